"""DPO through the CLI on a tiny model: raises the held-out chosen-over-rejected margin, loss log 2 at the start,
precomputed and online references agree, LoRA uses the adapter-disabled base as reference, and response-only
log-probs equal full-sequence log-probs."""

import json
import math
from pathlib import Path

import pytest
import torch

from instructkit.cli import main as cli
from pref_helpers import write_pairs

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_dpo.yaml")


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo_data")
    return write_pairs(d / "train.jsonl", 64, 0), write_pairs(d / "val.jsonl", 32, 1)


def dpo_args(pref_data, out, name, *extra):
    train, val = pref_data
    return ["dpo", "--config", CONFIG, f"data.sources=[{{path: {train}}}]", f"data.validation=[{{path: {val}}}]",
            f"train.output_dir={out}", f"train.run_name={name}", *extra]


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_dpo_raises_held_out_margin(pref_data, tmp_path):
    assert cli(dpo_args(pref_data, tmp_path, "dpo", "train.max_steps=12")) == 0
    m = metrics(tmp_path / "dpo")
    initial, final = m[0], m[-1]
    # policy == reference at the start: every implicit reward is 0, the loss is log 2
    assert initial["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert initial["eval_reward_margin"] == 0.0
    assert m[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert final["eval_reward_margin"] > 1.0
    assert final["eval_reward_accuracy"] >= 0.95
    assert final["eval_loss"] < 0.3
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "pairs_per_s"} <= set(m[2])


def test_precomputed_and_online_reference_give_the_same_run(pref_data, tmp_path):
    assert cli(dpo_args(pref_data, tmp_path, "pre", "train.max_steps=3")) == 0
    assert cli(dpo_args(pref_data, tmp_path, "onl", "train.max_steps=3", "reference=online")) == 0
    a = [r["loss"] for r in metrics(tmp_path / "pre") if "loss" in r]
    b = [r["loss"] for r in metrics(tmp_path / "onl") if "loss" in r]
    assert a == pytest.approx(b, abs=1e-5)


def test_ipo_and_cdpo_start_at_their_closed_forms(pref_data, tmp_path):
    # policy == reference: h = 0, IPO loss = (0 - 1/(2 beta))^2 = 1/(4 beta^2) = 25 for beta 0.1; cDPO stays log 2
    assert cli(dpo_args(pref_data, tmp_path, "ipo", "train.max_steps=1", "loss_type=ipo")) == 0
    assert metrics(tmp_path / "ipo")[1]["loss"] == pytest.approx(25.0, abs=1e-4)
    assert cli(dpo_args(pref_data, tmp_path, "cdpo", "train.max_steps=1", "label_smoothing=0.2")) == 0
    assert metrics(tmp_path / "cdpo")[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_lora_reference_is_the_disabled_adapter(pref_data, tmp_path):
    assert cli(dpo_args(pref_data, tmp_path, "lora", "train.max_steps=4", "lora.enabled=true", "lora.r=8",
                        "lora.dropout=0.0", "reference=online", "train.lr=0.01")) == 0
    m = metrics(tmp_path / "lora")
    assert m[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0 at init: policy == base
    assert m[-1]["eval_reward_margin"] > m[0]["eval_reward_margin"]
    assert (tmp_path / "lora" / "final" / "adapter_config.json").exists()


def test_response_logprobs_equal_full_forward(tiny_model_dir):
    """The response-only output layer gives exactly the log-probs of a plain full forward, with padding."""
    from transformers import AutoModelForCausalLM

    from instructkit.models.value_head import response_logprobs
    from instructkit.rl.rollout import prompt_response_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts, responses = [[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15]]
    b = prompt_response_batch(prompts, responses, pad_id=0)
    with torch.no_grad():
        lp = response_logprobs(model, b["input_ids"], b["attention_mask"], b["prompt_width"], b["response_width"])
        for i, (p, r) in enumerate(zip(prompts, responses)):
            full = torch.log_softmax(model(torch.tensor([p + r])).logits[0], -1)  # (L, V)
            want = torch.stack([full[len(p) - 1 + j, t] for j, t in enumerate(r)])
            torch.testing.assert_close(lp[i, :len(r)], want, atol=1e-5, rtol=0)
            assert torch.all(lp[i, len(r):] == 0)


def test_tiny_config_as_shipped_on_real_preference_data(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(CONFIG).parents[1])
    assert cli(["dpo", "--config", CONFIG, f"train.output_dir={tmp_path}", "train.max_steps=2"]) == 0
    m = metrics(tmp_path / "tiny_dpo")
    assert m[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and m[-1]["final"]
