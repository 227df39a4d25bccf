"""Reward model: a backbone plus a scalar head, trained with the pairwise (Bradley-Terry) loss on preference pairs.

Phases: config -> data (pairs rendered with the chat template) -> model (``*ForSequenceClassification`` with one label;
full or LoRA) -> loop (training/loop.py: exact accumulation over pairs, schedule, clipping, non-finite guard, metrics;
training/checkpoint.py: atomic checkpoints and exact resume) -> held-out accuracy -> reward normalisation -> save.

The score is read at the last token of prompt + response (the end-of-turn token). The saved folder is a plain
transformers sequence-classification model (``AutoModelForSequenceClassification`` loads it) with the training-set
mean and std of the raw rewards in config.json (models/value_head.py says how to apply them).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from instructkit.config import RewardModelConfig, to_dict
from instructkit.losses import pairwise_reward_loss
from instructkit.models.value_head import backbone_and_score, load_sequence_classifier, save_reward_model, \
    sequence_scores
from instructkit.rl.rollout import EncodedPair, encode_pairs, prompt_response_batch, split_validation

log = logging.getLogger(__name__)


def pair_batch(items: list[EncodedPair], pad_id: int) -> dict[str, Any]:
    """Chosen rows then rejected rows, in the prompt/response layout (2n rows), plus the margins (n,)."""
    prompts = [it.prompt for it in items] * 2
    responses = [it.chosen for it in items] + [it.rejected for it in items]
    batch = prompt_response_batch(prompts, responses, pad_id)
    batch["margin"] = torch.tensor([it.margin for it in items], dtype=torch.float32)
    batch["n"] = len(items)
    return batch


def pair_scores(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) raw rewards, each (n,)."""
    r = sequence_scores(model, batch["input_ids"], batch["attention_mask"])  # (2n,)
    return r[: batch["n"]], r[batch["n"]:]


def build_model(cfg: RewardModelConfig, run_dir: Path):
    """(sequence classifier, tokenizer): score head initialised with the run's seed, LoRA through peft if enabled."""
    from instructkit.models.load import ensure_pad_token

    from instructkit.models.load import resolve_path
    from instructkit.models.tiny import resolve_tiny_path

    path = resolve_path(resolve_tiny_path(cfg.model.path, run_dir))
    torch.manual_seed(cfg.train.seed)
    model, tok = load_sequence_classifier(path, trust_remote_code=cfg.model.trust_remote_code)
    ensure_pad_token(tok, model)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets: Any = "all-linear" if list(cfg.lora.target_modules) == ["all-linear"] else cfg.lora.target_modules
        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                                 target_modules=targets, task_type="SEQ_CLS", bias="none"))
    return model, tok


