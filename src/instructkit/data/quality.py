"""Heuristic quality filters, each named, with a report of how many examples each one removed.

The response is the final assistant turn of a conversation (for a preference pair: the chosen side); the prompt is
the last user turn before it. Filters, in the order they are applied (an example is counted under the first filter
that removes it; ``flagged`` counts every filter that fired):

- ``empty_response``: the response is empty or whitespace.
- ``short_response``: fewer than ``min_response_words`` words (or ``min_response_chars`` characters).
- ``repeats_prompt``: the response, normalised, equals the prompt, or is the prompt plus fewer than
  ``repeat_slack_words`` new words.
- ``blacklist``: a blacklisted word or phrase (whole words, case-insensitive) in the prompt and/or response, e.g. the
  Self-Instruct list (image, graph, picture, file, map, draw, plot, go to ...) for instructions a text model cannot do.
- ``length_outlier``: response length (words, or tokens if ``count_tokens`` is given) above ``max_response_length``,
  or a robust outlier: |log(1+n) - median| / (1.4826 * MAD) > ``outlier_z`` over the data set (the log because
  lengths are skewed; median/MAD because a few huge examples would inflate a mean and standard deviation).
- ``contamination``: the example shares a word n-gram (``contamination_ngram``, 13 as in GPT-3's contamination
  study) with a text of an evaluation set passed as ``eval_texts``.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from instructkit.data.dedup import normalize_text
from instructkit.data.schema import Conversation, Example, Message, TextExample, UnpairedExample

# Self-Instruct's filter list (Wang et al. 2022): tasks a language model cannot carry out.
SELF_INSTRUCT_BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip

FILTERS = ("empty_response", "short_response", "repeats_prompt", "blacklist", "length_outlier", "contamination")

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class QualityConfig:
    min_response_words: int = 1
    """Responses with fewer words are removed (short_response); 1 removes responses with no word at all ("...")."""
    min_response_chars: int = 1
    """Responses with fewer non-space characters are removed (short_response)."""
    repeat_slack_words: int = 3
    """repeats_prompt: a response that is the prompt plus fewer than this many new words counts as a repeat."""
    blacklist: tuple[str, ...] = ()
    """Words or phrases that remove an example (whole-word, case-insensitive); SELF_INSTRUCT_BLACKLIST is one list."""
    blacklist_in: str = "both"
    """Where to look for blacklisted words: "prompt", "response" or "both"."""
    max_response_length: int | None = None
    """Absolute cap on response length (words, or tokens with count_tokens); None: no cap."""
    outlier_z: float | None = 3.5
    """Robust z-score above which a response length is an outlier (None: off)."""
    contamination_ngram: int = 13
    """Word n-gram length for the contamination check against eval_texts."""


@dataclass
class Flag:
    index: int
    filter: str
    detail: str


@dataclass
class QualityReport:
    total: int = 0
    kept: int = 0
    removed_by: Counter = field(default_factory=Counter)
    """Examples removed, by the first filter that fired."""
    flagged: Counter = field(default_factory=Counter)
    """Examples each filter fired on (an example can be flagged by several)."""
    removed: list[Flag] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "kept": self.kept,
            "removed_by": {f: self.removed_by.get(f, 0) for f in FILTERS},
            "flagged": {f: self.flagged.get(f, 0) for f in FILTERS},
        }


def prompt_and_response(ex: Example) -> tuple[str, str]:
    """(last user turn before the response, response): the final assistant turn, a pair's chosen side, an unpaired
    example's completion; plain text is all response."""
    if isinstance(ex, TextExample):
        return "", ex.text
    if isinstance(ex, UnpairedExample):
        prior = ex.prompt
        response = "\n".join(m.content for m in ex.completion if m.role == "assistant")
    elif isinstance(ex, Conversation):
        msgs: list[Message] = ex.messages
        last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=None)
        if last is None:
            prior = msgs
            response = ""
        else:
            prior = msgs[:last]
            response = msgs[last].content
    else:
        prior = ex.prompt
        response = "\n".join(m.content for m in ex.chosen if m.role == "assistant")
    prompt = next((m.content for m in reversed(prior) if m.role == "user"), "")
    return prompt, response


