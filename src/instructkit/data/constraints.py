"""Constraint-augmented prompts for RL with verifiable rewards (Lambert et al. 2024, "Tülu 3", section 5: prompts
carrying checkable constraints, rewarded by a program).

``add_constraints`` takes instructions from any source and appends one or more verifiable constraints to the last
user turn ("Your entire response should be in lowercase letters."), recording each constraint's IFEval instruction id
and checker arguments, so that the ``constraints`` reward (rl/rewards.py) scores a response with the same checkers
IFEval uses (eval/instruction_following.py). Output records are prompts (``prompt_only`` format): the original
answer is dropped, since it was not written to satisfy the new constraint.

The catalogue below covers the IFEval instruction types whose satisfaction does not depend on the topic of the
instruction (case, punctuation, length, bullet lists, sections, postscripts, titles, quotations, JSON, keywords).
The sentences are written for this module; arguments are drawn per prompt from seeded ranges. Constraints that
cannot hold together (lowercase with capitals, JSON with a title or bullets, ...) are never drawn for one prompt.

The IFEval evaluation prompts must never become training prompts: ``check_against`` flags sources that share word
n-grams with evaluation prompts (eval/contamination.py's method), and the CLI refuses to write contaminated prompts
unless told to drop them (they then go to a rejects file, counted).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from instructkit.data.schema import Conversation, Message

_WORDS = ["river", "lantern", "orbit", "harvest", "compass", "velvet", "signal", "meadow", "puzzle", "anchor"]
_ENDINGS = ["Is there anything else I can help with?", "Let me know if you have additional questions.",
            "That is all for now."]


@dataclass(frozen=True)
class ConstraintKind:
    id: str  # the IFEval instruction id its checker is registered under
    make: Callable[[random.Random], tuple[dict[str, Any], str]]  # rng -> (checker kwargs, sentence)
    group: str  # constraints of one group exclude each other (at most one per prompt)
    conflicts: tuple[str, ...] = ()  # groups this one cannot be combined with


def _words_limit(rng: random.Random):
    if rng.random() < 0.5:
        n = rng.choice([40, 60, 80, 100])
        return {"relation": "less than", "num_words": n}, f"Answer in fewer than {n} words."
    n = rng.choice([50, 80, 120])
    return {"relation": "at least", "num_words": n}, f"Your answer must contain at least {n} words."


def _sentences(rng: random.Random):
    n = rng.choice([2, 3, 4, 5])
    return ({"relation": "less than", "num_sentences": n},
            f"Use fewer than {n} sentences in your reply.")


def _bullets(rng: random.Random):
    n = rng.choice([2, 3, 4, 5])
    return ({"num_bullets": n}, f"Format your answer as exactly {n} bullet points, each line starting with \"* \".")


def _highlights(rng: random.Random):
    n = rng.choice([1, 2, 3])
    return ({"num_highlights": n},
            f"Highlight at least {n} part{'s' if n > 1 else ''} of your answer with markdown, like *this part*.")


def _postscript(rng: random.Random):
    marker = rng.choice(["P.S.", "P.P.S"])
    return {"postscript_marker": marker}, f"End your response with a postscript that starts with {marker}"


def _end_phrase(rng: random.Random):
    phrase = rng.choice(_ENDINGS)
    return ({"end_phrase": phrase},
            f"Finish your response with the exact phrase \"{phrase}\" and write nothing after it.")


def _keyword(rng: random.Random):
    w = rng.choice(_WORDS)
    return {"keywords": [w]}, f"Include the word \"{w}\" somewhere in your answer."


def _forbidden(rng: random.Random):
    ws = rng.sample(_WORDS, 2)
    return {"forbidden_words": ws}, f"Do not use the words \"{ws[0]}\" or \"{ws[1]}\" in your response."


def _paragraphs(rng: random.Random):
    n = rng.choice([2, 3, 4])
    return ({"num_paragraphs": n},
            f"Write exactly {n} paragraphs, separated from each other by the markdown divider ***")


CATALOGUE: tuple[ConstraintKind, ...] = (
    ConstraintKind("change_case:english_lowercase",
                   lambda r: ({}, "Your entire response must be in lowercase letters; no capital letters at all."),
                   "case", ("json",)),
    ConstraintKind("change_case:english_capital",
                   lambda r: ({}, "Write your entire response in English, using capital letters only."),
                   "case", ("json",)),
    ConstraintKind("punctuation:no_comma", lambda r: ({}, "Do not use any commas in your response."), "comma"),
    ConstraintKind("length_constraints:number_words", _words_limit, "length"),
    ConstraintKind("length_constraints:number_sentences", _sentences, "length"),
    ConstraintKind("detectable_format:number_bullet_lists", _bullets, "layout", ("json",)),
    ConstraintKind("length_constraints:number_paragraphs", _paragraphs, "layout", ("json",)),
    ConstraintKind("detectable_format:number_highlighted_sections", _highlights, "highlight", ("json",)),
    ConstraintKind("detectable_content:postscript", _postscript, "ending", ("json",)),
    ConstraintKind("startend:end_checker", _end_phrase, "ending", ("json", "case", "wrap")),
    ConstraintKind("detectable_format:title",
                   lambda r: ({}, "Give your answer a title wrapped in double angular brackets, like <<my title>>."),
                   "title", ("json",)),
    ConstraintKind("startend:quotation",
                   lambda r: ({}, "Wrap your entire response in double quotation marks."), "wrap", ("json",)),
    ConstraintKind("detectable_format:json_format",
                   lambda r: ({}, "Your entire output must be valid JSON; you may wrap it in a ```json block."),
                   "json", ("case", "layout", "highlight", "ending", "title", "wrap")),
    ConstraintKind("keywords:existence", _keyword, "keyword"),
    ConstraintKind("keywords:forbidden_words", _forbidden, "forbidden"),
)
KINDS = {k.id: k for k in CATALOGUE}


def draw_constraints(rng: random.Random, n: int, kinds: Sequence[str] | None = None) -> list[tuple[dict, str]]:
    """``n`` mutually compatible constraints: ``[({"id", "kwargs"}, sentence), ...]`` drawn without replacement from
    ``kinds`` (ids of CATALOGUE; all by default)."""
    pool = [KINDS[k] for k in kinds] if kinds else list(CATALOGUE)
    rng.shuffle(pool)
    chosen: list[ConstraintKind] = []
    for k in pool:
        if len(chosen) == n:
            break
        if any(c.group == k.group or c.group in k.conflicts or k.group in c.conflicts for c in chosen):
            continue
        chosen.append(k)
    if len(chosen) < n:
        raise ValueError(f"cannot draw {n} compatible constraints from {len(pool)} kinds")
    out = []
    for k in chosen:
        kwargs, sentence = k.make(rng)
        out.append(({"id": k.id, "kwargs": kwargs}, sentence))
    return out


def add_constraints(examples: Sequence[Any], *, n_min: int = 1, n_max: int = 1, seed: int = 0,
                    kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One prompt record per example: its prompt (every turn before its last assistant turn) with n in [n_min, n_max]
    constraint sentences appended to the last user turn, as ``{"prompt": [messages], "constraints": [...],
    "source": ...}`` (the ``prompt_only`` format: extra keys become the prompt's meta, where the reward reads them).

    Deterministic for a seed: example i draws from ``random.Random(f"{seed}:{i}")``."""
    unknown = [k for k in kinds or () if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown constraint kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    if not 1 <= n_min <= n_max:
        raise ValueError(f"need 1 <= n_min <= n_max, got {n_min}, {n_max}")
    out = []
    for i, ex in enumerate(examples):
        prompt = _prompt_of(ex)
        if not prompt or prompt[-1].role != "user":
            raise ValueError(f"example {i}: its prompt does not end with a user turn")
        rng = random.Random(f"{seed}:{i}")
        drawn = draw_constraints(rng, rng.randint(n_min, n_max), kinds)
        last = prompt[-1]
        text = last.content.rstrip() + "\n\n" + " ".join(sentence for _, sentence in drawn)
        msgs = [m.to_dict() for m in prompt[:-1]] + [{"role": "user", "content": text}]
        rec: dict[str, Any] = {"prompt": msgs, "constraints": [spec for spec, _ in drawn]}
        meta = getattr(ex, "meta", None) or {}
        if meta.get("source") is not None:
            rec["source"] = meta["source"]
        out.append(rec)
    return out


def _prompt_of(ex: Any) -> list[Message]:
    if hasattr(ex, "prompt"):
        return list(ex.prompt)
    if isinstance(ex, Conversation):
        msgs = list(ex.messages)
        last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=len(msgs))
        return msgs[:last]
    raise ValueError(f"{type(ex).__name__} has no prompt to add constraints to")


def user_text(record: dict[str, Any]) -> str:
    """The last user turn of a prompt record written by add_constraints (what the contamination check compares)."""
    return next(m["content"] for m in reversed(record["prompt"]) if m["role"] == "user")
