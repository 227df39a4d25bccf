"""Reward model: a backbone plus a scalar head, trained with the pairwise (Bradley-Terry) loss on preference pairs
and on K-wise rankings.

Phases: config -> data (pairs regrouped by prompt, rendered with the chat template) -> model
(``*ForSequenceClassification`` with one label; full or LoRA) -> loop (training/loop.py: exact accumulation over
groups, schedule, clipping, non-finite guard, metrics; training/checkpoint.py: atomic checkpoints and exact resume) ->
held-out accuracy -> reward normalisation -> save.

``train.sharding: fsdp2`` and ``train.gradient_checkpointing`` (training/sharding.py, docs/distributed.md): every
forward (training, held-out accuracy, the reward statistics) runs through the FSDP root (``sharding.route``), whose unit
holds the embeddings and the score head; final/ is gathered into a plain copy on rank 0 (LoRA merged) and saved in the
same AutoModelForSequenceClassification layout.

Groups (InstructGPT, Ouyang et al. 2022, sec. 3.5). A ranking of K responses to one prompt (the ``ranked`` format)
arrives as its K-choose-2 pairs sharing ``meta["group"]``; they are regrouped into one group: the prompt, its K
distinct responses and the (better, worse) pairs among them. A plain pair is a group of 2 responses and 1 pair. The
unit of training is the group: the StepPlan samples groups (``train.micro_batch_size`` counts groups), a micro-batch
forwards each distinct response of its groups once (sum_g K_g rows, not 2 * sum_g C(K_g, 2)), and the validation split
is by group, so no ranking is on both sides. The loss of an optimizer step over the groups G of all its micro-batches:

    loss = 1/|G| * sum_{g in G} 1/|P_g| * sum_{(b, w) in P_g} -log sigmoid(r_b - r_w - m_bw)

each prompt weighs the same however many comparisons it has (InstructGPT eq. 1 has 1/C(K,2) per prompt; P_g is the
pairs left after ties and truncation; m is the optional margin). Each micro-batch returns its sum over groups and the
loop divides by |G| of the whole step, so accumulation is exact. With only plain pairs this is the mean pairwise loss
over pairs, as before groups existed. Held-out and logged accuracies count pairs.

The score is read at the last token of prompt + response (the end-of-turn token). The saved folder is a plain
transformers sequence-classification model (``AutoModelForSequenceClassification`` loads it) with the training-set
mean and std of the raw rewards in config.json (models/value_head.py says how to apply them).
"""

from __future__ import annotations

import json
import logging
import random
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from instructkit.config import RewardModelConfig
from instructkit.data.preference import EncodedGroup, EncodedPair, encode_groups, group_pairs
from instructkit.data.sources import split_validation
from instructkit.losses import pairwise_reward_loss
from instructkit.models.value_head import backbone_and_score, load_sequence_classifier, sequence_scores
from instructkit.rl.rollout import prompt_response_batch
from instructkit.training import sharding

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


