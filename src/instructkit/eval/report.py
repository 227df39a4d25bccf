"""Evaluation results on disk, and one markdown report comparing runs side by side (base, SFT, PPO, DPO, ...).

Where things live (the contract other stages write to):
- **Evaluation results** are JSON files next to the model they describe: ``<model_dir>/eval/<name>.json`` with
  ``{"eval": name, "model": ..., "created": ISO time, "metrics": {metric: number}, "samples": [{"prompt",
  "response", ...}], "details": {...}}``. ``save_eval`` writes them atomically; a new run of the same evaluation replaces
  the file.
- **Training curves** are ``<run_dir>/metrics.jsonl`` (training/loop.py's MetricsLogger): one JSON object per logged
  step with ``step`` and numbers such as ``loss``, ``score``/``reward``, ``kl`` (``CURVE_KEYS`` lists what is plotted).

``instructkit report RUN_DIR [RUN_DIR ...] --out FILE.md`` gathers, for each RUN_DIR, its ``metrics.jsonl`` and every
``eval/*.json`` found in RUN_DIR or in its sub-folders (a run folder usually holds the trained model in a sub-folder),
and writes FILE.md plus PNG plots in ``FILE_files/``: a table of every metric (one column per run), training curves,
bars of the [0, 1] metrics, and sample responses side by side for prompts the runs share.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVAL_DIR = "eval"
METRICS_FILE = "metrics.jsonl"
CURVE_KEYS = ("loss", "eval_loss", "reward", "score", "reward_total", "kl", "kl_coef", "accuracy", "reward_margin",
              "response_length", "lr")
"""Training-curve quantities plotted, in this order, when some run logged them: SFT/DPO/RM ``loss`` (and held-out
``eval_loss``), PPO's reward-model ``score``, total ``reward_total``, ``kl`` to the reference and the adaptive
``kl_coef``, RM/DPO ``accuracy`` and ``reward_margin``, response length and learning rate."""


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_eval(model_dir: str | Path, name: str, metrics: dict[str, Any], *, samples: list[dict] | None = None,
              details: dict[str, Any] | None = None, model: str | None = None) -> Path:
    """Write ``<model_dir>/eval/<name>.json`` (atomically). ``metrics`` should hold numbers (and short strings)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad evaluation name {name!r}")
    doc = {
        "eval": name,
        "model": model if model is not None else str(model_dir),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics": metrics,
        "samples": samples or [],
        "details": details or {},
    }
    path = Path(model_dir) / EVAL_DIR / f"{name}.json"
    _atomic_write_text(path, json.dumps(doc, ensure_ascii=False, indent=1, default=str) + "\n")
    return path


@dataclass
class RunData:
    name: str
    path: Path
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    """eval name -> the saved document."""
    curve: list[dict[str, float]] = field(default_factory=list)
    """metrics.jsonl rows (numbers only)."""

    def metric_table(self) -> dict[str, float | str]:
        """Flat ``eval.metric`` -> value."""
        out: dict[str, float | str] = {}
        for ev, doc in sorted(self.evals.items()):
            for k, v in (doc.get("metrics") or {}).items():
                if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                    out[f"{ev}.{k}"] = v
        return out


