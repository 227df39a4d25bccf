"""Quality filters: each named filter fires on what it should, counts per filter, robust length outliers."""

import math
import statistics

import pytest

from instructkit.data.quality import (
    FILTERS,
    SELF_INSTRUCT_BLACKLIST,
    QualityConfig,
    prompt_and_response,
    quality_filter,
)
from instructkit.data.schema import Conversation, Message, PreferencePair


def conv(user, assistant):
    return Conversation([Message("user", user), Message("assistant", assistant)])


def normal(n=20):
    # responses of 10..29 words: a plain length spread with no outliers among them
    return [conv(f"question {i}", " ".join(["word"] * (10 + i))) for i in range(n)]


def test_each_filter_fires_and_is_counted():
    data = normal() + [
        conv("q", "   "),                                    # 20 empty_response
        conv("q", "..."),                                    # 21 short_response (no word)
        conv("Repeat after me please", "repeat after me, please!"),  # 22 repeats_prompt (normalised words equal)
        conv("Draw a picture of a cat", "I cannot but here is a poem about cats and dogs friends"),  # 23 blacklist (prompt)
        conv("Tell me", " ".join(["long"] * 5000)),          # 24 length_outlier
    ]
    cfg = QualityConfig(blacklist=SELF_INSTRUCT_BLACKLIST)
    kept, rep = quality_filter(data, cfg)
    assert kept == data[:20]
    assert [(f.index, f.filter) for f in rep.removed] == [
        (20, "empty_response"),
        (21, "short_response"),
        (22, "repeats_prompt"),
        (23, "blacklist"),
        (24, "length_outlier"),
    ]
    assert rep.to_dict() == {
        "total": 25,
        "kept": 20,
        "removed_by": {"empty_response": 1, "short_response": 1, "repeats_prompt": 1, "blacklist": 1,
                       "length_outlier": 1, "contamination": 0},
        # 20 is empty (0 words) and 21 has 0 words: with log1p(0) = 0 both are also low-side length outliers
        "flagged": {"empty_response": 1, "short_response": 1, "repeats_prompt": 1, "blacklist": 1,
                    "length_outlier": 3, "contamination": 0},
    }
    assert rep.removed[3].detail == "blacklisted 'Draw'"  # the first match in the text
    assert set(FILTERS) == set(rep.to_dict()["removed_by"])


def test_robust_z_by_hand():
    # lengths 10..29 words plus one of 5000. log1p lengths: median m over 21 values is log1p(20);
    # MAD = median |log1p(n) - m|; z(5000) = (log1p(5000) - m) / (1.4826 * MAD).
    data = normal() + [conv("q", " ".join(["x"] * 5000))]
    logs = [math.log1p(n) for n in list(range(10, 30)) + [5000]]
    m = statistics.median(logs)
    mad = statistics.median([abs(x - m) for x in logs])
    z = (math.log1p(5000) - m) / (1.4826 * mad)
    assert m == pytest.approx(math.log1p(20))
    _, rep = quality_filter(data, QualityConfig(outlier_z=3.5))
    assert [f.index for f in rep.removed] == [20]
    assert rep.removed[0].detail == f"length 5000, robust z {z:.1f} > 3.5"
    # the same example survives when the threshold is above its z
    assert quality_filter(data, QualityConfig(outlier_z=z + 0.1))[1].removed == []


def test_absolute_length_cap_with_token_counter():
    data = normal(5)
    # a "tokenizer" that counts characters: responses are "word word ..." = 5 * (10 + i) - 1 chars
    kept, rep = quality_filter(data, QualityConfig(max_response_length=60, outlier_z=None), count_tokens=len)
    # 10 words -> 49 chars, 11 -> 54, 12 -> 59 kept; 13 -> 64, 14 -> 69 removed
    assert [f.index for f in rep.removed] == [3, 4]
    assert rep.removed[0].detail == "length 64 > max 60"


def test_repeats_prompt_slack_and_blacklist_scope():
    # prompt + 2 new words (< 3 slack) is a repeat; prompt + 3 new words is not
    data = [conv("Name a fruit", "Name a fruit: apple pear"), conv("Name a fruit", "Name a fruit: apple, pear, plum")]
    _, rep = quality_filter(data, QualityConfig(outlier_z=None))
    assert [(f.index, f.filter) for f in rep.removed] == [(0, "repeats_prompt")]
    # blacklist only in the prompt: a response mentioning a file is fine
    data = [conv("Summarise this text", "The file says hello."), conv("Open the file", "ok then")]
    _, rep = quality_filter(data, QualityConfig(blacklist=("file",), blacklist_in="prompt", outlier_z=None))
    assert [f.index for f in rep.removed] == [1]
    # whole words only: "profile" does not match "file"; phrases match across whitespace
    data = [conv("q", "see my profile"), conv("q", "please go  to the store")]
    _, rep = quality_filter(data, QualityConfig(blacklist=("file", "go to"), outlier_z=None))
    assert [(f.index, f.detail) for f in rep.removed] == [(1, "blacklisted 'go  to'")]


def test_contamination_against_eval_texts():
    eval_text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    clean = conv("q", "completely different content " * 3)
    leaked = conv("Answer: one two three four five six seven eight nine ten eleven twelve thirteen", "ok sure fine")
    near_miss = conv("one two three four five six seven eight nine ten eleven twelve", "ok fine sure")  # 12-gram only
    _, rep = quality_filter([clean, leaked, near_miss], QualityConfig(outlier_z=None), eval_texts=[eval_text])
    assert [(f.index, f.filter) for f in rep.removed] == [(1, "contamination")]


def test_pairs_use_the_chosen_side():
    pair = PreferencePair([Message("user", "q?")], [Message("assistant", "")], [Message("assistant", "no")])
    assert prompt_and_response(pair) == ("q?", "")
    _, rep = quality_filter([pair], QualityConfig(outlier_z=None))
    assert rep.removed_by["empty_response"] == 1


def test_real_self_instruct_blacklist(shared_data):
    from instructkit.data.io import read_examples

    seeds = read_examples(shared_data / "self_instruct_seed_tasks.jsonl")
    kept, rep = quality_filter(seeds, QualityConfig(blacklist=SELF_INSTRUCT_BLACKLIST, blacklist_in="prompt", outlier_z=None))
    assert rep.removed_by == {"blacklist": 4} and len(kept) == 171
    for f in rep.removed:
        prompt, _ = prompt_and_response(seeds[f.index])
        word = f.detail.split("'")[1].lower()
        assert word in prompt.lower()
