"""Reward model through the CLI on a tiny model: learns a synthetic preference rule, saves a plain transformers
sequence classifier with its normalisation, resumes exactly, and scores only through the attention mask."""

import json
from pathlib import Path

import pytest
import torch

from instructkit.cli import main as cli
from pref_helpers import write_pairs

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_reward_model.yaml")



@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    return write_pairs(d / "train.jsonl", 128, 0), write_pairs(d / "val.jsonl", 64, 1)


def rm_args(pref_data, out, name, *extra):
    train, val = pref_data
    return ["reward-model", "--config", CONFIG, f"data.sources=[{{path: {train}}}]",
            f"data.validation=[{{path: {val}}}]", f"train.output_dir={out}", f"train.run_name={name}", *extra]


@pytest.fixture(scope="module")
def trained_rm(pref_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_runs")
    assert cli(rm_args(pref_data, out, "rm", "train.save_every=10", "train.keep_checkpoints=5")) == 0
    return out / "rm"


def test_rm_learns_held_out_preferences(trained_rm):
    result = json.loads((trained_rm / "summary.json").read_text())
    assert result["eval_pairs"] == 64
    assert result["eval_accuracy"] >= 0.95
    metrics = [json.loads(line) for line in (trained_rm / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert steps[0]["loss"] > 0.5 and steps[-1]["loss"] < 0.2  # starts near log 2 (random head), falls
    assert {"accuracy", "reward_margin", "chosen_reward", "rejected_reward"} <= set(steps[-1])


def test_saved_rm_loads_with_plain_transformers_and_matches_our_scores(trained_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from instructkit.chat.render import Renderer
    from instructkit.models.value_head import NORM_KEY, load_reward_model, sequence_scores
    from instructkit.data.preference import encode_response
    from instructkit.rl.rollout import prompt_response_batch
    from instructkit.data.schema import Message

    model_dir = trained_rm / "final"
    plain = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert type(plain).__name__ == "LlamaForSequenceClassification" and plain.config.num_labels == 1
    norm = getattr(plain.config, NORM_KEY)
    ours, _, (mean, std) = load_reward_model(model_dir)
    assert (mean, std) == (norm["mean"], norm["std"]) and std > 0
    renderer = Renderer(tok)
    prompt, resp = encode_response(renderer, [Message("user", "Tell me about bread.")],
                                   [Message("assistant", "It is kind nice great.")])
    prompt2, resp2 = encode_response(renderer, [Message("user", "Tell me about the sky?")],
                                     [Message("assistant", "It is dark.")])
    with torch.no_grad():
        raw_plain = plain(input_ids=torch.tensor([prompt + resp])).logits[0, 0].item()
        batch = prompt_response_batch([prompt, prompt2], [resp, resp2], tok.pad_token_id)
        raw_ours = sequence_scores(ours, batch["input_ids"], batch["attention_mask"])
    # a left/right padded batch gives the same score as the unpadded sequence through plain transformers
    assert raw_ours[0].item() == pytest.approx(raw_plain, abs=1e-4)
    assert raw_ours[0] > raw_ours[1]  # good words beat bad words


def test_normalisation_centres_training_rewards(trained_rm, pref_data):
    """Normalised rewards of the training responses have mean 0 and std 1 (by construction of mean/std)."""
    from instructkit.chat.render import Renderer
    from instructkit.data.io import read_pairs
    from instructkit.models.value_head import load_reward_model
    from instructkit.recipes.reward_model import pair_batch, pair_scores
    from instructkit.data.preference import encode_pairs

    model, tok, (mean, std) = load_reward_model(trained_rm / "final")
    items, _ = encode_pairs(Renderer(tok), read_pairs(pref_data[0]), 64)
    with torch.no_grad():
        c, r = pair_scores(model, pair_batch(items, tok.pad_token_id))
    z = (torch.cat([c, r]) - mean) / std
    assert z.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert z.std().item() == pytest.approx(1.0, abs=1e-4)


def test_statistics_groups_sample_whole_groups_seeded():
    from instructkit.data.preference import EncodedGroup
    from instructkit.recipes.reward_model import statistics_groups

    groups = [EncodedGroup([i], [[i, 1], [i, 2]] + ([[i, 3]] if i % 2 else []), [(0, 1)], [0.0]) for i in range(20)]
    assert statistics_groups(groups, None, 0) is groups
    assert statistics_groups(groups, 50, 0) is groups  # 50 responses in all: every one
    picked = statistics_groups(groups, 9, 3)
    sizes = [len(g.responses) for g in picked]
    assert sum(sizes[:-1]) < 9 <= sum(sizes)  # whole groups until at least 9 responses
    assert len({id(g) for g in picked}) == len(picked)
    assert [g.prompt for g in statistics_groups(groups, 9, 3)] == [g.prompt for g in picked]  # seeded
    assert [g.prompt for g in statistics_groups(groups, 9, 4)] != [g.prompt for g in picked]


def test_normalisation_on_a_sample_resumes_from_the_last_checkpoint(trained_rm, pref_data, tmp_path):
    """normalize_sample=64: the stored mean/std are those of the 64 sampled training responses (32 pairs), and the
    setting may change on resume (the statistics come after the last step)."""
    from instructkit.chat.render import Renderer
    from instructkit.data.io import read_pairs
    from instructkit.data.preference import encode_groups, group_pairs
    from instructkit.models.value_head import load_reward_model
    from instructkit.recipes.reward_model import statistics_groups

    ckpt = trained_rm / "checkpoints" / "step-30"
    assert cli(rm_args(pref_data, tmp_path, "sampled", "normalize_sample=64", f"train.resume={ckpt}")) == 0
    summary = json.loads((tmp_path / "sampled" / "summary.json").read_text())
    assert summary["reward_stat_responses"] == 64
    model, tok, (mean, std) = load_reward_model(tmp_path / "sampled" / "final")
    _, _, (mean_all, std_all) = load_reward_model(trained_rm / "final")
    assert (mean, std) != (mean_all, std_all)
    items, _ = encode_groups(Renderer(tok), group_pairs(read_pairs(pref_data[0])), 64)
    picked = statistics_groups(items, 64, 0)  # data.seed 0
    with torch.no_grad():
        scores = [s for g in picked for s in group_scores_of(model, g, tok.pad_token_id)]
    t = torch.tensor(scores)
    assert len(scores) == 64
    assert mean == pytest.approx(t.mean().item(), abs=1e-5) and std == pytest.approx(t.std().item(), abs=1e-5)


def group_scores_of(model, group, pad_id):
    from instructkit.models.value_head import sequence_scores
    from instructkit.rl.rollout import prompt_response_batch

    batch = prompt_response_batch([group.prompt] * len(group.responses), group.responses, pad_id)
    return sequence_scores(model, batch["input_ids"], batch["attention_mask"]).tolist()


def test_rm_resume_from_a_checkpoint_equals_uninterrupted(trained_rm, pref_data, tmp_path):
    """Resuming at step 10 of the 30-step run reproduces its final weights and its metrics exactly."""
    from safetensors.torch import load_file

    ckpt = trained_rm / "checkpoints" / "step-10"
    assert (ckpt / "COMPLETE").exists()
    assert cli(rm_args(pref_data, tmp_path, "resumed", "train.save_every=10", "train.keep_checkpoints=5",
                       f"train.resume={ckpt}")) == 0
    a = load_file(str(trained_rm / "checkpoints" / "step-30" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-30" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full = [json.loads(x) for x in (trained_rm / "metrics.jsonl").read_text().splitlines()]
    part = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    losses_full = {m["step"]: m["loss"] for m in full if "loss" in m and m["step"] > 10}
    losses_part = {m["step"]: m["loss"] for m in part if "loss" in m}
    assert losses_part == losses_full


def test_resume_refuses_a_changed_batch_size(trained_rm, pref_data, tmp_path, capsys):
    ckpt = trained_rm / "checkpoints" / "step-10"
    code = cli(rm_args(pref_data, tmp_path, "drift", "train.micro_batch_size=4", f"train.resume={ckpt}"))
    assert code == 2
    assert "train.micro_batch_size" in capsys.readouterr().err


def test_rm_with_lora_trains_and_saves_a_merged_model(pref_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    assert cli(rm_args(pref_data, tmp_path, "lora", "lora.enabled=true", "lora.r=8", "train.max_steps=3")) == 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lora" / "final")
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_margin_enters_the_loss(pref_data, tmp_path):
    """With use_margin and margin m on every pair, the first-step loss is the pairwise loss shifted by m."""
    from instructkit.losses import pairwise_reward_loss

    src = [json.loads(x) for x in open(pref_data[0])]
    for rec in src:
        rec["margin"] = 2.0
    path = tmp_path / "margin.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in src))
    args = rm_args((path, pref_data[1]), tmp_path, "m", "use_margin=true", "train.max_steps=1")
    assert cli(args) == 0
    first = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[0])
    # the step's mean margin r_c - r_r is logged; the loss must be mean(-log sigmoid(diff - 2)), which for the near-zero
    # diffs of a fresh head is about softplus(2) = 2.127 (vs log 2 = 0.693 without the margin)
    assert first["loss"] == pytest.approx(2.1269, abs=0.05)
    loss, _ = pairwise_reward_loss(torch.tensor([first["reward_margin"]]), torch.tensor([0.0]), 2.0)
    assert loss.item() == pytest.approx(first["loss"], abs=0.02)


def test_tiny_config_as_shipped_on_real_preference_data(tmp_path, monkeypatch, shared_data):
    """configs/tiny_reward_model.yaml runs from the project root on lf_dpo_en_demo.json; hh-rlhf (which has records
    with an empty turn) reads in skip mode with its rejects counted."""
    monkeypatch.chdir(Path(CONFIG).parents[1])
    assert cli(["reward-model", "--config", CONFIG, f"train.output_dir={tmp_path}", "train.max_steps=2"]) == 0
    stats = json.loads((tmp_path / "tiny_reward_model" / "data_stats.json").read_text())
    assert stats["train_pairs"] + stats["validation_pairs"] + stats["dropped_train"]["too_long"] \
        + stats["dropped_validation"]["too_long"] == 300
    assert (tmp_path / "tiny_reward_model" / "metrics.jsonl").exists()
    hh = shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"
    assert cli(["reward-model", "--config", CONFIG, f"train.output_dir={tmp_path}", "train.run_name=hh",
                "train.max_steps=1", f"data.sources=[{{path: {hh}, max_examples: 64}}]", "data.skip_invalid=true",
                "data.max_invalid_fraction=0.2"]) == 0
    read = json.loads((tmp_path / "hh" / "data_stats.json").read_text())["read"][str(hh)]
    assert read["format"] == "hh_rlhf" and read["kept"] + read["rejected"] == read["total"]


@pytest.mark.parametrize("name, cls", [("reward_model", "RewardModelConfig"), ("tiny_reward_model", "RewardModelConfig"),
                                       ("dpo", "DPOConfig"), ("tiny_dpo", "DPOConfig"), ("ppo", "PPOConfig"),
                                       ("tiny_ppo", "PPOConfig")])
def test_shipped_configs_load(name, cls):
    from instructkit import config

    cfg = config.load_config(getattr(config, cls), Path(CONFIG).with_name(f"{name}.yaml"))
    assert cfg.train.run_name == name


def test_config_checks(tmp_path):
    from instructkit.config import ConfigError, DPOConfig, PPOConfig, load_config

    with pytest.raises(ConfigError, match="exactly one of reward_model"):
        load_config(PPOConfig, None, [])
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(PPOConfig, None, ["reward_function=a:b", "rollout_batch_size=10", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="loss_type"):
        load_config(DPOConfig, None, ["loss_type=hinge"])
    from instructkit.config import RewardModelConfig

    for bad in ("1", "true", "0.5"):
        with pytest.raises(ConfigError, match="normalize_sample"):
            load_config(RewardModelConfig, None, [f"normalize_sample={bad}"])
    assert load_config(RewardModelConfig, None, ["normalize_sample=null"]).normalize_sample is None
