"""Rejection sampling of constraint-following SFT data (recipes/rejection_sampling.py, `instructkit data
reject-sample`): a sample is kept only when it ends its turn and passes every constraint's strict checker; the first
passing sample of a prompt is the one kept; prompts with none go to the rejects file, counted; the teacher's text is
not edited."""

from __future__ import annotations

import json

import pytest

from instructkit.cli import main as cli
from instructkit.config import ConfigError, RejectionSamplingConfig
from instructkit.data.io import read_examples
from instructkit.eval.instruction_following import check_instruction
from instructkit.generation.engine import Engine, GenerationOutput
from instructkit.recipes import rejection_sampling as rs

LOWER = {"id": "change_case:english_lowercase", "kwargs": {}}
NO_COMMA = {"id": "punctuation:no_comma", "kwargs": {}}


def _prompts(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for user, cons in records:
            f.write(json.dumps({"prompt": [{"role": "user", "content": user}], "constraints": cons}) + "\n")


def test_judge_sample():
    assert rs.judge_sample([LOWER, NO_COMMA], "all lowercase and no commas", "stop") == []
    assert rs.judge_sample([LOWER, NO_COMMA], "Has Capitals, and a comma", "stop") == [LOWER["id"], NO_COMMA["id"]]
    assert rs.judge_sample([LOWER], "all lowercase but cut", "length") == ["length"]


def test_first_passing_sample_kept_rejects_counted(tmp_path, tiny_model_dir, monkeypatch):
    """Scripted teacher outputs (3 samples per prompt): prompt 0 passes on its 2nd sample only (the 3rd passes
    too: the first passing one is kept), prompt 1 never passes (one sample cut by the length limit), prompt 2 passes
    on its first sample."""
    script = [
        ("Has Capitals", "stop"), ("all lower, with comma", "stop"), ("also lower", "stop"),
        ("UPPER", "stop"), ("lower but cut", "length"), ("Mixed, Case", "stop"),
        ("no commas here", "stop"), ("No commas Either", "stop"), ("x, y", "stop"),
    ]
    calls = []

    def fake_chat(self, convs, params):
        calls.append((len(convs), params.seed, params.temperature))
        assert [c[0]["content"] for c in convs] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
        return [GenerationOutput(prompt_ids=[], token_ids=[], text=t, finish_reason=r) for t, r in script]

    monkeypatch.setattr(Engine, "chat", fake_chat)
    src = tmp_path / "prompts.jsonl"
    _prompts(src, [("a", [LOWER]), ("b", [LOWER]), ("c", [NO_COMMA])])
    out = tmp_path / "kept.jsonl"
    rep = rs.main(RejectionSamplingConfig(input=str(src), output=str(out), teacher=str(tiny_model_dir),
                                          samples_per_prompt=3, seed=7))
    assert calls == [(9, 7, 0.8)]
    kept = read_examples(str(out))
    assert [(c.messages[0].content, c.messages[-1].content) for c in kept] == [
        ("a", "all lower, with comma"), ("c", "no commas here")]
    assert [c.meta["sample"] for c in kept] == [1, 0]
    assert kept[0].meta["constraints"] == [LOWER] and kept[0].meta["generated_by"] == "rejection_sampling"
    rejects = [json.loads(x) for x in (tmp_path / "kept.jsonl.rejects").read_text().splitlines()]
    assert [r["index"] for r in rejects] == [1]
    assert rejects[0]["reasons"] == [[LOWER["id"]], ["length"], [LOWER["id"]]]
    assert rep["kept"] == 2 and rep["rejected"] == 1 and rep["prompts"] == 3
    assert rep["acceptance"] == pytest.approx(2 / 3)
    # samples that ended their turn: 3 + 2 for lowercase (2 + 0 satisfied), 3 for no_comma (2 satisfied)
    assert rep["per_constraint"][LOWER["id"]] == {"samples_checked": 5, "satisfied": 2, "rate": 0.4}
    assert rep["per_constraint"][NO_COMMA["id"]]["satisfied"] == 2
    assert rep["kept_by_sample"] == {"0": 1, "1": 1}
    assert rep["reasons_of_rejected_prompts"] == {LOWER["id"]: 1, "length": 1}
    assert json.loads((tmp_path / "kept.jsonl.report.json").read_text())["kept"] == 2


def test_cli_tiny_teacher_counts_add_up(tmp_path, tiny_model_dir):
    """A real (random) teacher through the CLI: every prompt is kept or rejected, and what is kept passes its
    checkers as written."""
    src = tmp_path / "prompts.jsonl"
    forbidden = {"id": "keywords:forbidden_words", "kwargs": {"forbidden_words": ["zebra"]}}
    _prompts(src, [(f"say something {i}", [forbidden]) for i in range(6)])
    out = tmp_path / "kept.jsonl"
    assert cli(["data", "reject-sample", str(src), str(out), "--teacher", str(tiny_model_dir), "--samples", "2",
                "--max-new-tokens", "6", "--batch-size", "4"]) == 0
    rep = json.loads((tmp_path / "kept.jsonl.report.json").read_text())
    kept = read_examples(str(out)) if out.stat().st_size else []
    rejects = (tmp_path / "kept.jsonl.rejects").read_text().splitlines()
    assert rep["kept"] == len(kept) and rep["rejected"] == len(rejects) and len(kept) + len(rejects) == 6
    for c in kept:
        assert check_instruction(forbidden["id"], forbidden["kwargs"], c.messages[-1].content)


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="greedy"):
        RejectionSamplingConfig(input="x", output="y", temperature=0.0, samples_per_prompt=2)
    src = tmp_path / "plain.jsonl"
    src.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    assert cli(["data", "reject-sample", str(src), str(tmp_path / "o.jsonl"), "--teacher", "unused"]) != 0


def test_prompt_with_tools_is_refused(tmp_path):
    src = tmp_path / "tools.jsonl"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    src.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "tools": [tool],
                               "constraints": [LOWER]}) + "\n")
    with pytest.raises(Exception, match="tools.jsonl:1: record declares tools"):
        rs.read_prompt_records(str(src))
