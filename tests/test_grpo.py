"""`instructkit grpo` on a tiny random Llama built in-process: the reward rises to near its maximum, the first update's
ratio is exactly 1, the KL to the reference is exactly 0 before any update, dynamic sampling drops and counts flat
groups, the common run layout is written, and 2 processes equal 1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instructkit.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_grpo.yaml"


def config(tmp_path: Path, name: str, **over) -> Path:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["data"]["sources"] = [{"path": str(ROOT.parent / "shared" / "data" / "lf_alpaca_en_demo.json")}]
    cfg["train"].update(output_dir=str(tmp_path / "runs"), run_name=name, **over.pop("train", {}))
    cfg.update(over)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def metrics(tmp_path: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def test_reward_rises_to_near_its_maximum(tmp_path):
    p = config(tmp_path, "learn", train={"max_steps": 20, "save_every": 0})
    assert cli(["grpo", "--config", str(p)]) == 0
    m = metrics(tmp_path, "learn")
    assert len(m) == 20
    first, last = m[0], m[-3:]
    assert first["reward"] < 0.3  # 64 of 512 ids: about 1/8 for the untrained model
    assert min(r["reward"] for r in last) > 0.9
    # on-policy (one update per batch): the importance ratio is exactly 1 and the k2 to the rollout policy 0
    assert first["ratio"] == 1.0 and first["approx_kl"] == 0.0
    assert all(r["groups_dropped"] == r["groups_flat"] for r in m)  # dynamic sampling drops every flat group
    run = tmp_path / "runs" / "learn"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"] == "grpo" and (run / "final" / "config.json").exists()
    assert (run / "samples.jsonl").exists() and (run / "config.yaml").exists()


def test_lora_kl_is_zero_before_the_first_update_and_updates_reuse_the_batch(tmp_path):
    p = config(tmp_path, "kl", train={"max_steps": 2, "save_every": 0, "lr": 0.05},
               lora={"enabled": True, "r": 4}, kl_coef=0.1, updates_per_batch=2, dynamic_sampling=False)
    assert cli(["grpo", "--config", str(p)]) == 0
    first, second = metrics(tmp_path, "kl")
    # update 1 of iteration 1: LoRA's B = 0, so policy == reference (k3 = 0) and ratio = 1; update 2 has moved:
    # its ratio differs from 1, so the mean over the two updates is no longer exactly 1
    assert first["kl"] > 0.0 and first["ratio"] != 1.0  # the mean of update 1 (exactly 0) and update 2 (moved)
    assert second["kl"] > 0.0
    assert first["groups_dropped"] == 0
    one = config(tmp_path, "kl1", train={"max_steps": 1, "save_every": 0}, lora={"enabled": True, "r": 4},
                 kl_coef=0.1, updates_per_batch=1, dynamic_sampling=False)
    assert cli(["grpo", "--config", str(one)]) == 0
    (rec,) = metrics(tmp_path, "kl1")
    assert rec["kl"] == 0.0 and rec["ratio"] == 1.0


def test_bad_settings_are_refused(tmp_path, capsys):
    assert cli(["grpo", "--config", str(CONFIG), f"train.output_dir={tmp_path}", "num_generations=1"]) == 2
    assert "num_generations must be >= 2" in capsys.readouterr().err
    p = config(tmp_path, "bad", rewards=[{"name": "gsm9k"}])
    with pytest.raises(ValueError, match="unknown reward 'gsm9k'"):
        cli(["grpo", "--config", str(p)])


def test_two_processes_equal_one(tmp_path):
    """torchrun --nproc_per_node 2: each process samples, scores and updates half of the prompts; the step's
    normaliser and statistics are global, and row i's sampling seed does not depend on the split."""
    common = {"train": {"max_steps": 2, "save_every": 0, "micro_batch_size": 16}, "prompts_per_step": 4,
              "num_generations": 4, "dynamic_sampling": False}
    single = config(tmp_path, "single", **json.loads(json.dumps(common)))
    multi = config(tmp_path, "multi", **json.loads(json.dumps(common)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "instructkit", "grpo", "--config", str(single)], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), "-m", "instructkit", "grpo", "--config", str(multi)],
                       env=env, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = metrics(tmp_path, "single"), metrics(tmp_path, "multi")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("reward", "response_length", "loss", "grad_norm", "ratio"):
            assert abs(ra[key] - rb[key]) < 1e-5, (key, ra, rb)
