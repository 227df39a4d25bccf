"""Supervised fine-tuning (SFT), read top to bottom: config, data, render, model, loop, checkpoint, final save, summary.

`instructkit sft --config configs/tiny_sft.yaml [key.sub=value ...]`. The mechanics (exact gradient accumulation,
schedule, clipping, non-finite guard, data parallelism) are training/loop.py's; atomic checkpoints and exact resume are
training/checkpoint.py's; the loss (output layer only at supervised positions) is losses.sft_loss_fused.

Outputs in ``<train.output_dir>/<train.run_name>/``: config.yaml (resolved), data_stats.json, metrics.jsonl,
samples.jsonl, checkpoints/ (step-N + latest), final/ (a plain transformers model folder, or a peft adapter folder for
LoRA/QLoRA, with the tokenizer and the chat template used in training) and summary.json.

``model.path: "tiny:"`` builds a tiny random Llama with a ChatML tokenizer (models/tiny.py) into ``<run>/tiny_model``
and trains that: smoke runs and tests without any model files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from pathlib import Path

import torch

from instructkit.config import ConfigError, SFTConfig, save_config, to_dict
from instructkit.training.packing import IGNORE_INDEX, Sample, build_rows, collate_rows, prepare_samples

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------------
def _read_source(src, cfg: SFTConfig, run_dir: Path) -> list:
    if src.path.startswith("builtin:"):
        try:
            from instructkit.data.builtin import load_builtin
        except ImportError:
            raise ConfigError(f"data path {src.path!r}: built-in data sets are not available in this build") from None
        examples = list(load_builtin(src.path.split(":", 1)[1]))
        return examples[: src.max_examples] if src.max_examples else examples
    from instructkit.data.io import read_conversations

    return read_conversations(src.path, src.format, skip_invalid=cfg.data.skip_invalid,
                              rejects_path=cfg.data.rejects_path or (run_dir / "rejects.jsonl"),
                              max_invalid_fraction=cfg.data.max_invalid_fraction, max_examples=src.max_examples,
                              tool_call_format=cfg.data.tool_call_format, split_think=cfg.data.split_think)


def load_conversations(cfg: SFTConfig, run_dir: Path) -> tuple[list, list]:
    """(train, validation) conversations. Without validation sources, a seeded ``validation_fraction`` is held out."""
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: give at least one training data source")
    train = [c for src in cfg.data.sources for c in _read_source(src, cfg, run_dir)]
    val = [c for src in cfg.data.validation for c in _read_source(src, cfg, run_dir)]
    if not cfg.data.validation and cfg.data.validation_fraction > 0 and len(train) > 1:
        order = list(range(len(train)))
        random.Random(cfg.data.seed).shuffle(order)
        n_val = max(1, int(round(cfg.data.validation_fraction * len(train))))
        held = set(order[:n_val])
        val = [train[i] for i in sorted(held)]
        train = [c for i, c in enumerate(train) if i not in held]
    return train, val


def render_samples(conversations: list, tokenizer, cfg: SFTConfig) -> list[Sample]:
    """chat/render.py decides the loss mask (assistant content plus end-of-turn token)."""
    from instructkit.chat.render import Renderer

    renderer = Renderer.from_config(tokenizer, cfg.model.template, cfg.data)
    out = []
    for conv in conversations:  # one sample per sequence: several when the template re-renders earlier turns
        for r in renderer.render_examples(conv, mask=cfg.data.mask):
            out.append(Sample(list(r.input_ids), list(r.loss_mask)))
    return out


def data_fingerprint(samples: list[Sample]) -> str:
    """Hash of the rendered training data: resume refuses data that changed under the same path."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.input_ids, s.loss_mask]).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------------------------------
