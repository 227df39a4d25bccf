"""What the run runtime (training/run.py) gives every recipe, through the CLI on tiny models:
- 2 processes (torchrun, gloo) equal 1 process with the same global batch for dpo, reward-model and ppo (per-step
  losses within 1e-5; PPO on a rule-based reward with fixed seeds: rollouts and updates split by rows, advantage
  whitening and the KL controller's statistics reduced over both processes);
- a run killed with SIGKILL and resumed equals an uninterrupted run (dpo, reward-model, ppo; sft: test_checkpoint.py);
- resume refuses a changed run-relevant config field, naming it, and changed data under the same path, for every
  recipe."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from instructkit.cli import main as cli
from pref_helpers import write_pairs
from sft_helpers import ROOT, env, write_data

CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("runtime_data")
    return {"conv": write_data(d / "conv.jsonl", n=24), "pairs": write_pairs(d / "pairs.jsonl", 32, 0)}


def args(recipe: str, data, out: Path, name: str, *extra: str) -> list[str]:
    common = [f"train.output_dir={out}", f"train.run_name={name}", "train.threads=1", "train.resume=auto"]
    if recipe == "sft":
        return ["sft", "--config", str(CONFIGS / "tiny_sft.yaml"), f"data.sources=[{{path: {data['conv']}}}]",
                "train.max_steps=4", "train.save_every=2", "train.sample_every=0", *common, *extra]
    if recipe == "dpo":
        return ["dpo", "--config", str(CONFIGS / "tiny_dpo.yaml"), f"data.sources=[{{path: {data['pairs']}}}]",
                "data.validation=[]", "data.validation_fraction=0.25", "train.micro_batch_size=4", *common, *extra]
    if recipe == "reward-model":
        return ["reward-model", "--config", str(CONFIGS / "tiny_reward_model.yaml"),
                f"data.sources=[{{path: {data['pairs']}}}]", "data.validation=[]", "data.validation_fraction=0.25",
                "train.micro_batch_size=4", *common, *extra]
    if recipe == "ppo":
        return ["ppo", "--config", str(CONFIGS / "tiny_ppo.yaml"), f"data.sources=[{{path: {data['conv']}}}]",
                "max_new_tokens=4", "ppo_epochs=2", "rollout_batch_size=8", "train.micro_batch_size=4",
                "adaptive_kl=true", "kl_target=0.5", *common, *extra]
    raise ValueError(recipe)


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def timeless(rec: dict) -> dict:
    """A metrics record without its wall-clock fields."""
    return {k: v for k, v in rec.items() if not k.endswith("_per_s")}


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((run / "final").glob("*.safetensors"))
    assert files, run
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def subprocess_run(argv: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "instructkit", *argv]
    else:
        with socket.socket() as sock:  # a free port for the gloo rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), "-m", "instructkit", *argv]
    p = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


# ---------------------------------------------------------------------------------------------------------------------
# 2 processes == 1 process
# ---------------------------------------------------------------------------------------------------------------------
TWO_PROC = {
    # recipe: (extra args for both, single-process extra, two-process extra, keys compared per step)
    "dpo": (["train.max_steps=4", "train.eval_every=2"], ["train.grad_accum=2"], ["train.grad_accum=1"],
            ("loss", "grad_norm", "reward_margin", "reward_accuracy", "eval_loss", "eval_reward_margin")),
    "reward-model": (["train.max_steps=4", "train.eval_every=2"], ["train.grad_accum=2"], ["train.grad_accum=1"],
                     ("loss", "grad_norm", "accuracy", "reward_margin", "eval_loss", "eval_accuracy")),
    "ppo": (["train.max_steps=3"], [], [],
            ("score", "kl", "kl_coef", "reward_total", "grad_norm", "policy_loss", "value_loss", "entropy",
             "approx_kl", "clipfrac", "response_length")),
}


@pytest.mark.parametrize("recipe", sorted(TWO_PROC))
def test_two_processes_equal_one(recipe, data, tmp_path):
    both, one, two, keys = TWO_PROC[recipe]
    subprocess_run(args(recipe, data, tmp_path, "one", *both, *one))
    subprocess_run(args(recipe, data, tmp_path, "two", *both, *two), nproc=2)
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 3
    compared = 0
    for ra, rb in zip(a, b):
        for k in keys:
            if ra.get(k) is not None:
                assert rb.get(k) is not None and abs(ra[k] - rb[k]) < 1e-5, (k, ra, rb)
                compared += 1
    assert compared >= 3 * len(keys)
    sa, sb = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two"))
    assert (sa["world_size"], sb["world_size"]) == (1, 2)
    wa, wb = final_tensors(tmp_path / "one"), final_tensors(tmp_path / "two")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL then resume == uninterrupted
# ---------------------------------------------------------------------------------------------------------------------
KILL = {"dpo": ("train.max_steps=16", 6), "reward-model": ("train.max_steps=16", 6), "ppo": ("train.max_steps=8", 4)}


def kill_after(argv: list[str], run_dir: Path, step: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", *argv], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip().endswith("}")]
            if any(r.get("step", 0) >= step and "loss" in r or r.get("step", 0) >= step and "score" in r
                   for r in lines):
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"run was not killed mid-way: {proc.stderr.read()[-2000:]}"
    assert not (run_dir / "summary.json").exists()


@pytest.mark.parametrize("recipe", sorted(KILL))
def test_sigkill_then_resume_equals_uninterrupted(recipe, data, tmp_path):
    steps, kill_at = KILL[recipe]
    extra = (steps, "train.save_every=2", "train.keep_checkpoints=2")
    subprocess_run(args(recipe, data, tmp_path, "ref", *extra))
    kill_after(args(recipe, data, tmp_path, "killed", *extra), tmp_path / "killed", kill_at)
    assert (tmp_path / "killed" / "checkpoints" / "latest").exists()
    subprocess_run(args(recipe, data, tmp_path, "killed", *extra))  # resume: auto
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["resumed_from_step"] and summary["resumed_from_step"] < int(steps.split("=")[1])
    assert [timeless(r) for r in records(tmp_path / "killed")] == [timeless(r) for r in records(tmp_path / "ref")]
    a, b = final_tensors(tmp_path / "ref"), final_tensors(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# drift and data change refused on resume
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["sft", "dpo", "reward-model", "ppo"])
def test_resume_refuses_config_drift_and_changed_data(recipe, data, tmp_path, capsys):
    own = dict(data)
    own["conv"] = write_data(tmp_path / "conv.jsonl", n=24)
    own["pairs"] = write_pairs(tmp_path / "pairs.jsonl", 32, 0)
    stop = ["train.max_steps=4", "train.save_every=2"] if recipe != "ppo" else ["train.max_steps=2",
                                                                               "train.save_every=1"]
    assert cli(args(recipe, own, tmp_path, "r", *stop)) == 0
    ckpt = tmp_path / "r" / "checkpoints" / "step-2"
    assert (ckpt / "COMPLETE").exists()
    capsys.readouterr()
    # a run-relevant field changed: refused, naming the field and both values
    assert cli(args(recipe, own, tmp_path, "r2", *stop, "train.lr=0.1234", f"train.resume={ckpt}")) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "0.1234" in err
    # the same path with other contents: refused, naming the data
    if recipe in ("sft", "ppo"):
        write_data(own["conv"], n=24, seed=7)
    else:
        write_pairs(own["pairs"], 32, 7)
    assert cli(args(recipe, own, tmp_path, "r3", *stop, f"train.resume={ckpt}")) == 2
    err = capsys.readouterr().err
    assert "data changed" in err and "data.sources" in err
