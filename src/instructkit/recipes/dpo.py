"""DPO: preference optimisation against a frozen reference, without a reward model or sampling (Rafailov et al. 2023).

Phases: config -> model (policy; reference = the starting policy, the same base with the LoRA adapter disabled, or
`reference_path`) -> data (pairs rendered with the chat template) -> reference log-probs (precomputed once, or online
in every step) -> loop (training/loop.py and training/checkpoint.py: exact accumulation over pairs, schedule, clipping,
non-finite guard, atomic checkpoints, exact resume) -> held-out margins and accuracy -> save.

Log-probs are taken on response tokens only: chosen and rejected share one forward pass (2n rows, prompt left-padded,
responses right-padded), and the output layer runs on the response columns alone (models/value_head.py).
Losses: sigmoid (DPO) with optional label smoothing (cDPO), or IPO on per-token mean log-probs (losses.dpo_loss).
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from instructkit.config import DPOConfig, to_dict
from instructkit.data.preference import EncodedPair, encode_pairs
from instructkit.data.sources import read_sources, split_validation
from instructkit.losses import dpo_loss
from instructkit.models.value_head import response_logprobs
from instructkit.rl.rollout import prompt_response_batch

log = logging.getLogger(__name__)


def pair_batch(items: list[EncodedPair], ref: list[tuple[float, float]] | None, pad_id: int) -> dict[str, Any]:
    """Chosen rows then rejected rows in the prompt/response layout, with precomputed reference log-probs if any."""
    batch = prompt_response_batch([it.prompt for it in items] * 2,
                                  [it.chosen for it in items] + [it.rejected for it in items], pad_id)
    batch["n"] = len(items)
    if ref is not None:
        batch["ref_chosen"] = torch.tensor([c for c, _ in ref], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([r for _, r in ref], dtype=torch.float32)
    return batch


def sequence_logps(model, batch: dict[str, Any], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed (or per-token mean) response log-probs, each (n,)."""
    lp = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["prompt_width"],
                           batch["response_width"])  # (2n, R), 0 on padding
    mask = batch["response_mask"]
    s = (lp * mask).sum(-1)  # (2n,)
    if average:
        s = s / mask.sum(-1).clamp(min=1)
    return s[: batch["n"]], s[batch["n"]:]


class Reference:
    """The frozen reference policy: a separate model, or the policy with its LoRA adapter disabled."""

    def __init__(self, cfg: DPOConfig, policy, run_dir: Path):
        self.policy = policy
        self.model = None
        if cfg.reference_path:
            from transformers import AutoModelForCausalLM

            from instructkit.models.load import resolve_path

            self.model = AutoModelForCausalLM.from_pretrained(resolve_path(cfg.reference_path), dtype=torch.float32)
        elif not cfg.lora.enabled and cfg.reference == "online":
            self.model = copy.deepcopy(policy)  # the starting weights, frozen
        if self.model is not None:
            self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: dict[str, Any], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model is not None:
            return sequence_logps(self.model, batch, average)
        # the policy itself: with LoRA the adapter is disabled; without LoRA this runs before the first update
        ctx = self.policy.disable_adapter() if hasattr(self.policy, "disable_adapter") else nullcontext()
        was = self.policy.training
        self.policy.eval()
        with ctx:
            out = sequence_logps(self.policy, batch, average)
        self.policy.train(was)
        return out


@torch.no_grad()
def evaluate(policy, reference: Reference, items: list[EncodedPair], ref: list | None, cfg: DPOConfig, pad_id: int,
             batch_size: int = 16) -> dict[str, float]:
    """Held-out DPO loss, implicit-reward margin and accuracy."""
    if not items:
        return {}
    was = policy.training
    policy.eval()
    avg = cfg.loss_type == "ipo"
    total: dict[str, float] = {}
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = pair_batch(chunk, ref[i:i + batch_size] if ref is not None else None, pad_id)
        pc, pr = sequence_logps(policy, batch, avg)
        rc, rr = (batch["ref_chosen"], batch["ref_rejected"]) if ref is not None else reference.logps(batch, avg)
        loss, m = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing, cfg.loss_type)
        for k, v in {"loss": loss, **m}.items():
            total[k] = total.get(k, 0.0) + float(v) * len(chunk)
    policy.train(was)
    return {f"eval_{k}": v / len(items) for k, v in total.items()} | {"eval_pairs": len(items)}


