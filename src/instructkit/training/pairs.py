"""Mechanics shared by the reference-free pair recipes (recipes/orpo.py, recipes/simpo.py).

Both recipes train on preference pairs without a reference model, and their losses read the same two numbers per
pair: the per-token mean log-prob of the chosen and of the rejected response, (1/|y|) log pi(y|x). What differs is the
loss alone, passed in as ``pair_loss(chosen, rejected) -> (loss, metrics)`` with chosen and rejected of shape (n,):
the same function scores a training micro-batch and the whole held-out set.

- ``read_pairs``: read and check the pairs, split off the held-out ones (before any model is loaded);
- ``encode_pair_splits``: render both splits with the chat template, write data_stats.json;
- ``pair_batch`` / ``average_logps``: chosen and rejected share one forward pass (2n rows, prompts left-padded,
  responses right-padded); the output layer runs on the response columns alone (models/value_head.response_logprobs);
  each side's log-prob is the per-token mean over its response tokens (the end-of-turn token included);
- ``evaluate_pairs``: ``pair_loss`` over all held-out pairs at once;
- ``train_on_pairs``: the loop on the run runtime (training/run.py: step plan, exact accumulation over pairs,
  schedule, clipping, checkpoints, resume), held-out evaluation at step 0, on ``train.eval_every`` and at the end.
  A micro-batch's loss is ``pair_loss`` times its pair count and the step divides by all its pairs, so a step's loss
  does not depend on how it is split into micro-batches or processes.

``train.sharding: fsdp2`` and ``train.gradient_checkpointing`` (training/sharding.py, docs/distributed.md): the recipe
applies them with ``run.prepare`` after loading the model (there is no reference model to keep whole); every forward,
training and held-out, runs through the FSDP root (``sharding.route``). Every rank evaluates every held-out pair, so
the held-out forwards are the same on every rank (lockstep); a training step's filler passes (a rank with fewer
micro-batches) repeat one of its micro-batches and are not counted in the metrics.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch

from instructkit.data.preference import EncodedPair, encode_pairs
from instructkit.data.sources import read_sources, split_validation
from instructkit.models.value_head import response_logprobs
from instructkit.rl.rollout import prompt_response_batch
from instructkit.training import sharding

PairLoss = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def read_pairs(cfg: Any, run) -> tuple[list, list, dict[str, Any]]:
    """(training pairs, held-out pairs, read statistics) of ``cfg.data``."""
    pairs, read_stats = read_sources(cfg.data, cfg.data.sources, run.run_dir, expect="preference")
    train_pairs, val_pairs, vstats = split_validation(pairs, cfg.data, run.run_dir)
    return train_pairs, val_pairs, {**read_stats, **vstats}


def encode_pair_splits(renderer, train_pairs: list, val_pairs: list, cfg: Any, run, read_stats: dict[str, Any]
                       ) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """Both splits as token ids (pairs that do not fit ``data.max_length`` dropped and counted in data_stats.json)."""
    from instructkit.data.schema import DataError

    train_items, dropped = encode_pairs(renderer, train_pairs, cfg.data.max_length)
    val_items, val_dropped = encode_pairs(renderer, val_pairs, cfg.data.max_length)
    if not train_items:
        raise DataError(f"no usable training pairs (dropped: {dropped})")
    if run.is_main:
        (run.run_dir / "data_stats.json").write_text(json.dumps(
            {"read": read_stats, "train_pairs": len(train_items), "validation_pairs": len(val_items),
             "dropped_train": dropped, "dropped_validation": val_dropped}, indent=1))
    return train_items, val_items


def pair_batch(items: list[EncodedPair], pad_id: int) -> dict[str, Any]:
    """Chosen rows then rejected rows in the prompt/response layout; ``n`` pairs."""
    batch = prompt_response_batch([it.prompt for it in items] * 2,
                                  [it.chosen for it in items] + [it.rejected for it in items], pad_id)
    batch["n"] = len(items)
    return batch


def average_logps(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) per-token mean response log-probs (1/|y|) log pi(y|x), each (n,)."""
    lp = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["prompt_width"],
                           batch["response_width"])  # (2n, R), 0 on padding
    mask = batch["response_mask"]
    avg = (lp * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (2n,)
    return avg[: batch["n"]], avg[batch["n"]:]


@torch.no_grad()
def evaluate_pairs(model, items: list[EncodedPair], pad_id: int, pair_loss: PairLoss, batch_size: int = 16
                   ) -> dict[str, float]:
    """``pair_loss`` and its metrics over all held-out pairs at once, as ``eval_*``; {} without held-out pairs."""
    if not items:
        return {}
    was = model.training
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(items), batch_size):  # every rank runs every batch: lockstep under sharding
        c, r = sharding.route(average_logps)(model, pair_batch(items[i:i + batch_size], pad_id))
        chosen.append(c)
        rejected.append(r)
    model.train(was)
    loss, m = pair_loss(torch.cat(chosen), torch.cat(rejected))
    return {f"eval_{k}": float(v) for k, v in {"loss": loss, **m}.items()} | {"eval_pairs": len(items)}


