"""KTO through the CLI on a tiny model: the loss starts at its closed form (policy == reference: every implicit reward
and the KL baseline are 0, each example costs lambda_y / 2), the held-out desirable-over-undesirable reward margin
rises, the KL baseline estimated over the whole step makes a step independent of its micro-batch split, preference
pairs are split into desirable and undesirable examples, and conversations are refused."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from instructkit.cli import main as cli
from pref_helpers import BAD, GOOD, TOPICS, write_pairs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_kto.yaml")


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
    assert f"{sft}: example 0 is a Conversation (format 'messages')" in err and "KTO needs unpaired examples" in err


def test_kto_with_lora_starts_from_the_base_and_saves_an_adapter(kto_data, tmp_path):
    # LoRA's B = 0 at init: the policy is the base, so the reference log-probs taken before training are the base's
    assert cli(args(kto_data, tmp_path, "lora", "train.max_steps=4", "lora.enabled=true", "lora.r=8",
                    "lora.dropout=0.0", "train.lr=0.01")) == 0
    m = metrics(tmp_path / "lora")
    assert m[1]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert m[-1]["eval_reward_margin"] > m[0]["eval_reward_margin"] == 0.0
    assert (tmp_path / "lora" / "final" / "adapter_config.json").exists()


def test_kl_baseline_over_the_whole_step_and_all_processes(kto_data, tmp_path):
    """z0 is estimated from all of a step's mismatched pairs, summed over processes: one micro-batch of 8 == 2
    micro-batches of 4 == torchrun 2 processes x 1 micro-batch of 4 (the same rows per step), so the same losses,
    baselines and gradient norms."""
    assert cli(args(kto_data, tmp_path, "k8", "train.max_steps=3")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    common = [a for a in args(kto_data, tmp_path, "", "train.max_steps=3", "train.micro_batch_size=4")[1:]
              if not a.startswith("train.run_name=")]
    one = subprocess.run([sys.executable, "-m", "instructkit", "kto", *common, "train.run_name=k4x2",
                          "train.grad_accum=2"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as sock:  # a free port for the gloo rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), "-m", "instructkit", "kto", *common,
                          "train.run_name=two", "train.grad_accum=1"], env=env, cwd=ROOT, capture_output=True,
                         text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    a = metrics(tmp_path / "k8")
    assert len(a) == 5 and a[3]["kl_baseline"] > 0  # the policy moved: mismatched completions changed likelihood
    for other in ("k4x2", "two"):
        b = metrics(tmp_path / other)
        assert len(b) == 5
        for ra, rb in zip(a, b):
            for key in ("loss", "kl_baseline", "grad_norm", "desirable", "rewards_desirable", "eval_loss",
                        "eval_reward_margin"):
                if ra.get(key) is not None:
                    assert rb[key] == pytest.approx(ra[key], abs=1e-5), (other, key, ra, rb)


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(kto_data, tmp_path):
    # the reference log-probs come from the starting weights before the checkpoint is loaded, so a resumed run
    # continues exactly: the same losses, baselines and held-out numbers after the checkpoint's step
    assert cli(args(kto_data, tmp_path, "ref", "train.max_steps=4", "train.save_every=2")) == 0
    ckpt = tmp_path / "ref" / "checkpoints" / "step-2"
    assert cli(args(kto_data, tmp_path, "res", "train.max_steps=4", "train.save_every=2",
                    f"train.resume={ckpt}")) == 0
    timeless = [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in metrics(tmp_path / "ref")]
    resumed = [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in metrics(tmp_path / "res")]
    assert [r["step"] for r in resumed][-3:] == [3, 4, 4]
    assert resumed[-3:] == timeless[-3:]
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["initial_eval"]["eval_loss"] == pytest.approx(0.5, abs=1e-6)
