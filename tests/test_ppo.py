"""PPO through the CLI on a tiny model with a rule-based reward: learns, keeps KL bounded, stays near the reference with
a large beta, ratio 1 before the first update, LoRA reference = disabled adapter, adaptive KL, missing-EOS penalty,
PPO-ptx, reward-model scoring with a separate critic, and exact resume."""

import json
import random
from pathlib import Path

import pytest
import torch

from instructkit.cli import main as cli

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_ppo.yaml")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("ppo_data") / "prompts.jsonl"
    topics = ["the sea", "bread", "the sky", "a poem", "Paris", "the dog", "numbers", "a fox"]
    with open(path, "w") as f:
        for i in range(64):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Tell me about {rng.choice(topics)} ({i})."},
                                             {"role": "assistant", "content": "Sure."}]}) + "\n")
    return path


def ppo(prompts, out, name, *extra):
    args = ["ppo", "--config", CONFIG, f"data.sources=[{{path: {prompts}}}]", f"train.output_dir={out}",
            f"train.run_name={name}", "train.save_every=0", *extra]
    assert cli(args) == 0
    return [json.loads(x) for x in (Path(out) / name / "metrics.jsonl").read_text().splitlines()]


LOGGED = {"score", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "explained_variance", "response_length",
          "kl_coef", "policy_loss", "ratio", "ended_fraction"}


def test_ppo_raises_rule_reward_to_near_max_with_bounded_kl(prompts, tmp_path):
    m = ppo(prompts, tmp_path, "learn", "train.max_steps=15", "max_new_tokens=4", "train.lr=0.02")
    assert LOGGED <= set(m[0])
    scores = [r["score"] for r in m]
    # 64 of 512 ids are rewarded: the untrained model scores about 0.14 (measured 0.14), the maximum is 1.0
    assert scores[0] < 0.3
    assert sum(scores[-3:]) / 3 >= 0.9
    assert max(r["kl"] for r in m) < 40.0  # summed over 4 tokens: bounded by the penalty (measured max 21.5)
    assert m[0]["kl"] == 0.0  # the first rollout comes from the reference itself


def test_large_beta_keeps_the_policy_near_the_reference(prompts, tmp_path):
    common = ("train.max_steps=8", "max_new_tokens=4", "train.lr=0.005")
    small = ppo(prompts, tmp_path, "small", *common, "kl_coef=0.01")
    large = ppo(prompts, tmp_path, "large", *common, "kl_coef=5.0")
    # the first rollout and update are identical (KL is 0 then); afterwards the penalty pulls the policy back:
    # measured mean KL of the last 3 iterations 0.19 (beta 5) vs 6.2 (beta 0.01)
    kl_small = sum(r["kl"] for r in small[-3:]) / 3
    kl_large = sum(r["kl"] for r in large[-3:]) / 3
    assert kl_large < 1.0
    assert kl_large < 0.2 * kl_small
    assert abs(large[-1]["rollout_entropy"] - large[0]["rollout_entropy"]) < 0.1


def test_features_lora_adaptive_kl_missing_eos_ptx(prompts, tmp_path, shared_data):
    alpaca = shared_data / "lf_alpaca_en_demo.json"
    m = ppo(prompts, tmp_path, "feat", "train.max_steps=2", "max_new_tokens=4", "ppo_epochs=1",
            "train.micro_batch_size=16", "lora.enabled=true", "lora.r=8", "train.lr=0.01", "adaptive_kl=true",
            "kl_coef=0.1", "kl_target=1.0", "kl_horizon=100", "missing_eos_penalty=-1.0", "ptx_coef=0.5",
            f"ptx_data=[{{path: {alpaca}, max_examples: 16}}]")
    first, second = m
    # one mini-batch, one epoch: the only update is evaluated before any change, so the ratio is exactly 1
    assert first["ratio"] == 1.0 and first["clipfrac"] == 0.0 and first["approx_kl"] == 0.0
    # LoRA starts with B = 0: policy == reference (adapter disabled), so the first KL is exactly 0
    assert first["kl"] == 0.0
    # adaptive KL (Ziegler et al.): beta_2 = beta_1 * (1 + clip(KL_1 / target - 1, -0.2, 0.2) * n / horizon)
    #                                     = 0.1 * (1 + (-0.2) * 16 / 100) = 0.0968
    assert first["kl_coef"] == pytest.approx(0.1)
    assert second["kl_coef"] == pytest.approx(0.0968)
    # 4 random tokens rarely end the turn: every unfinished response scores the penalty
    for r in m:
        n_ended = round(r["ended_fraction"] * 16)
        if n_ended == 0:
            assert r["score_penalized"] == -1.0
    assert all(torch.isfinite(torch.tensor(r["ptx_loss"])) and r["ptx_loss"] > 0 for r in m)
    assert (tmp_path / "feat" / "final" / "adapter_config.json").exists()


