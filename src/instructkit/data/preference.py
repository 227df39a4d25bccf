"""Preference data as token ids: each (prompt, response) rendered with the chat template, pairs and ranked groups.

Shared by the reward-model and DPO recipes (and reward evaluation). A renderer (chat/render.py's ``Renderer``) is passed
in; nothing here loads a model. Pairs that cannot be trained on are dropped and counted by reason, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from instructkit.data.schema import Conversation, DataError


@dataclass
class EncodedPair:
    """A preference pair as token ids: one prompt, two responses (each ending with the end-of-turn token)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0


def encode_response(renderer, prompt_messages, response_messages, max_length: int | None = None,
                    tools: list[dict] | None = None) -> tuple[list[int], list[int]] | None:
    """(prompt ids, response ids) of ``prompt + response`` rendered with the chat template.

    The prompt is ``renderer.render_prompt`` (what generation continues from); the response is the rest of the full
    render up to its last supervised token (the end-of-turn token: template glue after it is not the model's to
    predict). The two renders must agree on the prompt (training render == generation render), else DataError.
    Longer than ``max_length``: the response is cut to fit; None if the prompt alone does not leave a response token.
    ``tools``: the example's function definitions, rendered into the prompt by the template (as for SFT).
    """
    prompt_ids = list(renderer.render_prompt(prompt_messages, tools=tools))
    full = renderer.render(Conversation(list(prompt_messages) + list(response_messages), tools=tools),
                           mask="all_assistant")
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
    """Whether an encoded (chosen, rejected) pair can be trained on; counts the reason in ``dropped`` if not."""
    if c is None or r is None:
        dropped["too_long"] += 1
        return False
    if c[1] == r[1]:  # no preference signal left (identical, or identical after truncation)
        dropped["identical"] += 1
        return False
    return True


def encode_pairs(renderer, pairs, max_length: int | None = None) -> tuple[list[EncodedPair], dict[str, int]]:
    """Encode PreferencePairs; returns the kept ones and counts of what was dropped, by reason."""
    out: list[EncodedPair] = []
    dropped = {"too_long": 0, "identical": 0}
    for pair in pairs:
        c = encode_response(renderer, pair.prompt, pair.chosen, max_length, pair.tools)
        r = encode_response(renderer, pair.prompt, pair.rejected, max_length, pair.tools)
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
                cache[key] = encode_response(renderer, pair.prompt, side, max_length, pair.tools)
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
