"""Verifiable rewards: programs that score a response, no reward model (RL with verifiable rewards, Lambert et al.
2024 "Tülu 3"; Shao et al. 2024 "DeepSeekMath").

Every reward here is a pure function with the rule-reward signature of rl/rollout.py,

    fn(prompts: list[list[dict]], completions: list[str], completion_ids: list[list[int]], **kwargs) -> list[float]

and reads what it needs from keyword arguments the recipe passes to every function that declares them:
``meta`` (one dict per row: the prompt record's ``meta``, which carries a GSM8K reference answer or the constraints
of a constraint-augmented prompt) and ``ended`` (one bool per row: the response ended its turn with a stop token
rather than running out of tokens). Config keys of a component arrive as further keyword arguments.

Built-in components (``BUILTIN_REWARDS``):
- ``gsm8k``: 1 when the response's final answer equals the reference's ``#### N``; the response's answer is a
  ``\\boxed{N}``, else a ``#### N``, else the last number in the text (commas, ``$`` and a trailing period ignored;
  compared as exact fractions, so "18.00" equals "18").
- ``constraints``: the IFEval checkers of eval/instruction_following.py applied to the constraints in
  ``meta["constraints"]`` (``[{"id": instruction_id, "kwargs": {...}}]``, written by ``instructkit data
  add-constraints``); ``mode="fraction"`` (default: the share satisfied) or ``"all"`` (1 only when all are).
- ``ends_turn``: 1 when the response ended its turn.
- ``length``: 1 when the response has between ``min_tokens`` and ``max_tokens`` tokens.
- ``json``: 1 when the response (or the body of a ```json fence) parses as JSON.
A component is also any ``module:function`` with the signature above (user code).

``CombinedReward`` sums weighted components and returns each component's raw values, so a recipe logs them all.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Sequence

from instructkit.eval.instruction_following import check_instruction
from instructkit.rl.rollout import load_reward_function

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*(" + _NUMBER + r")")
_ANY_NUMBER = re.compile(_NUMBER)


def parse_number(text: str) -> Fraction | None:
    """"1,234.50" / "$18" / "18." / "-3" -> an exact Fraction; None when ``text`` holds no number."""
    m = _ANY_NUMBER.search(text)
    if m is None:
        return None
    raw = m.group(0).replace(",", "").replace("$", "")
    try:
        return Fraction(raw)
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_reference(answer: str) -> Fraction | None:
    """The number after ``####`` in a GSM8K reference solution (None when it has none)."""
    m = _HASHES.search(answer)
    return parse_number(m.group(1)) if m else None


def final_answer(response: str) -> Fraction | None:
    """A response's final answer: the last ``\\boxed{...}`` holding a number, else the last ``#### N``, else the last
    number in the text; None when there is no number at all."""
    boxed = [b for b in _BOXED.findall(response) if parse_number(b) is not None]
    if boxed:
        return parse_number(boxed[-1])
    hashes = _HASHES.findall(response)
    if hashes:
        return parse_number(hashes[-1])
    numbers = _ANY_NUMBER.findall(response)
    return parse_number(numbers[-1]) if numbers else None


def _meta_rows(meta: Sequence[dict] | None, n: int, what: str) -> Sequence[dict]:
    if meta is None or len(meta) != n:
        raise ValueError(f"the {what} reward needs the prompt records' meta (one per response)")
    return meta


def gsm8k_reward(prompts, completions, completion_ids, *, meta: Sequence[dict] | None = None,
                 answer_key: str = "answer", **_) -> list[float]:
    """1.0 when the response's final answer equals the reference (``meta[answer_key]``: a GSM8K solution with
    ``#### N``, or a bare number), else 0.0. A reference without a number is an error naming the row."""
    meta = _meta_rows(meta, len(completions), "gsm8k")
    out = []
    for i, (text, m) in enumerate(zip(completions, meta)):
        ref_text = str(m.get(answer_key, ""))
        ref = gsm8k_reference(ref_text) if "####" in ref_text else parse_number(ref_text)
        if ref is None:
            raise ValueError(f"gsm8k reward: row {i} has no reference number in meta[{answer_key!r}]: {ref_text[:80]!r}")
        got = final_answer(text)
        out.append(1.0 if got is not None and got == ref else 0.0)
    return out


def constraint_reward(prompts, completions, completion_ids, *, meta: Sequence[dict] | None = None,
                      mode: str = "fraction", **_) -> list[float]:
    """Share of the row's constraints (``meta["constraints"]``) the response satisfies (strict IFEval checkers), or,
    with ``mode="all"``, 1.0 only when every one is. A row without constraints is an error naming it."""
    if mode not in ("fraction", "all"):
        raise ValueError(f"constraints reward: mode must be 'fraction' or 'all', got {mode!r}")
    meta = _meta_rows(meta, len(completions), "constraints")
    out = []
    for i, (text, m) in enumerate(zip(completions, meta)):
        cons = m.get("constraints")
        if not cons:
            raise ValueError(f"constraints reward: row {i} carries no meta['constraints'] "
                             "(make prompts with `instructkit data add-constraints`)")
        ok = [check_instruction(c["id"], c.get("kwargs") or {}, text) for c in cons]
        out.append(float(all(ok)) if mode == "all" else sum(ok) / len(ok))
    return out