def _words(text: str) -> list[str]:
    return _WORD.findall(normalize_text(text))


def _phrase_pattern(phrases: Sequence[str]) -> re.Pattern | None:
    if not phrases:
        return None
    alts = sorted((r"\s+".join(map(re.escape, p.split())) for p in phrases if p.strip()), key=len, reverse=True)
    return re.compile(r"(?<!\w)(" + "|".join(alts) + r")(?!\w)", re.IGNORECASE) if alts else None


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def quality_filter(
    examples: Sequence[Example],
    config: QualityConfig | None = None,
    *,
    count_tokens: Callable[[str], int] | None = None,
    eval_texts: Sequence[str] = (),
) -> tuple[list[Example], QualityReport]:
    """Apply the filters (see the module docstring); returns the kept examples (in order) and the report."""
    cfg = config or QualityConfig()
    if cfg.blacklist_in not in ("prompt", "response", "both"):
        raise ValueError(f"blacklist_in must be prompt, response or both, got '{cfg.blacklist_in}'")
    pattern = _phrase_pattern(cfg.blacklist)
    pr = [prompt_and_response(ex) for ex in examples]
    lengths = [count_tokens(r) if count_tokens else len(_words(r)) for _, r in pr]

    # Robust length statistics over the whole set, in log space.
    logs = [math.log1p(n) for n in lengths]
    med = statistics.median(logs) if logs else 0.0
    mad = statistics.median([abs(x - med) for x in logs]) if logs else 0.0

    eval_grams: set[tuple[str, ...]] = set()
    for t in eval_texts:
        eval_grams |= _ngrams(_words(t), cfg.contamination_ngram)

    report = QualityReport(total=len(examples))
    kept = []
    for i, (ex, (prompt, response)) in enumerate(zip(examples, pr)):
        fired: list[tuple[str, str]] = []
        resp_words = _words(response)
        if not response.strip():
            fired.append(("empty_response", "empty response"))
        elif len(resp_words) < cfg.min_response_words or len("".join(response.split())) < cfg.min_response_chars:
            fired.append(("short_response", f"{len(resp_words)} words, {len(''.join(response.split()))} chars"))
        p_norm, r_norm = normalize_text(prompt), normalize_text(response)
        if r_norm and p_norm:
            p_words = _words(prompt)
            if r_norm == p_norm or (
                resp_words[: len(p_words)] == p_words and len(resp_words) - len(p_words) < cfg.repeat_slack_words
            ):
                fired.append(("repeats_prompt", "response repeats the prompt"))
        if pattern is not None:
            where = {"prompt": prompt, "response": response, "both": prompt + "\n" + response}[cfg.blacklist_in]
            m = pattern.search(where)
            if m:
                fired.append(("blacklist", f"blacklisted '{m.group(0)}'"))
        n = lengths[i]
        if cfg.max_response_length is not None and n > cfg.max_response_length:
            fired.append(("length_outlier", f"length {n} > max {cfg.max_response_length}"))
        elif cfg.outlier_z is not None and mad > 0:
            z = abs(logs[i] - med) / (1.4826 * mad)
            if z > cfg.outlier_z:
                fired.append(("length_outlier", f"length {n}, robust z {z:.1f} > {cfg.outlier_z}"))
        if eval_grams:
            if isinstance(ex, TextExample):
                text = ex.text
            else:
                msgs = ex.messages if isinstance(ex, Conversation) else ex.prompt + (
                    ex.completion if isinstance(ex, UnpairedExample) else ex.chosen)
                text = "\n".join(m.content for m in msgs)
            if _ngrams(_words(text), cfg.contamination_ngram) & eval_grams:
                fired.append(("contamination", f"shares a {cfg.contamination_ngram}-gram with the eval set"))
        for name, _ in fired:
            report.flagged[name] += 1
        if fired:
            report.removed_by[fired[0][0]] += 1
            report.removed.append(Flag(i, fired[0][0], fired[0][1]))
        else:
            kept.append(ex)
    report.kept = len(kept)
    return kept, report
