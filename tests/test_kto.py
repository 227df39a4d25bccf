"""KTO through the CLI on a tiny model: the loss starts at its closed form (policy == reference: every implicit reward
and the KL baseline are 0, each example costs lambda_y / 2), the held-out desirable-over-undesirable reward margin
rises, the KL baseline estimated over the whole step makes a step independent of its micro-batch split, preference
pairs are split into desirable and undesirable examples, and conversations are refused."""

import json
import random
from pathlib import Path

import pytest

from instructkit.cli import main as cli
from pref_helpers import BAD, GOOD, TOPICS, write_pairs

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_kto.yaml")


def write_unpaired(path, n, seed):
    """LLaMA-Factory's KTO layout (messages + label): good words are desirable, bad words undesirable."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.random() < 0.5
            words = " ".join(rng.choice(GOOD if label else BAD) for _ in range(3))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Tell me about {rng.choice(TOPICS)}."},
                                             {"role": "assistant", "content": f"It is {words}."}],
                                "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def kto_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("kto_data")
    return write_unpaired(d / "train.jsonl", 96, 0), write_unpaired(d / "val.jsonl", 32, 1)


def args(data, out, name, *extra):
    train, val = data
    return ["kto", "--config", CONFIG, f"data.sources=[{{path: {train}, format: kto}}]",
            f"data.validation=[{{path: {val}, format: kto}}]", f"train.output_dir={out}", f"train.run_name={name}",
            *extra]


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_kto_starts_at_half_and_raises_the_held_out_margin(kto_data, tmp_path):
    assert cli(args(kto_data, tmp_path, "kto", "train.max_steps=12", "beta=0.5")) == 0
    m = metrics(tmp_path / "kto")
    initial, first, final = m[0], m[1], m[-1]
    # policy == reference: r = 0 and z0 = 0, so each term is lambda_y (1 - sigma(0)) = 1/2
    assert initial["eval_loss"] == pytest.approx(0.5, abs=1e-6)
    assert initial["eval_reward_margin"] == 0.0 and initial["eval_kl_baseline"] == 0.0
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl_baseline"] == pytest.approx(0.0, abs=1e-5)
    assert first["desirable"] + first["undesirable"] == 8
    # held-out: desirable completions gain implicit reward over undesirable ones
    assert final["final"] and final["eval_examples"] == 32
    assert final["eval_reward_margin"] > 1.0
    assert final["eval_rewards_desirable"] > final["eval_rewards_undesirable"]
    assert final["eval_loss"] < 0.45
    stats = json.loads((tmp_path / "kto" / "data_stats.json").read_text())
    assert stats["train_desirable"] + stats["train_undesirable"] == stats["train_examples"] == 96
    assert json.loads((tmp_path / "kto" / "summary.json").read_text())["recipe"] == "kto"


def test_kto_weights_scale_the_first_loss(kto_data, tmp_path):
    # at the start each term is lambda_y / 2: loss = (lambda_D n_D + lambda_U n_U) / (2 n)
    assert cli(args(kto_data, tmp_path, "w", "train.max_steps=1", "desirable_weight=2.0",
                    "undesirable_weight=0.5")) == 0
    r = metrics(tmp_path / "w")[1]
    n_d, n_u = r["desirable"], r["undesirable"]
    assert r["loss"] == pytest.approx((2.0 * n_d + 0.5 * n_u) / (2 * (n_d + n_u)), abs=1e-6)


def test_kl_baseline_over_the_whole_step(kto_data, tmp_path):
    # z0 is estimated from all of the step's mismatched pairs, so splitting a step into micro-batches changes nothing
    assert cli(args(kto_data, tmp_path, "k8", "train.max_steps=3")) == 0
    assert cli(args(kto_data, tmp_path, "k4x2", "train.max_steps=3", "train.micro_batch_size=4",
                    "train.grad_accum=2")) == 0
    a, b = metrics(tmp_path / "k8")[1:4], metrics(tmp_path / "k4x2")[1:4]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
    assert [r["kl_baseline"] for r in a] == pytest.approx([r["kl_baseline"] for r in b], abs=1e-5)
    assert a[-1]["kl_baseline"] > 0  # the policy moved: mismatched completions changed likelihood


def test_preference_pairs_split_into_desirable_and_undesirable(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 20, 0)
    assert cli(["kto", "--config", CONFIG, f"data.sources=[{{path: {pairs}}}]", "data.validation_fraction=0.2",
                f"train.output_dir={tmp_path}", "train.run_name=p", "train.max_steps=1"]) == 0
    stats = json.loads((tmp_path / "p" / "data_stats.json").read_text())
    assert stats["train_desirable"] == stats["train_undesirable"] == 16
    assert stats["validation_examples"] == 8


def test_conversations_are_refused(tmp_path, capsys):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello"}]}) + "\n")
    assert cli(["kto", "--config", CONFIG, f"data.sources=[{{path: {sft}}}]", f"train.output_dir={tmp_path}",
                "train.run_name=c", "data.validation_fraction=0"]) == 2
    err = capsys.readouterr().err
    assert "record 0 is a Conversation" in err and "KTO needs unpaired examples" in err