def main(cfg: DPOConfig) -> dict[str, Any]:
    from instructkit.chat.render import Renderer
    from instructkit.models.load import load_model_and_tokenizer, save_model
    from instructkit.training.checkpoint import resume_run, save_checkpoint
    from instructkit.training.loop import (MetricsLogger, StepPlan, build_optimizer, build_scheduler, optimizer_step,
                                           step_record, total_steps_for)

    # -- config
    from instructkit.training.loop import start_run

    from instructkit.training.sharding import refuse_unwired

    refuse_unwired(cfg.train, "dpo")  # sharding and activation checkpointing: SFT only so far
    run_dir = start_run(cfg, cfg.train)

    # -- model and reference
    from instructkit.models.tiny import resolve_tiny_path

    model_cfg = type(cfg.model)(**{**to_dict(cfg.model), "path": resolve_tiny_path(cfg.model.path, run_dir)})
    torch.manual_seed(cfg.train.seed)
    policy, tok = load_model_and_tokenizer(model_cfg, cfg.lora)
    reference = Reference(cfg, policy, run_dir)
    renderer = Renderer.from_config(tok, cfg.model.template, cfg.data)
    pad_id = tok.pad_token_id
    avg = cfg.loss_type == "ipo"

    # -- data
    pairs, read_stats = read_sources(cfg.data, cfg.data.sources, run_dir, expect="preference")
    train_pairs, val_pairs, vstats = split_validation(pairs, cfg.data, run_dir)
    train_items, dropped = encode_pairs(renderer, train_pairs, cfg.data.max_length)
    val_items, val_dropped = encode_pairs(renderer, val_pairs, cfg.data.max_length)
    if not train_items:
        from instructkit.data.schema import DataError

        raise DataError(f"no usable training pairs (dropped: {dropped})")
    (run_dir / "data_stats.json").write_text(json.dumps(
        {"read": {**read_stats, **vstats}, "train_pairs": len(train_items), "validation_pairs": len(val_items),
         "dropped_train": dropped, "dropped_validation": val_dropped}, indent=1))

    # -- reference log-probs, once (before any update, so the policy itself can serve as the reference)
    def precompute(items: list[EncodedPair]) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for i in range(0, len(items), 16):
            c, r = reference.logps(pair_batch(items[i:i + 16], None, pad_id), avg)
            out += list(zip(c.tolist(), r.tolist()))
        return out

    ref_train = precompute(train_items) if cfg.reference == "precompute" else None
    ref_val = precompute(val_items) if cfg.reference == "precompute" else None
    if cfg.reference == "precompute" and not cfg.lora.enabled and not cfg.reference_path:
        reference.policy = None  # never used again: the policy moves away from the reference

    # -- loop
    plan = StepPlan(len(train_items), cfg.train.micro_batch_size, cfg.train.grad_accum, 1, cfg.data.seed)
    total = total_steps_for(cfg.train, plan)
    optimizer = build_optimizer(policy, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total)
    ckpt_root = run_dir / "checkpoints"
    logger = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard)
    resume, state = resume_run(ckpt_root, cfg.train.resume, policy, optimizer, scheduler, logger, config=to_dict(cfg))
    step = int(state.get("step", 0))
    initial_eval: dict[str, float] = {}
    if resume is not None:
        initial_eval = json.loads((resume / "initial_eval.json").read_text()) if (resume / "initial_eval.json").exists() \
            else {}
    else:
        initial_eval = evaluate(policy, reference, val_items, ref_val, cfg, pad_id)
        logger.log({"step": 0, **initial_eval})

    step_metrics: list[dict[str, float]] = []

    def loss_fn(m, batch):
        pc, pr = sequence_logps(m, batch, avg)
        if "ref_chosen" in batch:
            rc, rr = batch["ref_chosen"], batch["ref_rejected"]
        else:
            rc, rr = reference.logps(batch, avg)
        loss, metrics = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing, cfg.loss_type)
        step_metrics.append({k: float(v) * batch["n"] for k, v in metrics.items()})
        return loss * batch["n"], torch.tensor(batch["n"])

    policy.train()
    while step < total:
        mbs = [pair_batch([train_items[i] for i in rows], [ref_train[i] for i in rows] if ref_train else None, pad_id)
               for rows in plan.micro_batches(step)]
        step_metrics.clear()
        res = optimizer_step(policy, optimizer, scheduler, mbs, loss_fn, lambda b: b["n"],
                             max_grad_norm=cfg.train.max_grad_norm, step=step,
                             token_fn=lambda b: int(b["attention_mask"].sum()))  # units are pairs; tokens for tokens/s
        step += 1
        rec = step_record(step, res, plan.position(step - 1)[0])
        rec["pairs"] = res.units
        rec["pairs_per_s"] = res.units / res.seconds if res.seconds > 0 else None
        n = sum(b["n"] for b in mbs)
        for key in step_metrics[0] if step_metrics else ():
            rec[key] = sum(sm[key] for sm in step_metrics) / max(n, 1)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0:
            rec.update(evaluate(policy, reference, val_items, ref_val, cfg, pad_id))
        if step % max(cfg.train.log_every, 1) == 0 or step == total:
            logger.log(rec)
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == total:
            save_checkpoint(ckpt_root, step, policy, optimizer, scheduler, {"position": plan.position(step)},
                            to_dict(cfg), keep=cfg.train.keep_checkpoints,
                            extra_files={"initial_eval.json": json.dumps(initial_eval)})

    # -- held-out evaluation and save
    final_eval = evaluate(policy, reference, val_items, ref_val, cfg, pad_id)
    logger.log({"step": step, "final": True, **final_eval})
    logger.close()
    out = save_model(policy, tok, run_dir / "model")
    (out / "chat_template.jinja").write_text(renderer.template)
    result = {"run_dir": str(run_dir), "steps": step, "train_pairs": len(train_items), "initial": initial_eval,
              "final": final_eval, "model_dir": str(out)}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return result