def build_model(cfg: RewardModelConfig, run):
    """(sequence classifier, tokenizer): score head initialised with the run's seed, LoRA through peft if enabled."""
    from instructkit.models.load import apply_lora, ensure_pad_token

    path = run.model_config().path  # resolved; torch seeded after resolution
    model, tok = load_sequence_classifier(path, trust_remote_code=cfg.model.trust_remote_code)
    ensure_pad_token(tok, model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
    return model, tok


METRIC_KEYS = ("_pairs", "accuracy", "reward_margin", "chosen_reward", "rejected_reward")


def group_batch(groups: list[EncodedGroup], pad_id: int) -> dict[str, Any]:
    """Each distinct response of ``groups`` once, in the prompt/response layout (sum_g K_g rows), and the comparisons
    as row indices: better, worse, margin, pair_weight = 1/|P_g| (N,) over the N pairs, in group order.

    Rows are ordered by response slot, then group: the first response of every group, then the second, ... For plain
    pairs that is all chosen rows then all rejected rows, ``pair_batch``'s layout, so the pair path's floating-point
    sums (and its losses, bit for bit) are what they were before groups existed."""
    slots = max((len(g.responses) for g in groups), default=0)
    row: dict[tuple[int, int], int] = {}  # (group, response) -> row
    prompts: list[list[int]] = []
    responses: list[list[int]] = []
    for k in range(slots):
        for gi, g in enumerate(groups):
            if k < len(g.responses):
                row[gi, k] = len(responses)
                prompts.append(g.prompt)
                responses.append(g.responses[k])
    better: list[int] = []
    worse: list[int] = []
    margins: list[float] = []
    weights: list[float] = []
    for gi, g in enumerate(groups):
        weights += [1.0 / len(g.pairs)] * len(g.pairs)
        better += [row[gi, b] for b, _ in g.pairs]
        worse += [row[gi, w] for _, w in g.pairs]
        margins += g.margins
    batch = prompt_response_batch(prompts, responses, pad_id)
    batch.update(better=torch.tensor(better, dtype=torch.long), worse=torch.tensor(worse, dtype=torch.long),
                 margin=torch.tensor(margins, dtype=torch.float32), n=len(groups),
                 pair_weight=torch.tensor(weights, dtype=torch.float64),  # cast to the rewards' dtype in group_loss
                 n_pairs=len(better))
    return batch


def group_rewards(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(better, worse) raw rewards of every pair of the batch, each (N,); the model runs once per distinct response."""
    r = sequence_scores(model, batch["input_ids"], batch["attention_mask"])  # (rows,)
    return r[batch["better"]], r[batch["worse"]]


def group_loss(better: torch.Tensor, worse: torch.Tensor, batch: dict[str, Any], use_margin: bool = False
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over the batch's groups of each group's mean pairwise loss (the module docstring's equation before the
    division by the step's group count), and pair-level metric sums (accuracy, reward_margin, chosen_reward,
    rejected_reward; divide by the pair count).

        sum_g 1/|P_g| sum_{p in P_g} l_p  =  N * mean_p (w_p l_p),   w_p = 1/|P_g(p)|,  l_p = -log sigmoid(d_p - m_p)

    written as ``pairwise_reward_loss``'s mean times N so that plain pairs (w = 1) give its numbers bit for bit. Not
    ``losses.kwise_reward_loss``: that pools the pairs of a (P, K) strict ranking, while a group's pairs may be a
    partial order (ties, pairs dropped by truncation) and each group must weigh the same.
    Shapes: better, worse (N,) rewards of the N pairs."""
    diff = better - worse  # (N,)
    shifted = diff - batch["margin"].to(diff.dtype) if use_margin else diff
    weight = batch["pair_weight"].to(diff.dtype)  # (N,)
    n = diff.numel()
    loss = (-F.logsigmoid(shifted) * weight).mean() * n
    _, metrics = pairwise_reward_loss(better.detach(), worse.detach())
    return loss, {k: v.item() * n for k, v in metrics.items()}


def micro_batch_loss(model, batch: dict[str, Any], use_margin: bool = False, sink: dict | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """training/loop.py's loss function: (sum over the micro-batch's groups of their mean pair loss, group count);
    the loop divides by the step's group count. The metric sums go to ``sink[id(batch)]`` (keyed by micro-batch: a
    sharded filler pass repeats a micro-batch and must not count twice)."""
    better, worse = group_rewards(model, batch)
    loss, sums = group_loss(better, worse, batch, use_margin)
    if sink is not None:
        sink[id(batch)] = sums
    return loss, torch.tensor(batch["n"])


def row_chunks(groups: list[EncodedGroup], max_rows: int = 32) -> list[list[EncodedGroup]]:
    """Consecutive groups in chunks of at most ``max_rows`` responses (a larger group is a chunk alone)."""
    chunks: list[list[EncodedGroup]] = []
    rows = 0
    for g in groups:
        if not chunks or rows + len(g.responses) > max_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(g)
        rows += len(g.responses)
    return chunks


def by_length(groups: list[EncodedGroup]) -> list[EncodedGroup]:
    """Groups ordered by their longest prompt + response (stable), so that a chunk pads its rows to similar lengths:
    the held-out metrics and reward statistics are order-free means, and on real data (HH-RLHF, lengths 30-320
    tokens) chunks of consecutive groups spent most of their compute on padding."""
    return sorted(groups, key=lambda g: len(g.prompt) + max(len(r) for r in g.responses))


@torch.no_grad()
def evaluate_groups(model, groups: list[EncodedGroup], pad_id: int, max_rows: int = 32) -> dict[str, float]:
    """Held-out pairwise loss (mean over pairs), accuracy (fraction of pairs ordered correctly) and mean margin."""
    was = model.training
    model.eval()
    better, worse = [], []
    for chunk in row_chunks(by_length(groups), max_rows):  # every rank runs every chunk: lockstep under sharding
        b, w = sharding.route(group_rewards)(model, group_batch(chunk, pad_id))
        better.append(b)
        worse.append(w)
    model.train(was)
    if not better:
        return {}
    loss, m = pairwise_reward_loss(torch.cat(better), torch.cat(worse))
    return {"eval_loss": loss.item(), "eval_accuracy": m["accuracy"].item(), "eval_margin": m["reward_margin"].item(),
            "eval_pairs": sum(len(g.pairs) for g in groups), "eval_groups": len(groups)}


def statistics_groups(groups: list[EncodedGroup], sample: int | None, seed: int) -> list[EncodedGroup]:
    """The groups whose responses the normalisation statistics are measured on: all of them (``sample`` None or at
    least their responses), else whole groups in a seeded random order until they hold ``sample`` responses (the same
    on every rank: every rank runs every chunk)."""
    if sample is None or sum(len(g.responses) for g in groups) <= sample:
        return groups
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    out, n = [], 0
    for i in order:
        out.append(groups[i])
        n += len(groups[i].responses)
        if n >= sample:
            break
    return out


@torch.no_grad()
def reward_statistics(model, groups: list[EncodedGroup], pad_id: int, max_rows: int = 32) -> tuple[float, float]:
    """Mean and std of the raw rewards of the distinct responses of ``groups`` (each response of each group once)."""
    model.eval()
    scores = []
    for chunk in row_chunks(by_length(groups), max_rows):
        batch = group_batch(chunk, pad_id)
        scores.append(sharding.route(sequence_scores)(model, batch["input_ids"], batch["attention_mask"]))
    s = torch.cat(scores)
    return s.mean().item(), (s.std().item() if s.numel() > 1 else 1.0) or 1.0


def split_groups(pairs: list, data_cfg, run_dir) -> tuple[list[list], list[list], dict[str, Any]]:
    """(train groups, validation groups, read stats): pairs regrouped (rollout.group_pairs), then the validation split
    draws whole groups (or the groups of the ``data.validation`` sources)."""
    train, val, stats = split_validation(group_pairs(pairs), data_cfg, run_dir)
    if data_cfg.validation:
        val = group_pairs(val)  # read from the validation sources: pairs, not yet grouped
    return train, val, stats


def shared_groups(train: list[list], val: list[list]) -> int:
    """How many group ids are on both sides (only possible with separate validation sources that repeat a ranking)."""
    def ids(side: list[list]) -> set:
        return {p.meta["group"] for g in side for p in g if (p.meta or {}).get("group") is not None}

    return len(ids(train) & ids(val))


def main(cfg: RewardModelConfig) -> dict[str, Any]:
    from instructkit.chat.render import Renderer
    from instructkit.data.schema import DataError
    from instructkit.data.sources import read_sources
    from instructkit.training.run import Run, data_fingerprint

    run = Run.start(cfg, "reward-model", shardable=True)
    run_dir = run.run_dir

    # -- data (read and checked before the model is loaded)
    pairs, read_stats = read_sources(cfg.data, cfg.data.sources, run_dir, expect="preference")
    train_groups, val_groups, vstats = split_groups(pairs, cfg.data, run_dir)
    read_stats.update(vstats)
    overlap = shared_groups(train_groups, val_groups)
    if overlap:
        log.warning("%d ranked groups are in both the training and the validation data", overlap)

    # -- model, then the data rendered with its tokenizer
    model, tok = build_model(cfg, run)
    model = run.prepare(model)  # activation checkpointing, FSDP2 (the score head is in the root unit)
    renderer = Renderer.from_config(tok, cfg.model.template, cfg.data)
    pad_id = tok.pad_token_id
    train_items, dropped = encode_groups(renderer, train_groups, cfg.data.max_length)
    val_items, val_dropped = encode_groups(renderer, val_groups, cfg.data.max_length)
    if not cfg.use_margin:
        for it in train_items:
            it.margins = [0.0] * len(it.margins)
    n_train_pairs = sum(len(g.pairs) for g in train_items)
    run.check_data(read=read_stats, examples=sum(len(g) for g in train_groups), kept=n_train_pairs, dropped=dropped,
                   unit="pairs")
    if not train_items:
        raise DataError(f"no usable training pairs (dropped: {dropped})")
    if run.is_main:
        (run_dir / "data_stats.json").write_text(json.dumps(
            {"read": read_stats, "train_pairs": n_train_pairs, "validation_pairs": sum(len(g.pairs) for g in val_items),
             "train_groups": len(train_items), "validation_groups": len(val_items),
             "train_responses": sum(len(g.responses) for g in train_items), "groups_in_train_and_validation": overlap,
             "dropped_train": dropped, "dropped_validation": val_dropped}, indent=1))

    # -- loop (the unit is the group: micro_batch_size counts groups)
    start = run.setup(model, n_items=len(train_items), fingerprint=data_fingerprint(train_items))
    step_metrics: dict[int, dict[str, float]] = {}
    loss_fn = sharding.route(partial(micro_batch_loss, use_margin=cfg.use_margin, sink=step_metrics))
    model.train()
    held_out: dict[str, float] | None = None  # the last step's held-out metrics, if it was an eval step
    for step in range(start, run.total_steps):
        mbs = [group_batch([train_items[i] for i in rows], pad_id) for rows in run.micro_batches(step)]
        step_metrics.clear()
        res = run.optimizer_step(mbs, loss_fn, lambda b: b["n"], step=step,
                                 token_fn=lambda b: int(b["attention_mask"].sum()))  # units: groups
        done = step + 1
        rec = run.step_record(done, res)
        real = [step_metrics[id(b)] for b in mbs if id(b) in step_metrics]
        sums = run.dist.sum_metrics(real + [{"_pairs": sum(b["n_pairs"] for b in mbs)}], 1, METRIC_KEYS)
        rec.update({k: sums[k] / max(sums["_pairs"], 1) for k in METRIC_KEYS if k != "_pairs"})
        held_out = None
        if run.due("eval", done) and val_items:
            held_out = evaluate_groups(model, val_items, pad_id)
            rec.update(held_out)
        run.after_step(done, rec)

    # -- held-out accuracy (the last step's if it just ran: the weights have not changed since), normalisation, save
    result: dict[str, Any] = {"train_pairs": n_train_pairs, "train_groups": len(train_items)}
    result.update(held_out if held_out is not None else evaluate_groups(model, val_items, pad_id))
    mean, std, n_stat = 0.0, 1.0, 0
    if cfg.normalize:
        stat_items = statistics_groups(train_items, cfg.normalize_sample, cfg.data.seed)
        n_stat = sum(len(g.responses) for g in stat_items)
        mean, std = reward_statistics(model, stat_items, pad_id)
    result.update({"reward_mean": mean, "reward_std": std, "reward_stat_responses": n_stat})
    run.log({"step": run.total_steps, **result})
    backbone_and_score(sharding.unwrap(model))  # fails early if the head cannot be found
    return run.finish(model, tok, result, template=renderer.template, kind="reward", reward_norm=(mean, std))