def sft_batch_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, supervised tokens) of a packed micro-batch; the output layer sees only supervised positions, and
    its gradient is computed in the forward pass (losses.sft_loss_fused: same loss, a third fewer output-layer FLOPs)."""
    from instructkit.losses import sft_loss_fused
    from instructkit.models.load import causal_lm_parts, packed_hidden_states

    hidden = packed_hidden_states(model, batch)  # (B, T, H)
    _, head, softcap = causal_lm_parts(model)
    return sft_loss_fused(hidden, batch["labels"], head, softcap)


def count_supervised(batch) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def count_tokens(batch) -> int:
    return int(batch["n_tokens"])


# ---------------------------------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------------------------------
def write_samples(model, tokenizer, cfg: SFTConfig, run_dir: Path, step: int) -> None:
    """Greedy completions of ``train.sample_prompts`` appended to samples.jsonl (generation/engine.py)."""
    if not cfg.train.sample_prompts:
        return
    from instructkit.generation.engine import Engine, SamplingParams

    was_training = model.training
    model.eval()
    engine = Engine(model, tokenizer, template=cfg.model.template)
    # seed given: the engine then never draws from torch's global generator, so sampling cannot change training RNG
    params = SamplingParams(max_new_tokens=cfg.sample_max_new_tokens, temperature=0.0, seed=0, logprobs=False)
    outs = engine.chat([[{"role": "user", "content": p}] for p in cfg.train.sample_prompts], params)
    model.train(was_training)
    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        for p, o in zip(cfg.train.sample_prompts, outs):
            f.write(json.dumps({"step": step, "prompt": p, "completion": o.text, "finish_reason": o.finish_reason})
                    + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------
def main(cfg: SFTConfig) -> dict:
    from instructkit.models.load import load_model_and_tokenizer, save_model
    from instructkit.models.precision import log_precision, resolve_precision
    from instructkit.training import checkpoint as ckpt
    from instructkit.training import loop, sharding

    # -- config ---------------------------------------------------------------------------------------------------------
    precision = resolve_precision(cfg.model.dtype)
    dist = loop.DistContext.from_accelerate(cpu=precision.device.type == "cpu")
    run_dir = loop.start_run(cfg, cfg.train, dist.is_main)
    config_dict = json.loads(json.dumps(to_dict(cfg), default=str))

    # -- data -----------------------------------------------------------------------------------------------------------
    train_convs, val_convs = load_conversations(cfg, run_dir)

    # -- model (before rendering: the template may add tokens) ---------------------------------------------------------
    if cfg.model.path.startswith("tiny:"):
        from instructkit.models.tiny import resolve_tiny_path

        tiny_dir = resolve_tiny_path(cfg.model.path, run_dir, seed=cfg.train.seed, create=dist.is_main)
        dist.barrier()
        model_cfg = type(cfg.model)(**{**to_dict(cfg.model), "path": tiny_dir})
    else:
        model_cfg = cfg.model
    torch.manual_seed(cfg.train.seed)  # model-side randomness (LoRA init, dropout); data order has its own seed
    log_precision(precision)
    model, tokenizer = load_model_and_tokenizer(model_cfg, cfg.lora, precision=precision)
    model.train()
    model, dist = sharding.prepare_training(model, cfg.train, dist)  # activation checkpointing, FSDP2

    def train_loss(m, batch):
        batch = {k: v.to(precision.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with precision.autocast():
            return sft_batch_loss(m, batch)

    train_loss = sharding.route(train_loss)

    # -- render and pack ------------------------------------------------------------------------------------------------
    train_samples, train_stats = prepare_samples(render_samples(train_convs, tokenizer, cfg), cfg.data.max_length)
    val_samples, val_stats = prepare_samples(render_samples(val_convs, tokenizer, cfg), cfg.data.max_length)
    if not train_samples:
        raise ConfigError(f"no training example has a supervised token left: {train_stats.as_dict()}")
    if dist.is_main:
        (run_dir / "data_stats.json").write_text(json.dumps(
            {"train": train_stats.as_dict(), "validation": val_stats.as_dict()}, indent=1))
    rows = build_rows(train_samples, pack=cfg.train.pack, pack_length=cfg.train.pack_length, seed=cfg.data.seed)
    val_rows = build_rows(val_samples, pack=cfg.train.pack, pack_length=cfg.train.pack_length, seed=cfg.data.seed)
    plan = loop.StepPlan(len(rows), cfg.train.micro_batch_size, cfg.train.grad_accum, dist.world_size, cfg.data.seed)
    total_steps = loop.total_steps_for(cfg.train, plan)
    pad_id = tokenizer.pad_token_id
    fingerprint = data_fingerprint(train_samples)

    def micro_batches(step: int) -> list[dict]:
        return [collate_rows([rows[i] for i in group], pad_id) for group in plan.micro_batches(step, dist.rank)]

    mbs = cfg.train.micro_batch_size
    my_val = val_rows[dist.rank::dist.world_size]
    val_batches = [collate_rows(my_val[i:i + mbs], pad_id) for i in range(0, len(my_val), mbs)]

    # -- optimizer, schedule, resume ------------------------------------------------------------------------------------
    optimizer = loop.build_optimizer(model, cfg.train)
    scheduler = loop.build_scheduler(optimizer, cfg.train, total_steps)
    ckpt_root = run_dir / "checkpoints"
    counters = loop.LoopCounters()
    start = 0
    metrics = loop.MetricsLogger(run_dir, enabled=dist.is_main, tensorboard=cfg.train.tensorboard)

    def same_data(path, state) -> None:
        if state.get("data_fingerprint") != fingerprint:
            raise ckpt.CheckpointError(f"resume refused: the rendered training data changed since {path} "
                                       f"(fingerprint {state.get('data_fingerprint')} != {fingerprint})")
        step = int(state["step"])
        if [state["epoch"], state["index"]] != list(plan.position(step)):
            raise ckpt.CheckpointError(f"resume refused: data position {state['epoch'], state['index']} does not "
                                       f"match step {step} ({plan.position(step)})")

    resume_from, state = ckpt.resume_run(ckpt_root, cfg.train.resume, model, optimizer, scheduler, metrics,
                                         rank=dist.rank, config=config_dict, check=same_data,
                                         load_state=sharding.state_loader(model, optimizer))
    if resume_from is not None:
        start = int(state["step"])
        counters = loop.LoopCounters(**state["counters"])
        log.warning("resumed from %s at step %d (epoch %d, row %d)", resume_from, start, *plan.position(start))
    elif dist.is_main:  # a fresh run: earlier records in this folder belong to another run
        for name in ("metrics.jsonl", "samples.jsonl"):
            (run_dir / name).unlink(missing_ok=True)

    def save(step: int) -> None:
        epoch, index = plan.position(step)
        ckpt.save_checkpoint(ckpt_root, step, model, optimizer, scheduler,
                             {"epoch": epoch, "index": index, "counters": counters.as_dict(),
                              "data_fingerprint": fingerprint, "total_steps": total_steps},
                             config_dict, keep=cfg.train.keep_checkpoints, dist=dist,
                             **sharding.checkpoint_states(model, optimizer))

    def validate(step: int) -> float | None:
        if not val_rows:
            return None
        val_loss, n = loop.evaluate(model, val_batches, train_loss, dist)
        metrics.log({"step": step, "val_loss": val_loss, "val_supervised_tokens": n})
        return val_loss

    # -- loop -----------------------------------------------------------------------------------------------------------
    bar = loop.progress_bar(total_steps, start, dist.is_main)
    t_start = time.perf_counter()
    val_loss = None
    for step in range(start, total_steps):
        res = loop.optimizer_step(model, optimizer, scheduler, micro_batches(step), train_loss, count_supervised,
                                  max_grad_norm=cfg.train.max_grad_norm, dist=dist, token_fn=count_tokens, step=step)
        done = step + 1
        counters.units += res.units
        counters.tokens += res.tokens
        counters.empty_micro_batches += res.empty_micro_batches
        counters.empty_steps += res.loss is None
        if done % max(1, cfg.train.log_every) == 0 or done == total_steps:
            metrics.log(loop.step_record(done, res, plan.position(step)[0]))
        bar.update(1)
        bar.set_postfix(loss="-" if res.loss is None else f"{res.loss:.4f}",
                        tok_s=f"{res.tokens / max(res.seconds, 1e-9):.0f}")
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < total_steps:
            val_loss = validate(done)
        if cfg.train.sample_every and done % cfg.train.sample_every == 0:
            with sharding.gathered(model) as inner:  # every rank: a sharded model is gathered for generation
                if dist.is_main:
                    write_samples(inner, tokenizer, cfg, run_dir, done)
        if cfg.train.save_every and done % cfg.train.save_every == 0 and done < total_steps:
            save(done)
    bar.close()
    elapsed = time.perf_counter() - t_start

    # -- final evaluation, checkpoint and save --------------------------------------------------------------------------
    val_loss = validate(total_steps)
    if start < total_steps:
        save(total_steps)
    if not (cfg.train.sample_every and total_steps % cfg.train.sample_every == 0 and start < total_steps):
        with sharding.gathered(model) as inner:
            if dist.is_main:
                write_samples(inner, tokenizer, cfg, run_dir, total_steps)
    if sharding.is_sharded(model):  # full weights gathered on rank 0: the same plain folder
        sharding.save_full_model(model, tokenizer, run_dir / "final", dist.is_main)
    elif dist.is_main:
        save_model(model, tokenizer, run_dir / "final")
    if dist.is_main:
        save_config(cfg, run_dir / "final" / "instructkit_config.yaml")
    metrics.close()

    # -- summary --------------------------------------------------------------------------------------------------------
    history = loop.read_metrics(run_dir) if dist.is_main else []
    losses = [r["loss"] for r in history if r.get("loss") is not None]
    summary = {
        "run_dir": str(run_dir), "steps": total_steps, "resumed_from_step": start or None,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "val_loss": val_loss, "train_rows": len(rows), "train_examples": len(train_samples),
        "data": {"train": train_stats.as_dict(), "validation": val_stats.as_dict()},
        "counters": counters.as_dict(), "seconds": round(elapsed, 2),
        "final": str(run_dir / "final"), "adapter": bool(cfg.lora.enabled), "precision": precision.as_dict(),
        "sharding": cfg.train.sharding, "gradient_checkpointing": cfg.train.gradient_checkpointing,
    }
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if counters.empty_steps or counters.empty_micro_batches:
            log.warning("%d steps and %d micro-batches had no supervised token", counters.empty_steps,
                        counters.empty_micro_batches)
    dist.barrier()
    return summary
