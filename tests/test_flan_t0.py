"""`instructkit experiment flan-scaling` on REAL tasks (T0's per-template file), tiny model, through the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from instructkit.cli import main
from instructkit.data.io import read_conversations
from instructkit.eval.t0 import load_t0, training_mixture

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_flan_scaling_t0.yaml"
T0 = ROOT.parent / "shared" / "data" / "t0_train_per_template.jsonl.gz"
needs_t0 = pytest.mark.skipif(not T0.exists(), reason="../shared/data/t0_train_per_template.jsonl.gz not present")


def _write_t0(path: Path, rows: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _row(cluster, dataset, template, prompt, completion):
    return {"cluster": cluster, "dataset": dataset, "template": template, "prompt": prompt, "completion": completion}


def _small_t0(tmp_path: Path, leak: bool = False) -> Path:
    rows = []
    for i in range(6):
        for tpl in ("t1", "t2"):
            rows.append(_row("sentiment", "imdb", tpl, f"review {i} of film number {i} says it is grand, is it?",
                             "positive" if i % 2 else "negative"))
            rows.append(_row("topic", "news", tpl, f"article {i}: the markets rose on tuesday in city {i}. topic?",
                             ["Business", "Sports", "World"][i % 3]))
            rows.append(_row("qa", "trivia", tpl, f"question {i}: who wrote book number {i} in the series?",
                             f"author {i}"))
    rows.append(_row("topic", "trec", "t1", "what is this question about?", ""))  # empty target: counted, skipped
    if leak:  # a training-cluster record that quotes a held-out (sentiment) prompt word for word
        rows.append(_row("qa", "trivia", "t3", "review 0 of film number 0 says it is grand, is it? and more words",
                         "yes"))
    return _write_t0(tmp_path / "t0.jsonl.gz", rows)


def test_load_options_and_equal_shares(tmp_path):
    data = load_t0(_small_t0(tmp_path))
    assert data.clusters() == ["qa", "sentiment", "topic"] and data.empty == {"trec/t1": 1}
    opts = data.options(max_options=10)
    assert opts[("imdb", "t1")] == ["negative", "positive"] and opts[("news", "t2")] == ["Business", "Sports", "World"]
    assert ("trivia", "t1") in opts and ("trivia", "t1") not in data.options(max_options=5)  # 6 distinct answers
    mix = training_mixture(data, ["qa", "topic"], total=7, seed=0)
    by = {d: sum(r.dataset == d for r in mix) for d in ("news", "trivia")}
    assert sorted(by.values()) == [3, 4] and len(mix) == 7  # 7 over 2 datasets: 4 + 3
    one = training_mixture(data, ["qa", "topic"], total=6, seed=0, templates_per_dataset=1)
    assert all(len({r.template for r in one if r.dataset == d}) == 1 for d in ("news", "trivia"))
    with pytest.raises(Exception, match="needs more records"):
        training_mixture(data, ["qa"], total=13, seed=0)


def test_bad_record_names_file_and_line(tmp_path):
    p = _write_t0(tmp_path / "bad.jsonl.gz", [_row("a", "b", "c", "p", "x"), {"cluster": "a", "prompt": "p"}])
    with pytest.raises(Exception, match=r"bad\.jsonl\.gz.*2|line 2"):
        load_t0(p)


def test_contaminated_mixture_fails_the_run(tmp_path, capsys):
    t0 = _small_t0(tmp_path, leak=True)
    rc = main(["experiment", "flan-scaling", "--config", str(TINY), f"train.output_dir={tmp_path}", f"t0.path={t0}",
               "heldout_clusters=[sentiment]", "cluster_counts=[0]", "t0.total=25", "t0.template_arm=false",
               "contamination_ngram=8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "share a 8-gram with the training mixture" in err and "imdb" in err
    assert not (tmp_path / "tiny_flan_scaling_t0" / "base").exists()  # failed before any evaluation or training


@needs_t0
def test_tiny_flan_scaling_t0_end_to_end(tmp_path, capsys):
    rc = main(["experiment", "flan-scaling", "--config", str(TINY), f"train.output_dir={tmp_path}", f"t0.path={T0}"])
    assert rc == 0
    out = tmp_path / "tiny_flan_scaling_t0"
    res = json.loads((out / "results.json").read_text())
    assert res["heldout_clusters"] == ["paraphrase_identification", "closed_book_qa"]
    runs = res["runs"]
    assert [(r["arm"], r["clusters"], r["templates"]) for r in runs] == [
        ("base", 0, "-"), ("clusters", 1, "all"), ("clusters", 6, "all"), ("templates", 6, 1)]
    for r in runs[1:]:
        # equal compute: every arm trains on the same number of examples for the same steps
        assert r["examples"] == r["trained_examples"] == 12 and r["steps"] == 2 and r["contamination"]["clean"]
        assert not set(r["train_clusters"]) & set(res["heldout_clusters"])
        name = f"clusters_{r['clusters']}" + ("_1tpl" if r["templates"] == 1 else "") + "_seed0"
        train = read_conversations(out / name / "train.jsonl")
        assert len(train) == 12 and {c.meta["cluster"] for c in train} <= set(r["train_clusters"])
        if r["templates"] == 1:
            for d in {c.meta["task"] for c in train}:
                assert len({c.meta["template"] for c in train if c.meta["task"] == d}) == 1
        assert (out / name / "final" / "adapter_config.json").exists()
        for c in ("paraphrase_identification", "closed_book_qa"):
            assert 0.0 <= r["eval"]["clusters"][c]["mean"] <= 1.0
    # 3 paraphrase datasets + 2 closed-book datasets, first template each: 4 rank-classified, 1 generative
    assert res["heldout_items"] == 5 and res["scoring"] == {"rank": 4, "generative": 1}
    assert res["skipped_empty_targets"] and all(k.startswith("trec/") for k in res["skipped_empty_targets"])
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for row in ("| base | 0 |", "| clusters | 1 | all |", "| clusters | 6 | all |", "| templates | 6 | 1 |"):
        assert row in report
    assert "held-out score" in capsys.readouterr().out


def test_real_t0_config_loads():
    from instructkit.config import FlanScalingConfig, load_config

    cfg = load_config(FlanScalingConfig, ROOT / "configs" / "flan_scaling_t0.yaml")
    assert cfg.model.path == "gemma-3-270m" and cfg.t0.path.endswith("t0_train_per_template.jsonl.gz")
    assert cfg.heldout_clusters == ["sentiment"] and cfg.cluster_counts == [1, 2, 4, 0] and cfg.t0.template_arm
    assert cfg.contamination_ngram == 13 and cfg.lora.enabled and cfg.t0.template_arm_clusters == 2
    with pytest.raises(Exception, match="eval_templates"):
        load_config(FlanScalingConfig, TINY, ["t0.eval_templates=some"])
