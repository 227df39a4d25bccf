"""`instructkit experiment lima` (quality vs quantity at equal compute) on the tiny model, through the CLI; and the
curation it relies on (data/curation.py) against hand-computed selections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from instructkit.cli import main
from instructkit.data.curation import CurationConfig, allocate_equal, curate, farthest_point
from instructkit.data.schema import Conversation, Message

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_lima.yaml"
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "t0_train_per_template.jsonl.gz").exists()
                                  or not (SHARED / "ifeval_input_data.jsonl").exists(),
                                  reason="../shared/data not present")


def _conv(q, a, source):
    return Conversation([Message("user", q), Message("assistant", a)], {"source": source})


def test_allocate_equal_redistributes_short_strata():
    assert allocate_equal({"a": 10, "b": 10, "c": 10}, 10) == {"a": 3, "b": 3, "c": 4}  # remainder to the last
    # "b" has only 1: its unused share goes to the others (7 = 1 + 3 + 3)
    assert allocate_equal({"a": 10, "b": 1, "c": 10}, 7) == {"a": 3, "b": 1, "c": 3}
    with pytest.raises(ValueError, match="cannot select 5"):
        allocate_equal({"a": 2, "b": 2}, 5)


def test_farthest_point_hand_computed():
    # rows 0 and 1 identical, row 2 differs from both in all 4 values, row 3 differs from row 0 in 2 of 4
    sig = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 9, 9]])
    assert farthest_point(sig, 2, first=0) == [0, 2]  # distance 1.0 beats 0.5 and 0.0
    assert farthest_point(sig, 3, first=0) == [0, 2, 3]  # then row 3 (0.5 from row 0) before row 1 (0.0)


def test_curate_filters_dedups_and_stratifies():
    pool = [_conv(f"question {i} about topic {i}", f"a full answer number {i} with several words in it", "x")
            for i in range(6)]
    pool += [_conv("question 0 about topic 0", "a full answer number 0 with several words in it", "x")]  # exact dup
    pool += [_conv(f"classify text {i}", "Yes", "y") for i in range(3)]  # too short for min_response_words=3
    pool += [_conv(f"tell me about item {i} in detail", f"item {i} is a long explained thing with words", "y")
             for i in range(4)]
    picked, rep = curate(pool, 6, CurationConfig(min_response_words=3))
    assert rep["quality"]["removed_by"]["short_response"] == 3 and rep["dedup"]["exact"] == 1
    assert rep["strata"] == {"x": 6, "y": 4} and rep["quota"] == {"x": 3, "y": 3}
    assert len(picked) == 6 and sum(c.meta["source"] == "y" for c in picked) == 3
    assert all(len(c.messages[1].content.split()) >= 3 for c in picked)


def test_lima_contaminated_arm_fails_the_run(tmp_path, capsys):
    ifeval = tmp_path / "ifeval.jsonl"
    prompt = ("Write a 300+ word summary of the wikipedia page about the history of the printing press in europe. "
              "Do not use any commas and highlight at least 3 sections.")
    ifeval.write_text(json.dumps({"key": 1, "prompt": prompt, "instruction_id_list": [], "kwargs": []}) + "\n")
    leak = tmp_path / "leak.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}: say something kind and helpful to me"},
                          {"role": "assistant", "content": f"here is a kind and helpful answer number {i}"}]}
            for i in range(5)]
    rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "ok sure"}]})
    leak.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc = main(["experiment", "lima", "--config", str(TINY), f"train.output_dir={tmp_path}", "t0_path=",
               "alpaca_path=", f"builtin_sources=[{leak}]", f"ifeval_prompts={ifeval}", "n_examples=6",
               "arms=[pool]", "decontaminate_pool=false"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pool_seed0" in err and "share a 13-gram with the training mixture" in err and "ifeval" in err
    assert not (tmp_path / "tiny_lima" / "base").exists() and not (tmp_path / "tiny_lima" / "pool_seed0").exists()
    # with the pool decontaminated (the default) the leaked example is removed and counted instead
    rc = main(["experiment", "lima", "--config", str(TINY), f"train.output_dir={tmp_path}", "t0_path=",
               "alpaca_path=", f"builtin_sources=[{leak}]", f"ifeval_prompts={ifeval}", "n_examples=6",
               "arms=[pool]", "heldout_data="])
    assert rc == 2 and "fewer than n_examples=6" in capsys.readouterr().err  # 6 - 1 leaked = 5 left


@needs_shared
def test_tiny_lima_end_to_end(tmp_path, capsys):
    rc = main(["experiment", "lima", "--config", str(TINY), f"train.output_dir={tmp_path}",
               f"t0_path={SHARED / 't0_train_per_template.jsonl.gz'}", f"alpaca_path={SHARED / 'lf_alpaca_en_demo.json'}",
               f"ifeval_prompts={SHARED / 'ifeval_input_data.jsonl'}", "ifeval_limit=1", "stop_rate_limit=1"])
    assert rc == 0
    out = tmp_path / "tiny_lima"
    res = json.loads((out / "results.json").read_text())
    runs = {r["arm"]: r for r in res["runs"]}
    assert list(runs) == ["base", "curated", "random", "pool"]
    # the pool: 40 T0 + (40 of the Alpaca records left after holding out 4) + 40 built-in
    assert res["pool_sources"] == {"t0": 40, "alpaca": 40, "builtin:quickstart_train": 40} and res["pool"] == 120
    assert runs["curated"]["examples"] == runs["random"]["examples"] == 12 and runs["pool"]["examples"] == 120
    capacity = 2 * 128
    assert res["capacity_per_step"] == capacity
    for arm in ("curated", "random", "pool"):
        r = runs[arm]
        # the promised compute: the same optimizer steps for every arm, each step at most its packed token slots
        # and mostly full (packing)
        assert r["steps"] == 3 and 0.75 * 3 * capacity <= r["tokens"] <= 3 * capacity
        assert r["contamination"]["clean"] and r["contamination"]["checked"] > 0
        train = [json.loads(line) for line in (out / f"{arm}_seed0" / "train.jsonl").read_text().splitlines()]
        assert len(train) == r["examples"]
        for key in ("ifeval.inst_level_loose_acc", "perplexity.heldout_loss", "stop_rate.stop_rate"):
            assert key in r["eval"]
        # the same evaluation for every arm: the same IFEval prompts and held-out conversations
        assert json.loads((out / f"{arm}_seed0" / "eval" / "ifeval.json").read_text())["metrics"]["num_prompts"] == 1
    assert res["curation"]["selected"] == 12 and sum(res["curation"]["quota"].values()) == 12
    report = (out / "report.md").read_text()
    for arm in ("base", "curated", "random", "pool"):
        assert f"| {arm} | " in report
    assert "3 optimizer steps x 2 packed rows x 128 tokens" in report
    assert (out / "arms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "LIMA" in capsys.readouterr().out


def test_real_configs_load():
    from instructkit.config import LimaConfig, SFTConfig, load_config

    lima = load_config(LimaConfig, ROOT / "configs" / "lima.yaml")
    assert lima.arms == ["curated", "random", "pool"] and lima.n_examples == 1000 and lima.train.max_steps > 0
    assert lima.model.path == "gemma-3-270m" and lima.ifeval_prompts and lima.decontaminate_pool
    data = load_config(LimaConfig, ROOT / "configs" / "mixtures" / "assistant_gemma.yaml")
    assert data.t0_path and data.alpaca_path and data.ifeval_prompts and data.decontaminate_pool
    assert data.t0_strata == "source" and data.n_examples == 600
    sft = load_config(SFTConfig, ROOT / "configs" / "assistant_gemma.yaml")
    assert sft.model.path == "gemma-3-270m" and sft.lora.enabled
    # the SFT recipe reads exactly what the documented curate command writes
    assert [s.path for s in sft.data.sources] == [str((ROOT / "runs" / "data" / "assistant_gemma.jsonl").resolve())]
    assert "--out runs/data/assistant_gemma.jsonl" in (ROOT / "configs" / "assistant_gemma.yaml").read_text()
    with pytest.raises(Exception, match="max_steps > 0"):
        load_config(LimaConfig, TINY, ["train.max_steps=0"])


@needs_shared
def test_curate_command_writes_decontaminated_sft_data(tmp_path, capsys):
    out = tmp_path / "data" / "mix.jsonl"
    rc = main(["experiment", "curate", "--config", str(ROOT / "configs" / "mixtures" / "assistant_gemma.yaml"),
               "--out", str(out), "t0_path=", f"alpaca_path={SHARED / 'lf_alpaca_en_demo.json'}",
               f"ifeval_prompts={SHARED / 'ifeval_input_data.jsonl'}", "max_per_source=60", "heldout_alpaca=5",
               "n_examples=20", "include_sources=[]", "knowledge_clusters=[]"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rep = json.loads((tmp_path / "data" / "mix.jsonl.report.json").read_text())
    assert len(rows) == rep["examples"] == 20 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert rep["eval_sets"] == ["heldout", "ifeval", "stop_rate"] and rep["contamination"]["clean"]
    assert rep["eval_texts"] > 541 + 41  # IFEval, the benign stop-rate prompts and the 41 held-out conversations
    assert sum(rep["sources"].values()) == 20 and set(rep["sources"]) == {"alpaca", "builtin"}
    held = [json.loads(line) for line in (tmp_path / "data" / "mix.heldout.jsonl").read_text().splitlines()]
    assert len(held) == 36 + 5  # builtin:quickstart_heldout + the 5 held-out Alpaca records
    held_prompts = {h["messages"][0]["content"] for h in held}
    assert not held_prompts & {r["messages"][0]["content"] for r in rows}
