"""`instructkit tasks list|show`, `data build-mixture` and `evaluate heldout`, in-process."""

from __future__ import annotations

import json
from pathlib import Path

from instructkit.cli import main
from instructkit.data.io import read_conversations

ROOT = Path(__file__).resolve().parents[1]


def test_tasks_list_json(capsys):
    assert main(["tasks", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 60 and len({r["cluster"] for r in rows}) >= 10
    assert all({"name", "cluster", "templates"} <= set(r) and r["templates"] >= 5 for r in rows)
    add = next(r for r in rows if r["name"] == "addition")
    assert add == {**add, "cluster": "arithmetic", "templates": 10, "metric": "exact_match"}


def test_tasks_list_table_and_cluster_filter(capsys):
    assert main(["tasks", "list", "--cluster", "safety"]) == 0
    out = capsys.readouterr().out
    assert "refuse_harmful" in out and "addition" not in out and "4 tasks in 1 clusters" in out
    assert main(["tasks", "list", "--cluster", "nope"]) == 2


def test_tasks_show_renders_every_template_and_variant(capsys):
    assert main(["tasks", "show", "even_or_odd", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    # 5 templates x {zero_shot, few_shot} x {options, no options}
    assert len(shown) == 20
    assert {s["meta"]["variant"] for s in shown} == {"zero_shot", "few_shot"}
    assert all(s["messages"][-1]["content"] == shown[0]["messages"][-1]["content"] for s in shown)
    assert main(["tasks", "show", "even_or_odd"]) == 0
    text = capsys.readouterr().out
    assert text.count("=== t0") == 20 and "OPTIONS:\n- even\n- odd" in text
    assert main(["tasks", "show", "no_such_task"]) == 2


def test_build_mixture_writes_jsonl_and_counts(tmp_path, capsys):
    out = tmp_path / "mix.jsonl"
    cfg = ROOT / "configs" / "mixtures" / "heldout_nli_weighted.yaml"
    assert main(["data", "build-mixture", str(cfg), str(out), "total=200", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    convs = read_conversations(out)
    assert len(convs) == summary["total"] == 200
    assert not any(c.meta["cluster"] == "nli" for c in convs)
    assert sum(summary["templates"].values()) == 200
    assert sum(s["count"] for s in summary["sources"].values()) == 200
    # table form prints per-task and per-template counts
    assert main(["data", "build-mixture", str(cfg), str(out), "total=50"]) == 0
    assert "wrote 50 examples" in capsys.readouterr().out
    # a bad key in the config is a usage error
    assert main(["data", "build-mixture", str(cfg), str(out), "colour=red"]) == 2


def test_build_mixture_with_yaml_tasks(tmp_path, capsys):
    (tmp_path / "t.yaml").write_text(
        "tasks:\n  - {name: echo, cluster: mine, metric: exact_match, templates: ['Echo {w}', 'Repeat {w}', "
        "'Say {w}', 'w={w}', '{w}?'], examples: [{w: a, target: a}, {w: b, target: b}]}\n")
    (tmp_path / "m.yaml").write_text("strategy: weighted\ntotal: 10\nyaml_tasks: [t.yaml]\ntasks: [{name: echo}]\n")
    assert main(["data", "build-mixture", str(tmp_path / "m.yaml"), str(tmp_path / "o.jsonl")]) == 0
    convs = read_conversations(tmp_path / "o.jsonl")
    assert len(convs) == 10 and all(c.meta["task"] == "echo" for c in convs)


def test_evaluate_heldout_cli(tiny_model_dir, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    assert main(["data", "build-mixture", str(ROOT / "configs" / "mixtures" / "heldout_nli_weighted.yaml"),
                 str(train), "total=100"]) == 0
    capsys.readouterr()
    rc = main(["evaluate", "heldout", "--model", str(tiny_model_dir), "--clusters", "nli", "--tasks", "addition",
               "--examples-per-task", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "ev"),
               "--train-data", str(train), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["clusters"]) == {"nli", "arithmetic"}
    assert res["contamination"]["clean"] and res["contamination"]["checked"] > 0
    saved = json.loads((tmp_path / "ev" / "heldout.json").read_text())
    assert len(saved["records"]) == 2 * sum(t["templates"] for t in saved["tasks"].values())
    assert "| nli |" in (tmp_path / "ev" / "heldout.md").read_text()
    assert main(["evaluate", "heldout", "--model", str(tiny_model_dir), "--clusters", "nope"]) == 2


def test_shipped_mixture_configs_build(tmp_path, capsys):
    for name in ("flan_all", "heldout_nli_weighted", "with_user_tasks"):
        out = tmp_path / f"{name}.jsonl"
        assert main(["data", "build-mixture", str(ROOT / "configs" / "mixtures" / f"{name}.yaml"), str(out),
                     "total=120", "examples_per_task=10", "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["total"] == 120 == len(read_conversations(out))
    tasks = {c.meta["task"] for c in read_conversations(tmp_path / "with_user_tasks.jsonl")}
    assert {"unit_conversion", "animal_sound"} <= tasks
    assert main(["tasks", "show", "unit_conversion", "--tasks-file",
                 str(ROOT / "configs" / "mixtures" / "user_tasks.yaml")]) == 0
    assert "How many centimetres are in" in capsys.readouterr().out
