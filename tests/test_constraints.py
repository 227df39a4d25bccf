"""Constraint-augmented prompts (data/constraints.py, `instructkit data add-constraints`): compatible draws, checker
arguments the IFEval checkers accept, a reward that reads them back, and the refusal to train on evaluation prompts."""

from __future__ import annotations

import json
import random

import pytest

from instructkit.cli import main as cli
from instructkit.data.constraints import CATALOGUE, KINDS, add_constraints, draw_constraints
from instructkit.data.io import read_examples
from instructkit.data.schema import Conversation, Message
from instructkit.eval.instruction_following import check_instruction
from instructkit.rl.rewards import constraint_reward


def test_draws_are_compatible_and_checkable():
    for seed in range(300):
        rng = random.Random(seed)
        drawn = draw_constraints(rng, rng.randint(1, 3))
        kinds = [KINDS[spec["id"]] for spec, _ in drawn]
        for a in kinds:
            for b in kinds:
                if a is not b:
                    assert a.group != b.group and a.group not in b.conflicts and b.group not in a.conflicts
        for spec, sentence in drawn:
            check_instruction(spec["id"], spec["kwargs"], "some response")  # the checker takes these arguments
            assert sentence.strip()
    with pytest.raises(ValueError, match="cannot draw 3 compatible"):
        draw_constraints(random.Random(0), 3, ["change_case:english_lowercase", "change_case:english_capital"])


def test_every_kind_has_a_response_that_satisfies_it():
    """The sentence says what the checker checks: one hand-written response per kind passes its checker."""
    answers = {
        "change_case:english_lowercase": "all of this is lowercase.",
        "change_case:english_capital": "ALL OF THIS IS UPPERCASE.",
        "punctuation:no_comma": "No commas here at all.",
        "detectable_format:title": "<<a title>>\nThe body.",
        "startend:quotation": "\"Quoted from start to end.\"",
        "detectable_format:json_format": "```json\n{\"answer\": 1}\n```",
    }
    for kind in CATALOGUE:
        if kind.id in answers:
            spec, _ = kind.make(random.Random(0))
            assert check_instruction(kind.id, spec, answers[kind.id]), kind.id
    spec, sentence = KINDS["detectable_format:number_bullet_lists"].make(random.Random(1))
    n = spec["num_bullets"]
    assert f"exactly {n} bullet points" in sentence
    assert check_instruction("detectable_format:number_bullet_lists", spec, "\n".join(["* item"] * n))
    assert not check_instruction("detectable_format:number_bullet_lists", spec, "\n".join(["* item"] * (n + 1)))


def test_add_constraints_keeps_the_prompt_drops_the_answer_and_is_seeded(tmp_path):
    convs = [Conversation([Message("system", "Be brief."), Message("user", f"Name a colour {i}."),
                           Message("assistant", "Blue.")], {"source": "x.jsonl"}) for i in range(20)]
    a = add_constraints(convs, n_min=1, n_max=2, seed=3)
    assert a == add_constraints(convs, n_min=1, n_max=2, seed=3)
    assert a != add_constraints(convs, n_min=1, n_max=2, seed=4)
    for i, rec in enumerate(a):
        assert [m["role"] for m in rec["prompt"]] == ["system", "user"]
        assert rec["prompt"][1]["content"].startswith(f"Name a colour {i}.\n\n")
        assert 1 <= len(rec["constraints"]) <= 2 and rec["source"] == "x.jsonl"
    out = tmp_path / "p.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in a))
    back = read_examples(str(out))
    assert len(back) == 20 and all(ex.messages[-1].role == "user" for ex in back)
    # the reward reads the constraints from the prompt record's meta
    lower = [{"constraints": [{"id": "change_case:english_lowercase", "kwargs": {}}]}]
    rec = add_constraints(convs[:1], kinds=["change_case:english_lowercase"])[0]
    assert rec["constraints"] == lower[0]["constraints"]
    out.write_text(json.dumps(rec) + "\n")
    meta = [read_examples(str(out))[0].meta]
    assert constraint_reward([[]], ["the sky is blue and the sea is blue too."], [[]], meta=meta) == [1.0]
    assert constraint_reward([[]], ["The sky is blue and the sea is blue too."], [[]], meta=meta) == [0.0]
    with pytest.raises(ValueError, match="unknown constraint kind"):
        add_constraints(convs, kinds=["made:up"])


def test_cli_refuses_evaluation_prompts_and_can_drop_them(tmp_path, capsys):
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"prompt": "Write a limerick about a cat who learns to play the violin at night."})
                     + "\n")
    src = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Write a limerick about a cat who learns to play the violin "
                                                      "at night."}, {"role": "assistant", "content": "A cat..."}]},
            {"messages": [{"role": "user", "content": "Explain photosynthesis to a child."},
                          {"role": "assistant", "content": "Plants eat light."}]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prompts.jsonl"
    assert cli(["data", "add-constraints", str(src), str(out), "--eval", str(evals)]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 prompts overlap" in err and "example 0" in err and not out.exists()
    assert cli(["data", "add-constraints", str(src), str(out), "--eval", str(evals), "--drop-contaminated",
                "--max", "2"]) == 0
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(kept) == 1 and kept[0]["prompt"][0]["content"].startswith("Explain photosynthesis")
    rejects = [json.loads(x) for x in (tmp_path / "prompts.jsonl.rejects").read_text().splitlines()]
    assert [r["index"] for r in rejects] == [0]
    assert "dropped 1 prompts" in capsys.readouterr().out