def train_on_pairs(run, model, train_items: list[EncodedPair], val_items: list[EncodedPair], pad_id: int,
                   pair_loss: PairLoss) -> tuple[dict[str, float], dict[str, float]]:
    """The training loop; returns (initial, final) held-out evaluation. metrics.jsonl records per step the common
    fields, ``pairs``, ``pairs_per_s`` and the pair-weighted mean of each ``pair_loss`` metric over all ranks."""
    from instructkit.training.run import data_fingerprint

    start = run.setup(model, n_items=len(train_items), fingerprint=data_fingerprint(train_items))
    initial_eval = run.state.get("initial_eval") or {}
    if run.resumed_from is None:
        initial_eval = evaluate_pairs(model, val_items, pad_id, pair_loss)
        run.log({"step": 0, **initial_eval})

    # the metric names, named for the reduction (a rank without micro-batches in a step has none of its own)
    metric_keys = sorted(pair_loss(torch.full((1,), -1.0), torch.full((1,), -2.0))[1])
    step_metrics: dict[int, dict[str, float]] = {}  # by micro-batch: a sharded filler pass repeats one, not counted

    def loss_fn(m, batch):
        chosen, rejected = average_logps(m, batch)
        loss, metrics = pair_loss(chosen, rejected)
        step_metrics[id(batch)] = {k: float(v) * batch["n"] for k, v in metrics.items()}
        return loss * batch["n"], torch.tensor(batch["n"])  # summed over pairs: the step divides by all its pairs

    loss_fn = sharding.route(loss_fn)  # under fsdp2 the root's hooks wrap the whole loss

    model.train()
    for step in range(start, run.total_steps):
        mbs = [pair_batch([train_items[i] for i in rows], pad_id) for rows in run.micro_batches(step)]
        step_metrics.clear()
        res = run.optimizer_step(mbs, loss_fn, lambda b: b["n"], step=step,
                                 token_fn=lambda b: int(b["attention_mask"].sum()))  # units: pairs
        done = step + 1
        rec = run.step_record(done, res)
        rec["pairs"] = res.units
        rec["pairs_per_s"] = res.units / res.seconds if res.seconds > 0 else None
        real = [step_metrics[id(b)] for b in mbs if id(b) in step_metrics]
        rec.update(run.dist.sum_metrics(real, res.units, metric_keys))  # pair-weighted means over all ranks
        if run.due("eval", done):
            rec.update(evaluate_pairs(model, val_items, pad_id, pair_loss))
        run.after_step(done, rec, state={"initial_eval": initial_eval}, throughput="pairs_per_s")

    final_eval = evaluate_pairs(model, val_items, pad_id, pair_loss)
    run.log({"step": run.total_steps, "final": True, **final_eval})
    return initial_eval, final_eval

