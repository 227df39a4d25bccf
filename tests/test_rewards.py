"""Verifiable rewards (rl/rewards.py) on worked examples, malformed responses included."""

from __future__ import annotations

import gzip
import json
from fractions import Fraction
from pathlib import Path

import pytest

from instructkit.rl.rewards import (CombinedReward, constraint_reward, ends_turn_reward, final_answer, gsm8k_reward,
                                    json_reward, length_reward)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def gsm(responses, answers):
    return gsm8k_reward([[]] * len(responses), responses, [[]] * len(responses), meta=[{"answer": a} for a in answers])


def test_final_answer_prefers_boxed_then_hashes_then_the_last_number():
    assert final_answer("3 + 4 = 7, so \\boxed{7}. Check: 8") == 7
    assert final_answer("16 - 3 - 4 = 9 eggs; 9 * 2 = 18.\n#### 18") == 18
    assert final_answer("She makes $1,234.50 a day.") == Fraction("1234.5")
    assert final_answer("first 3, then 5, finally 12.") == 12  # several numbers: the last one
    assert final_answer("no number here") is None
    assert final_answer("\\boxed{x} then 4") == 4  # a boxed answer without a number does not count


def test_gsm8k_reward_on_worked_examples():
    ref = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    got = gsm(["She makes $18 every day.", "The answer is 18.00", "\\boxed{18}", "#### 81", "I don't know",
               "9 eggs, so 18 dollars, or 20 with tips", ""], [ref] * 7)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert gsm(["It is -3."], ["-3"]) == [1.0]  # a bare reference number
    with pytest.raises(ValueError, match="row 0 has no reference number"):
        gsm(["7"], ["no number"])
    with pytest.raises(ValueError, match="needs the prompt records' meta"):
        gsm8k_reward([[]], ["7"], [[]])


@pytest.mark.skipif(not (SHARED / "gsm8k_test.jsonl.gz").exists(), reason="../shared/data/gsm8k_test.jsonl.gz absent")
def test_every_gsm8k_test_reference_parses_and_matches_itself():
    with gzip.open(SHARED / "gsm8k_test.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1319
    # the reference solution itself, scored as a response, gets 1.0 (its "#### N" is its final answer)
    assert gsm([r["answer"] for r in rows], [r["answer"] for r in rows]) == [1.0] * len(rows)


def test_constraint_reward_fraction_and_all():
    meta = [{"constraints": [{"id": "change_case:english_lowercase", "kwargs": {}},
                             {"id": "punctuation:no_comma", "kwargs": {}}]}] * 3
    responses = ["all lowercase and no commas", "all lowercase, with a comma", "Capitals, and a comma"]
    assert constraint_reward([[]] * 3, responses, [[]] * 3, meta=meta) == [1.0, 0.5, 0.0]
    assert constraint_reward([[]] * 3, responses, [[]] * 3, meta=meta, mode="all") == [1.0, 0.0, 0.0]
    kw = [{"constraints": [{"id": "length_constraints:number_words", "kwargs": {"relation": "less than",
                                                                                "num_words": 4}}]}]
    assert constraint_reward([[]], ["one two three"], [[]], meta=kw) == [1.0]
    assert constraint_reward([[]], ["   "], [[]], meta=kw) == [0.0]  # an empty response follows nothing
    with pytest.raises(ValueError, match="row 0 carries no meta"):
        constraint_reward([[]], ["x"], [[]], meta=[{}])


def test_format_rewards():
    assert ends_turn_reward([[]] * 2, ["a", "b"], [[1], [2]], ended=[True, False]) == [1.0, 0.0]
    assert length_reward([[]] * 3, ["", "", ""], [[1], [1, 2, 3], [1] * 9], min_tokens=2, max_tokens=5) == [0, 1, 0]
    texts = ['{"a": 1}', '```json\n{"a": [1, 2]}\n```', '{"a": 1', '{"a": 1} trailing', "", "[1, 2]"]
    assert json_reward([[]] * 6, texts, [[]] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def shouting(prompts, completions, completion_ids, **_):
    return [float(c.isupper()) for c in completions]


def test_combined_reward_weights_and_logs_each_component():
    r = CombinedReward([{"name": "ends_turn", "weight": 0.5}, {"name": "length", "weight": 2.0, "max_tokens": 2},
                        {"function": "test_rewards:shouting", "weight": 1.0}])
    total, parts = r([[]] * 2, ["HI", "hello"], [[1, 2], [1, 2, 3]], meta=[{}, {}], ended=[True, False])
    # row 0: 0.5 * 1 + 2 * 1 + 1 * 1 = 3.5;  row 1: 0 + 0 + 0 = 0
    assert total == [3.5, 0.0]
    assert parts == {"ends_turn": [1.0, 0.0], "length": [1.0, 0.0], "shouting": [1.0, 0.0]}
    with pytest.raises(ValueError, match="unknown reward 'gsm9k'"):
        CombinedReward([{"name": "gsm9k"}])
    with pytest.raises(ValueError, match="exactly one of 'name'"):
        CombinedReward([{"weight": 1.0}])
    with pytest.raises(ValueError, match="no reward given"):
        CombinedReward([])


def test_gsm8k_records_read_as_conversations_the_reward_can_score(tmp_path):
    from instructkit.data.io import read_examples

    p = tmp_path / "gsm.jsonl"
    p.write_text(json.dumps({"question": "Janet has 16 eggs and eats 3. How many are left?",
                             "answer": "She has 16 - 3 = <<16-3=13>>13 left.\n#### 13"}) + "\n")
    (conv,) = read_examples(str(p))
    assert conv.meta["format"] == "gsm8k" and conv.meta["answer"].endswith("#### 13")
    assert conv.messages[1].content == "She has 16 - 3 = 13 left.\n#### 13"  # calculator annotation removed
    assert gsm([conv.messages[1].content], [conv.meta["answer"]]) == [1.0]
    p.write_text(json.dumps({"question": "Q?", "answer": "no final line"}) + "\n")
    with pytest.raises(Exception, match="cannot detect the format"):
        read_examples(str(p))  # a question/answer file without '#### N' is not taken for GSM8K
    with pytest.raises(Exception, match="no final '#### N' line"):
        read_examples(str(p), "gsm8k")
