"""train.sharding=fsdp2 and train.gradient_checkpointing in the preference and RL recipes, through the CLI: 2 sharded
processes equal one unsharded process (per-step losses within 1e-5), activation checkpointing changes no loss, a
sharded run killed with SIGKILL and resumed equals the uninterrupted one, and final/ is a full model.
The SFT counterparts are in tests/test_sharding.py (whose torchrun helpers these tests use)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pref_helpers import write_pairs
from sft_helpers import env
from test_sharding import _kill_when, _records, _torchrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_pairs(d / "train.jsonl", 24, 0), write_pairs(d / "val.jsonl", 6, 1)


def write_config(tmp: Path, name: str, pairs, train: dict, **top) -> Path:
    cfg = {"model": {"path": "tiny:"},
           "data": {"sources": [{"path": str(pairs[0])}], "validation": [{"path": str(pairs[1])}], "max_length": 128},
           "train": {"output_dir": str(tmp / "runs"), "run_name": name, "max_steps": 4, "micro_batch_size": 4,
                     "eval_every": 2, "threads": 1, "lr": 0.001, "schedule": "constant", "seed": 0, **train},
           **top}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(prefix: list[str], recipe: str, cfg: Path) -> None:
    p = subprocess.run(prefix + ["-m", "instructkit", recipe, "--config", str(cfg)], env=env(), cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]


def assert_same_records(a: list[dict], b: list[dict], keys: tuple[str, ...], tol: float = 1e-5) -> None:
    assert len(a) == len(b) and any(keys[0] in r for r in a)
    for ra, rb in zip(a, b):
        assert ra["step"] == rb["step"]
        for key in keys:
            assert (key in ra) == (key in rb), (key, ra, rb)
            if ra.get(key) is not None:
                assert abs(ra[key] - rb[key]) <= tol * max(1.0, abs(ra[key])), (key, ra, rb)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------------------------------
DPO_KEYS = ("loss", "grad_norm", "reward_margin", "reward_accuracy", "eval_loss", "eval_reward_margin")


def test_dpo_fsdp2_two_processes_equal_one_unsharded_process(tmp_path, pairs):
    """`torchrun --nproc_per_node 2 ... dpo train.sharding=fsdp2` x grad_accum 1 == one unsharded process x grad_accum
    2: per-step losses, gradient norms, logged metrics and held-out evaluations within 1e-5; final/ is a plain
    transformers folder (AutoModelForCausalLM loads it) with the unsharded run's weights within 1e-5."""
    from transformers import AutoModelForCausalLM

    run_cli([sys.executable], "dpo", write_config(tmp_path, "single", pairs, {"grad_accum": 2}))
    run_cli(_torchrun(2), "dpo", write_config(tmp_path, "multi", pairs, {"grad_accum": 1, "sharding": "fsdp2"}))
    single, multi = tmp_path / "runs" / "single", tmp_path / "runs" / "multi"
    assert_same_records(_records(single), _records(multi), DPO_KEYS)
    a, b = final_weights(single), final_weights(multi)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
    model = AutoModelForCausalLM.from_pretrained(multi / "final", dtype=torch.float32)
    assert all(torch.equal(p, b[n]) for n, p in model.state_dict().items() if n in b)
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["sharding"] == "fsdp2" and summary["world_size"] == 2


def test_dpo_gradient_checkpointing_sharded_lora_online_reference_same_losses(tmp_path, pairs):
    """LoRA with the online reference (the policy with its adapter disabled, run inside the FSDP root): one process
    with fsdp2 and activation checkpointing gives the plain run's per-step losses and gradient norms within 1e-5;
    final/ is the adapter folder."""
    top = {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, "reference": "online"}
    run_cli([sys.executable], "dpo", write_config(tmp_path, "plain", pairs, {"lr": 0.01}, **top))
    run_cli([sys.executable], "dpo", write_config(tmp_path, "ckpt", pairs, {
        "lr": 0.01, "sharding": "fsdp2", "gradient_checkpointing": True}, **top))
    plain, ckpt = _records(tmp_path / "runs" / "plain"), _records(tmp_path / "runs" / "ckpt")
    assert_same_records(plain, ckpt, DPO_KEYS)
    assert plain[-1]["eval_reward_margin"] > plain[0]["eval_reward_margin"]  # the adapter moved
    final = tmp_path / "runs" / "ckpt" / "final"
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()


