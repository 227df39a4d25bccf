"""data.validation_split_by: a seeded held-out fraction by record (unchanged) or by conversation (first user turn)."""

import json
import random

import pytest

from instructkit.config import ConfigError, DataConfig
from instructkit.data.schema import Conversation, Message, PreferencePair
from instructkit.data.sources import held_out_indices, split_unit, split_validation


def pair(first: str, later: str, k: int) -> PreferencePair:
    prompt = [Message("user", first), Message("assistant", "ok"), Message("user", later)]
    return PreferencePair(prompt, [Message("assistant", f"good {k}")], [Message("assistant", f"bad {k}")])


def test_record_split_is_the_seeded_shuffle_it_always_was():
    items = list(range(50))
    order = list(range(50))
    random.Random(3).shuffle(order)
    assert held_out_indices(items, 0.2, 3) == set(order[:10])


def test_first_user_turn_keeps_a_conversation_on_one_side(tmp_path):
    # 30 conversations, each branching into 1-4 pairs at later turns
    pairs = [pair(f"conversation {c}", f"turn {t}", c * 10 + t) for c in range(30) for t in range(1 + c % 4)]
    cfg = DataConfig(validation_fraction=0.25, validation_split_by="first_user_turn", seed=1)
    train, val, _ = split_validation(pairs, cfg, tmp_path)
    firsts = lambda side: {p.prompt[0].content for p in side}  # noqa: E731
    assert not firsts(train) & firsts(val)
    assert len(train) + len(val) == len(pairs)
    assert round(0.25 * len(pairs)) <= len(val) < round(0.25 * len(pairs)) + 4  # whole units, stops once reached
    # by record the same data does straddle conversations (the reason for the option)
    train, val, _ = split_validation(pairs, DataConfig(validation_fraction=0.25, seed=1), tmp_path)
    assert firsts(train) & firsts(val)


def test_units_of_groups_conversations_and_examples_without_a_user_turn():
    p = pair("hello", "more", 0)
    assert split_unit([p, p], "first_user_turn") == ("user", "hello")  # a reward-model group: its first pair
    conv = Conversation([Message("system", "s"), Message("user", "hi"), Message("assistant", "a")])
    assert split_unit(conv, "first_user_turn") == ("user", "hi")
    assert split_unit(Conversation([Message("assistant", "a")]), "first_user_turn") is None
    assert split_unit(conv, "record") is None
    # examples without a user turn are units of their own
    alone = [Conversation([Message("assistant", str(i))]) for i in range(10)]
    assert len(held_out_indices(alone, 0.3, 0, "first_user_turn")) == 3


def test_unknown_split_refused():
    with pytest.raises(ConfigError, match="validation_split_by"):
        DataConfig(validation_split_by="conversation")


def test_sft_split_by_first_user_turn(tmp_path):
    from instructkit.config import SFTConfig, DataSource
    from instructkit.recipes.sft import load_conversations

    path = tmp_path / "c.jsonl"
    with open(path, "w") as f:
        for c in range(20):
            for t in range(3):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"q{c}"},
                                                 {"role": "assistant", "content": f"a{c}.{t}"}]}) + "\n")
    cfg = SFTConfig(data=DataConfig(sources=[DataSource(path=str(path))], validation_fraction=0.2,
                                    validation_split_by="first_user_turn"))
    train, val = load_conversations(cfg, tmp_path)
    assert len(val) == 12 and len(train) == 48
    assert not {c.messages[0].content for c in train} & {c.messages[0].content for c in val}


def test_source_skip_takes_a_slice_of_the_file(tmp_path):
    from instructkit.config import DataSource
    from instructkit.data.io import ReadStats, read_examples
    from instructkit.data.sources import read_sources

    path = tmp_path / "a.jsonl"
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    rows.insert(3, {"instruction": "", "output": ""})  # an invalid record: rejected, never counted as an example
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    st = ReadStats()
    got = read_examples(path, skip=4, max_examples=3, skip_invalid=True, max_invalid_fraction=0.5, stats=st)
    assert [c.messages[0].content for c in got] == ["q4", "q5", "q6"]
    assert st.skipped == 4 and st.rejected == 1 and st.to_dict()["skipped"] == 4
    assert [c.messages[0].content for c in read_examples(path, skip=8, skip_invalid=True,
                                                          max_invalid_fraction=0.5)] == ["q8", "q9"]
    # through a config's sources, as every recipe reads them; two slices of one file are disjoint
    cfg = DataConfig(skip_invalid=True, max_invalid_fraction=0.5)
    first, _ = read_sources(cfg, [DataSource(path=str(path), max_examples=5)], tmp_path)
    rest, stats = read_sources(cfg, [DataSource(path=str(path), skip=5)], tmp_path)
    assert [c.messages[0].content for c in first + rest] == [f"q{i}" for i in range(10)]
    assert stats[str(path)]["skipped"] == 5
    with pytest.raises(ConfigError, match="skip must be >= 0"):
        DataSource(path="x", skip=-1)


def test_sft_reads_a_slice_of_a_builtin_and_of_a_file(tmp_path):
    from instructkit.config import DataSource, SFTConfig
    from instructkit.data.builtin import load_builtin
    from instructkit.recipes.sft import load_conversations

    every = list(load_builtin("quickstart_train"))
    cfg = SFTConfig(data=DataConfig(sources=[DataSource(path="builtin:quickstart_train", skip=2, max_examples=3)],
                                    validation_fraction=0.0))
    stats: dict = {}
    train, _ = load_conversations(cfg, tmp_path, stats)
    assert [c.messages for c in train] == [c.messages for c in every[2:5]]
    assert stats["builtin:quickstart_train"]["skipped"] == 2
