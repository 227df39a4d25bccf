"""`instructkit experiment grpo-report`: the report of one RL-with-verifiable-rewards experiment (GRPO run + the same
evaluation before and after it).

Inputs, all written by other commands:
- the GRPO run folder (recipes/grpo.py): ``metrics.jsonl`` (reward and each reward component, KL to the reference,
  response length, ended fraction per iteration), ``config.yaml``, ``data_stats.json``, ``summary.json``;
- two evaluation folders holding ``eval/<name>.json`` (eval/report.py's contract), one for the starting model and one
  for the trained one: ``ifeval`` (`instructkit evaluate run`, the four IFEval accuracies) or ``gsm8k``
  (`instructkit evaluate gsm8k`, accuracy on a fixed subset).

Outputs in ``--out``: ``curves.png`` (training curves, a moving average over iterations drawn over the raw values),
``eval.png`` (the evaluation's metrics before and after), ``results.json`` (every number of the report) and
``report.md`` (the command lines, data composition, configuration, machine, wall times, numbers, curves, sample
responses before and after). ``--notes`` is a markdown file whose text goes at the top of the report (what moved, what
did not): the numbers themselves are always generated from the files.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

CURVES = (  # (title, [(metrics.jsonl key, label)])
    ("reward (total and components)", [("reward", "total"), ("reward_constraints", "constraints"),
                                        ("reward_gsm8k", "gsm8k"), ("reward_ends_turn", "ends_turn")]),
    ("KL to the reference (k3) / approx. KL old-new", [("kl", "kl (k3, to reference)"), ("approx_kl", "approx_kl")]),
    ("response length (tokens)", [("response_length", "mean length")]),
    ("ended turn (fraction)", [("ended_fraction", "ended")]),
)
EVAL_KEYS = {
    "ifeval": ["prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"],
    "gsm8k": ["accuracy", "answered", "stop_rate"],
}


def register(sub) -> None:
    p = sub.add_parser("grpo-report", help="report of a GRPO run: curves, and an evaluation before vs after")
    p.add_argument("--run", required=True, help="the GRPO run folder (metrics.jsonl, config.yaml, summary.json)")
    p.add_argument("--before", required=True, help="folder holding eval/<eval>.json of the starting model")
    p.add_argument("--after", required=True, help="folder holding eval/<eval>.json of the trained model")
    p.add_argument("--eval", required=True, choices=sorted(EVAL_KEYS), help="which evaluation to compare")
    p.add_argument("--out", required=True, help="report folder (report.md, results.json, curves.png, eval.png)")
    p.add_argument("--title", default="GRPO experiment")
    p.add_argument("--notes", help="markdown file put at the top of the report (the reading of the numbers)")
    p.add_argument("--command", action="append", default=[], help="a command line of the experiment (repeatable)")
    p.add_argument("--wall", action="append", default=[], metavar="PHASE=SECONDS",
                   help="measured wall time of a phase, e.g. grpo=900 (repeatable)")
    p.add_argument("--data", action="append", default=[], metavar="TEXT",
                   help="a line describing the data composition (repeatable)")
    p.add_argument("--samples", type=int, default=4, help="sample responses shown before/after")
    p.set_defaults(func=cmd_grpo_report)


def cmd_grpo_report(args) -> int:
    try:
        walls = {}
        for w in args.wall:
            k, _, v = w.partition("=")
            walls[k.strip()] = float(v)
    except ValueError:
        print(f"error: --wall takes PHASE=SECONDS, got {args.wall}")
        return 2
    try:
        res = write_grpo_report(args.run, args.before, args.after, args.eval, args.out, title=args.title,
                                notes=args.notes, commands=args.command, walls=walls, data_lines=args.data,
                                n_samples=args.samples)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print(f"wrote {res['report']}")
    return 0


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows (one per logged iteration); a bad line is an error naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return [r for r in rows if "step" in r]


def read_eval(folder: str | Path, name: str) -> dict[str, Any]:
    path = Path(folder) / "eval" / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no {name} evaluation at {path} (run `instructkit evaluate` first)")
    return json.loads(path.read_text(encoding="utf-8"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start): out[i] = mean(values[max(0,i-w+1):i+1])."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def curve_summary(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """First/last quarter means of a logged quantity (None values skipped): the report's 'did it move' numbers."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not pts:
        return None
    q = max(1, len(pts) // 4)
    first = [v for _, v in pts[:q]]
    last = [v for _, v in pts[-q:]]
    return {"points": len(pts), "first_quarter_mean": sum(first) / len(first),
            "last_quarter_mean": sum(last) / len(last), "min": min(v for _, v in pts), "max": max(v for _, v in pts),
            "quarter": q}


def plot_curves(rows: list[dict[str, Any]], path: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, [(k, lab) for k, lab in series if any(isinstance(r.get(k), (int, float)) for r in rows)])
              for t, series in CURVES]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.2), squeeze=False)
    window = max(1, len(rows) // 8)
    for ax, (title, series) in zip(axes[0], panels):
        for k, lab in series:
            pts = [(r["step"], float(r[k])) for r in rows if isinstance(r.get(k), (int, float))]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            line, = ax.plot(xs, ys, alpha=0.3, lw=1)
            ax.plot(xs, moving_average(ys, window), color=line.get_color(), lw=2, label=lab)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [t for t, _ in panels]


def plot_eval(name: str, before: dict[str, float], after: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in EVAL_KEYS[name] if k in before and k in after]
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2, 3.2))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [before[k] for k in keys], 0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [after[k] for k in keys], 0.4, label="after")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([k.replace("_acc", "").replace("_", "\n") for k in keys], fontsize=7)
    ax.set_ylabel(name)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def per_instruction_table(before: dict, after: dict) -> dict[str, Any]:
    """IFEval strict accuracy per instruction type before and after, and pooled (instruction-weighted) over the types
    the constraint catalogue trains on (data/constraints.py) and over the others."""
    from instructkit.data.constraints import KINDS

    pb = (before.get("details") or {}).get("per_instruction") or {}
    pa = (after.get("details") or {}).get("per_instruction") or {}
    rows = [{"instruction": k, "n": pb[k]["n"], "before": pb[k]["strict_acc"], "after": pa[k]["strict_acc"],
             "in_training_catalogue": k in KINDS} for k in pb if k in pa]
    pooled = {}
    for label, flag in (("catalogue_types", True), ("other_types", False)):
        sel = [r for r in rows if r["in_training_catalogue"] == flag]
        n = sum(r["n"] for r in sel)
        if n:
            pooled[label] = {"types": len(sel), "instructions": n,
                             "before": sum(r["before"] * r["n"] for r in sel) / n,
                             "after": sum(r["after"] * r["n"] for r in sel) / n}
    return {"rows": rows, "pooled": pooled}


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _sample_pairs(name: str, before: dict, after: dict, n: int) -> list[dict[str, Any]]:
    """Samples for prompts both evaluations answered: first those whose verdict changed, then the rest, file order."""
    def verdict(s):  # gsm8k: correct; ifeval: every instruction of the prompt followed (strict)
        v = s.get("correct") if name == "gsm8k" else s.get("strict")
        return all(v) if isinstance(v, list) else v

    after_by = {s["prompt"]: s for s in after.get("samples", [])}
    pairs = [(b, after_by[b["prompt"]]) for b in before.get("samples", []) if b["prompt"] in after_by]
    changed = [p for p in pairs if verdict(p[0]) != verdict(p[1])]
    rest = [p for p in pairs if verdict(p[0]) == verdict(p[1])]
    return [{"prompt": b["prompt"], "before": b["response"], "after": a["response"],
             "before_verdict": verdict(b), "after_verdict": verdict(a)} for b, a in (changed + rest)[:n]]


