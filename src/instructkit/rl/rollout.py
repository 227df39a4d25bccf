"""Rollouts for PPO: generate responses, then score them: policy and reference log-probs, values, rewards.

A ``Trajectory`` holds one batch in the *prompt/response layout*: row i is its prompt left-padded to width P, followed
by its response right-padded to width R. Every response token sits in the same columns in every row, so the output
layer and the value head run on exactly the R response columns (models/value_head.py).

A rule-based reward is any Python callable named "module:function" with the signature

    fn(prompts: list[list[dict]], completions: list[str], completion_ids: list[list[int]], **kwargs) -> list[float]

(``kwargs`` come from the config). ``token_fraction_reward`` below is one, used by the tests and the tiny config.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import torch


def prompt_response_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                          response_masks: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Lay out (prompt, response) pairs: prompts left-padded to P, responses right-padded to R.

    Returns input_ids (B, P+R), attention_mask (B, P+R), response_mask (B, R) (1 on response tokens that count;
    ``response_masks`` can zero some, e.g. unsupervised template tokens), and the widths P and R."""
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in number")
    b = len(prompts)
    p = max(len(x) for x in prompts)
    r = max(1, max(len(x) for x in responses))
    input_ids = torch.full((b, p + r), pad_id, dtype=torch.long)
    attention = torch.zeros((b, p + r), dtype=torch.long)
    response_mask = torch.zeros((b, r), dtype=torch.float32)
    for i, (pr, rs) in enumerate(zip(prompts, responses)):
        if not pr:
            raise ValueError(f"row {i}: empty prompt")
        input_ids[i, p - len(pr): p] = torch.tensor(list(pr), dtype=torch.long)
        attention[i, p - len(pr): p] = 1
        if rs:
            input_ids[i, p: p + len(rs)] = torch.tensor(list(rs), dtype=torch.long)
            attention[i, p: p + len(rs)] = 1
            m = response_masks[i] if response_masks is not None else [1] * len(rs)
            response_mask[i, : len(rs)] = torch.tensor(list(m), dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response_mask,
            "prompt_width": p, "response_width": r}


@dataclass
class Trajectory:
    """One PPO rollout batch; tensors are (B, R) over response tokens unless noted."""

    input_ids: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    response_mask: torch.Tensor  # (B, R) float, 1 on generated tokens (the stop token included)
    prompt_width: int
    response_width: int
    logprobs: torch.Tensor  # (B, R) policy log-probs at rollout time (the PPO "old" log-probs)
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R) critic values at rollout time
    scores: torch.Tensor  # (B,) sequence scores (after the missing-EOS penalty)
    ended: torch.Tensor  # (B,) bool: the response ended with an end-of-turn token
    rewards: torch.Tensor | None = None  # (B, R) KL-penalised per-token rewards
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)

    def select(self, idx: torch.Tensor) -> "Trajectory":
        """The rows ``idx`` (a mini-batch), widths unchanged."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, torch.Tensor) else v
        return Trajectory(**out)


def load_reward_function(spec: str) -> Callable[..., list[float]]:
    """Import the callable named "package.module:function" (a rule-based reward)."""
    if ":" not in spec:
        raise ValueError(f"reward function {spec!r} must be 'module:function'")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import reward function {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


def token_fraction_reward(prompts, completions, completion_ids, *, token_ids: Sequence[int] = (), **_) -> list[float]:
    """Fraction of a completion's tokens that are in ``token_ids`` (0 for an empty completion): maximum 1.0.

    A rule reward a tiny model can learn in a few PPO steps (tests, configs/tiny_ppo.yaml)."""
    wanted = set(int(t) for t in token_ids)
    return [sum(t in wanted for t in ids) / len(ids) if ids else 0.0 for ids in completion_ids]


def make_rollout_batch(prompt_ids: Sequence[Sequence[int]], outputs: Sequence[Any], stop_ids: Sequence[int],
                       pad_id: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Engine outputs -> the prompt/response layout and (B,) ``ended`` (response ends with a stop token)."""
    responses = [list(o.token_ids) for o in outputs]
    stop = set(int(t) for t in stop_ids)
    ended = torch.tensor([bool(r) and r[-1] in stop and o.finish_reason == "stop" for r, o in zip(responses, outputs)])
    return prompt_response_batch(prompt_ids, responses, pad_id), ended


