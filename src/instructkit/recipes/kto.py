"""KTO: alignment from unpaired desirable / undesirable completions against a frozen reference (Ethayarajh et al. 2024).

    r(x, y) = log pi(y|x) - log ref(y|x)
    z0      = max(0, mean over the step of r(x, y') with y' a completion of another prompt)   (detached)
    loss    = lambda_D (1 - sigma(beta (r - z0)))  for desirable y,  lambda_U (1 - sigma(beta (z0 - r)))  otherwise
                                                                            (losses.kto_loss, losses.kto_kl_baseline)

Phases: config -> data (unpaired examples; preference pairs are split into a desirable chosen and an undesirable
rejected example, as the paper does for paired data) -> model -> examples rendered with the chat template, each given
a mismatched completion (a seeded derangement: every example borrows the completion of another example) -> reference
log-probs of matched and mismatched completions, once, from the starting policy (with LoRA: the base, adapter
included at B = 0) -> loop on the run runtime (training/run.py) -> held-out rewards -> final/ and summary.json.

The KL baseline z0 is estimated over each whole optimizer step: before the step, a gradient-free forward of the
step's mismatched (prompt, completion) pairs on every process, summed across processes. So a step's gradient does not
depend on how it is split into micro-batches or processes. Log-probs are summed over the completion's tokens.

``train.sharding: fsdp2`` and ``train.gradient_checkpointing`` (training/sharding.py, docs/distributed.md): the policy
is sharded after the reference log-probs are computed; every forward (training, the KL baseline, held-out evaluation)
runs through the FSDP root, and the KL baseline's forwards run in lockstep (``sharding.lockstep_map``: a rank with
fewer mismatched pairs in a step makes filler calls).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import torch

from instructkit.config import KTOConfig
from instructkit.data.preference import encode_response
from instructkit.data.sources import read_sources, split_validation
from instructkit.losses import kto_loss
from instructkit.models.value_head import response_logprobs
from instructkit.rl.rollout import prompt_response_batch
from instructkit.training import sharding


@dataclass
class EncodedExample:
    """An unpaired example as token ids; ``mismatch``: the completion of another example (for z0)."""

    prompt: list[int]
    completion: list[int]
    desirable: bool
    mismatch: list[int] | None = None


def labelled(ex) -> list[tuple]:
    """(prompt, completion, label, tools) tuples of an example: an UnpairedExample as is, a PreferencePair as its
    chosen response (desirable) and its rejected one (undesirable); [] for any other kind."""
    from instructkit.data.schema import PreferencePair, UnpairedExample

    if isinstance(ex, UnpairedExample):
        return [(ex.prompt, ex.completion, bool(ex.label), ex.tools)]
    if isinstance(ex, PreferencePair):
        return [(ex.prompt, ex.chosen, True, ex.tools), (ex.prompt, ex.rejected, False, ex.tools)]
    return []


def check_kinds(examples: list, stats: dict[str, Any], sources, prefix: str = "") -> None:
    """Refuse an example KTO cannot use, naming its file and format (``stats``: read_sources' per-source counts, in
    the order of ``sources``)."""
    from instructkit.data.schema import DataError

    k = 0
    for src in sources:
        st = stats.get(prefix + src.path, {})
        n = st.get("examples", len(examples) - k)
        for j, ex in enumerate(examples[k:k + n]):
            if not labelled(ex):
                raise DataError(f"{src.path}: example {j} is a {type(ex).__name__} (format {st.get('format')!r}); "
                                "KTO needs unpaired examples (format kto: messages + label, or prompt + completion "
                                "+ label) or preference pairs")
        k += n


def encode_examples(renderer, examples: list, max_length: int, seed: int) -> tuple[list[EncodedExample], dict]:
    """Render (prompt, completion, label) tuples; drop (and count) those with no completion token left; then give
    each kept example the completion of another one (a seeded cyclic shift over a shuffled order)."""
    items: list[EncodedExample] = []
    dropped = {"too_long": 0}
    for prompt, completion, label, tools in examples:
        enc = encode_response(renderer, prompt, completion, max_length, tools)
        if enc is None:
            dropped["too_long"] += 1
            continue
        items.append(EncodedExample(enc[0], enc[1], label))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    for k, i in enumerate(order):
        items[i].mismatch = items[order[(k + 1) % len(order)]].completion if len(items) > 1 else None
    return items, dropped


def completion_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> torch.Tensor:
    """Summed completion log-probs log pi(y|x), (n,)."""
    b = prompt_response_batch(prompts, completions, pad_id)
    lp = response_logprobs(model, b["input_ids"], b["attention_mask"], b["prompt_width"], b["response_width"])
    return (lp * b["response_mask"]).sum(-1)


@torch.no_grad()
def logps_of(model, items: list[EncodedExample], pad_id: int, mismatched: bool, batch_size: int = 16
             ) -> torch.Tensor:
    """Gradient-free summed log-probs of each item's own (or mismatched) completion, (n,)."""
    out = [completion_logps(model, [it.prompt for it in items[i:i + batch_size]],
                            [it.mismatch if mismatched else it.completion for it in items[i:i + batch_size]], pad_id)
           for i in range(0, len(items), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def evaluate(model, items: list[EncodedExample], ref: torch.Tensor, ref_mis: torch.Tensor, cfg: KTOConfig,
             pad_id: int) -> dict[str, float]:
    """Held-out KTO loss (z0 from the held-out mismatched pairs), mean implicit reward beta * r of desirable and of
    undesirable completions, and their difference (``reward_margin``)."""
    if len(items) < 2:
        return {}
    was = model.training
    model.eval()
    logps = sharding.route(logps_of)  # every rank evaluates every item: the same passes (lockstep) when sharded
    pol, pol_mis = logps(model, items, pad_id, False), logps(model, items, pad_id, True)
    model.train(was)
    z0 = (pol_mis - ref_mis).mean().clamp(min=0.0)
    desirable = torch.tensor([it.desirable for it in items])
    loss, m = kto_loss(pol, ref, desirable, z0, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    out = {"loss": loss, **m, "reward_margin": m["rewards_desirable"] - m["rewards_undesirable"]}
    return {f"eval_{k}": float(v) for k, v in out.items()} | {"eval_examples": len(items)}


def main(cfg: KTOConfig) -> dict[str, Any]:
    from instructkit.chat.render import Renderer
    from instructkit.data.schema import DataError
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.training.run import Run, data_fingerprint

    run = Run.start(cfg, "kto", shardable=True)

    # -- data (read and checked before the model is loaded)
    examples, read_stats = read_sources(cfg.data, cfg.data.sources, run.run_dir)
    check_kinds(examples, read_stats, cfg.data.sources)
    train_ex, val_ex, vstats = split_validation(examples, cfg.data, run.run_dir)  # a pair stays on one side
    if cfg.data.validation:
        check_kinds(val_ex, vstats, cfg.data.validation, prefix="validation:")
    train_ex, val_ex = [t for ex in train_ex for t in labelled(ex)], [t for ex in val_ex for t in labelled(ex)]

    # -- model: its starting weights are the reference
    policy, tok = load_model_and_tokenizer(run.model_config(), cfg.lora, precision=run.precision)
    renderer = Renderer.from_config(tok, cfg.model.template, cfg.data)
    pad_id = tok.pad_token_id

    # -- encode, mismatched completions
    train_items, dropped = encode_examples(renderer, train_ex, cfg.data.max_length, cfg.data.seed)
    val_items, val_dropped = encode_examples(renderer, val_ex, cfg.data.max_length, cfg.data.seed)
    if len(train_items) < 2:
        raise DataError(f"KTO needs at least 2 usable training examples (to estimate its KL baseline from mismatched "
                        f"pairs), got {len(train_items)} (dropped: {dropped})")
    n_d = sum(it.desirable for it in train_items)
    n_u = len(train_items) - n_d
    if run.is_main:
        (run.run_dir / "data_stats.json").write_text(json.dumps(
            {"read": {**read_stats, **vstats}, "train_examples": len(train_items), "train_desirable": n_d,
             "train_undesirable": n_u, "validation_examples": len(val_items), "dropped_train": dropped,
             "dropped_validation": val_dropped,
             # the paper recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3]
             "weighted_desirable_ratio": cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
             if cfg.undesirable_weight * n_u > 0 else None}, indent=1))

    # -- reference log-probs, once, before any update (the policy is still the reference)
    policy.eval()
    ref_train, ref_train_mis = logps_of(policy, train_items, pad_id, False), logps_of(policy, train_items, pad_id, True)
    ref_val = logps_of(policy, val_items, pad_id, False)
    ref_val_mis = logps_of(policy, val_items, pad_id, True) if len(val_items) > 1 else None  # else no evaluation
    policy = run.prepare(policy)  # activation checkpointing, FSDP2 (after the reference log-probs)

    def held_out() -> dict[str, float]:
        return evaluate(policy, val_items, ref_val, ref_val_mis, cfg, pad_id)

    # -- loop
    start = run.setup(policy, n_items=len(train_items), fingerprint=data_fingerprint(train_items))
    initial_eval = run.state.get("initial_eval") or {}
    if run.resumed_from is None:
        initial_eval = held_out()
        run.log({"step": 0, **initial_eval})

    def make_batch(rows: list[int]) -> dict[str, Any]:
        batch = prompt_response_batch([train_items[i].prompt for i in rows],
                                      [train_items[i].completion for i in rows], pad_id)
        batch.update(rows=rows, n=len(rows), ref=ref_train[rows],
                     desirable=torch.tensor([train_items[i].desirable for i in rows]))
        return batch

    def kl_baseline(rows: list[int]) -> torch.Tensor:
        """z0 over the whole step: this rank's mismatched pairs, summed with every other rank's."""
        size = cfg.train.micro_batch_size
        chunks = [[train_items[i] for i in rows[k:k + size]] for k in range(0, len(rows), size)]
        parts = sharding.lockstep_map(policy, run.dist, lambda m, c: logps_of(m, c, pad_id, True), chunks,
                                      train_items[:1])
        mis = torch.cat(parts) if parts else torch.zeros(0)
        t = torch.tensor([float((mis - ref_train_mis[rows]).sum()), float(len(rows))], dtype=torch.float64)
        run.dist.all_reduce_sum(t)
        return (t[0] / t[1].clamp(min=1.0)).clamp(min=0.0).float()

    step_metrics: dict[int, dict[str, float]] = {}  # by micro-batch: a sharded filler pass repeats one, not counted
    z0 = torch.zeros(())

    def loss_fn(m, batch):
        lp = response_logprobs(m, batch["input_ids"], batch["attention_mask"], batch["prompt_width"],
                               batch["response_width"])
        pol = (lp * batch["response_mask"]).sum(-1)  # (n,)
        loss, _ = kto_loss(pol, batch["ref"], batch["desirable"], z0, cfg.beta, cfg.desirable_weight,
                           cfg.undesirable_weight)
        r = cfg.beta * (pol.detach() - batch["ref"])
        d = batch["desirable"].to(r.dtype)
        step_metrics[id(batch)] = {"desirable_reward_sum": float((r * d).sum()), "desirable": float(d.sum()),
                                   "undesirable_reward_sum": float((r * (1 - d)).sum()),
                                   "undesirable": float((1 - d).sum())}
        return loss * batch["n"], torch.tensor(batch["n"])  # summed over examples: the step divides by all of them

    loss_fn = sharding.route(loss_fn)  # under fsdp2 the root's hooks wrap the whole loss

    policy.train()
    for step in range(start, run.total_steps):
        row_lists = run.micro_batches(step)
        mbs = [make_batch(rows) for rows in row_lists]
        z0 = kl_baseline([i for rows in row_lists for i in rows])
        step_metrics.clear()
        res = run.optimizer_step(mbs, loss_fn, lambda b: b["n"], step=step,
                                 token_fn=lambda b: int(b["attention_mask"].sum()))  # units: examples
        done = step + 1
        rec = run.step_record(done, res)
        real = [step_metrics[id(b)] for b in mbs if id(b) in step_metrics]
        totals = run.dist.sum_metrics(real, 1, keys=["desirable_reward_sum", "desirable",
                                                             "undesirable_reward_sum", "undesirable"])
        rec.update(examples=res.units, examples_per_s=res.units / res.seconds if res.seconds > 0 else None,
                   kl_baseline=float(z0), desirable=int(totals["desirable"]), undesirable=int(totals["undesirable"]),
                   rewards_desirable=totals["desirable_reward_sum"] / max(totals["desirable"], 1.0),
                   rewards_undesirable=totals["undesirable_reward_sum"] / max(totals["undesirable"], 1.0))
        if run.due("eval", done):
            rec.update(held_out())
        run.after_step(done, rec, state={"initial_eval": initial_eval}, throughput="examples_per_s")

    # -- held-out evaluation and save
    final_eval = held_out()
    run.log({"step": run.total_steps, "final": True, **final_eval})
    return run.finish(policy, tok, {"train_examples": len(train_items), "initial_eval": initial_eval, **final_eval},
                      template=renderer.template)
