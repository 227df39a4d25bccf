"""Duplicate removal: exact (hash of normalised text) and near (MinHash + LSH over word shingles, checked by exact
Jaccard).

Order is kept and the first occurrence wins: every removed example names the kept example it duplicates, the kind
("exact" or "near") and the similarity, so a report can say what was removed and why.

MinHash is written here with numpy instead of using datasketch: it is about forty lines, the permutations vectorise
as one (num_perm x shingles) array operation, and we control the shingle hash (blake2b, stable across processes and
Python versions, unlike ``hash()``), so the kept set is reproducible; one dependency less for one small function.
LSH only proposes candidates; a candidate is removed only if the exact Jaccard similarity of the shingle sets reaches
the threshold, so there are no false positives, and the band/row split is chosen to keep false negatives rare.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from instructkit.data.schema import Conversation, Example, Message, TextExample, UnpairedExample

_WORD = re.compile(r"\w+", re.UNICODE)


def normalize_text(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: what 'the same text' means for exact duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _turn(m: Message, prefix: str = "") -> str:
    """One turn as text: its role, reasoning, content and tool calls (two turns that differ only in their calls or
    their reasoning are not duplicates)."""
    text = f"{prefix}{m.role}: "
    if m.reasoning is not None:
        text += f"<reasoning>{m.reasoning}</reasoning> "
    text += m.content
    for c in m.tool_calls or ():
        text += f" <call>{c.name} {c.arguments}</call>"
    return text


def example_text(ex: Example) -> str:
    """All turns of an example with their roles (pairs: prompt, chosen and rejected; unpaired: prompt, completion and
    the label), one per line; plain text as it is."""
    if isinstance(ex, TextExample):
        return ex.text
    if isinstance(ex, Conversation):
        return "\n".join(_turn(m) for m in ex.messages)
    parts = [_turn(m) for m in ex.prompt]
    if isinstance(ex, UnpairedExample):
        parts += [_turn(m, "completion ") for m in ex.completion]
        parts.append(f"label: {ex.label}")
        return "\n".join(parts)
    parts += [_turn(m, "chosen ") for m in ex.chosen]
    parts += [_turn(m, "rejected ") for m in ex.rejected]
    return "\n".join(parts)


@dataclass
class Removal:
    index: int
    """Position of the removed example in the input."""
    kind: str
    """"exact" or "near"."""
    duplicate_of: int
    """Position of the kept example it duplicates."""
    similarity: float
    """1.0 for exact duplicates; the Jaccard similarity of the word-shingle sets for near duplicates."""


@dataclass
class DedupReport:
    total: int = 0
    kept: int = 0
    removed: list[Removal] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {"exact": 0, "near": 0}
        for r in self.removed:
            out[r.kind] += 1
        return out

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "removed": self.counts()}


def exact_dedup(
    examples: Sequence[Example], text: Callable[[Example], str] = example_text
) -> tuple[list[Example], DedupReport]:
    """Drop examples whose normalised text equals an earlier one's."""
    seen: dict[bytes, int] = {}
    kept, report = [], DedupReport(total=len(examples))
    for i, ex in enumerate(examples):
        h = hashlib.blake2b(normalize_text(text(ex)).encode("utf-8"), digest_size=16).digest()
        if h in seen:
            report.removed.append(Removal(i, "exact", seen[h], 1.0))
        else:
            seen[h] = i
            kept.append(ex)
    report.kept = len(kept)
    return kept, report


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams of the normalised text (a text shorter than n words is one shingle; an empty text has none)."""
    words = _WORD.findall(normalize_text(text))
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014): a bijection of 64-bit integers that scrambles every bit. uint64
    multiplication wraps modulo 2^64, which is what the mixer needs."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class MinHasher:
    """Signature k = min over shingles x of mix64(x XOR s_k): each random 64-bit key s_k picks a pseudo-random
    permutation of the 64-bit shingle hashes. P(sig_k(A) == sig_k(B)) is the Jaccard similarity of A and B
    (Broder 1997).

    (Not the textbook (a x + b) mod p: with a and x limited so the product fits in uint64, the order of a x mod p
    follows the order of x for most a, the permutations are not independent, and the estimate is badly biased.)"""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.keys = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True)

    def signature(self, shingle_set: set[str]) -> np.ndarray:
        if not shingle_set:
            return np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        xs = np.fromiter(
            (int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") for s in shingle_set),
            dtype=np.uint64,
            count=len(shingle_set),
        )
        hv = _mix64(self.keys[:, None] ^ xs[None, :])  # (num_perm, S)
        return hv.min(axis=1)


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.1) -> tuple[int, int]:
    """Bands b and rows r (b * r <= num_perm) minimising the weighted area of false positives (s < threshold but
    1 - (1 - s^r)^b large) and false negatives (s >= threshold but small), as in Leskovec et al., Mining of Massive
    Datasets, 3.4.2. False positives are weighted low (0.1) because every candidate is verified by exact Jaccard:
    they cost a set intersection, while a false negative is a duplicate left in. At threshold 0.8 with 128
    permutations this gives 14 bands of 9 rows: a pair at Jaccard 0.8 becomes a candidate with probability
    1 - (1 - 0.8^9)^14 = 0.87, at 0.85 with 0.975."""
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    s_lo = np.linspace(0.0, threshold, 201)
    s_hi = np.linspace(threshold, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = trapezoid(1 - (1 - s_lo**r) ** b, s_lo)
            fn = trapezoid((1 - s_hi**r) ** b, s_hi)
            err = fp_weight * fp + (1 - fp_weight) * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def near_dedup(
    examples: Sequence[Example],
    threshold: float = 0.8,
    *,
    num_perm: int = 128,
    ngram: int = 3,
    seed: int = 0,
    text: Callable[[Example], str] = example_text,
) -> tuple[list[Example], DedupReport]:
    """Drop examples whose word-shingle Jaccard similarity with an earlier kept example is >= ``threshold``."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    hasher = MinHasher(num_perm, seed)
    bands, rows = lsh_params(threshold, num_perm)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    kept_sets: dict[int, set[str]] = {}
    kept, report = [], DedupReport(total=len(examples))
    for i, ex in enumerate(examples):
        sh = shingles(text(ex), ngram)
        sig = hasher.signature(sh)
        keys = [sig[k * rows : (k + 1) * rows].tobytes() for k in range(bands)]
        candidates = sorted({j for k, key in enumerate(keys) for j in buckets[k].get(key, ())})
        best_j, best_sim = -1, -1.0
        for j in candidates:
            sim = jaccard(sh, kept_sets[j])
            if sim > best_sim:
                best_j, best_sim = j, sim
        if best_j >= 0 and best_sim >= threshold:
            report.removed.append(Removal(i, "near", best_j, best_sim))
            continue
        kept.append(ex)
        kept_sets[i] = sh
        for k, key in enumerate(keys):
            buckets[k].setdefault(key, []).append(i)
    report.kept = len(kept)
    return kept, report


def dedup(
    examples: Sequence[Example],
    *,
    exact: bool = True,
    near: bool = True,
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 3,
    seed: int = 0,
    text: Callable[[Example], str] = example_text,
) -> tuple[list[Example], DedupReport]:
    """Exact then near-duplicate removal; the report's indices refer to the input list."""
    index = list(range(len(examples)))
    report = DedupReport(total=len(examples))
    current = list(examples)
    for enabled, step in ((exact, "exact"), (near, "near")):
        if not enabled:
            continue
        if step == "exact":
            kept, rep = exact_dedup(current, text)
        else:
            kept, rep = near_dedup(current, threshold, num_perm=num_perm, ngram=ngram, seed=seed, text=text)
        removed_pos = {r.index for r in rep.removed}
        for r in rep.removed:
            report.removed.append(Removal(index[r.index], r.kind, index[r.duplicate_of], r.similarity))
        index = [index[k] for k in range(len(current)) if k not in removed_pos]
        current = kept
    report.removed.sort(key=lambda r: r.index)
    report.kept = len(current)
    return current, report
