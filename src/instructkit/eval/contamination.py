"""Contamination check: do held-out evaluation examples occur in the training mixture?

Method (GPT-3 appendix C; FLAN's and Llama's reports use the same idea): lowercase word n-grams (n = 13 or 8) of the
training text are put in a set; an evaluation text is flagged when any of its n-grams is in the set. Texts shorter than
n words are compared whole: flagged if the full word sequence occurs contiguously in some training text.

What is compared on the evaluation side: by default the example's *data* (each input field and the target, from the
conversation's meta["inputs"] and meta["target"]) -- not the template wording, which is shared by design between tasks
and would flag everything. With ``what="prompt"`` the whole user turn is compared instead (for evaluation sets read from
files, which have no fields). The training side is every message of every training conversation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from instructkit.data.schema import Conversation

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def conversation_text(conv: Conversation) -> str:
    return "\n".join(m.content for m in conv.messages)


def eval_texts(conv: Conversation, what: str = "fields") -> list[str]:
    if what == "prompt" or not conv.meta.get("inputs"):
        users = [m.content for m in conv.messages if m.role == "user"]
        return users[-1:] if users else []
    out = [str(v) for v in conv.meta["inputs"].values() if str(v).strip()]
    if conv.meta.get("target"):
        out.append(str(conv.meta["target"]))
    return out


@dataclass
class Overlap:
    index: int
    task: str | None
    text: str
    ngram: str


@dataclass
class ContaminationReport:
    n: int
    checked: int
    contaminated: int
    by_task: dict[str, dict[str, int]] = field(default_factory=dict)
    overlaps: list[Overlap] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.contaminated == 0

    def to_dict(self, max_overlaps: int = 50) -> dict:
        return {"n": self.n, "checked": self.checked, "contaminated": self.contaminated, "clean": self.clean,
                "by_task": self.by_task,
                "overlaps": [vars(o) for o in self.overlaps[:max_overlaps]]}


class NgramIndex:
    """The training side: n-grams for long texts, plus lazily built m-gram sets (m < n) for short evaluation texts."""

    def __init__(self, texts: Iterable[str], n: int):
        self.n = n
        self.token_lists = [words(t) for t in texts]
        self.grams: set[tuple[str, ...]] = set()
        for toks in self.token_lists:
            self.grams |= ngrams(toks, n)
        self._short: dict[int, set[tuple[str, ...]]] = {}

    def find(self, tokens: Sequence[str]) -> tuple[str, ...] | None:
        """The first n-gram of ``tokens`` seen in training (or the whole of a short text), else None."""
        if not tokens:
            return None
        if len(tokens) >= self.n:
            for i in range(len(tokens) - self.n + 1):
                g = tuple(tokens[i:i + self.n])
                if g in self.grams:
                    return g
            return None
        m = len(tokens)
        if m not in self._short:
            s: set[tuple[str, ...]] = set()
            for toks in self.token_lists:
                s |= ngrams(toks, m)
            self._short[m] = s
        g = tuple(tokens)
        return g if g in self._short[m] else None


def check_contamination(train: Iterable[Conversation], evals: Sequence[Conversation], n: int = 8,
                        what: str = "fields", min_words: int = 4) -> ContaminationReport:
    """Flag evaluation examples sharing an ``n``-gram with the training conversations (see the module docstring).

    ``min_words``: evaluation texts shorter than this are not checked (a one-word answer like "yes" or "42" occurs in
    any corpus and says nothing about leakage)."""
    index = NgramIndex((conversation_text(c) for c in train), n)
    report = ContaminationReport(n=n, checked=0, contaminated=0)
    for i, conv in enumerate(evals):
        task = conv.meta.get("task")
        stats = report.by_task.setdefault(str(task), {"checked": 0, "contaminated": 0})
        hit = None
        checked = False
        for text in eval_texts(conv, what):
            toks = words(text)
            if len(toks) < min_words:
                continue
            checked = True
            g = index.find(toks)
            if g is not None:
                hit = Overlap(i, task, text[:200], " ".join(g))
                break
        if checked:
            report.checked += 1
            stats["checked"] += 1
        if hit is not None:
            report.contaminated += 1
            stats["contaminated"] += 1
            report.overlaps.append(hit)
    return report


def contaminating(train: Sequence[Conversation], evals: Sequence[Conversation], n: int, what: str = "fields",
                  min_words: int = 4) -> list[int]:
    """Indices of the training conversations that ``check_contamination(train, evals, n, what, min_words)`` would
    flag an evaluation example for: those containing one of an evaluation text's ``n``-grams, or the whole of an
    evaluation text shorter than ``n`` words (but of at least ``min_words``). Removing them leaves the check clean, so
    decontaminating with this and then gating with ``require_clean`` agree (same words, same short-text rule)."""
    long_grams: set[tuple[str, ...]] = set()
    short: dict[int, set[tuple[str, ...]]] = {}
    for conv in evals:
        for text in eval_texts(conv, what):
            toks = words(text)
            if len(toks) < min_words:
                continue
            if len(toks) >= n:
                long_grams |= ngrams(toks, n)
            else:
                short.setdefault(len(toks), set()).add(tuple(toks))
    hits = []
    for i, conv in enumerate(train):
        toks = words(conversation_text(conv))
        if (long_grams and any(tuple(toks[j:j + n]) in long_grams for j in range(len(toks) - n + 1))) or any(
                tuple(toks[j:j + m]) in grams for m, grams in short.items() for j in range(len(toks) - m + 1)):
            hits.append(i)
    return hits


def require_clean(train: Iterable[Conversation], evals: Sequence[Conversation], n: int, what: str) -> dict:
    """The contamination check that gates a training run: raises DataError naming the overlaps when any evaluation
    example shares an ``n``-gram with the training conversations; returns the (clean) report as a dict otherwise."""
    from instructkit.data.schema import DataError

    rep = check_contamination(train, evals, n=n)
    if not rep.clean:
        shown = "; ".join(f"{o.task}: {o.ngram!r}" for o in rep.overlaps[:5])
        raise DataError(f"{what}: {rep.contaminated} of {rep.checked} evaluation examples share a {n}-gram with the "
                        f"training mixture (first: {shown}); fix the mixture or the held-out split before training")
    return rep.to_dict(max_overlaps=0)
