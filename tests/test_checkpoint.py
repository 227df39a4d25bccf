"""training/checkpoint.py: atomic saves, exact resume after SIGKILL, drift refused, no pickle."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from instructkit.config import TrainConfig
from instructkit.training import checkpoint as ckpt
from instructkit.training import loop

from sft_helpers import ROOT, env, losses, write_config


def _tiny_setup(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = TrainConfig(lr=1e-2)
    opt = loop.build_optimizer(model, cfg)
    sched = loop.build_scheduler(opt, cfg, 10)
    return model, opt, sched


def _one_step(model, opt, sched):
    x = torch.randint(5, 500, (1, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_roundtrip_restores_weights_optimizer_scheduler_rng(tiny_model_dir, tmp_path):
    model, opt, sched = _tiny_setup(tiny_model_dir)
    _one_step(model, opt, sched)
    torch.manual_seed(123)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"epoch": 0, "index": 4}, {"a": 1})
    expected_draw = torch.rand(3)
    assert ckpt.latest_checkpoint(tmp_path) == path and (path / "COMPLETE").exists()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    _one_step(model, opt, sched)  # move on, then restore into a fresh model
    model2, opt2, sched2 = _tiny_setup(tiny_model_dir)
    state = ckpt.load_checkpoint(path, model2, opt2, sched2, config={"a": 1})
    assert state["step"] == 1 and state["index"] == 4
    assert all(torch.equal(after[n], p) for n, p in model2.named_parameters())
    assert torch.equal(torch.rand(3), expected_draw)  # torch RNG restored
    assert sched2.last_epoch == 1
    # the same next step from the restored state gives the same weights as from the original state
    model3, opt3, sched3 = _tiny_setup(tiny_model_dir)
    ckpt.load_checkpoint(path, model3, opt3, sched3)
    _one_step(model2, opt2, sched2)
    _one_step(model3, opt3, sched3)
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), model3.parameters()))


def test_partial_save_leaves_previous_checkpoint_latest(tiny_model_dir, tmp_path):
    model, opt, sched = _tiny_setup(tiny_model_dir)
    good = ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {}, {})
    # a save killed half-way: the temporary folder exists with some files, latest still names step-2
    partial = tmp_path / ".tmp-step-4"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"\x00" * 10)
    assert ckpt.find_resume(tmp_path, "auto") == good
    # a later complete save prunes the partial folder and keeps `keep` checkpoints
    ckpt.save_checkpoint(tmp_path, 6, model, opt, sched, {}, {}, keep=1)
    assert not partial.exists() and not good.exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-6"
    # latest naming an incomplete folder is an error, never silently used
    (tmp_path / "step-8").mkdir()
    (tmp_path / "latest").write_text("step-8\n")
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.latest_checkpoint(tmp_path)


def test_missing_checkpoint_and_drift_are_named(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=str(tmp_path / "nope")):
        ckpt.find_resume(tmp_path, str(tmp_path / "nope"))
    assert ckpt.find_resume(tmp_path, "auto") is None and ckpt.find_resume(tmp_path, "never") is None
    saved = {"train": {"micro_batch_size": 4, "lr": 0.001, "log_every": 1}, "model": {"path": "a"}}
    ckpt.check_drift(saved, {"train": {"micro_batch_size": 4, "lr": 0.001, "log_every": 10}, "model": {"path": "a"}})
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_drift(saved, {"train": {"micro_batch_size": 2, "lr": 0.001, "log_every": 1}, "model": {"path": "b"}})
    msg = str(e.value)
    assert "train.micro_batch_size: checkpoint 4 != now 2" in msg and "model.path: checkpoint 'a' != now 'b'" in msg


class _SideEffect:
    def __reduce__(self):
        return (os.system, (f"touch {_SideEffect.marker}",))


def test_crafted_pickle_is_refused_without_side_effect(tiny_model_dir, tmp_path):
    model, opt, sched = _tiny_setup(tiny_model_dir)
    path = ckpt.save_checkpoint(tmp_path / "c", 1, model, opt, sched, {}, {})
    marker = tmp_path / "pwned"
    _SideEffect.marker = marker
    with open(path / "optimizer.pt", "wb") as f:
        pickle.dump({"state": _SideEffect()}, f)
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        ckpt.load_checkpoint(path, model, opt, sched)
    assert not marker.exists()
    # the file really is malicious: a plain pickle load runs the payload (so the assertion above can fail)
    with open(path / "optimizer.pt", "rb") as f:
        pickle.load(f)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL mid-run, resume, compare with an uninterrupted run (through the CLI, in subprocesses)
# ---------------------------------------------------------------------------------------------------------------------
def _kill_after(cfg_path: Path, run_dir: Path, step: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "sft", "--config", str(cfg_path)], env=env(),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip().endswith("}")]
            if any(r.get("step", 0) >= step for r in lines):
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"run was not killed mid-way: {proc.stderr.read()[-2000:]}"
    assert not (run_dir / "summary.json").exists()


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    final = run_dir / "final"
    f = final / ("adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors")
    return load_file(str(f))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, lora):
    # 2 epochs' worth of steps with grad_accum 2, a checkpoint every 3 steps; LoRA with dropout exercises the RNG state
    over = {"train": {"max_steps": 60, "save_every": 3, "keep_checkpoints": 2, "eval_every": 7}}
    if lora:
        over["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1}
    ref_cfg = write_config(tmp_path, "ref", **over)
    from sft_helpers import run_cli

    run_cli("sft", "--config", str(ref_cfg))
    cfg = write_config(tmp_path, "killed", **over)
    run_dir = tmp_path / "runs" / "killed"
    _kill_after(cfg, run_dir, 8)
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and int(latest.name.split("-")[1]) >= 6
    run_cli("sft", "--config", str(cfg))  # resume: auto
    ref_losses, got = losses(tmp_path / "runs" / "ref"), losses(run_dir)
    assert len(got) == len(ref_losses) == 60
    assert got == ref_losses  # bit for bit on CPU (fp32, deterministic, same threads)
    a, b = _final_tensors(tmp_path / "runs" / "ref"), _final_tensors(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    val = lambda d: [json.loads(x)["val_loss"] for x in (d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                     if "val_loss" in x]
    assert val(run_dir) == val(tmp_path / "runs" / "ref")


def test_resume_refuses_changed_batch_size(tmp_path, capsys):
    from instructkit.cli import main as cli_main

    cfg = write_config(tmp_path, "r", train={"max_steps": 4, "save_every": 2})
    assert cli_main(["sft", "--config", str(cfg)]) == 0
    cfg = write_config(tmp_path, "r", train={"max_steps": 4, "save_every": 2, "micro_batch_size": 1})
    assert cli_main(["sft", "--config", str(cfg)]) == 2
    assert "train.micro_batch_size: checkpoint 2 != now 1" in capsys.readouterr().err
    assert cli_main(["sft", "--config", str(cfg), f"train.resume={tmp_path / 'missing'}"]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
