"""SimPO: preference optimisation on a length-normalised reward margin, without a reference model (Meng et al. 2024).

    loss = -log sigmoid( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )        (losses.simpo_loss)

Phases: config -> data (preference pairs, read and checked before the model is loaded) -> model (no reference copy)
-> pairs rendered with the chat template -> loop on the run runtime (training/run.py: step plan, exact accumulation
over pairs, schedule, clipping, checkpoints, resume) -> held-out margin and accuracy -> final/ and summary.json.

Chosen and rejected share one forward pass (2n rows, prompts left-padded, responses right-padded); the output layer
runs on the response columns alone (models/value_head.response_logprobs). Each side's log-prob is the per-token mean
over its response tokens (the end-of-turn token included).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from instructkit.config import SimPOConfig
from instructkit.data.preference import EncodedPair, encode_pairs
from instructkit.data.sources import read_sources, split_validation
from instructkit.losses import simpo_loss
from instructkit.models.value_head import response_logprobs
from instructkit.rl.rollout import prompt_response_batch


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
def evaluate(model, items: list[EncodedPair], cfg: SimPOConfig, pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Held-out SimPO loss, margin beta (avg_w - avg_l) and accuracy, over all held-out pairs at once."""
    if not items:
        return {}
    was = model.training
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(items), batch_size):
        c, r = average_logps(model, pair_batch(items[i:i + batch_size], pad_id))
        chosen.append(c)
        rejected.append(r)
    model.train(was)
    loss, m = simpo_loss(torch.cat(chosen), torch.cat(rejected), cfg.beta, cfg.gamma)
    return {f"eval_{k}": float(v) for k, v in {"loss": loss, **m}.items()} | {"eval_pairs": len(items)}


def main(cfg: SimPOConfig) -> dict[str, Any]:
    from instructkit.chat.render import Renderer
    from instructkit.data.schema import DataError
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.training.run import Run, data_fingerprint

    run = Run.start(cfg, "simpo")

    # -- data (read and checked before the model is loaded)
    pairs, read_stats = read_sources(cfg.data, cfg.data.sources, run.run_dir, expect="preference")
    train_pairs, val_pairs, vstats = split_validation(pairs, cfg.data, run.run_dir)

    # -- model (no reference: SimPO's reward is the policy's own length-normalised log-likelihood)
    model, tok = load_model_and_tokenizer(run.model_config(), cfg.lora, precision=run.precision)
    renderer = Renderer.from_config(tok, cfg.model.template, cfg.data)
    pad_id = tok.pad_token_id

    # -- encode
    train_items, dropped = encode_pairs(renderer, train_pairs, cfg.data.max_length)
    val_items, val_dropped = encode_pairs(renderer, val_pairs, cfg.data.max_length)
    if not train_items:
        raise DataError(f"no usable training pairs (dropped: {dropped})")
    if run.is_main:
        (run.run_dir / "data_stats.json").write_text(json.dumps(
            {"read": {**read_stats, **vstats}, "train_pairs": len(train_items), "validation_pairs": len(val_items),
             "dropped_train": dropped, "dropped_validation": val_dropped}, indent=1))

    # -- loop
    start = run.setup(model, n_items=len(train_items), fingerprint=data_fingerprint(train_items))
    initial_eval = run.state.get("initial_eval") or {}
    if run.resumed_from is None:
        initial_eval = evaluate(model, val_items, cfg, pad_id)
        run.log({"step": 0, **initial_eval})

    step_metrics: list[dict[str, float]] = []

    def loss_fn(m, batch):
        chosen, rejected = average_logps(m, batch)
        loss, metrics = simpo_loss(chosen, rejected, cfg.beta, cfg.gamma)
        step_metrics.append({k: float(v) * batch["n"] for k, v in metrics.items()})
        return loss * batch["n"], torch.tensor(batch["n"])  # summed over pairs: the step divides by all its pairs

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
        rec.update(run.dist.sum_metrics(step_metrics, res.units))  # pair-weighted means over all ranks
        if run.due("eval", done):
            rec.update(evaluate(model, val_items, cfg, pad_id))
        run.after_step(done, rec, state={"initial_eval": initial_eval}, throughput="pairs_per_s")

    # -- held-out evaluation and save
    final_eval = evaluate(model, val_items, cfg, pad_id)
    run.log({"step": run.total_steps, "final": True, **final_eval})
    return run.finish(model, tok, {"train_pairs": len(train_items), "initial_eval": initial_eval, **final_eval},
                      template=renderer.template)
