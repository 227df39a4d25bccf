"""`instructkit experiment <name> --config FILE [key.sub=value ...]`: multi-run experiments.

flan-scaling (FLAN, Wei et al. 2021, figure 6): does instruction tuning on more task clusters help on clusters never
seen in training? Phases, in order:
  1. config: hold out `heldout_clusters`; order the remaining clusters (given, or a seeded shuffle);
  2. base: evaluate the untuned base zero-shot on the held-out tasks (x = 0 clusters);
  3. for each k in `cluster_counts` (0 = all remaining): render and mix the first k clusters' tasks (same total size
     for every k), check the mixture for n-gram contamination against the held-out examples, LoRA-SFT the base on it
     with recipes/sft.py, evaluate the adapter on the held-out tasks;
  4. report: results.json, report.md (a table per run and per held-out cluster, with the template spread) and
     curve.png (held-out score against the number of training clusters).
Each finished run writes its evaluation, so a rerun skips runs that are already done (resume at run granularity; SFT
itself resumes from its own checkpoints).

With `t0.path` set (configs/flan_scaling_t0.yaml) the tasks are REAL: T0's per-template training data (eval/t0.py).
Clusters are T0's 8; every run trains on `t0.total` examples (an equal share per dataset of its clusters), repeated for
each of `t0.seeds`; a second arm trains on all remaining clusters with one template per dataset against all templates
at the same number of examples; held-out scores are rank classification over the observed label set (sentiment,
topic, paraphrase, yes/no and lettered templates), ROUGE-L (summarization, structure-to-text) or exact match. A
training mixture that shares a `contamination_ngram`-gram with a held-out example FAILS the run (DataError) before any
training. Report: results.json, report.md, curve.png (mean over seeds, error bars = seed spread, band = template
spread).

lima (LIMA, Zhou et al. 2023): curated vs random vs the whole pool at equal compute; cli/lima.py.

instructgpt (InstructGPT, Ouyang et al. 2022): SFT -> reward model -> PPO, then an SFT-vs-PPO report; the pipeline is
recipes/instructgpt.py.

grpo-report (RL with verifiable rewards: GRPO on IFEval-style constraints or GSM8K): training curves and an evaluation
before vs after; cli/grpo_report.py.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("experiment", help="multi-run experiments: flan-scaling, lima, curate, instructgpt, grpo-report")
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    p = sub.add_parser("flan-scaling", help="held-out cluster score vs number of instruction-tuning clusters")
    p.add_argument("--config", default=None, help="YAML config (configs/flan_scaling.yaml, configs/tiny_flan_scaling.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_flan_scaling)
    p = sub.add_parser("lima", help="quality vs quantity at equal compute: curated vs random vs the whole pool")
    p.add_argument("--config", default="configs/lima.yaml", help="YAML config (configs/lima.yaml, configs/tiny_lima.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_lima)
    p = sub.add_parser("curate", help="the LIMA curation alone: decontaminated, curated SFT data (assistant recipe)")
    p.add_argument("--config", default="configs/mixtures/assistant_gemma.yaml",
                   help="YAML config with lima's pool and curation keys (configs/mixtures/assistant_gemma.yaml)")
    p.add_argument("--out", required=True, help="messages JSONL to write (plus <out>.report.json)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_curate)
    p = sub.add_parser("instructgpt", help="SFT -> reward model -> PPO, then an SFT-vs-PPO report")
    p.add_argument("--config", default="configs/instructgpt.yaml",
                   help="YAML config (configs/instructgpt.yaml, configs/tiny_instructgpt.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_instructgpt)
    from instructkit.cli.grpo_report import register as register_grpo_report  # RLVR experiment reports

    register_grpo_report(sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def cmd_flan_scaling(args) -> int:
    from instructkit.config import FlanScalingConfig, load_config

    cfg = load_config(FlanScalingConfig, args.config, args.overrides)
    result = run_flan_scaling(cfg)
    print(Path(result["report"]).read_text(encoding="utf-8"))
    print(f"saved {result['report']}, {result['curve']} and {result['results']}", file=sys.stderr)
    return 0


def cmd_lima(args) -> int:
    from instructkit.cli.lima import run_lima
    from instructkit.config import LimaConfig, load_config

    result = run_lima(load_config(LimaConfig, args.config, args.overrides))
    print(Path(result["report"]).read_text(encoding="utf-8"))
    print(f"saved {result['report']}, {result['plot']} and {result['results']}", file=sys.stderr)
    return 0


def cmd_curate(args) -> int:
    from instructkit.cli.lima import build_curated
    from instructkit.config import LimaConfig, load_config

    rep = build_curated(load_config(LimaConfig, args.config, args.overrides), args.out)
    print(json.dumps({k: rep[k] for k in ("out", "examples", "sources", "pool", "decontaminated", "eval_sets")},
                     indent=1))
    return 0


def cmd_instructgpt(args) -> int:
    from instructkit.recipes.instructgpt import load_instructgpt_config, main

    result = main(load_instructgpt_config(args.config, args.overrides))
    print(Path(result["report"]).read_text(encoding="utf-8"))
    print(f"saved {result['report']} and {result['results']}", file=sys.stderr)
    return 0


def cluster_plan(cfg, clusters: list[str]) -> list[tuple[int, list[str]]]:
    """[(k, the k training clusters)] for each requested count; 0 (and counts above the total) mean all."""
    from instructkit.config import ConfigError

    held = set(cfg.heldout_clusters)
    remaining = [c for c in clusters if c not in held]
    if cfg.cluster_order:
        unknown = [c for c in cfg.cluster_order if c not in remaining]
        if unknown:
            raise ConfigError(f"cluster_order names unknown or held-out clusters {unknown}; available: {remaining}")
        order = list(cfg.cluster_order) + [c for c in remaining if c not in cfg.cluster_order]
    else:
        order = sorted(remaining)
        random.Random(f"flan-scaling/{cfg.data.seed}").shuffle(order)
    plan: list[tuple[int, list[str]]] = []
    for k in cfg.cluster_counts:
        k = len(order) if k == 0 or k > len(order) else k
        if k not in [p[0] for p in plan]:
            plan.append((k, order[:k]))
    return sorted(plan)


def run_flan_scaling(cfg) -> dict:
    if cfg.t0.path:
        return run_flan_scaling_t0(cfg)
    return run_flan_scaling_bank(cfg)


def run_flan_scaling_bank(cfg) -> dict:
    import dataclasses

    import torch

    from instructkit.config import ConfigError, DataSource, SFTConfig, save_config
    from instructkit.data.io import write_jsonl
    from instructkit.eval.contamination import check_contamination
    from instructkit.eval.heldout import HeldoutConfig, eval_items, evaluate_heldout, load_for_eval, write_results
    from instructkit.recipes import sft
    from instructkit.config import TaskMixtureEntry
    from instructkit.tasks.mixture import build_task_mixture, count_by, default_bank

    out = Path(cfg.train.output_dir) / cfg.train.run_name
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)

    # -- 1. config: clusters, base model -------------------------------------------------------------------------------
    bank = default_bank([str(p) for p in cfg.mixture.yaml_tasks])
    try:
        heldout_tasks = bank.in_clusters(cfg.heldout_clusters)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    plan = cluster_plan(cfg, bank.clusters())
    base_path = cfg.model.path
    if base_path.startswith("tiny:"):
        from instructkit.models.tiny import create_tiny

        base_dir = out / "base_model"
        if not (base_dir / "config.json").exists():
            create_tiny(base_dir, seed=cfg.train.seed)
        base_path = str(base_dir.resolve())
    hcfg = HeldoutConfig(clusters=list(cfg.heldout_clusters), examples_per_task=cfg.eval_examples_per_task,
                         templates=cfg.eval_templates, seed=cfg.eval_seed, max_new_tokens=cfg.eval_max_new_tokens,
                         batch_size=cfg.eval_batch_size, match=cfg.eval_match)
    eval_prompts = [c for *_, c in eval_items(heldout_tasks, hcfg)]

    def evaluate(path: str, run_dir: Path, title: str) -> dict:
        done = run_dir / "eval" / "heldout.json"
        if done.exists():
            return json.loads(done.read_text(encoding="utf-8"))
        model, tokenizer = load_for_eval(path, cfg.model.template)
        res = evaluate_heldout(model, tokenizer, heldout_tasks, hcfg, template=cfg.model.template)
        write_results(res, run_dir / "eval", title)
        return res

    # -- 2. the untuned base ---------------------------------------------------------------------------------------------
    runs = [{"clusters": 0, "train_clusters": [], "eval": evaluate(base_path, out / "base", "base model")}]

    # -- 3. one LoRA SFT run per cluster count -----------------------------------------------------------------------------
    for k, clusters in plan:
        run_dir = out / f"clusters_{k}"
        run_dir.mkdir(parents=True, exist_ok=True)
        mix_cfg = dataclasses.replace(cfg.mixture, tasks=[TaskMixtureEntry(f"cluster:{c}") for c in clusters],
                                      exclude_clusters=list(cfg.heldout_clusters))
        mixture = build_task_mixture(mix_cfg, bank)
        data_path = run_dir / "train.jsonl"
        write_jsonl(data_path, mixture.examples)
        contamination = check_contamination(mixture.examples, eval_prompts, n=cfg.contamination_ngram)
        (run_dir / "mixture.json").write_text(json.dumps({
            **mixture.summary(), "clusters": clusters,
            "templates": {f"{t}/{tpl}": c for (t, tpl), c in count_by(mixture.examples, "task", "template").items()},
            "contamination": contamination.to_dict()}, indent=1), encoding="utf-8")
        sft_cfg = SFTConfig(
            model=dataclasses.replace(cfg.model, path=base_path), lora=cfg.lora,
            data=dataclasses.replace(cfg.data, sources=[DataSource(path=str(data_path), format="messages")]),
            train=dataclasses.replace(cfg.train, output_dir=str(out), run_name=f"clusters_{k}"))
        summary = sft.main(sft_cfg)
        res = evaluate(summary["final"], run_dir, f"LoRA SFT on {k} clusters")
        runs.append({"clusters": k, "train_clusters": clusters, "tasks": len(mixture.counts),
                     "examples": len(mixture.examples), "first_loss": summary.get("first_loss"),
                     "last_loss": summary.get("last_loss"), "contamination": contamination.to_dict(max_overlaps=5),
                     "eval": res})

    # -- 4. report -------------------------------------------------------------------------------------------------------
    results = {"heldout_clusters": list(cfg.heldout_clusters), "base_model": base_path,
               "runs": [{**r, "eval": {k: v for k, v in r["eval"].items() if k != "records"}} for r in runs]}
    results_path = out / "results.json"
    results_path.write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    curve = out / "curve.png"
    plot_curve(results, curve)
    report = out / "report.md"
    report.write_text(report_markdown(results, cfg), encoding="utf-8")
    return {"results": str(results_path), "report": str(report), "curve": str(curve), "runs": runs}


def report_markdown(results: dict, cfg) -> str:
    held = results["heldout_clusters"]
    lines = [f"# FLAN cluster scaling: held-out {', '.join(held)}", "",
             f"Base model: `{cfg.model.path}`; LoRA r={cfg.lora.r}; {cfg.mixture.total} training examples per run; "
             f"{cfg.eval_examples_per_task} held-out examples per task x templates ({cfg.eval_templates}).", "",
             "![held-out score vs training clusters](curve.png)", "",
             "| training clusters | tasks | held-out score | " + " | ".join(held) +
             " | template spread (mean std) | contaminated | first loss | last loss |",
             "|---|---|---|" + "---|" * len(held) + "---|---|---|---|"]
    for r in results["runs"]:
        ev = r["eval"]
        per = " | ".join(f"{ev['clusters'][c]['mean']:.3f}" for c in held)
        stds = [t["std"] for t in ev["tasks"].values()]
        spread = sum(stds) / len(stds) if stds else 0.0
        cont = r.get("contamination", {}).get("contaminated", "-")
        fl = f"{r['first_loss']:.3f}" if r.get("first_loss") is not None else "-"
        ll = f"{r['last_loss']:.3f}" if r.get("last_loss") is not None else "-"
        name = "0 (base)" if r["clusters"] == 0 else f"{r['clusters']}: {', '.join(r['train_clusters'])}"
        lines.append(f"| {name} | {r.get('tasks', '-')} | {ev['overall']:.3f} | {per} | {spread:.3f} | {cont} | "
                     f"{fl} | {ll} |")
    lines += ["", "Per held-out task (mean over templates; min-max across templates):", "",
              "| training clusters | " + " | ".join(sorted(results['runs'][0]['eval']['tasks'])) + " |",
              "|---|" + "---|" * len(results["runs"][0]["eval"]["tasks"])]
    for r in results["runs"]:
        tasks = r["eval"]["tasks"]
        lines.append(f"| {r['clusters']} | " + " | ".join(
            f"{tasks[t]['mean']:.3f} ({tasks[t]['min']:.2f}-{tasks[t]['max']:.2f})" for t in sorted(tasks)) + " |")
    return "\n".join(lines) + "\n"


def plot_curve(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    xs = [r["clusters"] for r in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["eval"]["overall"] for r in runs], "o-", lw=2, label="held-out mean")
    for c in results["heldout_clusters"]:
        ax.plot(xs, [r["eval"]["clusters"][c]["mean"] for r in runs], "s--", alpha=0.7, label=c)
    ax.set_xlabel("instruction-tuning clusters (0 = untuned base)")
    ax.set_ylabel("zero-shot held-out score")
    ax.set_xticks(xs)
    ax.set_ylim(0, 1)  # scores are accuracies / EM / ROUGE-L in [0, 1]: a fixed scale, no exaggerated wiggles
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# flan-scaling on T0 (real tasks)
# ---------------------------------------------------------------------------------------------------------------------
def prepare_base(cfg, out: Path) -> str:
    """The base model path; "tiny:" builds a tiny random Llama into <out>/base_model once."""
    if cfg.model.path.startswith("tiny:"):
        from instructkit.models.tiny import create_tiny

        base_dir = out / "base_model"
        if not (base_dir / "config.json").exists():
            create_tiny(base_dir, seed=cfg.train.seed)
        return str(base_dir.resolve())
    return cfg.model.path


def run_flan_scaling_t0(cfg) -> dict:
    import dataclasses

    import torch

    from instructkit.config import ConfigError, DataSource, SFTConfig, save_config
    from instructkit.data.io import write_jsonl
    from instructkit.eval.contamination import require_clean
    from instructkit.eval.heldout import load_for_eval, write_results
    from instructkit.eval.t0 import evaluate_t0, heldout_items, load_t0, to_conversation, training_mixture
    from instructkit.recipes import sft

    root = Path(cfg.train.output_dir) / cfg.train.run_name
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    data = load_t0(cfg.t0.path)
    unknown = [c for c in cfg.heldout_clusters if c not in data.clusters()]
    if unknown:
        raise ConfigError(f"heldout_clusters {unknown} are not T0 clusters; available: {data.clusters()}")
    options = data.options(cfg.t0.max_options)
    base_path = prepare_base(cfg, root)
    groups = [[c] for c in cfg.heldout_clusters] if cfg.t0.heldout_in_turn else [list(cfg.heldout_clusters)]

    experiments = []
    for group in groups:
        out = root / ("heldout_" + "+".join(group)) if cfg.t0.heldout_in_turn else root
        out.mkdir(parents=True, exist_ok=True)
        gcfg = dataclasses.replace(cfg, heldout_clusters=group)
        plan = cluster_plan(gcfg, data.clusters())
        all_remaining = cluster_plan(dataclasses.replace(gcfg, cluster_counts=[cfg.t0.template_arm_clusters]),
                                     data.clusters())[0]
        items = heldout_items(data, group, cfg.t0.eval_examples_per_dataset, cfg.t0.eval_templates)
        eval_convs = [to_conversation(r) for r in items]

        def evaluate(path: str, run_dir: Path, title: str) -> dict:
            done = run_dir / "eval" / "heldout.json"
            if done.exists():
                return json.loads(done.read_text(encoding="utf-8"))
            model, tokenizer = load_for_eval(path, cfg.model.template)
            res = evaluate_t0(model, tokenizer, items, options, template=cfg.model.template,
                              max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size,
                              match=cfg.eval_match, rouge_clusters=cfg.t0.rouge_clusters)
            write_results(res, run_dir / "eval", title)
            return res

        jobs = [("clusters", k, cs, 0) for k, cs in plan]
        if cfg.t0.template_arm:
            k_all, cs_all = all_remaining
            if k_all not in [k for k, _ in plan]:
                jobs.append(("clusters", k_all, cs_all, 0))
            jobs.append(("templates", k_all, cs_all, 1))
        # every mixture is drawn and checked BEFORE anything is evaluated or trained: an overlap fails the run early
        mixtures = {}
        for seed in cfg.t0.seeds:
            for arm, k, clusters, tpd in jobs:
                name = f"clusters_{k}" + ("_1tpl" if tpd else "") + f"_seed{seed}"
                mixture = training_mixture(data, clusters, cfg.t0.total, seed, templates_per_dataset=tpd)
                convs = [to_conversation(r, max_prompt_chars=cfg.t0.max_prompt_chars) for r in mixture]
                mixtures[name] = (arm, k, clusters, tpd, seed, mixture, convs,
                                  require_clean(convs, eval_convs, cfg.contamination_ngram, f"{out.name}/{name}"))

        runs = [{"arm": "base", "clusters": 0, "train_clusters": [], "templates": "-", "seed": None,
                 "eval": evaluate(base_path, out / "base", "base model (zero-shot)")}]
        for name, (arm, k, clusters, tpd, seed, mixture, convs, contamination) in mixtures.items():
            run_dir = out / name
            run_dir.mkdir(parents=True, exist_ok=True)
            data_path = run_dir / "train.jsonl"
            write_jsonl(data_path, convs)
            counts: dict[str, int] = {}
            for r in mixture:
                counts[f"{r.dataset}/{r.template}"] = counts.get(f"{r.dataset}/{r.template}", 0) + 1
            (run_dir / "mixture.json").write_text(json.dumps({
                "clusters": clusters, "examples": len(mixture), "templates_per_dataset": tpd or "all",
                "shortened_prompts": sum(len(r.prompt.strip()) > cfg.t0.max_prompt_chars > 0 for r in mixture),
                "datasets": sorted({r.dataset for r in mixture}), "counts": counts,
                "contamination": contamination}, indent=1), encoding="utf-8")
            sft_cfg = SFTConfig(
                model=dataclasses.replace(cfg.model, path=base_path), lora=cfg.lora,
                data=dataclasses.replace(cfg.data, sources=[DataSource(path=str(data_path), format="messages")],
                                         seed=seed),
                train=dataclasses.replace(cfg.train, output_dir=str(out), run_name=name, seed=seed))
            summary = sft.main(sft_cfg)
            title = f"LoRA SFT on {k} clusters, {'1 template' if tpd else 'all templates'}, seed {seed}"
            runs.append({"arm": arm, "clusters": k, "train_clusters": clusters, "templates": 1 if tpd else "all",
                         "seed": seed, "examples": len(mixture), "datasets": len({r.dataset for r in mixture}),
                         "trained_examples": summary.get("train_examples"),
                         "steps": summary.get("steps"), "first_loss": summary.get("first_loss"),
                         "last_loss": summary.get("last_loss"), "contamination": contamination,
                         "eval": evaluate(summary["final"], run_dir, title)})
        experiments.append(_t0_group_results(group, runs, data, items, options))
        _write_t0_outputs(experiments[-1], cfg, out)
    if cfg.t0.heldout_in_turn:
        results = {"source": cfg.t0.path, "in_turn": True, "experiments": experiments}
        (root / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
        (root / "report.md").write_text("\n".join(
            f"- held out {', '.join(e['heldout_clusters'])}: [report](heldout_{'+'.join(e['heldout_clusters'])}/"
            f"report.md)" for e in experiments) + "\n", encoding="utf-8")
        return {"results": str(root / "results.json"), "report": str(root / "report.md"),
                "curve": str(root / f"heldout_{'+'.join(groups[0])}" / "curve.png"), "experiments": experiments}
    return {"results": str(root / "results.json"), "report": str(root / "report.md"),
            "curve": str(root / "curve.png"), "experiments": experiments, "runs": experiments[0]["runs"]}


def _t0_group_results(group, runs, data, items, options) -> dict:
    import statistics

    def spread(ev):  # mean over held-out datasets of the std across their templates
        stds = [t["std"] for t in ev["tasks"].values()]
        return sum(stds) / len(stds) if stds else 0.0

    points: dict[tuple, list] = {}
    for r in runs:
        points.setdefault((r["arm"], r["clusters"], r["templates"]), []).append(r)
    summary = []
    for (arm, k, tpl), rs in sorted(points.items(), key=lambda kv: (kv[0][0] != "base", kv[0][0], kv[0][1])):
        scores = [r["eval"]["overall"] for r in rs]
        summary.append({"arm": arm, "clusters": k, "templates": tpl, "runs": len(rs),
                        "mean": statistics.fmean(scores), "seed_std": statistics.pstdev(scores) if len(rs) > 1 else 0.0,
                        "template_spread": statistics.fmean(spread(r["eval"]) for r in rs),
                        "per_cluster": {c: statistics.fmean(r["eval"]["clusters"][c]["mean"] for r in rs)
                                        for c in group}})
    by_metric: dict[str, int] = {}
    for r in items:
        m = "rank" if (r.dataset, r.template) in options else "generative"
        by_metric[m] = by_metric.get(m, 0) + 1
    return {"heldout_clusters": group, "source": data.path, "heldout_items": len(items), "scoring": by_metric,
            "skipped_empty_targets": data.empty, "summary": summary,
            "runs": [{**r, "eval": {k: v for k, v in r["eval"].items() if k != "records"}} for r in runs]}


def _write_t0_outputs(results: dict, cfg, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    plot_t0_curve(results, out / "curve.png")
    held = results["heldout_clusters"]
    lines = [f"# FLAN scaling on real tasks (T0): held out {', '.join(held)}", "",
             f"Base model: `{cfg.model.path}`; LoRA r={cfg.lora.r}; {cfg.t0.total} training examples per run (an "
             f"equal share per dataset); seeds {cfg.t0.seeds}; source `{results['source']}`.",
             f"Held-out items: {results['heldout_items']} ({cfg.t0.eval_examples_per_dataset} per dataset x "
             f"template, templates: {cfg.t0.eval_templates}); scored by rank classification: "
             f"{results['scoring'].get('rank', 0)}, generative (exact match / ROUGE-L): "
             f"{results['scoring'].get('generative', 0)}. Option sets are the answers observed in the file per "
             "template (eval/t0.py), so a slice missing a class ranks fewer options than its prompt lists.",
             f"Records skipped for an empty target: {sum(results['skipped_empty_targets'].values())} "
             f"({', '.join(sorted({k.split('/')[0] for k in results['skipped_empty_targets']})) or 'none'}).",
             "Every training mixture passed the contamination check against the held-out items "
             f"({cfg.contamination_ngram}-grams); an overlap fails the run.", "",
             "![held-out score vs training clusters](curve.png)", "",
             "| arm | training clusters | templates per dataset | runs (seeds) | held-out score (mean) | seed std | "
             "template spread | " + " | ".join(held) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(held)]
    for s in results["summary"]:
        lines.append(f"| {s['arm']} | {s['clusters']} | {s['templates']} | {s['runs']} | {s['mean']:.3f} | "
                     f"{s['seed_std']:.3f} | {s['template_spread']:.3f} | "
                     + " | ".join(f"{s['per_cluster'][c]:.3f}" for c in held) + " |")
    lines += ["", "Every run (examples: drawn / kept by SFT after max_length):", "",
              "| run | clusters | examples | steps | first loss | last loss | held-out score |",
              "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        name = "base" if r["arm"] == "base" else f"{r['arm']} k={r['clusters']} tpl={r['templates']} seed={r['seed']}"
        fl = f"{r['first_loss']:.3f}" if r.get("first_loss") is not None else "-"
        ll = f"{r['last_loss']:.3f}" if r.get("last_loss") is not None else "-"
        ex = f"{r['examples']} / {r['trained_examples']}" if r["arm"] != "base" else "-"
        lines.append(f"| {name} | {', '.join(r['train_clusters']) or '-'} | {ex} | {r.get('steps', '-')} | {fl} | {ll} | "
                     f"{r['eval']['overall']:.3f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_t0_curve(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = results["summary"]
    curve = [s for s in summ if s["arm"] in ("base", "clusters")]
    xs = [s["clusters"] for s in curve]
    ys = [s["mean"] for s in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(xs, ys, yerr=[s["seed_std"] for s in curve], fmt="o-", lw=2, capsize=3,
                label="all templates (error bar: seed std)")
    ax.fill_between(xs, [y - s["template_spread"] for y, s in zip(ys, curve)],
                    [y + s["template_spread"] for y, s in zip(ys, curve)], alpha=0.15, label="template spread")
    for s in summ:
        if s["arm"] == "templates":
            ax.errorbar([s["clusters"]], [s["mean"]], yerr=[s["seed_std"]], fmt="D", capsize=3, color="C3",
                        label="1 template per dataset")
    ax.set_xlabel("training clusters (0 = untuned base)")
    ax.set_ylabel("zero-shot held-out score")
    ax.set_xticks(sorted(set(xs)))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("held out: " + ", ".join(results["heldout_clusters"]))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
