"""GSM8K accuracy (Cobbe et al. 2021): greedy answers to grade-school maths problems, graded by final-answer match.

Each problem's question is the only user turn (as GRPO trains on it: data/formats.py ``gsm8k``); the model answers
with its own chat template (batched greedy generation, eval/metrics.generate_chat), and a response is correct when
its final answer (rl/rewards.final_answer: the last ``\\boxed{N}``, else the last ``#### N``, else the last number)
equals the reference's ``#### N``: the same extraction the ``gsm8k`` reward uses, so accuracy here and reward in
training measure the same thing.

The subset is fixed: the first ``limit`` problems of the file, in file order.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from instructkit.data.schema import DataError
from instructkit.rl.rewards import final_answer, gsm8k_reference


def load_problems(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """``[{"question", "answer", "reference"}]`` from a GSM8K JSONL (optionally .gz); the first ``limit`` rows.
    A row without a question or a ``#### N`` answer is an error naming the file and line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e})") from None
            q, a = (row.get("question"), row.get("answer")) if isinstance(row, dict) else (None, None)
            ref = gsm8k_reference(a) if isinstance(a, str) else None
            if not isinstance(q, str) or not q.strip() or ref is None:
                raise DataError(f"{path}:{n}: a GSM8K row needs a 'question' and an 'answer' ending in '#### N'")
            out.append({"question": q, "answer": a, "reference": ref})
    return out


def grade(problems: list[dict[str, Any]], responses: list[str]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics (accuracy, answered = share of responses holding a number) and one sample per problem."""
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses")
    samples = []
    for p, r in zip(problems, responses):
        got = final_answer(r)
        samples.append({"prompt": p["question"], "response": r, "reference": str(p["reference"]),
                        "extracted": None if got is None else str(got), "correct": got == p["reference"]})
    n = max(1, len(samples))
    return ({"accuracy": sum(s["correct"] for s in samples) / n,
             "answered": sum(s["extracted"] is not None for s in samples) / n,
             "num_problems": len(samples)}, samples)


def gsm8k_accuracy(model, tokenizer, problems: list[dict[str, Any]], *, max_new_tokens: int = 256,
                   batch_size: int = 8, template: str = "auto") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy responses to ``problems`` and their grade (see ``grade``); metrics also record max_new_tokens and the
    share of responses that stopped before it (``stop_rate``)."""
    from instructkit.eval.metrics import generate_chat

    outs = generate_chat(model, tokenizer, [[{"role": "user", "content": p["question"]}] for p in problems],
                         max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size, template=template)
    metrics, samples = grade(problems, [o.text for o in outs])
    for s, o in zip(samples, outs):
        s["finish_reason"] = o.finish_reason
    metrics["stop_rate"] = sum(o.finish_reason == "stop" for o in outs) / max(1, len(outs))
    metrics["max_new_tokens"] = max_new_tokens
    return metrics, samples
