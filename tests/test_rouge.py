"""Fast ROUGE-L: scores and keep/reject decisions identical to Google's rouge-score."""

from __future__ import annotations

import json
import random

import pytest

from instructkit.data.rouge import RougeLIndex, lcs_length, novelty_filter, rouge_l, rouge_tokenize

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

WORDS = ("the a of to in write give list explain classify summarize story poem sentence text data why how what is "
         "are three tips healthy capital france sky blue email letter recipe").split()


def _random_text(rng: random.Random) -> str:
    n = rng.choice([0, 1, 2, 3, 5, 8, 12, 20, 40, 70, 100])
    words = [rng.choice(WORDS) for _ in range(n)]
    # punctuation, case, digits and non-ASCII letters exercise the tokenizer
    extras = ["", "!", " Über-café", " 42,3", " DON'T", "\t\n", " naïve", " x_y"]
    return " ".join(words) + rng.choice(extras)


def test_tokenizer_matches_rouge_score():
    tok = rouge_scorer.tokenizers.DefaultTokenizer(use_stemmer=False)
    for text in ["Hello, World!", "DON'T stop", "Über-café 42,3", "", "   ", "a_b-c", "İstanbul KELVIN\u212a"]:
        assert rouge_tokenize(text) == tok.tokenize(text)


def test_lcs_hand_computed():
    # LCS("abcbdab", "bdcaba") = 4 (e.g. "bcba"), the CLRS example
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4
    assert lcs_length([], [1]) == 0
    assert lcs_length(list(range(100)), list(range(0, 100, 3))) == 34


def test_rouge_l_hand_computed():
    # target "the cat sat on the mat" (6), prediction "the cat on a mat" (5): LCS "the cat on mat" = 4
    # P = 4/5, R = 4/6, F = 2PR/(P+R) = 2*0.8*0.6667/(1.4667) = 0.72727...
    assert rouge_l("the cat sat on the mat", "the cat on a mat") == pytest.approx(8 / 11, abs=1e-12)
    assert rouge_l("", "anything") == 0.0


def test_scores_identical_on_10000_random_pairs():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    for _ in range(10_000):
        a, b = _random_text(rng), _random_text(rng)
        assert rouge_l(a, b) == scorer.score(a, b)["rougeL"].fmeasure, (a, b)


def test_index_max_score_identical_to_brute_force():
    """RougeLIndex.max_score (bound + bit-parallel LCS, incl. targets longer than 64 tokens) equals the max over
    rouge-score pair by pair, on 10,000 (candidate, pool text) pairs."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(1)
    pool = [_random_text(rng) for _ in range(100)]
    index = RougeLIndex(pool)
    for _ in range(100):
        text = _random_text(rng)
        ref = [scorer.score(text, p)["rougeL"].fmeasure for p in pool]
        best, j = index.max_score(text)
        assert best == max(ref)
        if best > 0:
            assert j == ref.index(best)  # earliest on ties
        else:
            assert j == -1


def test_novelty_filter_decisions_identical_on_seed_tasks(shared_data):
    """Self-Instruct's filter on the 175 real seed instructions plus mutated copies (near-duplicates), vs rouge-score:
    same kept set, same max scores."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    seeds = [json.loads(line)["instruction"] for line in (shared_data / "self_instruct_seed_tasks.jsonl").open()]
    rng = random.Random(2)
    cands = []
    for _ in range(120):
        words = rng.choice(seeds).split()
        for _ in range(rng.randint(0, len(words))):  # mutate some words: from near-copies to new text
            words[rng.randrange(len(words))] = rng.choice(WORDS)
        cands.append(" ".join(words))
    pool = seeds[:60]
    res = novelty_filter(cands, pool, threshold=0.7)
    grown = list(pool)
    for d in res.decisions:
        scores = [scorer.score(d.text, p)["rougeL"].fmeasure for p in grown]
        assert d.max_score == max(scores)
        assert d.kept == (max(scores) < 0.7)
        assert d.most_similar == grown[scores.index(max(scores))]
        if d.kept:
            grown.append(d.text)
    assert 0 < len(res.kept) < len(cands)  # both outcomes occur
    assert len(res.kept) + len(res.rejected) == len(cands)


def test_stop_at_is_enough_for_a_reject():
    index = RougeLIndex(["write a poem about the sea", "list three tips"])
    score, j = index.max_score("Write a poem about the sea!", stop_at=0.7)
    assert score == 1.0 and j == 0
