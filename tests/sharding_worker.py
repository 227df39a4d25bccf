"""Worker for tests/test_sharding.py, run under torchrun (or alone: a world of one): training steps through FSDP2
(training/sharding.py) for SFT (full and LoRA) and DPO, and, on rank 0, the same steps unsharded in one process with
``grad_accum`` multiplied by the world size (the same rows per step, the same micro-batches). Also: a resume from full
state dicts gathered after step 1 equals the uninterrupted run, and the gathered full state dict equals the unsharded
model's. Writes JSON to argv[1] (rank 0)."""

from __future__ import annotations

import json
import os
import sys

import torch

from instructkit.config import LoRAConfig, TrainConfig
from instructkit.losses import dpo_loss, sft_loss_fused
from instructkit.models.load import apply_lora, causal_lm_parts, packed_hidden_states
from instructkit.models.tiny import build_model, build_tokenizer
from instructkit.models.value_head import response_logprobs
from instructkit.rl.rollout import prompt_response_batch
from instructkit.training import loop, sharding
from instructkit.training.packing import Sample, collate_rows

TOK = build_tokenizer(512)
MICRO, ACCUM = 2, 1


def sft_loss(model, batch):
    hidden = packed_hidden_states(model, batch)
    _, head, softcap = causal_lm_parts(model)
    return sft_loss_fused(hidden, batch["labels"], head, softcap)


def dpo_step_loss(model, batch):
    lp = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["prompt_width"],
                           batch["response_width"])
    s = (lp * batch["response_mask"]).sum(-1)
    n = batch["n"]
    loss, _ = dpo_loss(s[:n], s[n:], batch["ref_c"], batch["ref_r"], beta=0.1)
    return loss * n, n


def sft_rows() -> list:
    """11 packed rows; row 4 has nothing supervised (an empty micro-batch), the last step is short."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(11):
        row = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            n = int(torch.randint(5, 30, (1,), generator=g))
            mask = [0] * n if i == 4 else [0, 0] + [1] * (n - 2)
            row.append(Sample(torch.randint(4, 500, (n,), generator=g).tolist(), mask))
        rows.append(row)
    return rows


def dpo_items() -> list:
    g = torch.Generator().manual_seed(5)
    items = []
    for _ in range(10):
        p = torch.randint(4, 500, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(4, 500, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(4, 500, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        items.append((p, c, r))
    return items


def make_model(lora: bool):
    model = build_model(TOK, seed=0)
    if lora:
        torch.manual_seed(1)
        model = apply_lora(model, LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    return model


def batches_for(kind: str, ref_model=None):
    if kind == "sft":
        rows = sft_rows()
        return len(rows), lambda idx: collate_rows([rows[i] for i in idx], TOK.pad_token_id), sft_loss, \
            lambda b: int(b["n_supervised"])
    items = dpo_items()
    refs = {}
    with torch.no_grad():  # reference log-probs of the starting weights, one pair at a time (any split gives these)
        for i, (p, c, r) in enumerate(items):
            b = prompt_response_batch([p, p], [c, r], TOK.pad_token_id)
            lp = (response_logprobs(ref_model, b["input_ids"], b["attention_mask"], b["prompt_width"],
                                    b["response_width"]) * b["response_mask"]).sum(-1)
            refs[i] = (lp[0], lp[1])

    def collate(idx):
        b = prompt_response_batch([items[i][0] for i in idx] * 2,
                                  [items[i][1] for i in idx] + [items[i][2] for i in idx], TOK.pad_token_id)
        b["n"] = len(idx)
        b["ref_c"] = torch.stack([refs[i][0] for i in idx])
        b["ref_r"] = torch.stack([refs[i][1] for i in idx])
        return b

    return len(items), collate, dpo_step_loss, lambda b: b["n"]


def train(kind: str, lora: bool, dist, shard: bool, grad_accum: int, steps_from: int = 0, state=None,
          stop_after: int | None = None):
    """Per-step (loss, grad_norm, units) and the final model; optionally starting from ``state`` (full state dicts)."""
    torch.manual_seed(0)
    model = make_model(lora)
    n_rows, collate, loss_fn, count = batches_for(kind, model)
    if shard:
        model = sharding.shard_model(model, dist)
    cfg = TrainConfig(lr=1e-2, max_grad_norm=0.5, schedule="linear")
    opt = loop.build_optimizer(model, cfg)
    plan = loop.StepPlan(n_rows, MICRO, grad_accum, dist.world_size, 0)
    total = plan.steps_per_epoch * 2
    sched = loop.build_scheduler(opt, cfg, total)
    if state is not None:
        sharding.load_full_state(model, opt, state["model"], state["optim"])
        sched.load_state_dict(state["sched"])
    out = []
    fn = sharding.route(loss_fn)
    for step in range(steps_from, total if stop_after is None else stop_after):
        mbs = [collate(g) for g in plan.micro_batches(step, dist.rank)]
        r = loop.optimizer_step(model, opt, sched, mbs, fn, count, max_grad_norm=0.5, dist=dist, step=step)
        out.append([r.loss, r.grad_norm, r.units])
    return out, model, opt, sched, collate, fn


def main() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    else:
        sharding.init_single_process_group()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dist = sharding.ShardedContext(rank, world)
    result = {"world": world}
    for kind, lora in (("sft", False), ("sft", True), ("dpo", False)):
        key = f"{kind}{'_lora' if lora else ''}"
        steps, model, opt, sched, collate, fn = train(kind, lora, dist, True, ACCUM)
        ev = loop.evaluate(model, [collate([i]) for i in range(rank, 5, world)], fn, dist)
        full = sharding.full_state_dict(model)
        if kind == "sft" and not lora:
            # resume: full state after 2 steps, a fresh sharded model loads it and continues
            _, m2, o2, s2, _, _ = train(kind, lora, dist, True, ACCUM, stop_after=2)
            state = {"model": sharding.full_state_dict(m2, trainable_only=True),
                     "optim": sharding.full_optimizer_state_dict(m2, o2), "sched": s2.state_dict()}
            resumed, m3, *_ = train(kind, lora, dist, True, ACCUM, steps_from=2, state=state)
            full3 = sharding.full_state_dict(m3)  # a collective: every rank
            result["resumed"] = resumed
            if rank == 0:
                result["resumed_max_diff"] = max((full[k] - full3[k]).abs().max().item() for k in full)
        if rank == 0:
            ref_steps, ref_model, *_ = train(kind, lora, loop.DistContext(), False, ACCUM * world)
            ref_ev = loop.evaluate(ref_model, [collate([i]) for i in range(5)], sharding.route(
                sft_loss if kind == "sft" else dpo_step_loss))
            ref_sd = ref_model.state_dict()
            result[key] = {"sharded": steps, "unsharded": ref_steps, "eval": [ev, ref_ev],
                           "full_keys_match": sorted(full) == sorted(ref_sd),
                           "full_max_diff": max((full[k] - ref_sd[k]).abs().max().item() for k in ref_sd)}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
