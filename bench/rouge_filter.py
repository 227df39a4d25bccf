"""Self-Instruct's ROUGE-L novelty filter: instructkit's RougeLIndex vs rouge-score pair by pair over a process pool.

    python bench/rouge_filter.py --candidates 20000 --baseline-candidates 3000 --workers 2

The workload: 20,000 candidate instructions (the 175 Self-Instruct seed instructions mutated word by word and spliced,
so similarities span 0 to 1 and a fair share is rejected), filtered in order against a pool that starts with the seeds
and grows with every kept candidate; a candidate is rejected when its ROUGE-L F against any pool instruction is >= 0.7.

The peer is the reference scripts' loop: for each candidate, ``Pool.map(partial(scorer.score, candidate), pool)`` with
``rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)`` (the pool of worker processes is created once here, which is
kinder than the original's one pool per candidate). Running it over all 20,000 candidates would take hours on this
machine, so it runs on the first ``--baseline-candidates``; on that prefix both sides must keep exactly the same
candidates, and the speed-up is measured there (where instructkit's advantage is smallest: the pool is small). The
full-run figure for the peer is an extrapolation from its measured time per pair, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"


def make_candidates(seeds: list[str], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = sorted({w for s in seeds for w in s.split()})
    out: list[str] = []
    for _ in range(n):
        base = rng.choice(seeds if (not out or rng.random() < 0.6) else out[-200:])
        words = base.split()
        if rng.random() < 0.3:  # splice with another instruction
            other = rng.choice(seeds).split()
            cut = rng.randint(1, max(1, len(words) - 1))
            words = words[:cut] + other[rng.randint(0, max(0, len(other) - 1)):]
        for _ in range(int(len(words) * rng.choice([0.0, 0.1, 0.2, 0.3, 0.5, 0.8]))):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        out.append(" ".join(words))
    return out


def _score(scorer, target, prediction):
    return scorer.score(target, prediction)["rougeL"].fmeasure


def baseline(candidates: list[str], pool: list[str], threshold: float, workers: int) -> tuple[list[bool], int]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = list(pool)
    kept, pairs = [], 0
    with Pool(workers) as p:
        for c in candidates:
            scores = p.map(partial(_score, scorer, c), pool, chunksize=max(1, len(pool) // (4 * workers)))
            pairs += len(pool)
            ok = max(scores) < threshold
            kept.append(ok)
            if ok:
                pool.append(c)
    return kept, pairs


def ours(candidates: list[str], pool: list[str], threshold: float) -> list[bool]:
    from instructkit.data.rouge import novelty_filter

    return [d.kept for d in novelty_filter(candidates, pool, threshold).decisions]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=20_000)
    ap.add_argument("--baseline-candidates", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rouge_filter.json"))
    args = ap.parse_args()
    seeds = [json.loads(line)["instruction"] for line in SEEDS.open()]
    cands = make_candidates(seeds, args.candidates)
    prefix = cands[:args.baseline_candidates]

    # prefix: both sides, ours first then the peer then ours again (noise check), same kept set required
    t0 = time.perf_counter()
    ours_prefix = ours(prefix, seeds, args.threshold)
    t_ours_prefix = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_prefix, pairs_prefix = baseline(prefix, seeds, args.threshold, args.workers)
    t_base_prefix = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours(prefix, seeds, args.threshold)
    t_ours_prefix = min(t_ours_prefix, time.perf_counter() - t0)
    identical = ours_prefix == base_prefix

    t0 = time.perf_counter()
    ours_full = ours(cands, seeds, args.threshold)
    t_ours_full = time.perf_counter() - t0
    # pairs the peer would score on the full run: the pool size at each candidate
    size, pairs_full = len(seeds), 0
    for k in ours_full:
        pairs_full += size
        size += k
    per_pair = t_base_prefix / pairs_prefix
    out = {
        "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "workers": args.workers, "threshold": args.threshold, "seed_pool": len(seeds),
        "prefix": {"candidates": len(prefix), "kept": sum(ours_prefix), "identical_kept_sets": identical,
                   "pairs": pairs_prefix, "rouge_score_pool_s": t_base_prefix, "instructkit_s": t_ours_prefix,
                   "speedup": t_base_prefix / t_ours_prefix},
        "full": {"candidates": len(cands), "kept": sum(ours_full), "pairs": pairs_full, "instructkit_s": t_ours_full,
                 "rouge_score_pool_s_extrapolated": per_pair * pairs_full,
                 "speedup_extrapolated": per_pair * pairs_full / t_ours_full},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(out, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