def test_several_samples_per_prompt_keep_the_invariants(prompts, tmp_path, capsys):
    """samples_per_prompt=4: 4 prompts x 4 responses per iteration, the rows of one prompt sharing its forward (rollout
    prefill, scoring, updates); the first update still sees ratio exactly 1 and, with LoRA, KL exactly 0, because
    scoring and update are the same computation on the same batch."""
    m = ppo(prompts, tmp_path, "spp", "train.max_steps=2", "max_new_tokens=4", "ppo_epochs=1",
            "train.micro_batch_size=16", "samples_per_prompt=4", "lora.enabled=true", "lora.r=8", "train.lr=0.01")
    first = m[0]
    assert first["ratio"] == 1.0 and first["clipfrac"] == 0.0 and first["approx_kl"] == 0.0
    assert first["kl"] == 0.0
    samples = [json.loads(x) for x in (tmp_path / "spp" / "samples.jsonl").read_text().splitlines()]
    step1 = [s for s in samples if s["step"] == 1]
    assert len(step1) == 4 and all(s["prompt"] == step1[0]["prompt"] for s in step1)  # rows 0-3: one prompt
    assert cli(["ppo", "--config", CONFIG, f"train.output_dir={tmp_path}", "samples_per_prompt=3"]) == 2
    assert "rollout_batch_size / samples_per_prompt" in capsys.readouterr().err


def test_reward_model_scores_with_a_separate_critic(prompts, tmp_path):
    """A tiny RM (same tokenizer) scores rollouts; the critic starts from it (InstructGPT)."""
    rm_cfg = str(Path(CONFIG).with_name("tiny_reward_model.yaml"))
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Say something {i}."}],
                                "chosen": [{"role": "assistant", "content": "good great nice"}],
                                "rejected": [{"role": "assistant", "content": "bad sad poor"}]}) + "\n")
    assert cli(["reward-model", "--config", rm_cfg, f"data.sources=[{{path: {pairs}}}]", "data.validation_fraction=0",
                f"train.output_dir={tmp_path}", "train.run_name=rm", "train.max_steps=3"]) == 0
    m = ppo(prompts, tmp_path, "rmppo", "train.max_steps=2", "max_new_tokens=4", "reward_function=",
            f"reward_model={tmp_path / 'rm' / 'final'}", "value_model=separate")
    assert all(torch.isfinite(torch.tensor([r["score"], r["value_loss"], r["kl"]])).all() for r in m)
    assert m[0]["score"] != m[1]["score"]


def test_ppo_resume_equals_uninterrupted(prompts, tmp_path):
    """Resume from the iteration-2 checkpoint of a 4-iteration run: same metrics and same final weights."""
    from safetensors.torch import load_file

    common = ("train.max_steps=4", "max_new_tokens=4", "ppo_epochs=2", "train.save_every=2", "adaptive_kl=true",
              "kl_target=1.0")
    full = ppo(prompts, tmp_path, "full", *common)
    ckpt = tmp_path / "full" / "checkpoints" / "step-2"
    part = ppo(prompts, tmp_path, "part", *common, f"train.resume={ckpt}")
    assert [r["step"] for r in part] == [3, 4]
    for a, b in zip(full[2:], part):
        assert a == b
    wa = load_file(str(tmp_path / "full" / "checkpoints" / "step-4" / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "part" / "checkpoints" / "step-4" / "trainable.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_length_reward_enters_the_score(prompts, tmp_path):
    """length_reward: each rollout's score is the rule reward plus coef per response token (the logged means)."""
    m = ppo(prompts, tmp_path, "len", "train.max_steps=2", "length_reward=0.5")
    for r in m:
        assert r["score_penalized"] == pytest.approx(r["score"] + 0.5 * r["response_length"], abs=1e-5)
    plain = ppo(prompts, tmp_path, "plain", "train.max_steps=1")
    assert plain[0]["score_penalized"] == pytest.approx(plain[0]["score"], abs=1e-6)


def test_tiny_config_as_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(CONFIG).parents[1])
    assert cli(["ppo", "--config", CONFIG, f"train.output_dir={tmp_path}", "train.max_steps=2"]) == 0
    m = [json.loads(x) for x in (tmp_path / "tiny_ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == [1, 2] and LOGGED <= set(m[-1])
    assert (tmp_path / "tiny_ppo" / "samples.jsonl").exists()
