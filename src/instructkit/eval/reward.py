"""Preference evaluation: win rate of model A over model B, under a reward model or a pairwise LLM judge.

Inputs are two response files matched by prompt text: JSONL ``{"prompt", "response"}`` (any model's outputs), or a
saved evaluation such as ``<model>/eval/responses.json`` from ``instructkit evaluate stop-rate`` (its ``samples``), so
two models answer the same prompts with one command each and are then compared.

**Reward model.** Each (prompt, response) is rendered exactly as the reward-model recipe renders it for training
(``rl/rollout.encode_response``: the chat-template prompt, then the response up to its end-of-turn token) and scored
with ``models/value_head.sequence_scores``: the scalar head read at the last real token (by attention mask, never by
searching for the pad id). A wins when r(A) > r(B); equal scores are ties. win rate = (wins + ties / 2) / n.

**LLM judge** (AlpacaEval-style pairwise preference): the judge sees the instruction and two outputs labelled
"Output (a)" and "Output (b)" and names the better one (or a tie). LLM judges prefer whichever output comes first (or
second) surprisingly often, so every prompt is judged twice, A as (a) then B as (a), and A's score for the prompt is
the mean of the two verdicts (win 1, tie or unparseable 0.5, loss 0): a judge that always answers "Output (a)"
gives exactly 0.5 and a position consistency of 0. Every raw verdict is saved (JSONL), because a judge's numbers are only
as good as its parsed answers. The judge is any OpenAI-compatible endpoint through generation/backends.OpenAIBackend
(retries, key from an environment variable, never logged).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructkit.data.schema import DataError


@dataclass(frozen=True)
class ResponsePair:
    prompt: str
    response_a: str
    response_b: str


def _read_responses(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"responses file not found: {path}")
    out: dict[str, str] = {}
    if path.suffix == ".json":  # a saved evaluation (<model>/eval/responses.json): its samples
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg}", source=str(path), line=e.lineno) from None
        rows = doc.get("samples") if isinstance(doc, dict) else doc
        if not isinstance(rows, list):
            raise DataError("expected an evaluation file with samples, or a list of {prompt, response}", source=str(path))
        numbered = [(i, r, "record") for i, r in enumerate(rows)]
    else:
        numbered = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        numbered.append((n, json.loads(line), "line"))
                    except json.JSONDecodeError as e:
                        raise DataError(f"malformed JSON: {e.msg}", source=str(path), line=n) from None
    for n, row, kind in numbered:
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("response"), str):
            raise DataError("expected {\"prompt\": str, \"response\": str}", source=str(path), **{kind: n})
        out.setdefault(row["prompt"], row["response"])
    return out


def paired_responses(path_a: str | Path, path_b: str | Path) -> list[ResponsePair]:
    """Responses of A and B to the same prompts (in A's order). Prompts only one side answered are an error."""
    a, b = _read_responses(path_a), _read_responses(path_b)
    only_a, only_b = [p for p in a if p not in b], [p for p in b if p not in a]
    if only_a or only_b:
        raise DataError(f"the response files answer different prompts: {len(only_a)} only in {path_a}, "
                        f"{len(only_b)} only in {path_b} (first: {(only_a or only_b)[0][:60]!r})")
    if not a:
        raise DataError(f"no responses in {path_a}")
    return [ResponsePair(p, a[p], b[p]) for p in a]


def win_rate_summary(scores_a: Sequence[float]) -> dict[str, Any]:
    """Per-prompt scores of A in [0, 1] -> win rate and counts."""
    n = len(scores_a)
    return {
        "winrate": sum(scores_a) / n,
        "wins": sum(1 for s in scores_a if s > 0.5),
        "losses": sum(1 for s in scores_a if s < 0.5),
        "ties": sum(1 for s in scores_a if s == 0.5),
        "n": n,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------------------------------


def reward_scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, template: str = "auto",
                  batch_size: int = 8, max_length: int | None = 2048) -> list[float]:
    """Raw reward of each (prompt, response), rendered as the reward-model recipe renders pairs."""
    import torch

    from instructkit.chat.render import Renderer
    from instructkit.models.value_head import sequence_scores
    from instructkit.data.preference import encode_response
    from instructkit.rl.rollout import prompt_response_batch

    renderer = Renderer(tokenizer, template=template)
    encoded = []
    for p, r in zip(prompts, responses):
        enc = encode_response(renderer, [{"role": "user", "content": p}], [{"role": "assistant", "content": r}],
                              max_length)
        if enc is None:
            raise DataError(f"prompt too long to score within {max_length} tokens: {p[:60]!r}")
        encoded.append(enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    model.eval()
    with torch.no_grad():
        for s in range(0, len(encoded), batch_size):
            chunk = encoded[s:s + batch_size]
            batch = prompt_response_batch([c[0] for c in chunk], [c[1] for c in chunk], pad)
            out += sequence_scores(model, batch["input_ids"], batch["attention_mask"]).tolist()
    return out


def reward_model_winrate_scored(model, tokenizer, pairs: Sequence[ResponsePair], *, template: str = "auto",
                                batch_size: int = 8) -> dict[str, Any]:
    prompts = [p.prompt for p in pairs]
    ra = reward_scores(model, tokenizer, prompts, [p.response_a for p in pairs], template=template,
                       batch_size=batch_size)
    rb = reward_scores(model, tokenizer, prompts, [p.response_b for p in pairs], template=template,
                       batch_size=batch_size)
    per_prompt = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(ra, rb)]
    return {
        **win_rate_summary(per_prompt),
        "mean_reward_a": sum(ra) / len(ra),
        "mean_reward_b": sum(rb) / len(rb),
        "mean_margin": sum(a - b for a, b in zip(ra, rb)) / len(ra),
        "rewards_a": ra,
        "rewards_b": rb,
    }


def reward_model_winrate(reward_model_path: str | Path, pairs: Sequence[ResponsePair], *, batch_size: int = 8,
                         template: str = "auto") -> dict[str, Any]:
    from instructkit.models.value_head import load_reward_model

    model, tokenizer, _norm = load_reward_model(reward_model_path)  # normalisation shifts both sides alike
    return reward_model_winrate_scored(model, tokenizer, pairs, template=template, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------------------
# LLM judge
# ---------------------------------------------------------------------------------------------------------------------

JUDGE_SYSTEM = "You are a careful, impartial evaluator of AI assistants' answers."
JUDGE_TEMPLATE = """Compare two answers to the same instruction and decide which one is better.

Judge helpfulness, correctness, and how well the answer follows the instruction. Do not let the order of the answers,
their length, or their style alone decide. If they are equally good, say so.

## Instruction
{instruction}

## Output (a)
{output_a}

## Output (b)
{output_b}

## Your verdict
Reply with exactly one of: "Output (a)", "Output (b)", or "Tie"."""

_VERDICT = re.compile(r"output\s*\(?\s*([ab])\s*\)?|\b(tie)\b", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """"a", "b", "tie", or None when the reply names none or several different verdicts."""
    found = {(m.group(1) or m.group(2)).lower() for m in _VERDICT.finditer(text)}
    return found.pop() if len(found) == 1 else None


def judge_messages(instruction: str, output_a: str, output_b: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_TEMPLATE.format(instruction=instruction, output_a=output_a,
                                                          output_b=output_b)},
    ]


class OpenAIJudge:
    """A judge behind an OpenAI-compatible endpoint: greedy, short replies, through generation/backends.py."""

    def __init__(self, base_url: str, model: str = "judge", api_key_env: str | None = None, max_new_tokens: int = 16,
                 concurrency: int = 4, **backend_kwargs: Any):
        from instructkit.generation.backends import OpenAIBackend
        from instructkit.generation.engine import SamplingParams

        # api_key_env names the variable (None: no key, e.g. a local judge); the backend errors if it is unset
        self.backend = OpenAIBackend(base_url, model, api_key_env=api_key_env, concurrency=concurrency,
                                     **backend_kwargs)
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.name = model

    def __call__(self, conversations: Sequence[list[dict[str, str]]]) -> list[str]:
        return self.backend.complete(list(conversations), self.params)


def judge_winrate(judge: Callable[[Sequence[list[dict[str, str]]]], list[str]], pairs: Sequence[ResponsePair], *,
                  verdicts_path: str | Path | None = None) -> dict[str, Any]:
    """Pairwise judge win rate of A over B, both orders per prompt (see module docstring).

    ``judge(list_of_message_lists) -> list_of_reply_texts``. Returns win rate and counts, ``position_consistency``
    (fraction of prompts where both orders name the same model, ties included), ``unparsed`` verdict count, and the
    raw verdicts (also written to ``verdicts_path`` as JSONL when given).
    """
    requests, meta = [], []
    for i, p in enumerate(pairs):
        requests.append(judge_messages(p.prompt, p.response_a, p.response_b))
        meta.append((i, "A_first"))
        requests.append(judge_messages(p.prompt, p.response_b, p.response_a))
        meta.append((i, "B_first"))
    replies = judge(requests)
    if len(replies) != len(requests):
        raise RuntimeError(f"the judge returned {len(replies)} replies for {len(requests)} requests")
    score_of = {("a", "A_first"): 1.0, ("b", "A_first"): 0.0, ("a", "B_first"): 0.0, ("b", "B_first"): 1.0}
    per_order: list[dict[str, float]] = [{} for _ in pairs]
    verdicts, unparsed = [], 0
    for (i, order), reply in zip(meta, replies):
        v = parse_verdict(reply)
        unparsed += v is None
        s = 0.5 if v in (None, "tie") else score_of[(v, order)]
        per_order[i][order] = s
        verdicts.append({"prompt": pairs[i].prompt, "order": order, "raw": reply, "verdict": v, "score_a": s})
    per_prompt = [(d["A_first"] + d["B_first"]) / 2 for d in per_order]
    consistent = sum(1 for d in per_order if d["A_first"] == d["B_first"])
    if verdicts_path:
        Path(verdicts_path).parent.mkdir(parents=True, exist_ok=True)
        with open(verdicts_path, "w", encoding="utf-8") as f:
            for v in verdicts:
                f.write(json.dumps(v, ensure_ascii=False) + "\n")
    return {
        **win_rate_summary(per_prompt),
        "position_consistency": consistent / len(pairs),
        "unparsed": unparsed,
        "judge": getattr(judge, "name", type(judge).__name__),
        "verdicts": verdicts,
    }
