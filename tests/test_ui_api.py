"""The UI's JSON endpoints without a browser: paths from requests stay inside their roots, evaluation JSON becomes
tables, unknown recipes are refused."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from instructkit.ui.app import _tables, build_app  # noqa: E402


@pytest.fixture()
def client(tmp_path):
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    (tmp_path / "runs" / "r1" / "ifeval.json").write_text(json.dumps(
        {"prompt_level_strict": 0.25, "per_instruction_type": {"length:max": {"strict": 0.5, "loose": 0.6},
                                                               "format:json": {"strict": 0.1, "loose": 0.2}}}))
    (tmp_path / "secret.txt").write_text("x")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link.jsonl").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "root" / "runs").symlink_to(tmp_path / "runs")
    return TestClient(build_app(tmp_path / "root", "runs"))


def test_paths_stay_inside_the_roots(client):
    for path in ("../secret.txt", "/etc/passwd", "link.jsonl"):
        r = client.get("/api/data", params={"path": path})
        assert r.status_code == 403, (path, r.text)
    assert client.get("/api/runs/..%2F..").status_code in (403, 404)
    r = client.post("/api/launch", json={"recipe": "sft", "config": "../secret.txt"})
    assert r.status_code == 403


def test_runs_and_eval_tables(client):
    assert [r["name"] for r in client.get("/api/runs").json()["runs"]] == ["r1"]
    d = client.get("/api/runs/r1").json()
    assert d["keys"] == ["loss"] and [m["loss"] for m in d["metrics"]] == [2.0, 1.5]
    (ev,) = d["evals"]
    titles = {t["title"]: t for t in ev["tables"]}
    assert titles["metrics"]["rows"] == [["prompt_level_strict", 0.25]]
    per_type = titles["per_instruction_type"]
    assert per_type["columns"] == ["loose", "strict"] and ["length:max", 0.6, 0.5] in per_type["rows"]


def test_unknown_recipe_is_refused(client, tmp_path):
    (tmp_path / "root" / "c.yaml").write_text("x: 1\n")
    r = client.post("/api/launch", json={"recipe": "rm -rf", "config": "c.yaml"})
    assert r.status_code == 400 and "recipe" in r.json()["error"]


def test_tables_of_win_rates():
    t = _tables({"win_rate": 0.6, "ties": 2})
    assert t == [{"title": "metrics", "columns": ["value"], "rows": [["win_rate", 0.6], ["ties", 2]]}]