# ---------------------------------------------------------------------------------------------------------------------
# Encoding preference data and prompts (shared by the reward-model, DPO and PPO recipes)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class EncodedPair:
    """A preference pair as token ids: one prompt, two responses (each ending with the end-of-turn token)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0


def encode_response(renderer, prompt_messages, response_messages, max_length: int | None = None
                    ) -> tuple[list[int], list[int]] | None:
    """(prompt ids, response ids) of ``prompt + response`` rendered with the chat template.

    The prompt is ``renderer.render_prompt`` (what generation continues from); the response is the rest of the full
    render up to its last supervised token (the end-of-turn token: template glue after it is not the model's to
    predict). The two renders must agree on the prompt (training render == generation render), else DataError.
    Longer than ``max_length``: the response is cut to fit; None if the prompt alone does not leave a response token.
    """
    from instructkit.data.schema import DataError

    prompt_ids = list(renderer.render_prompt(prompt_messages))
    full = renderer.render(list(prompt_messages) + list(response_messages), mask="all_assistant")
    n = len(prompt_ids)
    if full.input_ids[:n] != prompt_ids:
        raise DataError("the chat template renders the prompt differently with and without the response")
    mask = full.loss_mask[n:]
    supervised = [i for i, m in enumerate(mask) if m]
    if not supervised:
        return None
    response = full.input_ids[n: n + supervised[-1] + 1]
    if max_length is not None:
        if n >= max_length:
            return None
        response = response[: max_length - n]
    return prompt_ids, response


def _usable(c, r, dropped: dict[str, int]) -> bool:
    """Whether an encoded (chosen, rejected) pair can be trained on; counts the reason in ``dropped`` if not (R6)."""
    if c is None or r is None:
        dropped["too_long"] += 1
        return False
    if c[1] == r[1]:  # no preference signal left (identical, or identical after truncation)
        dropped["identical"] += 1
        return False
    return True


def encode_pairs(renderer, pairs, max_length: int | None = None) -> tuple[list[EncodedPair], dict[str, int]]:
    """Encode PreferencePairs; returns the kept ones and counts of what was dropped, by reason (R6)."""
    out: list[EncodedPair] = []
    dropped = {"too_long": 0, "identical": 0}
    for pair in pairs:
        c = encode_response(renderer, pair.prompt, pair.chosen, max_length)
        r = encode_response(renderer, pair.prompt, pair.rejected, max_length)
        if not _usable(c, r, dropped):
            continue
        out.append(EncodedPair(c[0], c[1], r[1], float(pair.margin or 0.0)))
    return out, dropped


@dataclass
class EncodedGroup:
    """Responses to one prompt as token ids, each once, and the comparisons among them (a ranking of K responses
    is one group of K responses and up to K-choose-2 pairs; a plain preference pair is a group of 2 and 1 pair)."""

    prompt: list[int]
    responses: list[list[int]]
    pairs: list[tuple[int, int]]  # (better, worse) indices into ``responses``
    margins: list[float]  # one per pair


def group_pairs(pairs) -> list[list]:
    """PreferencePairs -> groups (lists of pairs), in order of first appearance.

    Pairs with the same ``meta["group"]`` (the ranked format sets it) and the same prompt are one group; a pair
    without a group is a group of its own. Keying on the prompt too keeps a reused group id from merging prompts."""
    groups: dict[Any, list] = {}
    for k, pair in enumerate(pairs):
        gid = (pair.meta or {}).get("group")
        key = ("pair", k) if gid is None else ("group", str(gid), tuple(pair.prompt))
        groups.setdefault(key, []).append(pair)
    return list(groups.values())


def encode_groups(renderer, groups, max_length: int | None = None) -> tuple[list[EncodedGroup], dict[str, int]]:
    """Encode groups of PreferencePairs (``group_pairs``); each distinct response is rendered once per group.

    Dropped pairs are counted by reason as in ``encode_pairs`` (too_long, identical), plus ``duplicate`` for a pair
    repeated in its group; a group with no pair left is dropped. For groups of one pair this keeps exactly the
    pairs ``encode_pairs`` keeps."""
    out: list[EncodedGroup] = []
    dropped = {"too_long": 0, "identical": 0, "duplicate": 0}
    for group in groups:
        cache: dict[tuple, Any] = {}

        def enc(pair, side):
            key = tuple(side)
            if key not in cache:
                cache[key] = encode_response(renderer, pair.prompt, side, max_length)
            return cache[key]

        prompt_ids: list[int] | None = None
        index: dict[tuple[int, ...], int] = {}  # response ids -> row in the group (insertion order)
        pairs: list[tuple[int, int]] = []
        margins: list[float] = []
        seen: set[tuple[int, int]] = set()
        for pair in group:
            c, r = enc(pair, pair.chosen), enc(pair, pair.rejected)
            if not _usable(c, r, dropped):
                continue
            prompt_ids = c[0]
            b = index.setdefault(tuple(c[1]), len(index))
            w = index.setdefault(tuple(r[1]), len(index))
            if (b, w) in seen:
                dropped["duplicate"] += 1
                continue
            seen.add((b, w))
            pairs.append((b, w))
            margins.append(float(pair.margin or 0.0))
        if pairs:
            out.append(EncodedGroup(prompt_ids, [list(x) for x in index], pairs, margins))
    return out, dropped


def prompt_messages_of(example) -> list:
    """The prompt of a Conversation (every turn before the last assistant turn) or of a PreferencePair."""
    if hasattr(example, "prompt"):
        return list(example.prompt)
    msgs = list(example.messages)
    last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=len(msgs))
    return msgs[:last]


def read_sources(data_cfg, sources, run_dir, expect: str | None = None) -> tuple[list, dict[str, Any]]:
    """Examples from DataSource entries with the DataConfig's strict/skip settings; and read stats per source."""
    from pathlib import Path

    from instructkit.data.io import ReadStats, iter_examples

    examples: list = []
    stats: dict[str, Any] = {}
    for i, src in enumerate(sources):
        st = ReadStats()
        rejects = data_cfg.rejects_path or str(Path(run_dir) / f"rejects_{i}.jsonl")
        examples += list(iter_examples(src.path, src.format, skip_invalid=data_cfg.skip_invalid,
                                       rejects_path=rejects if data_cfg.skip_invalid else None,
                                       max_invalid_fraction=data_cfg.max_invalid_fraction, stats=st,
                                       expect=expect, max_examples=src.max_examples))
        stats[src.path] = st.to_dict()
    return examples, stats


def split_validation(examples: list, data_cfg, run_dir) -> tuple[list, list, dict[str, Any]]:
    """(train, validation, read stats): `data.validation` sources if given, else a seeded `validation_fraction` split
    of ``examples``."""
    import random

    train, stats = examples, {}
    if data_cfg.validation:
        val, vstats = read_sources(data_cfg, data_cfg.validation, run_dir)
        stats.update({f"validation:{k}": v for k, v in vstats.items()})
        return train, val, stats
    order = list(range(len(train)))
    random.Random(data_cfg.seed).shuffle(order)
    n_val = int(round(len(train) * data_cfg.validation_fraction))
    val_idx = set(order[:n_val])
    return [e for i, e in enumerate(train) if i not in val_idx], [train[i] for i in sorted(val_idx)], stats
