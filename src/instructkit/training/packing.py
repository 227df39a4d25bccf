"""Padding-free packing: several rendered samples share a row, but each attends only to itself.

A "row" is a list of samples. ``collate_rows`` turns a micro-batch of rows into tensors:

- ``input_ids`` (B, T): the samples of a row concatenated, rows right-padded to the longest row of the micro-batch;
- ``position_ids`` (B, T): restart at 0 at every sample, so rotary positions are those of an unpacked sample;
- ``segment_ids`` (B, T): which sample of the row each position belongs to (-1 for padding);
- ``labels`` (B, T): already shifted: ``labels[t]`` is the token at ``t + 1`` when that token is supervised and belongs
  to the same sample, else -100. The last token of a sample never predicts the first token of the next one.

The isolating attention mask is built from ``segment_ids`` by models/load.py's ``block_causal_mask`` (a 4D additive mask, block-diagonal
and causal). We measured on transformers 5.23 / CPU that position_ids alone do NOT isolate packed samples with the sdpa or
eager attention (only the flash-attention kernels key on position_ids), and that a 4D *boolean* mask is misread by the
eager path; an additive float mask in the model's dtype is exact for both (tests/test_packing.py checks per-sample losses).

Unpacked (padded) batches are the same thing with one sample per row, so there is one code path.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One rendered example: token ids and a 0/1 mask of supervised tokens (same length)."""

    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        """Tokens that are predicted with a loss: supervised tokens that have a previous token."""
        return sum(self.loss_mask[1:])


@dataclass
class PrepareStats:
    """What happened to each sample on the way into rows: ``kept + sum(dropped.values()) == total``, always."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "truncated": self.truncated, "dropped": dict(self.dropped)}


def prepare_samples(samples: list[Sample], max_length: int, *, truncate: bool = True) -> tuple[list[Sample], PrepareStats]:
    """Truncate samples longer than ``max_length`` (or drop them if ``truncate`` is False) and drop samples that have no
    supervised token left. Every drop is counted by reason; nothing disappears silently."""
    stats = PrepareStats(total=len(samples))
    kept: list[Sample] = []
    for s in samples:
        if len(s.input_ids) != len(s.loss_mask):
            raise ValueError(f"sample has {len(s.input_ids)} ids but {len(s.loss_mask)} mask entries")
        if len(s) == 0:
            stats.dropped["empty"] += 1
            continue
        if len(s) > max_length:
            if not truncate:
                stats.dropped["too_long"] += 1
                continue
            s = Sample(s.input_ids[:max_length], s.loss_mask[:max_length])
            if s.n_supervised == 0:
                stats.dropped["no_supervised_tokens_after_truncation"] += 1
                continue
            stats.truncated += 1
        elif s.n_supervised == 0:
            stats.dropped["no_supervised_tokens"] += 1
            continue
        kept.append(s)
    stats.kept = len(kept)
    return kept, stats


def pack_first_fit(lengths: list[int], pack_length: int) -> list[list[int]]:
    """First-fit bin packing in the given order: each sample goes into the first row with room, else a new row.

    Returns rows as lists of sample indices. Every index appears exactly once; a row's total length is at most
    ``pack_length`` (a longer sample is an error: truncate with ``prepare_samples`` first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > pack_length:
            raise ValueError(f"sample {i} has {n} tokens, more than pack_length={pack_length}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(pack_length - n)
    return rows


def build_rows(samples: list[Sample], *, pack: bool, pack_length: int, seed: int) -> list[list[Sample]]:
    """Rows for an epoch-independent layout: samples in a seeded order, then first-fit packed (or one per row).

    The row layout is fixed for the whole run; epochs shuffle rows (see ``epoch_order``), so the data position on resume
    is just (epoch, row index)."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    if not pack:
        return [[samples[i]] for i in order]
    packed = pack_first_fit([len(samples[i]) for i in order], pack_length)
    return [[samples[order[j]] for j in row] for row in packed]


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of rows for ``epoch`` (independent of any model-side randomness, so the data
    order is reproducible from the seed alone)."""
    order = list(range(n_rows))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def collate_rows(rows: list[list[Sample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Micro-batch of rows -> input_ids, position_ids, segment_ids, labels (B, T), plus scalar counts."""
    width = max(sum(len(s) for s in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    segment_ids = torch.full((B, width), -1, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    n_tokens = 0
    for b, row in enumerate(rows):
        t = 0
        for k, s in enumerate(row):
            n = len(s)
            ids = torch.tensor(s.input_ids, dtype=torch.long)
            mask = torch.tensor(s.loss_mask, dtype=torch.bool)
            input_ids[b, t:t + n] = ids
            position_ids[b, t:t + n] = torch.arange(n)
            segment_ids[b, t:t + n] = k
            # shift inside the sample: position j predicts token j+1 of the same sample
            lab = torch.where(mask[1:], ids[1:], torch.full_like(ids[1:], IGNORE_INDEX))
            labels[b, t:t + n - 1] = lab
            t += n
            n_tokens += n
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "labels": labels,
        "n_tokens": torch.tensor(n_tokens),
        "n_supervised": (labels != IGNORE_INDEX).sum(),
    }
