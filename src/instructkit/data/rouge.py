"""ROUGE-L with the decisions of Google's `rouge-score`, fast enough to filter tens of thousands of instructions.

Self-Instruct keeps a generated instruction only if its ROUGE-L F-measure against every instruction already in the pool
is below 0.7. The reference scripts call ``rouge_scorer.RougeScorer(["rougeL"]).score`` pair by pair, re-tokenising both
strings every time, over a multiprocessing pool: quadratic in the pool size with a large constant. Written here because
it is the project's own hot path (no library does incremental novelty search); the scores are the library's:

- the tokenizer is rouge-score's default one (lowercase, every run of characters outside [a-z0-9] is a separator, no
  stemming, as Self-Instruct uses it); each string is tokenised once and its words mapped to integer ids;
- F = 2PR / (P + R) with P = LCS / len(prediction), R = LCS / len(target), computed with the same float operations as
  ``rouge_score.rouge_scorer._score_lcs`` so a score at the threshold decides the same way;
- an upper bound prunes most pairs without any LCS: LCS <= |multiset overlap| of the two token lists, so
  F <= 2 * overlap / (m + n). Overlaps with the whole pool come from an inverted index in one ``np.bincount``;
- the LCS of the surviving pairs is computed bit-parallel (Hyyrö / Crochemore et al. 2001: one word holds the DP column of
  the candidate, each pool token costs four word operations) over many pool entries at once with numpy uint64 arrays.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID = re.compile(r"^[a-z0-9]+$")


def rouge_tokenize(text: str) -> list[str]:
    """rouge-score's default tokenizer without stemming: lowercase, non-[a-z0-9] runs split, empties dropped."""
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if _VALID.match(t)]


def _fmeasure(lcs: int, target_len: int, prediction_len: int) -> float:
    # the exact float operations of rouge_score.rouge_scorer._score_lcs and scoring.fmeasure
    if target_len == 0 or prediction_len == 0:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence, bit-parallel with Python integers (any lengths)."""
    if not a or not b:
        return 0
    masks: dict = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F-measure, equal to ``RougeScorer(["rougeL"]).score(target, prediction)["rougeL"].fmeasure``."""
    t, p = rouge_tokenize(target), rouge_tokenize(prediction)
    return _fmeasure(lcs_length(t, p), len(t), len(p))


@dataclass
class NoveltyDecision:
    text: str
    kept: bool
    max_score: float
    """Highest ROUGE-L F against the pool at the time of the decision (0.0 if the pool was empty)."""
    most_similar: str | None
    """The pool text with that score (the earliest one on ties), None if no pool text shares a word."""


@dataclass
class NoveltyResult:
    decisions: list[NoveltyDecision]

    @property
    def kept(self) -> list[str]:
        return [d.text for d in self.decisions if d.kept]

    @property
    def rejected(self) -> list[NoveltyDecision]:
        return [d for d in self.decisions if not d.kept]