def test_dpo_fsdp2_sigkill_then_resume_equals_uninterrupted(tmp_path, pairs):
    """A sharded DPO run (one process: FSDP2 over a world of one, with activation checkpointing) killed with SIGKILL
    after step 5 and resumed from its step-4 checkpoint (full state gathered, scattered back through
    sharding.state_loader) equals the uninterrupted run bit for bit: per-step losses and final/ weights."""
    train = {"max_steps": 8, "micro_batch_size": 2, "grad_accum": 1, "save_every": 2, "eval_every": 0,
             "sharding": "fsdp2", "gradient_checkpointing": True}
    run_cli([sys.executable], "dpo", write_config(tmp_path, "ref", pairs, train))
    cfg = write_config(tmp_path, "killed", pairs, train)
    run_dir = tmp_path / "runs" / "killed"
    cmd = [sys.executable, "-m", "instructkit", "dpo", "--config", str(cfg)]
    _kill_when(cmd, run_dir, 5)
    run_cli([sys.executable], "dpo", cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] in (4, 6)
    losses = lambda d: [r["loss"] for r in _records(d) if "loss" in r]  # noqa: E731
    assert losses(run_dir) == losses(tmp_path / "runs" / "ref") and len(losses(run_dir)) == 8
    a, b = final_weights(tmp_path / "runs" / "ref"), final_weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------------------------------
RM_KEYS = ("loss", "grad_norm", "accuracy", "reward_margin", "eval_loss", "eval_accuracy", "reward_mean", "reward_std")