@torch.no_grad()
def evaluate_pairs(model, items: list[EncodedPair], pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Held-out pairwise loss, accuracy and mean margin."""
    was = model.training
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(items), batch_size):
        c, r = pair_scores(model, pair_batch(items[i:i + batch_size], pad_id))
        chosen.append(c)
        rejected.append(r)
    model.train(was)
    if not chosen:
        return {}
    loss, m = pairwise_reward_loss(torch.cat(chosen), torch.cat(rejected))
    return {"eval_loss": loss.item(), "eval_accuracy": m["accuracy"].item(), "eval_margin": m["reward_margin"].item(),
            "eval_pairs": len(items)}


@torch.no_grad()
def reward_statistics(model, items: list[EncodedPair], pad_id: int, batch_size: int = 16) -> tuple[float, float]:
    """Mean and std of the raw rewards of every training response (chosen and rejected)."""
    model.eval()
    scores = []
    for i in range(0, len(items), batch_size):
        c, r = pair_scores(model, pair_batch(items[i:i + batch_size], pad_id))
        scores += [c, r]
    s = torch.cat(scores)
    return s.mean().item(), (s.std().item() if s.numel() > 1 else 1.0) or 1.0


def main(cfg: RewardModelConfig) -> dict[str, Any]:
    from instructkit.chat.render import Renderer
    from instructkit.training.checkpoint import find_resume, load_checkpoint, save_checkpoint
    from instructkit.training.loop import (MetricsLogger, StepPlan, build_optimizer, build_scheduler, optimizer_step,
                                           step_record, total_steps_for)

    # -- config
    from instructkit.training.loop import start_run

    run_dir = start_run(cfg, cfg.train)

    # -- model (before the data: the tokenizer renders it)
    model, tok = build_model(cfg, run_dir)
    renderer = Renderer(tok, template=cfg.model.template)
    pad_id = tok.pad_token_id

    # -- data
    from instructkit.rl.rollout import read_sources

    pairs, read_stats = read_sources(cfg.data, cfg.data.sources, run_dir, expect="preference")
    train_pairs, val_pairs, vstats = split_validation(pairs, cfg.data, run_dir)
    read_stats.update(vstats)
    train_items, dropped = encode_pairs(renderer, train_pairs, cfg.data.max_length)
    val_items, val_dropped = encode_pairs(renderer, val_pairs, cfg.data.max_length)
    if not cfg.use_margin:
        for it in train_items:
            it.margin = 0.0
    if not train_items:
        from instructkit.data.schema import DataError

        raise DataError(f"no usable training pairs (dropped: {dropped})")
    (run_dir / "data_stats.json").write_text(json.dumps(
        {"read": read_stats, "train_pairs": len(train_items), "validation_pairs": len(val_items),
         "dropped_train": dropped, "dropped_validation": val_dropped}, indent=1))

    # -- loop
    plan = StepPlan(len(train_items), cfg.train.micro_batch_size, cfg.train.grad_accum, 1, cfg.data.seed)
    total = total_steps_for(cfg.train, plan)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total)
    ckpt_root = run_dir / "checkpoints"
    logger = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard)
    step = 0
    resume = find_resume(ckpt_root, cfg.train.resume)
    if resume is not None:
        step = int(load_checkpoint(resume, model, optimizer, scheduler, config=to_dict(cfg))["step"])
        logger.truncate_after(step)
        log.info("resumed from %s at step %d", resume, step)

    step_metrics: list[dict[str, float]] = []

    def loss_fn(m, batch):
        chosen, rejected = pair_scores(m, batch)
        margin = batch["margin"] if cfg.use_margin else None
        loss, metrics = pairwise_reward_loss(chosen, rejected, margin)
        step_metrics.append({k: v.item() * batch["n"] for k, v in metrics.items()})
        return loss * batch["n"], torch.tensor(batch["n"])

    model.train()
    while step < total:
        mbs = [pair_batch([train_items[i] for i in rows], pad_id) for rows in plan.micro_batches(step)]
        step_metrics.clear()
        res = optimizer_step(model, optimizer, scheduler, mbs, loss_fn, lambda b: b["n"],
                             max_grad_norm=cfg.train.max_grad_norm, step=step)
        step += 1
        rec = step_record(step, res, plan.position(step - 1)[0])
        n = sum(b["n"] for b in mbs)
        for key in ("accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
            rec[key] = sum(sm[key] for sm in step_metrics) / max(n, 1)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and val_items:
            rec.update(evaluate_pairs(model, val_items, pad_id))
        if step % max(cfg.train.log_every, 1) == 0 or step == total:
            logger.log(rec)
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == total:
            save_checkpoint(ckpt_root, step, model, optimizer, scheduler, {"position": plan.position(step)},
                            to_dict(cfg), keep=cfg.train.keep_checkpoints)

    # -- held-out accuracy, normalisation, save
    result: dict[str, Any] = {"steps": step, "train_pairs": len(train_items)}
    result.update(evaluate_pairs(model, val_items, pad_id))
    mean, std = reward_statistics(model, train_items, pad_id) if cfg.normalize else (0.0, 1.0)
    result.update({"reward_mean": mean, "reward_std": std})
    logger.log({"step": step, **{k: v for k, v in result.items() if k != "steps"}})
    logger.close()
    backbone_and_score(model)  # fails early if the head cannot be found
    out = save_reward_model(model, tok, run_dir / "model", mean, std)
    (out / "chat_template.jinja").write_text(renderer.template)
    result["model_dir"] = str(out)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return result
