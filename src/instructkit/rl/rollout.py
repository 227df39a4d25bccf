"""Rollouts for PPO and GRPO: the prompts they sample from, the batch layout of sampled responses, rule rewards.

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

from instructkit.data.schema import DataError
from instructkit.data.sources import prompt_messages_of


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


def encode_prompts(examples: Sequence[Any], renderer: Any, max_length: int, *, need: int = 0, why: str = ""
                   ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The prompts an RL recipe samples from: records {"ids", "messages", "meta"} of conversations or pairs (the
    messages before the last assistant turn, rendered by ``renderer.render_prompt`` with the example's tools, as SFT
    renders them; ``messages`` keep every field, tool calls and reasoning included, for rule rewards), and the examples
    dropped by reason: "no_prompt" (nothing before the answer), "too_long" (more than ``max_length`` tokens).
    Fewer than ``need`` prompts is a DataError naming ``why`` (what needs them)."""
    prompts, dropped = [], {"too_long": 0, "no_prompt": 0}
    for ex in examples:
        msgs = prompt_messages_of(ex)
        if not msgs:
            dropped["no_prompt"] += 1
            continue
        ids = renderer.render_prompt(msgs, tools=getattr(ex, "tools", None))
        if len(ids) > max_length:
            dropped["too_long"] += 1
            continue
        prompts.append({"ids": list(ids), "messages": [m.to_dict() for m in msgs], "meta": dict(ex.meta)})
    if len(prompts) < need:
        raise DataError(f"{len(prompts)} usable prompts, fewer than the {need} of {why} ({dropped['too_long']} longer "
                        f"than data.max_length={max_length}, {dropped['no_prompt']} without a prompt)")
    return prompts, dropped
