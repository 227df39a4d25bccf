"""ORPO and SimPO through the CLI on a tiny model (no reference model): each raises the held-out chosen-over-rejected
margin from its start, SimPO's loss reduces to its closed form when beta -> 0, and a step's loss does not depend on how
it is split into micro-batches."""

import json
import math
from pathlib import Path

import pytest

from instructkit.cli import main as cli
from pref_helpers import write_pairs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("orpo_simpo_data")
    return write_pairs(d / "train.jsonl", 64, 0), write_pairs(d / "val.jsonl", 32, 1)


def args(recipe, pref_data, out, name, *extra):
    train, val = pref_data
    return [recipe, "--config", str(CONFIGS / f"tiny_{recipe}.yaml"), f"data.sources=[{{path: {train}}}]",
            f"data.validation=[{{path: {val}}}]", f"train.output_dir={out}", f"train.run_name={name}", *extra]


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_simpo_raises_held_out_margin(pref_data, tmp_path):
    assert cli(args("simpo", pref_data, tmp_path, "simpo", "train.max_steps=12")) == 0
    m = metrics(tmp_path / "simpo")
    initial, final = m[0], m[-1]
    assert final["final"] and final["eval_pairs"] == 32
    # the held-out margin beta * (avg log pi(y_w) - avg log pi(y_l)) starts near 0 (a random model) and grows
    assert abs(initial["eval_reward_margin"]) < 0.2
    assert final["eval_reward_margin"] > initial["eval_reward_margin"] + 1.0
    assert final["eval_reward_accuracy"] >= 0.95
    assert final["eval_loss"] < initial["eval_loss"]
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "pairs_per_s"} <= set(m[1])
    summary = json.loads((tmp_path / "simpo" / "summary.json").read_text())
    assert summary["recipe"] == "simpo" and (tmp_path / "simpo" / "final" / "config.json").exists()


def test_simpo_loss_without_beta_is_softplus_gamma(pref_data, tmp_path):
    # beta -> 0: every implicit reward is 0, loss = -log sigmoid(-gamma) = log(1 + e^gamma) = 1.3132617 for gamma 1
    assert cli(args("simpo", pref_data, tmp_path, "g", "train.max_steps=1", "beta=1e-9", "gamma=1.0")) == 0
    assert metrics(tmp_path / "g")[1]["loss"] == pytest.approx(math.log1p(math.e), abs=1e-6)


def test_orpo_raises_log_odds_ratio_and_trains_the_chosen_answer(pref_data, tmp_path):
    assert cli(args("orpo", pref_data, tmp_path, "orpo", "train.max_steps=12", "lam=1.0")) == 0
    m = metrics(tmp_path / "orpo")
    initial, final = m[0], m[-1]
    assert abs(initial["eval_log_odds_ratio"]) < 0.2
    assert final["eval_log_odds_ratio"] > initial["eval_log_odds_ratio"] + 0.5
    assert final["eval_reward_accuracy"] >= 0.9
    assert final["eval_nll"] < initial["eval_nll"] - 1.0  # the SFT term: the chosen answers became likely
    # loss = L_SFT + lambda * L_OR on every logged step (lambda = 1)
    for r in m[1:-1]:
        assert r["loss"] == pytest.approx(r["nll"] + r["or_loss"], rel=1e-5)


def test_a_step_does_not_depend_on_its_micro_batch_split(pref_data, tmp_path):
    for recipe in ("orpo", "simpo"):
        assert cli(args(recipe, pref_data, tmp_path, f"{recipe}8", "train.max_steps=3")) == 0
        assert cli(args(recipe, pref_data, tmp_path, f"{recipe}4x2", "train.max_steps=3", "train.micro_batch_size=4",
                        "train.grad_accum=2")) == 0
        a = [r["loss"] for r in metrics(tmp_path / f"{recipe}8") if "loss" in r]
        b = [r["loss"] for r in metrics(tmp_path / f"{recipe}4x2") if "loss" in r]
        assert len(a) == 3 and a == pytest.approx(b, abs=1e-5)
