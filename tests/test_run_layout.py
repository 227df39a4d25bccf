"""One output layout for every training recipe (training/run.py): a tiny run through the CLI writes final/ (loads the
documented way, with the tokenizer and the chat template used), summary.json with the common keys, metrics.jsonl,
config.yaml and checkpoints/; generate and export accept the run folder; resume: never starts a fresh metrics log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.cli import main as cli
from pref_helpers import write_pairs
from sft_helpers import write_data

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMON = {"recipe", "run_dir", "final", "kind", "steps", "resumed_from_step", "first_loss", "last_loss", "seconds",
          "adapter", "world_size", "counters", "precision"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("layout_data")
    return {"conv": write_data(d / "conv.jsonl", n=16), "pairs": write_pairs(d / "pairs.jsonl", 16, 0)}


def recipe_args(recipe: str, data, out: Path, name: str, *extra: str) -> list[str]:
    common = [f"train.output_dir={out}", f"train.run_name={name}", "train.max_steps=2", "train.threads=1"]
    if recipe == "sft":
        return ["sft", "--config", str(CONFIGS / "tiny_sft.yaml"), f"data.sources=[{{path: {data['conv']}}}]",
                "data.validation_fraction=0.25", "train.micro_batch_size=2", "train.grad_accum=1", *common, *extra]
    if recipe == "dpo":
        return ["dpo", "--config", str(CONFIGS / "tiny_dpo.yaml"), f"data.sources=[{{path: {data['pairs']}}}]",
                "data.validation=[]", "data.validation_fraction=0.25", *common, *extra]
    if recipe == "reward-model":
        return ["reward-model", "--config", str(CONFIGS / "tiny_reward_model.yaml"),
                f"data.sources=[{{path: {data['pairs']}}}]", "data.validation=[]", "data.validation_fraction=0.25",
                *common, *extra]
    if recipe == "ppo":
        return ["ppo", "--config", str(CONFIGS / "tiny_ppo.yaml"), f"data.sources=[{{path: {data['conv']}}}]",
                "max_new_tokens=4", "ppo_epochs=1", *common, *extra]
    raise ValueError(recipe)


LOADS = {"sft": "causal", "dpo": "causal", "reward-model": "reward", "ppo": "causal"}


@pytest.mark.parametrize("recipe", sorted(LOADS))
def test_tiny_run_writes_the_common_layout(recipe, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    assert cli(recipe_args(recipe, data, tmp_path, "r")) == 0
    run = tmp_path / "r"
    for name in ("final", "summary.json", "metrics.jsonl", "config.yaml", "checkpoints/latest"):
        assert (run / name).exists(), name
    assert not (run / "model").exists() and not (run / "eval.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert COMMON <= set(summary) and summary["recipe"] == recipe and summary["steps"] == 2
    assert summary["final"] == str(run / "final") and summary["world_size"] == 1
    final = run / "final"
    assert (final / "chat_template.jinja").read_text().strip()
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template == (final / "chat_template.jinja").read_text()
    cls = AutoModelForSequenceClassification if LOADS[recipe] == "reward" else AutoModelForCausalLM
    model = cls.from_pretrained(final)
    assert model is not None
    if LOADS[recipe] == "reward":
        return
    # the run folder is accepted where a model folder is
    capsys.readouterr()
    assert cli(["generate", "--model", str(run), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli(["export", "--model", str(run), "--out", str(tmp_path / "exp")]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == str(final)


def test_resume_never_starts_a_fresh_metrics_log(data, tmp_path):
    assert cli(recipe_args("dpo", data, tmp_path, "r")) == 0
    first = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert cli(recipe_args("dpo", data, tmp_path, "r", "train.resume=never")) == 0
    again = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert [json.loads(x)["step"] for x in again.splitlines()] == [json.loads(x)["step"] for x in first.splitlines()]