def _read_curve(path: Path) -> list[dict[str, float]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write: the curve before it is still good
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
                rows.append({k: float(v) for k, v in row.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return rows


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """A run folder (or a model folder): its metrics.jsonl and every eval/*.json at most 3 levels below it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder not found: {path}")
    run = RunData(name=name or path.name, path=path)
    if (path / METRICS_FILE).exists():
        run.curve = _read_curve(path / METRICS_FILE)
    found = sorted((p for depth in range(4) for p in path.glob("/".join(["*"] * depth + [EVAL_DIR, "*.json"]))),
                   key=lambda p: (len(p.parts), str(p)))
    for p in found:  # shallower first: the run's own eval wins over a sub-folder's of the same name
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e.msg})") from None
        run.evals.setdefault(doc.get("eval") or p.stem, doc)
    return run


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: list[RunData], key: str, out: Path) -> Path | None:
    """One PNG of ``key`` against step, one line per run that logged it."""
    series = [(r.name, [(row["step"], row[key]) for row in r.curve if key in row]) for r in runs]
    series = [(n, pts) for n, pts in series if pts]
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, pts in series:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(key)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_metric_bars(runs: list[RunData], metrics: list[str], out: Path) -> Path | None:
    """Grouped bars of metrics in [0, 1] (accuracies, rates), one bar per run."""
    if not metrics:
        return None
    plt = _plt()
    tables = [r.metric_table() for r in runs]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(metrics) * max(1, len(runs)) / 2), 4), dpi=100)
    width = 0.8 / max(1, len(runs))
    for i, (run, table) in enumerate(zip(runs, tables)):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [float(table.get(m, float("nan"))) for m in metrics], width, label=run.name)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(metrics))])
    ax.set_xticklabels(metrics, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"
    return str(v)


def _cell(text: str, limit: int) -> str:
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


def shared_samples(runs: list[RunData], limit: int) -> list[tuple[str, list[str | None]]]:
    """Prompts answered in several runs, with each run's response (None where a run lacks it), first ``limit``."""
    per_run: list[dict[str, str]] = []
    for r in runs:
        d: dict[str, str] = {}
        for ev in sorted(r.evals):
            for s in r.evals[ev].get("samples") or []:
                if isinstance(s, dict) and isinstance(s.get("prompt"), str) and isinstance(s.get("response"), str):
                    d.setdefault(s["prompt"], s["response"])
        per_run.append(d)
    order: list[str] = []
    for d in per_run:
        order.extend(p for p in d if p not in order)
    min_runs = 2 if len(runs) > 1 else 1
    chosen = [p for p in order if sum(p in d for d in per_run) >= min_runs][:limit]
    return [(p, [d.get(p) for d in per_run]) for p in chosen]


def knowledge_kept(runs: list[RunData]) -> dict[str, dict[str, Any]]:
    """Item-level comparison of the knowledge eval against the first run (items matched by dataset, template and
    index): for every run, how many of the items the first run answers right it also answers right, and how many of
    the first run's wrong ones it answers right. Empty when the first run has no knowledge samples."""
    def items(run: RunData) -> dict[tuple, float]:
        doc = run.evals.get("knowledge") or {}
        return {(s.get("task"), s.get("template"), s.get("index")): float(s["score"])
                for s in doc.get("samples") or [] if isinstance(s, dict) and "score" in s}

    ref = items(runs[0]) if runs else {}
    if not ref:
        return {}
    out = {}
    for r in runs:
        mine = items(r)
        common = [k for k in ref if k in mine]
        if not common:
            continue
        right = [k for k in common if ref[k] == 1.0]
        wrong = [k for k in common if ref[k] != 1.0]
        kept = sum(mine[k] == 1.0 for k in right)
        gained = sum(mine[k] == 1.0 for k in wrong)
        out[r.name] = {"items": len(common), "accuracy": sum(mine[k] == 1.0 for k in common) / len(common),
                       "ref_right": len(right), "kept": kept, "kept_rate": kept / len(right) if right else None,
                       "ref_wrong": len(wrong), "gained": gained,
                       "gained_rate": gained / len(wrong) if wrong else None}
    return out


def write_report(run_dirs: list[str | Path], out: str | Path, *, names: list[str] | None = None,
                 samples: int = 5, title: str = "instructkit report") -> Path:
    """Write the markdown report and its PNGs; return the report path."""
    if names and len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} runs")
    runs = [load_run(d, names[i] if names else None) for i, d in enumerate(run_dirs)]
    out = Path(out)
    files = out.parent / f"{out.stem}_files"
    files.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"Generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}.", "", "| run | folder |",
             "|---|---|"]
    lines += [f"| {r.name} | `{r.path}` |" for r in runs]

    tables = [r.metric_table() for r in runs]
    keys = sorted({k for t in tables for k in t})
    lines += ["", "## Metrics", ""]
    if keys:
        lines += ["| metric | " + " | ".join(r.name for r in runs) + " |", "|---|" + "---|" * len(runs)]
        lines += [f"| {k} | " + " | ".join(_fmt(t.get(k)) for t in tables) + " |" for k in keys]
    else:
        lines.append("No evaluation results found (expected `<model>/eval/*.json`; run `instructkit evaluate ...`).")

    unit = [k for k in keys if all(isinstance(t.get(k), (int, float)) and 0 <= float(t[k]) <= 1 for t in tables
                                   if k in t)
            and not k.endswith(("loss", "perplexity"))]
    bars = plot_metric_bars(runs, unit, files / "metrics.png")
    if bars:
        lines += ["", f"![metrics in [0, 1]]({files.name}/{bars.name})"]

    curve_keys = [k for k in CURVE_KEYS if any(k in row for r in runs for row in r.curve)]
    lines += ["", "## Training curves", ""]
    plotted = [p for k in curve_keys if (p := plot_curves(runs, k, files / f"curve_{k}.png"))]
    lines += [f"![{p.stem[6:]}]({files.name}/{p.name})" for p in plotted] or ["No `metrics.jsonl` found."]
    lines.append("")
    for r in runs:
        # the last row that has a curve metric (a run's final line may hold only its evaluation results)
        logged = [row for row in r.curve if any(k in row for k in curve_keys)]
        if logged:
            last = logged[-1]
            lines.append(f"- {r.name}: {len(logged)} logged steps, last step {int(last['step'])}: "
                         + ", ".join(f"{k} {_fmt(last[k])}" for k in curve_keys if k in last))

    kept = knowledge_kept(runs)
    if kept:
        ref = runs[0].name
        lines += ["", "## Knowledge kept", "",
                  f"Per item of the knowledge eval, against the first run ({ref}): accuracy on the items {ref} "
                  f"answers right (kept) and on those it answers wrong (gained).", "",
                  f"| run | items | accuracy | right where {ref} is right | right where {ref} is wrong |",
                  "|---|---|---|---|---|"]
        for name, k in kept.items():
            lines.append(f"| {name} | {k['items']} | {_fmt(k['accuracy'])} | {k['kept']}/{k['ref_right']} "
                         f"({_fmt(k['kept_rate'])}) | {k['gained']}/{k['ref_wrong']} ({_fmt(k['gained_rate'])}) |")

    lines += ["", "## Sample responses", ""]
    shared = shared_samples(runs, samples)
    if shared:
        lines += ["| prompt | " + " | ".join(r.name for r in runs) + " |", "|---|" + "---|" * len(runs)]
        for prompt, responses in shared:
            lines.append(f"| {_cell(prompt, 200)} | "
                         + " | ".join("—" if x is None else _cell(x, 400) for x in responses) + " |")
    else:
        lines.append("No saved responses shared by the runs.")
    _atomic_write_text(out, "\n".join(lines) + "\n")
    return out
