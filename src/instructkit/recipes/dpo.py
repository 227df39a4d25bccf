"""DPO: preference optimisation against a frozen reference, without a reward model or sampling (Rafailov et al. 2023).

Phases: config -> model (policy; reference = the starting policy, the same base with the LoRA adapter disabled, or
`reference_path`) -> data (pairs rendered with the chat template) -> reference log-probs (precomputed once, or online
in every step) -> loop (training/loop.py and training/checkpoint.py: exact accumulation over pairs, schedule, clipping,
non-finite guard, atomic checkpoints, exact resume) -> held-out margins and accuracy -> save.

Log-probs are taken on response tokens only: chosen and rejected share one forward pass (2n rows, prompt left-padded,
responses right-padded), and the output layer runs on the response columns alone (models/value_head.py).
Losses: sigmoid (DPO) with optional label smoothing (cDPO), or IPO on per-token mean log-probs (losses.dpo_loss).

``train.sharding: fsdp2`` and ``train.gradient_checkpointing`` (training/sharding.py, docs/distributed.md): the policy
is sharded after the reference log-probs are precomputed; every forward of the policy (training, held-out evaluation,
an online reference through the LoRA-disabled policy) runs through the FSDP root (``sharding.route``). The reference
model, when it is a separate model (``reference_path``, or a frozen copy for ``reference: online`` without LoRA), is
NOT sharded: each rank keeps it whole, in eval mode without gradients. That is the simplest correct choice: its
forwards need no collective, so they cannot break the ranks' lockstep, and it costs the memory of one frozen copy (with
the default ``reference: precompute`` there is no reference model at all).
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import nullcontext
from typing import Any

import torch

from instructkit.config import DPOConfig
from instructkit.data.preference import EncodedPair, encode_pairs
from instructkit.data.sources import read_sources, split_validation
from instructkit.losses import dpo_loss
from instructkit.models.value_head import response_logprobs
from instructkit.rl.rollout import prompt_response_batch
from instructkit.training import sharding

log = logging.getLogger(__name__)

# dpo_loss's metrics, logged as pair-weighted means over all ranks (named: a rank without micro-batches sums zeros)
METRIC_KEYS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
               "logps_rejected")


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

    def __init__(self, cfg: DPOConfig, policy, run):
        self.policy = policy
        self.model = None
        if cfg.reference_path:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(run.resolve_model(cfg.reference_path),
                                                              dtype=torch.float32)
        elif not cfg.lora.enabled and cfg.reference == "online":
            self.model = copy.deepcopy(policy)  # the starting weights, frozen
        if self.model is not None:
            self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: dict[str, Any], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Under sharding, call this inside the FSDP root (a routed function) when the policy serves as reference."""
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

    def pair_loss(m, batch):  # every rank runs every held-out batch: the same passes, lockstep under sharding
        pc, pr = sequence_logps(m, batch, avg)
        rc, rr = (batch["ref_chosen"], batch["ref_rejected"]) if ref is not None else reference.logps(batch, avg)
        return dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing, cfg.loss_type)

    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = pair_batch(chunk, ref[i:i + batch_size] if ref is not None else None, pad_id)
        loss, m = sharding.route(pair_loss)(policy, batch)
        for k, v in {"loss": loss, **m}.items():
            total[k] = total.get(k, 0.0) + float(v) * len(chunk)
    policy.train(was)
    return {f"eval_{k}": v / len(items) for k, v in total.items()} | {"eval_pairs": len(items)}


def main(cfg: DPOConfig) -> dict[str, Any]:
    from instructkit.chat.render import Renderer
    from instructkit.data.schema import DataError
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.training.run import Run, data_fingerprint

    run = Run.start(cfg, "dpo", shardable=True)
    run_dir = run.run_dir
    avg = cfg.loss_type == "ipo"

    # -- data (read and checked before the model is loaded)
    pairs, read_stats = read_sources(cfg.data, cfg.data.sources, run_dir, expect="preference")
    train_pairs, val_pairs, vstats = split_validation(pairs, cfg.data, run_dir)

    # -- model and reference
    policy, tok = load_model_and_tokenizer(run.model_config(), cfg.lora, precision=run.precision)
    reference = Reference(cfg, policy, run)
    renderer = Renderer.from_config(tok, cfg.model.template, cfg.data)
    pad_id = tok.pad_token_id

    # -- encode
    train_items, dropped = encode_pairs(renderer, train_pairs, cfg.data.max_length)
    val_items, val_dropped = encode_pairs(renderer, val_pairs, cfg.data.max_length)
    run.check_data(read=read_stats, examples=len(train_pairs), kept=len(train_items), dropped=dropped, unit="pairs")
    if not train_items:
        raise DataError(f"no usable training pairs (dropped: {dropped})")
    if run.is_main:
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
    policy = run.prepare(policy)  # activation checkpointing, FSDP2 (after the precomputed reference log-probs)

    def held_out() -> dict[str, float]:
        return evaluate(policy, reference, val_items, ref_val, cfg, pad_id)

    # -- loop
    start = run.setup(policy, n_items=len(train_items), fingerprint=data_fingerprint(train_items))
    initial_eval = run.state.get("initial_eval") or {}
    if run.resumed_from is None:
        initial_eval = held_out()
        run.log({"step": 0, **initial_eval})

    step_metrics: dict[int, dict[str, float]] = {}  # by micro-batch: a sharded filler pass repeats one, not counted

    def loss_fn(m, batch):
        pc, pr = sequence_logps(m, batch, avg)
        rc, rr = (batch["ref_chosen"], batch["ref_rejected"]) if "ref_chosen" in batch else reference.logps(batch, avg)
        loss, metrics = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing, cfg.loss_type)
        step_metrics[id(batch)] = {k: float(v) * batch["n"] for k, v in metrics.items()}
        return loss * batch["n"], torch.tensor(batch["n"])

    loss_fn = sharding.route(loss_fn)  # under fsdp2 the root's hooks wrap the whole loss

    policy.train()
    for step in range(start, run.total_steps):
        mbs = [pair_batch([train_items[i] for i in rows], [ref_train[i] for i in rows] if ref_train else None, pad_id)
               for rows in run.micro_batches(step)]
        step_metrics.clear()
        res = run.optimizer_step(mbs, loss_fn, lambda b: b["n"], step=step,
                                 token_fn=lambda b: int(b["attention_mask"].sum()))  # units: pairs
        done = step + 1
        rec = run.step_record(done, res)
        rec["pairs"] = res.units
        rec["pairs_per_s"] = res.units / res.seconds if res.seconds > 0 else None
        rec.update(run.dist.sum_metrics([step_metrics[id(b)] for b in mbs if id(b) in step_metrics],
                                        res.units, METRIC_KEYS))  # pair-weighted means over all ranks
        if run.due("eval", done):
            rec.update(held_out())
        run.after_step(done, rec, state={"initial_eval": initial_eval}, throughput="pairs_per_s")

    # -- held-out evaluation and save
    final_eval = held_out()
    run.log({"step": run.total_steps, "final": True, **final_eval})
    return run.finish(policy, tok, {"train_pairs": len(train_items), "initial_eval": initial_eval, **final_eval},
                      template=renderer.template)
