"""train.report_to: TensorBoard, W&B (offline) and MLflow (file store) each get the metrics.jsonl records, the resolved
config and the final summary, read back with each library's own reader. One tiny SFT run through the CLI logs to all
three; a reward-model run checks that another recipe reports too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
       "MLFLOW_TRACKING_URI": "", "WANDB_DISABLE_GIT": "true"}


def _run(recipe: str, config: str, out: Path, name: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "instructkit", recipe, "--config", str(ROOT / "configs" / config),
           f"train.output_dir={out}", f"train.run_name={name}", "train.max_steps=3", "train.eval_every=0",
           "train.save_every=0", "train.log_every=1", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env={k: v for k, v in ENV.items() if v != ""},
                       cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracking")
    _run("sft", "tiny_sft.yaml", out, "tracked", "train.sample_every=0", "train.report_to=[tensorboard,wandb,mlflow]")
    return out / "tracked"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_tensorboard_events_hold_the_metrics_config_and_summary(sft_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(sft_run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    losses = [(r["step"], r["loss"]) for r in _metrics(sft_run) if "loss" in r]
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in got] == [s for s, _ in losses]
    assert all(abs(a - b[1]) < 1e-5 for (_, a), b in zip(got, losses))
    summary = json.loads((sft_run / "summary.json").read_text())
    assert abs(acc.Scalars("summary/last_loss")[-1].value - summary["last_loss"]) < 1e-5
    texts = {t: acc.Tensors(t) for t in acc.Tags()["tensors"]}
    assert any("config" in t for t in texts) and any("summary" in t for t in texts)


def _wandb_records(run_dir: Path) -> dict[str, list]:
    """The records of an offline run's .wandb file parsed with wandb's own protobuf classes. The file is a LevelDB-style
    log (wandb's datastore format: a 7-byte header ':W&B' + magic 0xBEE1 + version, then 32 KiB blocks of records,
    each crc32 (4 bytes), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last)); wandb's Python
    reader of it moved into its Go core, so the framing is read here."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (store,) = list(run_dir.glob("*.wandb"))
    data = store.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, block, payloads, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            payloads.append(parts + chunk)
    out: dict[str, list] = {}
    for payload in payloads:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        out.setdefault(kind, []).append(getattr(rec, kind))
    return out


def test_wandb_offline_run_files(sft_run):
    (run_dir,) = list((sft_run / "wandb").glob("offline-run-*"))
    recs = _wandb_records(run_dir)
    steps = []
    for h in recs["history"]:
        items = {i.key or "/".join(i.nested_key): i.value_json for i in h.item}
        if "loss" in items:
            steps.append((int(items["_step"]), float(items["loss"])))
    want = [(r["step"], r["loss"]) for r in _metrics(sft_run) if "loss" in r]
    assert [s for s, _ in steps] == [s for s, _ in want]
    assert all(abs(a[1] - b[1]) < 1e-5 for a, b in zip(steps, want))
    config = {i.key or "/".join(i.nested_key): i.value_json for c in (*recs.get("config", []),
                                                                      *(r.config for r in recs["run"]))
              for i in c.update}
    assert json.loads(config["train"])["run_name"] == "tracked"
    summary = {i.key or "/".join(i.nested_key): i.value_json for s in recs["summary"] for i in s.update}
    ours = json.loads((sft_run / "summary.json").read_text())
    assert abs(json.loads(summary["last_loss"]) - ours["last_loss"]) < 1e-9
    assert "exit" in recs  # the run was finished, not left open


def test_mlflow_file_store_read_back_with_its_client(sft_run):
    from mlflow.tracking import MlflowClient

    info = json.loads((sft_run / "mlflow_run.json").read_text())
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.run_name"] == "tracked"
    hist = client.get_metric_history(info["run_id"], "loss")
    want = [(r["step"], r["loss"]) for r in _metrics(sft_run) if "loss" in r]
    got = sorted((m.step, m.value) for m in hist)
    assert [s for s, _ in got] == [s for s, _ in want] and all(abs(a[1] - b[1]) < 1e-9 for a, b in zip(got, want))
    summary = json.loads((sft_run / "summary.json").read_text())
    assert run.data.metrics["summary.last_loss"] == pytest.approx(summary["last_loss"])
    art = Path(client.download_artifacts(info["run_id"], "summary.json"))
    assert json.loads(art.read_text())["last_loss"] == summary["last_loss"]


@pytest.mark.slow
def test_another_recipe_reports_too(tmp_path):
    _run("reward-model", "tiny_reward_model.yaml", tmp_path, "rm", "train.report_to=[tensorboard]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "rm" / "tensorboard"))
    acc.Reload()
    assert acc.Tags()["scalars"]


def test_unknown_backends_are_refused():
    from instructkit.config import ConfigError
    from instructkit.training.tracking import check_report_to

    with pytest.raises(ConfigError, match="comet"):
        check_report_to(["comet"])
