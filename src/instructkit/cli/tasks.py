"""`instructkit tasks list | show TASK`: the FLAN-style task bank.

This module also defines two subcommands that live in other groups (registered there with one line each):
`instructkit data build-mixture CONFIG OUT` and `instructkit evaluate heldout --model PATH --clusters ...`.
"""

from __future__ import annotations

import argparse
import json
import sys


def _bank(args):
    from instructkit.tasks.mixture import default_bank

    return default_bank(getattr(args, "tasks_file", None) or [])


def _tasks_file_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks-file", action="append", default=[], metavar="YAML",
                   help="extra YAML task definitions (repeatable)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("tasks", help="the FLAN-style task bank: list tasks, show templates",
                                   description="Built-in instruction tasks (and YAML-defined ones), each with several "
                                               "templates, rendered zero-/few-shot with or without options.")
    sub = parser.add_subparsers(dest="tasks_command", metavar="ACTION")

    p = sub.add_parser("list", help="tasks with cluster, metric and template count")
    p.add_argument("--json", action="store_true", help="a JSON list of {name, cluster, templates, metric, ...}")
    p.add_argument("--cluster", action="append", default=[], help="only these clusters (repeatable)")
    _tasks_file_arg(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="render every template and variant of one example of a task")
    p.add_argument("task")
    p.add_argument("--index", type=int, default=0, help="which example (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=2, help="exemplars in the few-shot variants")
    p.add_argument("--json", action="store_true", help="print the rendered conversations as JSON")
    _tasks_file_arg(p)
    p.set_defaults(func=cmd_show)

    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def cmd_list(args) -> int:
    bank = _bank(args)
    tasks = list(bank.tasks.values())
    if args.cluster:
        try:
            tasks = bank.in_clusters(args.cluster)
        except KeyError as e:
            print(f"error: {e.args[0]}", file=sys.stderr)
            return 2
    rows = [{"name": t.name, "cluster": t.cluster, "templates": len(t.templates), "metric": t.metric,
             "options": list(t.options) if t.options else (None if not t.has_options else "per example"),
             "source": "fixed" if t.examples is not None else "generator"} for t in tasks]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'task':<28} {'cluster':<16} {'templates':>9}  {'metric':<12} source")
    for r in sorted(rows, key=lambda r: (r["cluster"], r["name"])):
        print(f"{r['name']:<28} {r['cluster']:<16} {r['templates']:>9}  {r['metric']:<12} {r['source']}")
    clusters = sorted({r["cluster"] for r in rows})
    print(f"\n{len(rows)} tasks in {len(clusters)} clusters, {sum(r['templates'] for r in rows)} templates")
    return 0


def cmd_show(args) -> int:
    from instructkit.tasks.bank import pick_exemplars, render_variants

    bank = _bank(args)
    try:
        task = bank.get(args.task)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    ex = task.example(args.index, args.seed)
    shots = pick_exemplars(task, ex, args.index, args.k, args.seed, "train")
    shown = render_variants(task, ex, shots)
    if args.json:
        print(json.dumps([{"variant": label, **conv.to_dict()} for label, conv in shown], indent=1,
                         ensure_ascii=False))
        return 0
    print(f"task {task.name}  cluster {task.cluster}  metric {task.metric}  {len(task.templates)} templates  "
          f"example {args.index} (seed {args.seed})\n")
    for label, conv in shown:
        print(f"=== {label} ===")
        for m in conv.messages:
            print(f"[{m.role}]\n{m.content}")
        print()
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# `instructkit data build-mixture CONFIG OUT`
# ---------------------------------------------------------------------------------------------------------------------
def add_build_mixture_parser(sub) -> None:
    p = sub.add_parser("build-mixture", help="render and mix task-bank tasks (configs/mixtures/*.yaml) into JSONL")
    p.add_argument("config", help="a task mixture YAML (see configs/mixtures/)")
    p.add_argument("output", help="internal JSONL to write")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. total=500 seed=1")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    p.set_defaults(func=cmd_build_mixture)


def load_task_mixture_config(path, overrides=None):
    from pathlib import Path

    from instructkit.config import load_config
    from instructkit.config import TaskMixtureConfig

    cfg = load_config(TaskMixtureConfig, path, overrides or [])
    base = Path(path).parent if path else Path(".")
    cfg.yaml_tasks = [str(p if Path(p).is_absolute() or Path(p).exists() else base / p) for p in cfg.yaml_tasks]
    return cfg