def test_reward_model_fsdp2_two_processes_with_checkpointing_equal_one_plain_process(tmp_path, pairs):
    """`torchrun --nproc_per_node 2 ... reward-model train.sharding=fsdp2 train.gradient_checkpointing=true` x
    grad_accum 1 == one plain process x grad_accum 2: per-step losses, gradient norms, accuracies, held-out numbers and
    the reward statistics within 1e-5; final/ loads with AutoModelForSequenceClassification and scores like the
    unsharded run's final/ within 1e-5."""
    from transformers import AutoModelForSequenceClassification

    run_cli([sys.executable], "reward-model", write_config(tmp_path, "single", pairs, {"grad_accum": 2}))
    run_cli(_torchrun(2), "reward-model", write_config(tmp_path, "multi", pairs, {
        "grad_accum": 1, "sharding": "fsdp2", "gradient_checkpointing": True}))
    single, multi = tmp_path / "runs" / "single", tmp_path / "runs" / "multi"
    assert_same_records(_records(single), _records(multi), RM_KEYS)
    a, b = final_weights(single), final_weights(multi)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
    ids = torch.randint(5, 500, (2, 9))
    scores = [AutoModelForSequenceClassification.from_pretrained(d / "final", dtype=torch.float32).eval()(
        input_ids=ids).logits for d in (single, multi)]
    assert scores[0].shape == (2, 1) and (scores[0] - scores[1]).abs().max() < 1e-5
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["sharding"] == "fsdp2" and summary["gradient_checkpointing"] and summary["world_size"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------------------------------
KTO_KEYS = ("loss", "grad_norm", "kl_baseline", "rewards_desirable", "rewards_undesirable", "eval_loss",
            "eval_reward_margin")


def test_kto_fsdp2_two_processes_with_checkpointing_equal_one_plain_process(tmp_path, pairs):
    """`torchrun --nproc_per_node 2 ... kto train.sharding=fsdp2 train.gradient_checkpointing=true` x grad_accum 1
    == one plain process x grad_accum 2: per-step losses, gradient norms, KL baselines (the step's mismatched pairs
    over both ranks, forwards in lockstep), rewards and held-out numbers within 1e-5; final/ is a plain transformers
    folder with the unsharded run's weights within 1e-5."""
    from transformers import AutoModelForCausalLM

    run_cli([sys.executable], "kto", write_config(tmp_path, "single", pairs, {"grad_accum": 2}))
    run_cli(_torchrun(2), "kto", write_config(tmp_path, "multi", pairs, {
        "grad_accum": 1, "sharding": "fsdp2", "gradient_checkpointing": True}))
    single, multi = tmp_path / "runs" / "single", tmp_path / "runs" / "multi"
    assert_same_records(_records(single), _records(multi), KTO_KEYS)
    a, b = final_weights(single), final_weights(multi)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
    AutoModelForCausalLM.from_pretrained(multi / "final", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# ORPO and SimPO (training/pairs.py)
# ---------------------------------------------------------------------------------------------------------------------
PAIR_KEYS = {"orpo": ("loss", "grad_norm", "or_loss", "log_odds_ratio", "reward_accuracy", "nll", "eval_loss",
                      "eval_log_odds_ratio", "eval_reward_accuracy", "eval_nll"),
             "simpo": ("loss", "grad_norm", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy",
                       "eval_loss", "eval_reward_margin", "eval_reward_accuracy")}


@pytest.mark.parametrize("recipe", ["orpo", "simpo"])
def test_pair_recipe_checkpointing_and_fsdp2_two_processes_equal_one_plain_process(tmp_path, pairs, recipe):
    """For the reference-free pair recipes: (a) one process with train.gradient_checkpointing == the plain process
    (same grad_accum 2): per-step losses, gradient norms, pair metrics and held-out numbers within 1e-5; (b)
    `torchrun --nproc_per_node 2 ... train.sharding=fsdp2 train.gradient_checkpointing=true` x grad_accum 1 == the
    plain process x grad_accum 2 (the same 8 pairs per step) within 1e-5; final/ of both is a plain transformers
    folder with the plain run's weights within 1e-5."""
    from transformers import AutoModelForCausalLM

    run_cli([sys.executable], recipe, write_config(tmp_path, "plain", pairs, {"grad_accum": 2}))
    run_cli([sys.executable], recipe, write_config(tmp_path, "ckpt", pairs, {
        "grad_accum": 2, "gradient_checkpointing": True}))
    run_cli(_torchrun(2), recipe, write_config(tmp_path, "multi", pairs, {
        "grad_accum": 1, "sharding": "fsdp2", "gradient_checkpointing": True}))
    plain, ckpt, multi = (tmp_path / "runs" / n for n in ("plain", "ckpt", "multi"))
    assert all(any(r.get(k) is not None for r in _records(plain)) for k in PAIR_KEYS[recipe])  # compared below
    for other in (ckpt, multi):
        assert_same_records(_records(plain), _records(other), PAIR_KEYS[recipe])
        a, b = final_weights(plain), final_weights(other)
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
    AutoModelForCausalLM.from_pretrained(multi / "final", dtype=torch.float32)
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["sharding"] == "fsdp2" and summary["gradient_checkpointing"] and summary["world_size"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------------------------
GRPO_KEYS = ("loss", "grad_norm", "reward", "response_length", "groups_flat", "groups_dropped", "ratio", "approx_kl",
             "clipfrac_low", "clipfrac_high", "kl")

# Prompts 0 and 1 never earn a reward (their groups are flat and dynamic sampling drops them); 2 and 3 earn the
# fraction of the response's tokens in 300..363. The recipe's draw of iteration 0 (random.Random("0:0"), 4 of 4)
# puts prompts 0 and 1 on rank 0, so rank 0 has no update to make while rank 1 has: the sharded run must keep the
# ranks in lockstep with an empty pass.
GRPO_REWARD = '''
def learn_or_flat(prompts, completions, completion_ids, **_):
    wanted = set(range(300, 364))
    return [sum(t in wanted for t in ids) / len(ids) if ids and "learn" in msgs[-1]["content"] else 0.0
            for msgs, ids in zip(prompts, completion_ids)]
'''


def write_grpo(tmp: Path, name: str, train: dict, **top) -> Path:
    prompts = ["Say anything.", "Name a colour.", "Please learn to count.", "Please learn a word."]
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": "ok"}]}) + "\n"
                            for p in prompts))
    (tmp / "grpo_test_reward.py").write_text(GRPO_REWARD)
    cfg = {"model": {"path": "tiny:"}, "data": {"sources": [{"path": str(data)}], "max_length": 64},
           "train": {"output_dir": str(tmp / "runs"), "run_name": name, "max_steps": 3, "micro_batch_size": 4,
                     "threads": 1, "lr": 0.001, "schedule": "constant", "save_every": 0, "seed": 0, **train},
           "rewards": [{"function": "grpo_test_reward:learn_or_flat"}], "prompts_per_step": 4, "num_generations": 4,
           "updates_per_batch": 2, "max_new_tokens": 6, "temperature": 1.0, "kl_coef": 0.1, "aggregation": "token",
           "dynamic_sampling": True, **top}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_grpo_checkpointing_and_fsdp2_two_processes_equal_one_plain_process(tmp_path, lora):
    """GRPO with a KL to the reference (full weights: a frozen copy kept whole per process; LoRA: the policy with its
    adapter disabled, run inside the FSDP root), two updates per rollout batch (the rollout policy's log-probs through
    the root) and dynamic sampling: (a) one process with train.gradient_checkpointing == the plain process; (b)
    `torchrun --nproc_per_node 2 ... train.sharding=fsdp2 train.gradient_checkpointing=true` (rollouts generated from
    the gathered weights, 2 prompts per process) == the plain process: rewards, lengths, dropped groups, per-step
    losses, gradient norms, ratios and KLs within 1e-5, and final/ (full weights, or the adapter) within 1e-5 but for
    at most 4 elements, which stay within 1e-4 (see below)."""
    import os
    import random

    from safetensors.torch import load_file
    from sft_helpers import env

    assert set(random.Random("0:0").sample(range(4), 4)[:2]) == {0, 1}  # rank 0's share of iteration 0: both flat
    top = {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}} if lora else {}
    e = {**env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    runs = {"plain": ([sys.executable], {}), "ckpt": ([sys.executable], {"gradient_checkpointing": True}),
            "multi": (_torchrun(2), {"sharding": "fsdp2", "gradient_checkpointing": True})}
    for name, (prefix, train) in runs.items():
        cfg = write_grpo(tmp_path, name, train, **top)
        p = subprocess.run(prefix + ["-m", "instructkit", "grpo", "--config", str(cfg)], env=e, cwd=ROOT,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    plain = tmp_path / "runs" / "plain"
    recs = _records(plain)
    assert all(r.get(k) is not None for r in recs for k in GRPO_KEYS)  # every key is compared below
    assert recs[0]["groups_dropped"] >= 2 and recs[-1]["kl"] > 0  # the flat prompts were dropped; the policy moved
    for other in ("ckpt", "multi"):
        assert_same_records(recs, _records(tmp_path / "runs" / other), GRPO_KEYS)
        a = load_file(str(plain / "final" / weights))
        b = load_file(str(tmp_path / "runs" / other / "final" / weights))
        # Adam divides by sqrt(v) + 1e-8: an element whose gradient is ~1e-8 (a rarely sampled token's embedding
        # row) turns float-rounding differences of its gradient into update differences of a few % of lr, so the
        # bound is 0.1 lr (seen: one element of 32768 at 3.5e-5, every other within 1e-5)
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-4 for k in a)
        assert sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a) <= 4
    summary = json.loads((tmp_path / "runs" / "multi" / "summary.json").read_text())
    assert summary["sharding"] == "fsdp2" and summary["gradient_checkpointing"] and summary["world_size"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------------------------------
# value_clipfrac is not compared: before the critic moves, the clipped and unclipped value losses tie up to rounding,
# so which side wins follows the micro-batch's float rounding (it differs between any two splits of a mini-batch)
PPO_KEYS = ("score", "kl", "reward_total", "response_length", "policy_loss", "value_loss", "entropy", "clipfrac",
            "approx_kl", "ratio", "grad_norm")


def write_ppo(tmp: Path, name: str, train: dict, **top) -> Path:
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Tell me about thing {i}."},
                                                     {"role": "assistant", "content": "Sure."}]}) + "\n"
                            for i in range(16)))
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_ppo.yaml").read_text())
    cfg["data"] = {"sources": [{"path": str(data)}], "max_length": 64}
    cfg["train"] = {"output_dir": str(tmp / "runs"), "run_name": name, "max_steps": 2, "micro_batch_size": 2,
                    "grad_accum": 1, "threads": 1, "lr": 0.001, "schedule": "constant", "save_every": 0, "seed": 0,
                    **train}
    cfg.update(rollout_batch_size=8, ppo_epochs=2, max_new_tokens=6, kl_coef=0.05, **top)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("variant", ["head", "lora_critic"])
