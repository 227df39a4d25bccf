"""`instructkit experiment flan-scaling` on the tiny model, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.cli import main
from instructkit.cli.experiment import cluster_plan
from instructkit.config import ConfigError, FlanScalingConfig, load_config
from instructkit.data.io import read_conversations
from instructkit.tasks.mixture import default_bank

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_flan_scaling.yaml"


def test_cluster_plan_orders_and_counts():
    clusters = default_bank().clusters()  # 14 clusters
    cfg = FlanScalingConfig(heldout_clusters=["nli", "code"], cluster_counts=[4, 1, 2, 0, 99])
    plan = cluster_plan(cfg, clusters)
    # 0 and 99 both mean all 12 remaining -> one run; sorted by k
    assert [k for k, _ in plan] == [1, 2, 4, 12]
    assert all(cs == plan[-1][1][:k] for k, cs in plan)  # nested: run k uses the first k of one order
    assert not {"nli", "code"} & set(plan[-1][1]) and len(set(plan[-1][1])) == 12
    assert cluster_plan(cfg, clusters) == plan  # seeded
    cfg2 = FlanScalingConfig(heldout_clusters=["nli"], cluster_counts=[2], cluster_order=["safety", "code"])
    assert cluster_plan(cfg2, clusters) == [(2, ["safety", "code"])]
    with pytest.raises(ConfigError, match="cluster_order names unknown or held-out"):
        cluster_plan(FlanScalingConfig(heldout_clusters=["nli"], cluster_order=["nli"]), clusters)


def test_configs_load():
    real = load_config(FlanScalingConfig, ROOT / "configs" / "flan_scaling.yaml")
    assert real.lora.enabled and real.cluster_counts == [1, 2, 4, 0] and real.mixture.cap == 3000
    assert set(real.heldout_clusters) <= set(default_bank().clusters())
    tiny = load_config(FlanScalingConfig, TINY)
    assert tiny.mixture.render.options_fraction == 1.0
    with pytest.raises(ConfigError):
        load_config(FlanScalingConfig, TINY, ["heldout_clusters=[]"])


def test_tiny_flan_scaling_end_to_end(tmp_path, capsys):
    rc = main(["experiment", "flan-scaling", "--config", str(TINY), f"train.output_dir={tmp_path}",
               "cluster_counts=[1,0]", "train.max_steps=2"])
    assert rc == 0
    out = tmp_path / "tiny_flan_scaling"
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    # base (0 clusters), 1 cluster, all 13 non-NLI clusters
    assert [r["clusters"] for r in runs] == [0, 1, 13]
    for r in runs:
        ev = r["eval"]
        assert set(ev["clusters"]) == {"nli"} and 0.0 <= ev["overall"] <= 1.0
        assert set(ev["tasks"]) == {t.name for t in default_bank().in_clusters(["nli"])}
    for r in runs[1:]:
        assert r["contamination"]["clean"] and r["contamination"]["checked"] > 0
        assert r["examples"] == 48 and r["last_loss"] is not None
        train = read_conversations(out / f"clusters_{r['clusters']}" / "train.jsonl")
        # 48 examples over up to 73 tasks: every example from the run's clusters, the 1-cluster run from exactly it
        assert {c.meta["cluster"] for c in train} <= set(r["train_clusters"])
        if r["clusters"] == 1:
            assert {c.meta["cluster"] for c in train} == set(r["train_clusters"])
        assert (out / f"clusters_{r['clusters']}" / "final" / "adapter_config.json").exists()
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| 0 (base) |" in report and "| 13: " in report and "curve.png" in report
    assert "| training clusters |" in capsys.readouterr().out