def cmd_build_mixture(args) -> int:
    from instructkit.config import ConfigError
    from instructkit.data.io import write_jsonl
    from instructkit.tasks.mixture import build_task_mixture, count_by

    cfg = load_task_mixture_config(args.config, args.overrides)
    try:
        mixture = build_task_mixture(cfg)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    n = write_jsonl(args.output, mixture.examples)
    by_template = count_by(mixture.examples, "task", "template")
    if args.json:
        print(json.dumps({"output": args.output, "total": n, **mixture.summary(),
                          "templates": {f"{t}/{tpl}": c for (t, tpl), c in by_template.items()}}))
        return 0
    print(f"{'task':<28} {'size':>6} {'rate':>7} {'count':>6}  per template")
    for task, s in mixture.summary()["sources"].items():
        per = ", ".join(f"{tpl}:{c}" for (t, tpl), c in by_template.items() if t == task)
        print(f"{task:<28} {s['size']:>6} {s['rate']:>7.4f} {s['count']:>6}  {per}")
    variants = count_by(mixture.examples, "variant", "options_shown")
    print("variants: " + ", ".join(f"{v}{' +options' if o else ''}: {c}" for (v, o), c in variants.items()))
    print(f"wrote {n} examples to {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# `instructkit evaluate heldout --model PATH --clusters ...`
# ---------------------------------------------------------------------------------------------------------------------
def add_heldout_parser(sub) -> None:
    p = sub.add_parser("heldout", help="zero-shot accuracy on held-out task clusters (rank classification, EM, "
                                       "ROUGE-L), spread across templates")
    p.add_argument("--model", required=True, help="model folder, zoo name, or LoRA adapter folder")
    p.add_argument("--template", default="auto", help="chat template: auto or a built-in name")
    p.add_argument("--clusters", default="", help="comma-separated held-out clusters")
    p.add_argument("--tasks", default="", help="comma-separated task names (in addition to the clusters)")
    p.add_argument("--examples-per-task", type=int, default=20)
    p.add_argument("--templates", default="all", help="all (default) or one template name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-options", action="store_true", help="do not show OPTIONS (still rank-classified)")
    p.add_argument("--match", default="exact", choices=("exact", "contains"),
                   help="exact_match tasks: strict exact match (FLAN) or target-contained-in-answer")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", default=None, help="folder for heldout.json and heldout.md (default <model>/eval)")
    p.add_argument("--train-data", default=None, metavar="JSONL",
                   help="training data to check the evaluation examples against (n-gram contamination)")
    p.add_argument("--ngram", type=int, default=8, help="n for the contamination check (8 or 13)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _tasks_file_arg(p)
    p.set_defaults(func=cmd_heldout)


def cmd_heldout(args) -> int:
    from pathlib import Path

    from instructkit.config import ConfigError
    from instructkit.eval.heldout import HeldoutConfig, eval_items, evaluate_heldout, load_for_eval, write_results

    bank = _bank(args)
    clusters = [c for c in args.clusters.split(",") if c]
    names = [t for t in args.tasks.split(",") if t]
    if not clusters and not names:
        raise ConfigError("give --clusters and/or --tasks")
    try:
        tasks = bank.resolve([f"cluster:{c}" for c in clusters] + names)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    cfg = HeldoutConfig(clusters=clusters, tasks=names, examples_per_task=args.examples_per_task,
                        templates=args.templates, seed=args.seed, with_options=not args.no_options,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, match=args.match)
    contamination = None
    if args.train_data:
        from instructkit.data.io import read_conversations
        from instructkit.eval.contamination import check_contamination

        train = read_conversations(args.train_data)
        contamination = check_contamination(train, [c for *_, c in eval_items(tasks, cfg)], n=args.ngram)
    model, tokenizer = load_for_eval(args.model, args.template)
    results = evaluate_heldout(model, tokenizer, tasks, cfg, template=args.template)
    results["config"] = vars(cfg)
    results["model"] = str(args.model)
    if contamination is not None:
        results["contamination"] = contamination.to_dict()
    if args.out:
        out = Path(args.out)
    else:  # next to the model, like the other evaluations (<model>/eval/)
        from instructkit.models.load import resolve_path

        out = resolve_path(args.model) / "eval"
    j, m = write_results(results, out, title=f"Held-out evaluation of {args.model}")
    if args.json:
        print(json.dumps({k: v for k, v in results.items() if k not in ("records", "templates")}))
    else:
        print(m.read_text(encoding="utf-8"))
        if contamination is not None:
            c = contamination
            print(f"contamination ({c.n}-grams): {c.contaminated} of {c.checked} checked examples overlap the "
                  f"training data")
    print(f"saved {j} and {m}", file=sys.stderr)
    return 1 if contamination is not None and not contamination.clean else 0
