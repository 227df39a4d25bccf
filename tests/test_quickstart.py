"""The quickstart end to end on the tiny model (through the CLI), its config handling, and its report."""

from __future__ import annotations

import json
import math

import pytest

from instructkit.cli import main as cli_main
from instructkit.cli.quickstart import load_quickstart_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    code = cli_main([
        "quickstart", "model.path=tiny", f"train.output_dir={out}", "train.max_steps=6", "train.lr=0.02",
        "data.sources=[{path: 'builtin:quickstart_train', max_examples: 24}]", "data.max_length=128",
        "train.pack_length=256", "train.micro_batch_size=2", "max_heldout=8", "max_new_tokens=8",
    ])
    assert code == 0
    run = out / "quickstart"
    return run, json.loads((run / "quickstart.json").read_text())


def test_tiny_quickstart_numbers(tiny_run):
    run, r = tiny_run
    # A random-init tiny Llama gives near-uniform next-token probabilities: the final RMSNorm makes the hidden state's
    # norm ~sqrt(64) = 8 and the output weights are ~N(0, 0.02), so logits are ~N(0, sigma^2) with sigma ~ 0.16, and
    # E[-log softmax] ~ ln(V) + sigma^2 / 2 = ln(512) + 0.0128 = 6.251 (second-order expansion of log-sum-exp).
    assert r["heldout_loss_before"] == pytest.approx(math.log(512) + 0.16 ** 2 / 2, abs=0.02)
    assert r["heldout_loss_after"] < r["heldout_loss_before"] - 0.02  # 6 steps at lr 0.02 already move it
    # The SFT recipe's own validation (peft model, unmerged) and ours (merged adapter) measure the same thing.
    assert r["sft_val_loss"] == pytest.approx(r["heldout_loss_after"], abs=1e-5)
    assert r["steps"] == 6 and r["train_examples"] == 24
    for phase in ("before", "after"):
        outs = r[phase]["outputs"]
        assert len(outs) == 8
        stopped = sum(o["finish_reason"] == "stop" for o in outs)
        assert r[f"stop_fraction_{phase}"] == stopped / 8
        assert all(o["new_tokens"] <= 8 for o in outs)
        assert all(o["new_tokens"] == 8 for o in outs if o["finish_reason"] == "length")


def test_tiny_quickstart_report_and_plot(tiny_run):
    run, r = tiny_run
    report = (run / "report.md").read_text()
    assert "| replies that end their turn within 8 tokens |" in report
    assert f"{r['heldout_loss_before']:.3f}" in report and f"{r['heldout_loss_after']:.3f}" in report
    from instructkit.data.builtin import load_builtin

    for conv in load_builtin("quickstart_heldout")[:8]:
        assert conv.messages[-2].content[:40].replace("|", "\\|") in report
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![loss curve](loss.png)" in report
    assert (run / "final" / "adapter_config.json").exists()  # a LoRA adapter, as configured


def test_overrides_merge_key_by_key():
    cfg = load_quickstart_config(None, ["lora.r=8", "data.max_length=64", "model.path=tiny:"])
    assert cfg.lora.enabled and cfg.lora.r == 8  # the section's other defaults survive
    assert cfg.data.max_length == 64 and cfg.data.sources[0].path == "builtin:quickstart_train"
    assert cfg.model.path == "tiny"
    sft = cfg.sft_config("/some/folder")
    assert sft.model.path == "/some/folder"
    assert [s.path for s in sft.data.validation] == ["builtin:quickstart_heldout"]


def test_shipped_yaml_equals_the_defaults():
    """`make quickstart` runs without --config; configs/quickstart.yaml documents the same settings."""
    from pathlib import Path

    from instructkit.config import to_dict

    path = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    assert to_dict(load_quickstart_config(str(path), [])) == to_dict(load_quickstart_config(None, []))


def test_bad_override_is_exit_2(capsys):
    assert cli_main(["quickstart", "lora.nope=1"]) == 2
    assert "lora.nope" in capsys.readouterr().err


@pytest.mark.slow
def test_gemma_quickstart_full(tmp_path):
    """The real thing (about 15-20 minutes on 2 cores): most held-out replies stop after tuning, none before."""
    assert cli_main(["quickstart", f"train.output_dir={tmp_path}"]) == 0
    r = json.loads((tmp_path / "quickstart" / "quickstart.json").read_text())
    assert r["stop_fraction_before"] <= 0.1
    assert r["stop_fraction_after"] >= 0.8
    assert r["heldout_loss_after"] < r["heldout_loss_before"]
