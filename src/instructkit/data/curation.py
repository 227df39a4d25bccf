"""LIMA-style curation (Zhou et al. 2023): a small, clean, diverse subset of a large pool.

``curate(pool, n, config, eval_texts)`` applies, in order:

1. **quality filters** (data/quality.py): empty / too-short responses (``min_response_words``), responses that repeat
   the prompt, length outliers (off by default, see ``CurationConfig.outlier_z``), and any example sharing a 13-gram
   with an evaluation text passed as ``eval_texts`` (contamination);
2. **dedup** (data/dedup.py): exact, then MinHash near-duplicates (word 3-gram Jaccard >= ``near_threshold``);
3. **diversity selection**, documented here because it is the choice that makes the set "curated":
   - *stratification*: the pool is split into strata by ``meta[stratum_key]`` (the experiment sets it to the source:
     "alpaca", "builtin", or the T0 cluster), and ``n`` is shared equally among the strata; a stratum with fewer
     examples than its share gives the rest to the others (``allocate_equal``), so no single source dominates
     however large it is;
   - *greedy farthest-point* within a stratum, on MinHash signatures of word 3-gram shingles of the prompt and the
     response (no embeddings, no model): start from the example with the longest response (LIMA favours complete,
     long-form answers), then repeatedly add the example whose estimated Jaccard distance to its nearest selected
     example is largest (ties: the earlier example). Each pick costs one vectorised pass over the stratum.

Every removal is counted in the returned report (filters by name, duplicates, strata sizes), nothing silently
dropped. Pure data code: no model, no tokenizer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from instructkit.data.dedup import MinHasher, dedup, example_text, shingles
from instructkit.data.quality import QualityConfig, prompt_and_response, quality_filter
from instructkit.data.schema import Conversation


@dataclass
class CurationConfig:
    min_response_words: int = 3
    """Responses with fewer words are removed (LIMA keeps complete answers, not labels)."""
    outlier_z: float | None = None
    """Robust length-outlier filter (data/quality.py); None (default): off, because on a mixed pool the median
    length is the majority source's (T0's short answers) and the filter would remove most long-form answers
    (Alpaca's), the opposite of what LIMA keeps."""
    near_threshold: float = 0.8
    """Near-duplicate Jaccard threshold (data/dedup.py)."""
    stratum_key: str = "source"
    """meta key whose value is an example's stratum."""
    num_perm: int = 64
    """MinHash permutations of the diversity selection's signatures."""
    seed: int = 0


def allocate_equal(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Share ``n`` equally among strata capped by their sizes (water-filling): strata in ascending (size, name) order
    each take min(size, what is left // strata left), so a short stratum's unused share goes to the larger ones and
    the rounding remainder to the last (largest) strata."""
    if n > sum(sizes.values()):
        raise ValueError(f"cannot select {n} examples from {sum(sizes.values())} (strata {sizes})")
    quota, left = {}, n
    order = sorted(sizes, key=lambda k: (sizes[k], k))
    for i, k in enumerate(order):
        quota[k] = min(sizes[k], left // (len(order) - i))
        left -= quota[k]
    return {k: quota[k] for k in sizes}


def farthest_point(signatures: np.ndarray, k: int, first: int) -> list[int]:
    """Greedy farthest-point selection of ``k`` rows; distance = fraction of differing MinHash values (an estimate
    of the Jaccard distance of the shingle sets). Returns row indices in selection order."""
    m = signatures.shape[0]
    if k >= m:
        return [first] + [i for i in range(m) if i != first]
    chosen = [first]
    nearest = (signatures != signatures[first]).mean(axis=1)
    nearest[first] = -1.0
    while len(chosen) < k:
        i = int(np.argmax(nearest))  # first maximum: ties go to the earlier example
        chosen.append(i)
        nearest = np.minimum(nearest, (signatures != signatures[i]).mean(axis=1))
        nearest[chosen] = -1.0
    return chosen


def curate(pool: Sequence[Conversation], n: int, config: CurationConfig | None = None,
           eval_texts: Sequence[str] = ()) -> tuple[list[Conversation], dict]:
    """The curated subset (module docstring) and a report of what each stage removed or kept."""
    cfg = config or CurationConfig()
    qcfg = QualityConfig(min_response_words=cfg.min_response_words, outlier_z=cfg.outlier_z)
    kept, qrep = quality_filter(list(pool), qcfg, eval_texts=eval_texts)
    deduped, drep = dedup(kept, threshold=cfg.near_threshold, seed=cfg.seed)
    strata: dict[str, list[Conversation]] = defaultdict(list)
    for ex in deduped:
        strata[str(ex.meta.get(cfg.stratum_key, "unknown"))].append(ex)
    quota = allocate_equal({k: len(v) for k, v in strata.items()}, n)
    hasher = MinHasher(cfg.num_perm, cfg.seed)
    selected: list[Conversation] = []
    for name in sorted(strata):
        items = strata[name]
        if quota[name] == 0:
            continue
        sigs = np.stack([hasher.signature(shingles(example_text(ex), 3)) for ex in items])
        first = max(range(len(items)), key=lambda i: (len(prompt_and_response(items[i])[1].split()), -i))
        selected += [items[i] for i in farthest_point(sigs, quota[name], first)]
    report = {"pool": len(pool), "after_quality": len(kept), "quality": qrep.to_dict(),
              "after_dedup": len(deduped), "dedup": drep.counts(), "strata": {k: len(v) for k, v in strata.items()},
              "quota": quota, "selected": len(selected)}
    return selected, report