def ends_turn_reward(prompts, completions, completion_ids, *, ended: Sequence[bool] | None = None, **_) -> list[float]:
    """1.0 for a response that ended its turn (a stop token), 0.0 for one cut off at the token limit."""
    if ended is None or len(ended) != len(completions):
        raise ValueError("the ends_turn reward needs the rollouts' ended flags")
    return [1.0 if e else 0.0 for e in ended]


def length_reward(prompts, completions, completion_ids, *, min_tokens: int = 0, max_tokens: int | None = None,
                  **_) -> list[float]:
    """1.0 when min_tokens <= len(response tokens) <= max_tokens (no upper bound when None), else 0.0."""
    hi = float("inf") if max_tokens is None else max_tokens
    return [1.0 if min_tokens <= len(ids) <= hi else 0.0 for ids in completion_ids]


_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```\s*$", re.S)


def json_reward(prompts, completions, completion_ids, **_) -> list[float]:
    """1.0 when the response, stripped (or the body of one ```json fence), is valid JSON; 0.0 otherwise
    (unterminated objects, trailing text, an empty response)."""
    out = []
    for text in completions:
        body = text.strip()
        m = _FENCE.match(body)
        if m:
            body = m.group(1).strip()
        try:
            json.loads(body)
            out.append(1.0)
        except ValueError:
            out.append(0.0)
    return out


BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {
    "gsm8k": gsm8k_reward,
    "constraints": constraint_reward,
    "ends_turn": ends_turn_reward,
    "length": length_reward,
    "json": json_reward,
}


@dataclass
class RewardComponent:
    name: str
    fn: Callable[..., list[float]]
    weight: float
    kwargs: dict[str, Any]
    takes: frozenset[str]  # which of "meta" / "ended" the function declares (or all, for **kwargs)


def _takes(fn: Callable) -> frozenset[str]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset({"meta", "ended"})
    return frozenset(k for k in ("meta", "ended") if k in params)


class CombinedReward:
    """sum_k w_k r_k over components, each a built-in name or ``module:function``.

    ``specs``: ``[{"name": "gsm8k", "weight": 1.0, ...kwargs}, {"function": "pkg.mod:fn", "weight": 0.5}]``; keys
    other than name / function / weight are the component's keyword arguments. Calling it returns the weighted totals
    and each component's raw values (keyed by name), so every component can be logged."""

    def __init__(self, specs: Sequence[dict[str, Any]]):
        if not specs:
            raise ValueError("no reward given: set rewards: [{name: gsm8k}, ...] or a module:function")
        self.components: list[RewardComponent] = []
        for k, spec in enumerate(specs):
            spec = dict(spec)
            name, function = spec.pop("name", None), spec.pop("function", None)
            weight = float(spec.pop("weight", 1.0))
            if (name is None) == (function is None):
                raise ValueError(f"reward {k}: give exactly one of 'name' (one of {', '.join(BUILTIN_REWARDS)}) "
                                 f"or 'function' (module:function), got {sorted(map(str, specs[k]))}")
            if name is not None:
                if name not in BUILTIN_REWARDS:
                    raise ValueError(f"reward {k}: unknown reward {name!r}; built-in: {', '.join(BUILTIN_REWARDS)}")
                fn, label = BUILTIN_REWARDS[name], name
            else:
                fn, label = load_reward_function(function), function.split(":", 1)[1]
            if any(c.name == label for c in self.components):
                label = f"{label}_{k}"
            self.components.append(RewardComponent(label, fn, weight, spec, _takes(fn)))

    def __call__(self, prompts: list, completions: list[str], completion_ids: list[list[int]], *,
                 meta: Sequence[dict] | None = None, ended: Sequence[bool] | None = None
                 ) -> tuple[list[float], dict[str, list[float]]]:
        n = len(completions)
        totals = [0.0] * n
        parts: dict[str, list[float]] = {}
        for c in self.components:
            context = {k: v for k, v in (("meta", meta), ("ended", ended)) if k in c.takes}
            values = [float(v) for v in c.fn(prompts, completions, completion_ids, **context, **c.kwargs)]
            if len(values) != n:
                raise ValueError(f"reward {c.name} returned {len(values)} values for {n} responses")
            parts[c.name] = values
            totals = [t + c.weight * v for t, v in zip(totals, values)]
        return totals, parts
