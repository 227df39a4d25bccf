"""Built-in instruction data: counts, schema, no train/held-out overlap, no duplicates, reproducible generated part."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

import pytest

from instructkit.data.builtin import GENERATOR_VERSION, generated_examples, load_builtin, names
from instructkit.data.schema import DataError, validate_conversation


@pytest.fixture(scope="module")
def train():
    return load_builtin("quickstart_train")


@pytest.fixture(scope="module")
def heldout():
    return load_builtin("builtin:quickstart_heldout")


def _key(conv):
    return tuple((m.role, m.content) for m in conv.messages)


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def test_names():
    assert names() == ["quickstart_heldout", "quickstart_train"]
    with pytest.raises(DataError, match="unknown built-in data set 'nope'"):
        load_builtin("nope")


def test_counts(train, heldout):
    assert len(train) >= 300
    assert len(heldout) >= 30


def test_schema_valid_and_meta(train, heldout):
    for conv in train + heldout:
        validate_conversation(conv)
        assert conv.messages[-1].role == "assistant" and conv.messages[-1].content.strip()
        assert conv.meta["source"] in ("handwritten", "generated") and conv.meta["category"]


def test_categories_are_diverse(train):
    cats = Counter(c.meta["category"] for c in train)
    required = {"explain", "classify", "extract", "summarise", "rewrite", "math", "code", "format", "multi_turn",
                "refusal", "benign", "creative"}
    assert required <= set(cats)
    assert all(cats[c] >= 10 for c in required), cats
    assert max(cats.values()) / len(train) < 0.3  # no single category dominates
    assert sum(len(c.messages) > 2 for c in train) >= 10  # multi-turn / system-prompt conversations


def test_no_exact_duplicates(train, heldout):
    assert len({_key(c) for c in train}) == len(train)
    assert len({_key(c) for c in heldout}) == len(heldout)
    train_prompts = [_norm(c.messages[-2].content) for c in train]
    assert len(set(train_prompts)) == len(train_prompts)


def test_no_overlap_between_train_and_heldout(train, heldout):
    """No held-out instruction appears (case and punctuation ignored) in any training turn."""
    train_user = {_norm(m.content) for c in train for m in c.messages if m.role == "user"}
    for conv in heldout:
        for m in conv.messages:
            if m.role == "user":
                assert _norm(m.content) not in train_user, m.content


def test_responses_are_short(train):
    """Short answers keep the CPU quickstart in budget: measured in words (a proxy for tokens, ~1.3 tokens/word)."""
    words = sorted(len(c.messages[-1].content.split()) for c in train)
    assert words[len(words) // 2] <= 15  # median
    assert sum(w <= 45 for w in words) / len(words) >= 0.95  # ~60 tokens
    assert words[-1] <= 60


def test_generated_part_is_reproducible_and_exact(train):
    """The stored generated examples equal a fresh generation, and their answers are right."""
    stored = [c for c in train if c.meta["source"] == "generated"]
    fresh = generated_examples()
    assert len(stored) == len(fresh) >= 80
    assert {_key(c) for c in stored} == {_key(c) for c in fresh}
    assert all(c.meta["generator"] == GENERATOR_VERSION for c in stored)
    checked = 0
    for c in fresh:
        q, a = c.messages[0].content, c.messages[1].content
        m = re.fullmatch(r"(?:What is|Calculate) (\d+) (?:plus|\+) (\d+)[?.]", q)
        if m:
            assert a == f"{m[1]} + {m[2]} = {int(m[1]) + int(m[2])}."
            checked += 1
        m = re.fullmatch(r"Sort these numbers from smallest to largest: ([\d, ]+)\.", q)
        if m:
            assert [int(x) for x in a.split(", ")] == sorted(int(x) for x in m[1].split(", "))
            checked += 1
        if q.startswith("Write ") and "as JSON" in q or q.startswith("Return JSON"):
            d = json.loads(a)
            assert set(d) == {"name", "age", "city"} and str(d["age"]) in q and d["city"] in q
            checked += 1
    assert checked >= 15
    assert generated_examples(seed=1) != fresh  # the seed matters


def test_handwritten_examples_spot_check(train):
    by_prompt = {c.messages[-2].content: c.messages[-1].content for c in train}
    assert by_prompt["What is the capital of Australia?"] == "The capital of Australia is Canberra."
    assert by_prompt["Is the number 17 even or odd?"] == "Odd"
    refusals = [c for c in train if c.meta["category"] == "refusal"]
    assert all(c.messages[-1].content.startswith(("I can't", "I won't")) for c in refusals)
    benign = [c for c in train if c.meta["category"] == "benign"]
    assert not any(c.messages[-1].content.startswith(("I can't", "I won't")) for c in benign)


def test_files_are_packaged_resources():
    base = resources.files("instructkit").joinpath("resources", "data")
    for fname in ("quickstart_train.jsonl", "quickstart_heldout.jsonl"):
        lines = base.joinpath(fname).read_text(encoding="utf-8").splitlines()
        assert all(json.loads(line)["messages"] for line in lines)


def test_sft_data_source_reads_builtin(tmp_path):
    """The SFT recipe's `builtin:NAME` data source goes through load_builtin (max_examples applies)."""
    from instructkit.config import DataSource, SFTConfig
    from instructkit.recipes.sft import _read_source

    got = _read_source(DataSource(path="builtin:quickstart_train", max_examples=7), SFTConfig(), tmp_path)
    assert [_key(c) for c in got] == [_key(c) for c in load_builtin("quickstart_train")[:7]]
