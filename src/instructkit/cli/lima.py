"""`instructkit experiment lima`: quality against quantity at equal training compute (LIMA, Zhou et al. 2023).

Phases, in order:
  1. pool: every source (T0 per-template data, Alpaca, built-in conversations), each example tagged with its stratum
     (``meta.source``: "t0/<cluster>", "alpaca", "builtin"); the last ``heldout_alpaca`` Alpaca records and
     ``heldout_data`` form the held-out-loss set and never enter the pool;
  2. decontamination: pool examples sharing a ``contamination_ngram``-gram with any evaluation text (IFEval prompts,
     stop-rate prompts, held-out conversations) are removed and counted (``decontaminate_pool``);
  3. arms, per seed: "curated" = data/curation.py (quality filters, dedup, stratified farthest-point diversity
     selection) to ``n_examples``; "random" = ``n_examples`` uniformly from the same (decontaminated) pool; "pool" =
     the whole pool. Each arm's training set then passes the contamination GATE: any overlap with an evaluation text
     raises DataError before any training;
  4. training: the SFT recipe, every arm with the same ``train.max_steps`` and the same packed rows x pack_length per
     step (the equal compute; small arms repeat epochs, the pool arm sees each example at most once);
  5. evaluation: recipes/evaluate.py on the base and on every arm (LoRA adapters merged first): IFEval subset, held-out
     loss, stop rate -- the same code and settings for every arm;
  6. report: results.json, report.md (every arm with its compute: steps, tokens, tokens per step) and arms.png.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from pathlib import Path

EVALS = ("ifeval", "perplexity", "stop_rate")
METRICS = (("ifeval", "prompt_level_strict_acc"), ("ifeval", "inst_level_strict_acc"),
           ("ifeval", "prompt_level_loose_acc"), ("ifeval", "inst_level_loose_acc"),
           ("perplexity", "heldout_loss"), ("stop_rate", "stop_rate"), ("stop_rate", "mean_response_tokens"))


def _tag(convs, source: str):
    from instructkit.data.schema import Conversation

    return [Conversation(c.messages, {**c.meta, "source": source}, c.tools) for c in convs]


def read_pool(cfg) -> tuple[list, list, dict]:
    """(pool, held-out conversations, counts per source)."""
    from instructkit.data.builtin import load_builtin
    from instructkit.data.io import read_conversations
    from instructkit.eval.t0 import load_t0, to_conversation

    rng = random.Random(f"lima-pool/{cfg.data.seed}")

    def cap(items):
        if cfg.max_per_source and len(items) > cfg.max_per_source:
            keep = sorted(rng.sample(range(len(items)), cfg.max_per_source))
            return [items[i] for i in keep]
        return items

    def read(path):
        return load_builtin(path) if str(path).startswith("builtin:") else read_conversations(path)

    pool, counts = [], {}
    if cfg.t0_path:
        t0 = cap(load_t0(cfg.t0_path).records)
        for r in t0:
            c = to_conversation(r, max_prompt_chars=cfg.t0_max_prompt_chars)
            pool.append(dataclasses.replace(c, meta={**c.meta, "source": f"t0/{r.cluster}" if cfg.t0_strata == "cluster"
                                                                 else "t0"}))
        counts["t0"] = len(t0)
    heldout = list(read(cfg.heldout_data)) if cfg.heldout_data else []
    if cfg.alpaca_path:
        alpaca = read(cfg.alpaca_path)
        if cfg.heldout_alpaca:
            alpaca, held = alpaca[:-cfg.heldout_alpaca], alpaca[-cfg.heldout_alpaca:]
            heldout += held
        alpaca = cap(alpaca)
        pool += _tag(alpaca, "alpaca")
        counts["alpaca"] = len(alpaca)
    for src in cfg.builtin_sources:
        convs = cap(read(src))
        pool += _tag(convs, "builtin")
        counts[src] = len(convs)
    return pool, heldout, counts


def eval_conversations(cfg, heldout) -> list:
    """Every evaluation text as a Conversation for eval/contamination.py (prompt in meta.inputs, reference as target)."""
    from instructkit.data.schema import Conversation, Message
    from instructkit.eval.metrics import load_builtin_prompts

    out = []
    if cfg.ifeval_prompts:
        with open(cfg.ifeval_prompts, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    p = json.loads(line)["prompt"]
                    out.append(Conversation([Message("user", p)], {"task": "ifeval", "inputs": {"prompt": p}}))
    for r in load_builtin_prompts("benign"):
        out.append(Conversation([Message("user", r["prompt"])], {"task": "stop_rate", "inputs": {"prompt": r["prompt"]}}))
    for c in heldout:
        users = [m.content for m in c.messages if m.role == "user"]
        answers = [m.content for m in c.messages if m.role == "assistant"]
        out.append(Conversation(c.messages, {"task": "heldout", "inputs": {"prompt": "\n".join(users)},
                                             "target": answers[-1] if answers else ""}))
    return out


def decontaminate(pool, eval_convs, n: int) -> tuple[list, int]:
    """The pool without every example the contamination gate (eval/contamination.require_clean) would flag."""
    from instructkit.eval.contamination import contaminating

    bad = set(contaminating(pool, eval_convs, n))
    return [c for i, c in enumerate(pool) if i not in bad], len(bad)


def run_lima(cfg) -> dict:
    import torch

    from instructkit.eval.contamination import require_clean
    from instructkit.config import DataSource, EvaluateConfig, SFTConfig, save_config
    from instructkit.data.curation import CurationConfig, curate
    from instructkit.data.io import write_jsonl
    from instructkit.recipes import evaluate, sft

    root = Path(cfg.train.output_dir) / cfg.train.run_name
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    base_path = cfg.model.path
    if base_path.startswith("tiny:"):
        from instructkit.models.tiny import create_tiny

        if not (root / "base_model" / "config.json").exists():
            create_tiny(root / "base_model", seed=cfg.train.seed)
        base_path = str((root / "base_model").resolve())

    # -- 1-2. pool, held-out set, decontamination ------------------------------------------------------------------------
    if cfg.include_sources or cfg.knowledge_clusters:
        from instructkit.config import ConfigError

        raise ConfigError("include_sources and knowledge_clusters are for `experiment curate`; the lima arms differ "
                          "only in how the pool is sampled and are evaluated as configured here, so they are refused")
    pool, heldout, source_counts = read_pool(cfg)
    heldout_path = root / "heldout.jsonl"
    write_jsonl(heldout_path, heldout)
    eval_convs = eval_conversations(cfg, heldout)
    removed = 0
    if cfg.decontaminate_pool:
        pool, removed = decontaminate(pool, eval_convs, cfg.contamination_ngram)
    if len(pool) < cfg.n_examples:
        from instructkit.config import ConfigError

        raise ConfigError(f"the pool has {len(pool)} examples, fewer than n_examples={cfg.n_examples}")

    # -- 3. arms (drawn and gated before any training) --------------------------------------------------------------------
    curated, curation = None, None
    if "curated" in cfg.arms:
        curated, curation = curate(pool, cfg.n_examples, CurationConfig(
            min_response_words=cfg.min_response_words, near_threshold=cfg.near_threshold, seed=cfg.data.seed))
    arms = {}
    for seed in cfg.seeds:
        for arm in cfg.arms:
            if arm == "curated":
                data = list(curated)
            elif arm == "random":
                data = random.Random(f"lima-random/{seed}").sample(pool, cfg.n_examples)
            else:
                data = list(pool)
                random.Random(f"lima-pool/{seed}").shuffle(data)
            name = f"{arm}_seed{seed}"
            arms[name] = (arm, seed, data, require_clean(data, eval_convs, cfg.contamination_ngram, name))

    rows = cfg.train.micro_batch_size * cfg.train.grad_accum
    capacity = rows * cfg.train.pack_length

    def run_eval(model_path: str, out_dir: Path) -> dict:
        done = out_dir / "eval_summary.json"
        if done.exists():
            return json.loads(done.read_text(encoding="utf-8"))
        evals = [e for e in EVALS if e != "ifeval" or cfg.ifeval_prompts]
        ecfg = EvaluateConfig(model=dataclasses.replace(cfg.model, path=model_path), evals=evals,
                              ifeval_prompts=cfg.ifeval_prompts, ifeval_limit=cfg.ifeval_limit,
                              heldout_data=str(heldout_path), heldout_limit=cfg.heldout_limit,
                              stop_rate_limit=cfg.stop_rate_limit, max_length=cfg.data.max_length,
                              max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                              save_dir=str(out_dir))
        res = evaluate.main(ecfg)
        metrics = {f"{e}.{k}": v for e, r in res.items() for k, v in r["metrics"].items()
                   if isinstance(v, (int, float))}
        done.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
        return metrics

    # -- 4-5. train and evaluate ---------------------------------------------------------------------------------------------
    runs = [{"arm": "base", "seed": None, "examples": 0, "steps": 0, "tokens": 0,
             "eval": run_eval(base_path, root / "base")}]
    for name, (arm, seed, data, contamination) in arms.items():
        run_dir = root / name
        run_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(run_dir / "train.jsonl", data)
        sources: dict[str, int] = {}
        for c in data:
            sources[c.meta.get("source", "?")] = sources.get(c.meta.get("source", "?"), 0) + 1
        sft_cfg = SFTConfig(
            model=dataclasses.replace(cfg.model, path=base_path), lora=cfg.lora,
            data=dataclasses.replace(cfg.data, sources=[DataSource(path=str(run_dir / "train.jsonl"),
                                                                    format="messages")],
                                     validation_fraction=0.0, seed=seed),
            train=dataclasses.replace(cfg.train, output_dir=str(root), run_name=name, seed=seed))
        summary = sft.main(sft_cfg)
        model_path = summary["final"]
        if (Path(model_path) / "adapter_config.json").exists():
            from instructkit.models.load import merge_and_save

            merged = run_dir / "merged"
            if not (merged / "config.json").exists():
                merge_and_save(model_path, merged)
            model_path = str(merged)
        tokens = int(summary.get("counters", {}).get("tokens", 0))
        runs.append({"arm": arm, "seed": seed, "examples": len(data), "sources": sources,
                     "trained_examples": summary.get("train_examples"),
                     "steps": summary.get("steps"), "tokens": tokens,
                     "tokens_per_step": tokens / summary["steps"] if summary.get("steps") else 0.0,
                     "capacity_per_step": capacity, "first_loss": summary.get("first_loss"),
                     "last_loss": summary.get("last_loss"), "contamination": contamination,
                     "eval": run_eval(model_path, run_dir)})

    # -- 6. report -----------------------------------------------------------------------------------------------------------
    results = {"pool": len(pool), "pool_sources": source_counts, "decontaminated": removed,
               "heldout": len(heldout), "n_examples": cfg.n_examples, "max_steps": cfg.train.max_steps,
               "rows_per_step": rows, "pack_length": cfg.train.pack_length, "capacity_per_step": capacity,
               "curation": curation, "runs": runs, "arms": _aggregate(runs)}
    (root / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    _plot(results, root / "arms.png")
    (root / "report.md").write_text(_report(results, cfg), encoding="utf-8")
    return {"results": str(root / "results.json"), "report": str(root / "report.md"), "plot": str(root / "arms.png"),
            "runs": runs}


def _aggregate(runs) -> dict:
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        keys = sorted({k for r in rs for k in r["eval"]})
        out[arm] = {k: {"mean": statistics.fmean(r["eval"][k] for r in rs if k in r["eval"]),
                        "std": statistics.pstdev([r["eval"][k] for r in rs if k in r["eval"]]) if len(rs) > 1 else 0.0}
                    for k in keys}
        out[arm]["runs"] = len(rs)
    return out


def _report(results: dict, cfg) -> str:
    cols = [f"{e}.{m}" for e, m in METRICS if any(f"{e}.{m}" in r["eval"] for r in results["runs"])]
    cur = results["curation"]
    lines = [f"# LIMA: quality vs quantity at equal compute (`{cfg.model.path}`)", "",
             f"Pool: {results['pool']} examples after removing {results['decontaminated']} that overlap an evaluation "
             f"text ({cfg.contamination_ngram}-grams); sources read: {results['pool_sources']}. Held-out loss set: "
             f"{results['heldout']} conversations never in the pool.",
             f"Compute per arm: {results['max_steps']} optimizer steps x {results['rows_per_step']} packed rows x "
             f"{results['pack_length']} tokens = {results['capacity_per_step']} token slots per step; the table gives "
             "the tokens each arm actually trained on.", ""]
    if cur:
        lines += [f"Curation (data/curation.py): {cur['pool']} -> quality filters {cur['after_quality']} "
                  f"(removed by filter: {{{', '.join(f'{k}: {v}' for k, v in cur['quality']['removed_by'].items() if v)}}}) "
                  f"-> dedup {cur['after_dedup']} (exact {cur['dedup']['exact']}, near {cur['dedup']['near']}) -> "
                  f"stratified farthest-point selection of {cur['selected']}; quota per stratum {cur['quota']}.", ""]
    lines += ["![arms](arms.png)", "",
              "| arm | seed | examples | steps | tokens | tokens/step | " + " | ".join(cols) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(cols)]
    for r in results["runs"]:
        vals = " | ".join(f"{r['eval'][c]:.3f}" if c in r["eval"] else "-" for c in cols)
        tps = f"{r['tokens_per_step']:.0f}" if r["steps"] else "-"
        lines.append(f"| {r['arm']} | {r['seed'] if r['seed'] is not None else '-'} | {r['examples']} | "
                     f"{r['steps']} | {r['tokens']} | {tps} | {vals} |")
    lines += ["", "Mean (std over seeds) per arm:", "", "| arm | runs | " + " | ".join(cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for arm, a in results["arms"].items():
        vals = " | ".join(f"{a[c]['mean']:.3f} ({a[c]['std']:.3f})" if c in a else "-" for c in cols)
        lines.append(f"| {arm} | {a['runs']} | {vals} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"])
    keys = [k for k in ("ifeval.inst_level_loose_acc", "stop_rate.stop_rate") if k in results["arms"][arms[0]]]
    fig, axes = plt.subplots(1, max(1, len(keys) + 1), figsize=(4 * (len(keys) + 1), 3.5))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, k in zip(axes, keys + ["perplexity.heldout_loss"]):
        a = [results["arms"][x].get(k, {"mean": 0.0, "std": 0.0}) for x in arms]
        ax.bar(arms, [v["mean"] for v in a], yerr=[v["std"] for v in a], capsize=3, color="C0")
        ax.set_title(k, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_curated(cfg, out_path: str | Path) -> dict:
    """`instructkit experiment curate`: the LIMA pipeline's data half alone -- pool, decontamination against every
    evaluation set, curation to ``n_examples``, the contamination gate -- written as a messages JSONL for
    `instructkit sft` (configs/assistant_gemma.yaml), with ``<out>.report.json`` (curation counts, sources, gate)."""
    from instructkit.config import ConfigError
    from instructkit.data.curation import CurationConfig, curate
    from instructkit.data.io import write_jsonl
    from instructkit.eval.contamination import require_clean

    pool, heldout, source_counts = read_pool(cfg)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    heldout_path = out.with_name(out.stem + ".heldout.jsonl")
    write_jsonl(heldout_path, heldout)
    eval_convs = eval_conversations(cfg, heldout)
    knowledge = None
    if cfg.knowledge_clusters:
        from instructkit.eval.t0 import heldout_items, load_t0, to_conversation, write_items

        t0 = load_t0(cfg.t0_path)
        items = heldout_items(t0, cfg.knowledge_clusters, cfg.knowledge_per_dataset, templates="first")
        options = t0.options(cfg.knowledge_max_options)
        knowledge = out.with_name(out.stem + ".knowledge.jsonl")
        write_items(knowledge, items, options)
        for r in items:
            c = to_conversation(r)
            eval_convs.append(dataclasses.replace(c, meta={**c.meta, "task": "knowledge"}))
    removed = 0
    if cfg.decontaminate_pool:
        pool, removed = decontaminate(pool, eval_convs, cfg.contamination_ngram)
    if len(pool) < cfg.n_examples:
        raise ConfigError(f"the pool has {len(pool)} examples, fewer than n_examples={cfg.n_examples}")
    picked, curation = curate(pool, cfg.n_examples, CurationConfig(
        min_response_words=cfg.min_response_words, near_threshold=cfg.near_threshold, seed=cfg.data.seed))
    from instructkit.data.io import read_conversations

    included, included_removed = [], {}
    for src in cfg.include_sources:
        convs = _tag(read_conversations(src), f"include:{Path(src).name}")
        kept, n_removed = decontaminate(convs, eval_convs, cfg.contamination_ngram) if cfg.decontaminate_pool \
            else (convs, 0)
        included += kept
        included_removed[src] = {"read": len(convs), "decontaminated": n_removed, "included": len(kept)}
    picked += included
    gate = require_clean(picked, eval_convs, cfg.contamination_ngram, str(out))
    random.Random(f"curate/{cfg.data.seed}").shuffle(picked)
    write_jsonl(out, picked)
    sources: dict[str, int] = {}
    for c in picked:
        sources[c.meta.get("source", "?")] = sources.get(c.meta.get("source", "?"), 0) + 1
    report = {"out": str(out), "heldout": str(heldout_path),
              "knowledge": str(knowledge) if knowledge else None, "examples": len(picked), "sources": sources,
              "pool": len(pool), "pool_sources": source_counts, "decontaminated": removed,
              "included_sources": included_removed, "eval_sets": sorted({c.meta["task"] for c in eval_convs}),
              "eval_texts": len(eval_convs),
              "contamination": gate, "curation": curation}
    Path(str(out) + ".report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report