def test_ppo_checkpointing_and_fsdp2_two_processes_equal_one_plain_process(tmp_path, variant):
    """PPO, "head": full weights with a value head on the policy (the reference a frozen copy kept whole per
    process); "lora_critic": LoRA on the policy and on a separate critic model (the reference is the policy with its
    adapter disabled, inside the FSDP root; checkpointing on both models). (a) One process with
    train.gradient_checkpointing == the plain process; (b) `torchrun --nproc_per_node 2 ... train.sharding=fsdp2
    train.gradient_checkpointing=true` (rollouts from the gathered weights, 4 rows per process) == the plain process:
    scores, KLs, losses, clip fractions and gradient norms within 1e-5, final/ (the policy: full weights, or its
    adapter) within 1e-5. A mini-batch is micro_batch_size x grad_accum = 2 rows of the whole rollout batch, so some
    hold no row of one process, which then takes an empty pass to keep in lockstep."""
    from safetensors.torch import load_file

    # the recipe's mini-batch draw (torch.randperm seeded with train.seed * 7919 + iteration): the second epoch of
    # iteration 0 starts with rows 5 and 7, both held by process 1 (rows 4-7): process 0 takes an empty pass
    g = torch.Generator().manual_seed(0)
    torch.randperm(8, generator=g)
    assert set(torch.randperm(8, generator=g)[:2].tolist()) == {5, 7}
    top = {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, "value_model": "separate"} \
        if variant == "lora_critic" else {}
    run_cli([sys.executable], "ppo", write_ppo(tmp_path, "plain", {}, **top))
    run_cli([sys.executable], "ppo", write_ppo(tmp_path, "ckpt", {"gradient_checkpointing": True}, **top))
    run_cli(_torchrun(2), "ppo", write_ppo(tmp_path, "multi", {"sharding": "fsdp2", "gradient_checkpointing": True},
                                           **top))
    weights = "adapter_model.safetensors" if top else "model.safetensors"
    plain = tmp_path / "runs" / "plain"
    recs = _records(plain)
    assert all(r.get(k) is not None for r in recs for k in PPO_KEYS) and recs[-1]["kl"] > 0  # the policy moved
    for other in ("ckpt", "multi"):
        assert_same_records(recs, _records(tmp_path / "runs" / other), PPO_KEYS)
        a = load_file(str(plain / "final" / weights))
        b = load_file(str(tmp_path / "runs" / other / "final" / weights))
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
    assert not (tmp_path / "runs" / "multi" / "final" / "model.safetensors").exists() or not top
    summary = json.loads((tmp_path / "runs" / "multi" / "summary.json").read_text())
    assert summary["sharding"] == "fsdp2" and summary["gradient_checkpointing"] and summary["world_size"] == 2