def _clip(text: str, n: int = 700) -> str:
    text = text.strip()
    return text if len(text) <= n else text[:n] + " [...]"


def write_grpo_report(run: str | Path, before_dir: str | Path, after_dir: str | Path, name: str, out: str | Path, *,
                      title: str = "GRPO experiment", notes: str | None = None, commands: list[str] = (),
                      walls: dict[str, float] | None = None, data_lines: list[str] = (),
                      n_samples: int = 4) -> dict[str, str]:
    if name not in EVAL_KEYS:
        raise ValueError(f"unknown evaluation {name!r}; one of {', '.join(EVAL_KEYS)}")
    run, out = Path(run), Path(out)
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run} (is it a GRPO run folder?)")
    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path} has no logged iterations")
    before, after = read_eval(before_dir, name), read_eval(after_dir, name)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    data_stats = json.loads((run / "data_stats.json").read_text()) if (run / "data_stats.json").exists() else {}
    config = (run / "config.yaml").read_text(encoding="utf-8") if (run / "config.yaml").exists() else ""
    out.mkdir(parents=True, exist_ok=True)
    panels = plot_curves(rows, out / "curves.png")
    bm, am = before["metrics"], after["metrics"]
    plot_eval(name, bm, am, out / "eval.png")
    keys = [k for k in EVAL_KEYS[name] if k in bm and k in am]
    curves = {k: s for k in ("reward", "reward_constraints", "reward_gsm8k", "reward_ends_turn", "kl", "approx_kl",
                             "response_length", "ended_fraction", "groups_dropped", "rollout_tokens_per_s")
              if (s := curve_summary(rows, k)) is not None}
    samples = _sample_pairs(name, before, after, n_samples)
    per_inst = per_instruction_table(before, after) if name == "ifeval" else None
    results = {
        "title": title, "eval": name,
        "before": {k: bm[k] for k in bm if isinstance(bm[k], (int, float, str))},
        "after": {k: am[k] for k in am if isinstance(am[k], (int, float, str))},
        "delta": {k: am[k] - bm[k] for k in keys if isinstance(bm[k], (int, float))},
        "training": {"iterations": len(rows), "seconds": summary.get("seconds"), "curves": curves,
                     "prompts": summary.get("prompts"), "num_generations": summary.get("num_generations")},
        "wall_seconds": dict(walls or {}), "cpu": cpu_model(), "commands": list(commands),
        "data": list(data_lines), "data_stats": data_stats, "run": str(run),
        "before_model": before.get("model"), "after_model": after.get("model"),
    }
    if per_inst:
        results["per_instruction_strict"] = per_inst
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")

    md = [f"# {title}", ""]
    if notes:
        md += [Path(notes).read_text(encoding="utf-8").strip(), ""]
    md += [f"## {name} before and after", "",
           f"| metric | before ({before.get('model')}) | after ({after.get('model')}) | change |",
           "|---|---|---|---|"]
    md += [f"| {k} | {_fmt(bm[k])} | {_fmt(am[k])} | {am[k] - bm[k]:+.4f} |" for k in keys]
    extra = [k for k in bm if k not in keys and isinstance(bm[k], (int, float)) and k in am]
    md += [f"| {k} | {_fmt(bm[k])} | {_fmt(am[k])} | |" for k in extra]
    md += ["", "![before and after](eval.png)"]
    if per_inst and per_inst["rows"]:
        md += ["", "### Strict accuracy per instruction type", "",
               "Pooled over instructions; *catalogue* = the constraint types the training prompts carry "
               "(data/constraints.py), *other* = IFEval types never seen in training.", "",
               "| types | instructions | before | after | change |", "|---|---|---|---|---|"]
        md += [f"| {k} ({p['types']}) | {p['instructions']} | {p['before']:.4f} | {p['after']:.4f} | "
               f"{p['after'] - p['before']:+.4f} |" for k, p in per_inst["pooled"].items()]
        md += ["", "| instruction | in catalogue | n | before | after |", "|---|---|---|---|---|"]
        md += [f"| {r['instruction']} | {'yes' if r['in_training_catalogue'] else 'no'} | {r['n']} | "
               f"{r['before']:.3f} | {r['after']:.3f} |" for r in per_inst["rows"]]
    md += ["", "## Training curves", "",
           f"{len(rows)} iterations; {', '.join(panels)} (thin: per iteration; thick: trailing mean over "
           f"{max(1, len(rows) // 8)}).", "", "![curves](curves.png)", "",
           "| quantity | first-quarter mean | last-quarter mean | min | max |", "|---|---|---|---|---|"]
    md += [f"| {k} | {s['first_quarter_mean']:.4f} | {s['last_quarter_mean']:.4f} | {s['min']:.4f} | {s['max']:.4f} |"
           for k, s in curves.items()]
    md += ["", "## How it was run", ""]
    if commands:
        md += ["```", *commands, "```", ""]
    md += [f"- CPU: {results['cpu']}", f"- training wall time (recipe): {summary.get('seconds')} s"]
    md += [f"- wall time, {k}: {v:.0f} s ({v / 60:.1f} min)" for k, v in (walls or {}).items()]
    if data_lines or data_stats:
        md += ["", "### Data", ""] + [f"- {d}" for d in data_lines]
        if data_stats:
            md += [f"- prompts usable for training: {data_stats.get('prompts')} (skipped longer than "
                   f"data.max_length: {data_stats.get('skipped_too_long')})"]
    if config:
        md += ["", "### Configuration (the run's config.yaml)", "", "```yaml", config.strip(), "```"]
    if samples:
        md += ["", "## Sample responses (greedy), before and after", "",
               "Prompts whose verdict changed come first."]
        for s in samples:
            md += ["", f"**Prompt:** {_clip(s['prompt'], 400)}", "",
                   f"*Before* (verdict: {s['before_verdict']}):", "", "~~~~text", _clip(s["before"]), "~~~~", "",
                   f"*After* (verdict: {s['after_verdict']}):", "", "~~~~text", _clip(s["after"]), "~~~~"]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return {"report": str(out / "report.md"), "results": str(out / "results.json"), "curves": str(out / "curves.png")}