class RougeLIndex:
    """A growing pool of texts; ``max_score(text)`` finds the most similar pool text by ROUGE-L F exactly."""

    def __init__(self, texts: Iterable[str] = ()):
        self._vocab: dict[str, int] = {}
        self.texts: list[str] = []
        self._lens = np.zeros(64, dtype=np.int64)
        self._mat = np.full((64, 16), -1, dtype=np.int64)  # token ids, right-padded with -1
        self._post_idx: dict[int, np.ndarray] = {}
        self._post_cnt: dict[int, np.ndarray] = {}
        self._post_n: dict[int, int] = {}
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self.texts)

    def _ids(self, tokens: list[str], grow: bool) -> list[int]:
        out = []
        for tok in tokens:
            i = self._vocab.get(tok)
            if i is None:
                if not grow:
                    i = -2 - len(out)  # unseen word: matches nothing in the pool, distinct from padding (-1)
                else:
                    i = self._vocab[tok] = len(self._vocab)
            out.append(i)
        return out

    def add(self, text: str) -> None:
        ids = self._ids(rouge_tokenize(text), grow=True)
        k = len(self.texts)
        self.texts.append(text)
        if k >= len(self._lens):
            self._lens = np.concatenate([self._lens, np.zeros(len(self._lens), dtype=np.int64)])
            self._mat = np.concatenate([self._mat, np.full_like(self._mat, -1)])
        if len(ids) > self._mat.shape[1]:
            width = max(len(ids), 2 * self._mat.shape[1])
            grown = np.full((self._mat.shape[0], width), -1, dtype=np.int64)
            grown[:, :self._mat.shape[1]] = self._mat
            self._mat = grown
        self._lens[k] = len(ids)
        self._mat[k, :len(ids)] = ids
        for tok, c in Counter(ids).items():
            n = self._post_n.get(tok, 0)
            idx = self._post_idx.get(tok)
            if idx is None or n == len(idx):
                cap = max(8, 2 * n)
                new_idx = np.empty(cap, dtype=np.int64)
                new_cnt = np.empty(cap, dtype=np.int64)
                if idx is not None:
                    new_idx[:n] = idx[:n]
                    new_cnt[:n] = self._post_cnt[tok][:n]
                self._post_idx[tok], self._post_cnt[tok] = new_idx, new_cnt
            self._post_idx[tok][n] = k
            self._post_cnt[tok][n] = c
            self._post_n[tok] = n + 1

    def max_score(self, text: str, stop_at: float | None = None) -> tuple[float, int]:
        """(best ROUGE-L F of ``text`` as target against pool texts as predictions, index of that text or -1).

        With ``stop_at``, the search may return as soon as a score >= stop_at is found (enough for a reject decision);
        the returned score is then >= stop_at but not necessarily the maximum.
        """
        target = self._ids(rouge_tokenize(text), grow=False)
        m = len(target)
        P = len(self.texts)
        if m == 0 or P == 0:
            return 0.0, -1
        counts = Counter(target)
        idx_parts, w_parts = [], []
        for tok, c in counts.items():
            n = self._post_n.get(tok, 0)
            if n:
                idx_parts.append(self._post_idx[tok][:n])
                w_parts.append(np.minimum(self._post_cnt[tok][:n], c))
        if not idx_parts:
            return 0.0, -1
        overlap = np.bincount(np.concatenate(idx_parts), weights=np.concatenate(w_parts), minlength=P)[:P]
        lens = self._lens[:P]
        # F <= 2 * overlap / (m + n); a tiny slack keeps the bound above the exact float score
        bound = 2.0 * overlap / (m + lens) + 1e-9
        cand = np.flatnonzero(overlap > 0)
        order = cand[np.argsort(-bound[cand], kind="stable")]
        # the most promising pool texts first: their best score then prunes every pair whose bound is below it
        head, rest = order[:self._HEAD], order[self._HEAD:]
        rows, scores = head, self._scores(target, head)
        best = float(scores.max())
        if rest.size and not (stop_at is not None and best >= stop_at):
            rest = rest[bound[rest] >= best]
            if rest.size:
                rows = np.concatenate([rows, rest])
                scores = np.concatenate([scores, self._scores(target, rest)])
                best = float(scores.max())
        if best <= 0.0:
            return 0.0, -1
        return best, int(rows[scores == best].min())  # the earliest pool text on ties

    _HEAD = 64
    _CHUNK = 4096

    def _scores(self, target: list[int], rows: np.ndarray) -> np.ndarray:
        """ROUGE-L F of target against each pool row, with the float operations of rouge-score (vectorised: IEEE
        division and multiplication give the same doubles as Python's)."""
        m = len(target)
        n = self._lens[rows].astype(np.float64)
        lcs = np.empty(len(rows), dtype=np.float64)
        by_len = np.argsort(self._lens[rows], kind="stable")  # similar lengths together: less padding per chunk
        for start in range(0, len(rows), self._CHUNK):
            sel = by_len[start:start + self._CHUNK]
            lcs[sel] = self._lcs_many(target, rows[sel])
        precision = lcs / n
        recall = lcs / float(m)
        denom = precision + recall
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
        return f

    def _lcs_many(self, target: list[int], rows: np.ndarray) -> np.ndarray:
        """LCS(target, pool[r]) for each r in rows, bit-parallel across rows (target length <= 64) or per pair."""
        m = len(target)
        if m > 64:
            return np.array([lcs_length(target, self._mat[r, :self._lens[r]].tolist()) for r in rows.tolist()])
        vocab_n = len(self._vocab)
        table = np.zeros(vocab_n + 1, dtype=np.uint64)  # last slot: padding (-1) and unseen words match nothing
        for i, tok in enumerate(target):
            if tok >= 0:
                table[tok] |= np.uint64(1) << np.uint64(i)
        width = int(self._lens[rows].max())
        toks = self._mat[rows, :width]
        toks = np.where(toks < 0, vocab_n, toks)
        masks = table[toks]  # (k, width) uint64
        v = np.full(len(rows), np.iinfo(np.uint64).max, dtype=np.uint64)
        for col in range(width):
            u = v & masks[:, col]
            v = (v + u) | (v - u)  # uint64 wrap-around only touches bits >= m, which are ignored
        low = np.uint64((1 << m) - 1) if m < 64 else np.iinfo(np.uint64).max
        zeros = m - np.bitwise_count(v & low).astype(np.int64)
        return zeros


def novelty_filter(candidates: Iterable[str], pool: Iterable[str], threshold: float = 0.7) -> NoveltyResult:
    """Keep each candidate whose ROUGE-L F against every text in the pool (and every candidate kept before it) is
    below ``threshold``, as Self-Instruct does; report the max score and the most similar text for each."""
    index = RougeLIndex(pool)
    decisions = []
    for text in candidates:
        score, j = index.max_score(text)
        kept = score < threshold
        decisions.append(NoveltyDecision(text, kept, score, index.texts[j] if j >= 0 else None))
        if kept:
            index.add(text)
    return NoveltyResult(decisions)
