"""Dedup: exact (normalised) and near (MinHash + LSH, verified by exact Jaccard)."""

import random

import numpy as np
import pytest

from instructkit.data.dedup import (
    MinHasher,
    dedup,
    example_text,
    exact_dedup,
    jaccard,
    lsh_params,
    near_dedup,
    normalize_text,
    shingles,
)
from instructkit.data.schema import Conversation, Message


def conv(user, assistant):
    return Conversation([Message("user", user), Message("assistant", assistant)])


def words_text(rng, n, vocab=2000):
    return " ".join(f"w{rng.randrange(vocab)}" for _ in range(n))


def test_normalisation_and_exact_duplicates():
    assert normalize_text("  Hello\tWORLD\n ") == "hello world"
    assert normalize_text("ﬁne") == "fine"  # NFKC ligature
    exs = [conv("Hi", "Hello there"), conv("hi ", "hello   THERE"), conv("Hi", "Bye"), conv("Hello there", "Hi")]
    kept, rep = exact_dedup(exs)
    assert kept == [exs[0], exs[2], exs[3]]
    assert [(r.index, r.kind, r.duplicate_of, r.similarity) for r in rep.removed] == [(1, "exact", 0, 1.0)]
    # role matters: the same words in swapped turns are not a duplicate
    assert example_text(exs[0]) != example_text(exs[3])


def test_shingles_and_jaccard_by_hand():
    # "a b c d" -> 3-grams {"a b c", "b c d"}; "a b c e" -> {"a b c", "b c e"}: |∩| = 1, |∪| = 3 -> 1/3
    a, b = shingles("A b, c d"), shingles("a b c e")
    assert a == {"a b c", "b c d"} and b == {"a b c", "b c e"}
    assert jaccard(a, b) == pytest.approx(1 / 3)
    assert shingles("two words") == {"two words"} and shingles("") == set()


def test_minhash_estimates_jaccard():
    # Two sets sharing 60 of 100 + 100 - 60 = 140 elements: J = 60/140 = 0.4286. With 1024 permutations the
    # equality rate has standard deviation sqrt(J(1-J)/1024) = 0.0155; allow 4 sigma.
    a = {f"s{i}" for i in range(100)}
    b = {f"s{i}" for i in range(40, 140)}
    h = MinHasher(1024, seed=0)
    est = float(np.mean(h.signature(a) == h.signature(b)))
    assert abs(est - 60 / 140) < 4 * 0.0155
    assert np.array_equal(h.signature(a), MinHasher(1024, seed=0).signature(set(sorted(a))))  # order-free, seeded


def test_lsh_params_fit_the_budget():
    for t in (0.5, 0.8, 0.9):
        b, r = lsh_params(t, 128)
        assert b * r <= 128
    assert lsh_params(0.8, 128) == (14, 9)


def test_near_duplicates_removed_with_no_false_positives():
    rng = random.Random(0)
    base = [words_text(rng, 120) for _ in range(40)]
    exs = [conv("Write something.", t) for t in base]
    variants = []
    for i, t in enumerate(base[:20]):
        w = t.split()
        for k in rng.sample(range(len(w)), 2):  # 2 substitutions in 120 words: Jaccard about 0.90
            w[k] = "zz" + w[k]
        variants.append(conv("Write something.", " ".join(w)))
    data = exs + variants
    kept, rep = near_dedup(data, threshold=0.8)
    sets = [shingles(example_text(e)) for e in data]
    for r in rep.removed:
        # every removal is verified: its similarity is the exact Jaccard and reaches the threshold
        assert r.similarity == pytest.approx(jaccard(sets[r.index], sets[r.duplicate_of]))
        assert r.similarity >= 0.8 and r.duplicate_of < r.index
    truly = [i for i in range(40, 60) if jaccard(sets[i], sets[i - 40]) >= 0.8]
    assert len(truly) == 20
    found = {r.index for r in rep.removed}
    # All 20 found: at J = 0.906 (2 of 120 words changed) a pair misses every one of the 14 bands of 9 rows with
    # probability (1 - 0.906^9)^14 = 0.0006, so missing any of 20 has probability about 1.2%, and the seeded hash
    # makes the outcome fixed. No unrelated text is removed.
    assert found == set(range(40, 60))
    assert rep.kept == len(kept) == 60 - len(found)


def test_threshold_controls_what_counts():
    a = "the quick brown fox jumps over the lazy dog near the river bank today"
    b = "the quick brown fox jumps over the lazy cat near the river bank today"
    # example_text is "user: q\nassistant: ..." -> 3 + 14 = 17 words -> 15 shingles each; "dog" (word 11) is in 3
    # of them, so |∩| = 12 and |∪| = 12 + 3 + 3 = 18 -> J = 2/3
    ja = jaccard(shingles(example_text(conv("q", a))), shingles(example_text(conv("q", b))))
    assert ja == pytest.approx(2 / 3)
    exs = [conv("q", a), conv("q", b)]
    assert near_dedup(exs, threshold=0.8)[1].removed == []
    removed = near_dedup(exs, threshold=0.5)[1].removed
    assert [(r.index, r.duplicate_of) for r in removed] == [(1, 0)] and removed[0].similarity == pytest.approx(2 / 3)


def test_dedup_combined_reports_input_indices():
    exs = [conv("q", "alpha beta gamma delta epsilon zeta eta theta"), conv("x", "unrelated words here entirely"),
           conv("Q", "alpha beta gamma delta epsilon zeta eta theta"),
           conv("q", "alpha beta gamma delta epsilon zeta eta theta iota")]
    kept, rep = dedup(exs, threshold=0.7)
    # 2 is an exact copy of 0 (case); 3 adds one shingle to 0's 6+1 (role "user q assistant alpha ..." 3-grams):
    assert [(r.index, r.kind, r.duplicate_of) for r in rep.removed] == [(2, "exact", 0), (3, "near", 0)]
    assert kept == [exs[0], exs[1]] and rep.counts() == {"exact": 1, "near": 1}


def test_real_alpaca_exact_duplicates(shared_data):
    from instructkit.data.io import read_examples

    exs = read_examples(shared_data / "lf_alpaca_en_demo.json")
    kept, rep = dedup(exs)
    assert rep.counts() == {"exact": 14, "near": 0} and len(kept) == 985
    first = rep.removed[0]
    assert (first.index, first.duplicate_of) == (275, 117)
    assert exs[275].messages == exs[117].messages
