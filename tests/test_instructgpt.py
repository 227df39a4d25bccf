"""The InstructGPT pipeline experiment (recipes/instructgpt.py): SFT -> RM -> PPO -> report, via the CLI.

The fast tests run a shortened tiny pipeline once (module fixture) and check the report's numbers against each other
and against the JSON; the slow test runs configs/tiny_instructgpt.yaml unchanged and checks that PPO beats SFT under
the RM on the synthetic rule it can learn.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from instructkit.cli import main as cli_main
from instructkit.config import PIPELINE_REWARD_MODEL, ConfigError
from instructkit.recipes import instructgpt as ig

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny_instructgpt.yaml"

# A shortened tiny pipeline: enough to run every stage and the report, not to learn much. LoRA in every stage, as in
# configs/instructgpt.yaml, so the adapters are merged between stages (the slow test covers full fine-tuning).
FAST = ["sft.lora.enabled=true", "reward_model.lora.enabled=true", "ppo.lora.enabled=true",
        "sft.train.max_steps=6", "sft.train.save_every=3", "reward_model.train.max_steps=4",
        "reward_model.train.save_every=2", "ppo.train.max_steps=2", "ppo.train.save_every=1", "eval_max_prompts=6",
        "eval_batch_size=4", "num_samples=3"]


def _run(shared_data: Path, out: Path, extra: list[str], capsys) -> int:
    rc = cli_main(["experiment", "instructgpt", "--config", str(TINY_CONFIG), f"output_dir={out}",
                   f"synthetic_prompts={shared_data / 'lf_dpo_en_demo.json'}", *extra])
    capsys.readouterr()
    return rc


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("instructgpt")
    rc = cli_main(["experiment", "instructgpt", "--config", str(TINY_CONFIG), f"output_dir={out}",
                   f"synthetic_prompts={shared_data / 'lf_dpo_en_demo.json'}", *FAST])
    return rc, out / "tiny_instructgpt"


def _markdown_cells(md: str) -> dict[str, list[str]]:
    """First column -> the other cells, for every table row of the report."""
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# pure pieces
# ---------------------------------------------------------------------------------------------------------------------
def test_win_rate_counts_ties_half():
    # A vs B per prompt: 2 > 1 win, 0 < 1 loss, 1 == 1 tie, 3 > -1 win -> (2 wins + 1 tie / 2) / 4 = 0.625
    r = ig.win_rate([2.0, 0.0, 1.0, 3.0], [1.0, 1.0, 1.0, -1.0])
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (2, 1, 1, 4)
    assert r["winrate"] == pytest.approx(0.625, abs=1e-12)


def test_config_fills_pipeline_reward_model_and_refuses_a_rule_reward(tmp_path):
    cfg = ig.load_instructgpt_config(TINY_CONFIG)
    assert cfg.ppo.reward_model == PIPELINE_REWARD_MODEL
    assert cfg.sft.model.path == "tiny:" and cfg.ppo.value_model == "head"
    with pytest.raises(ConfigError, match="reward_function"):
        ig.load_instructgpt_config(TINY_CONFIG, ["ppo.reward_function=instructkit.rl.rollout:token_fraction_reward"])
    with pytest.raises(ConfigError, match="eval_prompts"):
        ig.load_instructgpt_config(TINY_CONFIG, ["synthetic_prompts="])
    with pytest.raises(ConfigError, match="unknown config key"):
        ig.load_instructgpt_config(TINY_CONFIG, ["ppo.not_a_key=1"])
    real = ig.load_instructgpt_config(ROOT / "configs" / "instructgpt.yaml")
    assert real.sft.model.path == "smollm2-135m-instruct" and real.eval_offset == 260
    # the held-out records (260..) are beyond what the RM and PPO stages read
    assert real.reward_model.data.sources[0].max_examples <= real.eval_offset
    assert real.ppo.data.sources[0].max_examples <= real.eval_offset


def test_synthetic_data_split_and_rule(tmp_path, shared_data):
    cfg = ig.load_instructgpt_config(TINY_CONFIG, [f"synthetic_prompts={shared_data / 'lf_dpo_en_demo.json'}"])
    paths = ig.write_synthetic_data(cfg, tmp_path)
    rows = {k: [json.loads(x) for x in p.read_text().splitlines()] for k, p in paths.items()}
    assert len(rows["heldout"]) == cfg.synthetic_heldout
    assert len(rows["sft"]) == len(rows["pairs"])
    train_prompts = {r["messages"][0]["content"] for r in rows["sft"]}
    held_prompts = {r["prompt"][0]["content"] for r in rows["heldout"]}
    assert not train_prompts & held_prompts  # held-out prompts are never trained on
    answers = [r["messages"][-1]["content"] for r in rows["sft"]]
    assert set(answers) == {ig.GOOD_RESPONSE, ig.BAD_RESPONSE}
    assert abs(answers.count(ig.GOOD_RESPONSE) - answers.count(ig.BAD_RESPONSE)) <= 1  # half each
    assert all(r["chosen"][0]["content"] == ig.GOOD_RESPONSE and r["rejected"][0]["content"] == ig.BAD_RESPONSE
               for r in rows["pairs"])


def test_kl_is_zero_against_itself_and_matches_a_hand_computation(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from instructkit.rl.rollout import prompt_response_batch

    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(1)
    b = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = prompt_response_batch([[5, 6, 7], [9, 10]], [[11, 12, 13], [14]], pad_id=0)
    log_ratio, exact = ig.kl_to_reference(a, a, batch)
    assert torch.equal(log_ratio, torch.zeros_like(log_ratio)) and torch.equal(exact, torch.zeros_like(exact))

    log_ratio, exact = ig.kl_to_reference(a, b, batch)
    # by hand for row 1 (prompt [9, 10] left-padded to width 3, response [14]): the next-token distributions after
    # the unpadded prompt [9, 10]; KL = sum_v p(v) (log p(v) - log q(v)), log-ratio = log p(14) - log q(14)
    with torch.no_grad():
        lp = torch.log_softmax(a(torch.tensor([[9, 10]])).logits[0, -1], -1)
        lq = torch.log_softmax(b(torch.tensor([[9, 10]])).logits[0, -1], -1)
    assert exact[1, 0].item() == pytest.approx((lp.exp() * (lp - lq)).sum().item(), rel=1e-4, abs=1e-6)
    assert log_ratio[1, 0].item() == pytest.approx((lp[14] - lq[14]).item(), rel=1e-4, abs=1e-6)
    assert exact[1, 1:].abs().sum() == 0 and log_ratio[1, 1:].abs().sum() == 0  # padding contributes nothing
    assert (exact[0] > 0).all()  # a real KL is positive where the models differ


# ---------------------------------------------------------------------------------------------------------------------
# the pipeline through the CLI
# ---------------------------------------------------------------------------------------------------------------------
def test_fast_pipeline_report_is_consistent(fast_run):
    rc, run = fast_run
    assert rc == 0
    for stage_file in ("sft/summary.json", "sft/final/adapter_config.json", "sft/merged/config.json",
                       "reward_model/summary.json", "reward_model/final/config.json", "ppo/summary.json",
                       "ppo/final/adapter_config.json", "ppo/merged/config.json", "ppo/metrics.jsonl"):
        assert (run / stage_file).exists(), stage_file
    results = json.loads((run / "results.json").read_text())
    s = results["summary"]
    n = s["ppo_vs_sft.n"]
    assert n == 6
    assert 0.0 <= s["ppo_vs_sft.winrate"] <= 1.0
    assert s["ppo_vs_sft.wins"] + s["ppo_vs_sft.ties"] + s["ppo_vs_sft.losses"] == n
    assert s["ppo_vs_sft.winrate"] == pytest.approx((s["ppo_vs_sft.wins"] + s["ppo_vs_sft.ties"] / 2) / n)
    # the win rate and the mean rewards come from the same per-prompt scores
    pol = results["policies"]
    assert ig.win_rate(pol["ppo"]["scores"], pol["sft"]["scores"])["winrate"] == s["ppo_vs_sft.winrate"]
    for name in ("sft", "ppo"):
        sc = pol[name]["scores"]
        assert len(sc) == n and s[f"{name}.reward_mean"] == pytest.approx(sum(sc) / n, rel=1e-9)
        assert s[f"{name}.reward_std"] >= 0
        assert 0.0 <= s[f"{name}.ended_fraction"] <= 1.0
        assert s[f"{name}.ended_fraction"] == pytest.approx(sum(pol[name]["ended"]) / n)
        assert 1 <= s[f"{name}.response_length_mean"] <= 16  # eval_max_new_tokens in the tiny config
    # exact KL is >= 0 by construction; per-sequence = per-token x mean length (same token count)
    assert s["ppo_vs_sft.kl_exact_per_token"] >= 0 and s["ppo_vs_sft.kl_exact_per_sequence"] >= 0
    assert s["ppo_vs_sft.kl_per_sequence"] == pytest.approx(
        s["ppo_vs_sft.kl_per_token"] * s["ppo.response_length_mean"], rel=1e-6, abs=1e-9)
    assert s["ppo_vs_sft.kl_per_sequence"] == pytest.approx(sum(results["kl"]["kl_per_sequence_values"]) / n)
    # markdown shows the JSON's numbers (4 decimals)
    md = (run / "report.md").read_text()
    cells = _markdown_cells(md)
    assert cells["reward (mean)"] == [f"{s['sft.reward_mean']:.4f}", f"{s['ppo.reward_mean']:.4f}"]
    assert cells["reward (std)"] == [f"{s['sft.reward_std']:.4f}", f"{s['ppo.reward_std']:.4f}"]
    assert cells["fraction ending with end-of-turn"] == [f"{s['sft.ended_fraction']:.4f}",
                                                         f"{s['ppo.ended_fraction']:.4f}"]
    assert cells["win rate under the RM (ties count half)"] == [f"{s['ppo_vs_sft.winrate']:.4f}"]
    assert cells["wins"] == [str(s["ppo_vs_sft.wins"])]
    assert cells["KL per token (log-ratio, k1)"] == [f"{s['ppo_vs_sft.kl_per_token']:.4f}"]
    assert cells["KL per sequence (exact over the vocabulary)"] == [f"{s['ppo_vs_sft.kl_exact_per_sequence']:.4f}"]
    # plots of reward and KL over PPO iterations exist, are PNGs and are linked
    for key in ("score", "kl"):
        png = run / f"ppo_{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png.name})" in md
    # samples side by side
    assert len(results["samples"]) == 3 and md.count(" (r=") == 2 * 3


def test_rerun_skips_finished_stages(fast_run, shared_data, capsys):
    rc, run = fast_run
    assert rc == 0
    stamps = {p: (run / p).stat().st_mtime_ns for p in ("sft/summary.json", "reward_model/summary.json",
                                                         "ppo/summary.json", "ppo/metrics.jsonl")}
    before = json.loads((run / "results.json").read_text())["summary"]
    assert _run(shared_data, run.parent, FAST, capsys) == 0
    assert {p: (run / p).stat().st_mtime_ns for p in stamps} == stamps  # no stage ran again
    after = json.loads((run / "results.json").read_text())["summary"]
    assert after == before  # same models, same sampling seed: the same comparison


def test_killed_pipeline_continues_from_the_missing_stage(fast_run, shared_data, capsys, tmp_path):
    import shutil

    rc, run = fast_run
    assert rc == 0
    copy = tmp_path / "tiny_instructgpt"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "ppo")  # as if killed before PPO started
    sft_stamp = (copy / "sft" / "summary.json").stat().st_mtime_ns
    assert _run(shared_data, tmp_path, FAST, capsys) == 0
    assert (copy / "sft" / "summary.json").stat().st_mtime_ns == sft_stamp
    assert json.loads((copy / "ppo" / "summary.json").read_text())["iterations"] == 2
    assert (copy / "report.md").exists()


@pytest.mark.parametrize("name", ["instructgpt.yaml", "instructgpt_hh.yaml"])
def test_shipped_configs_resolve_data_paths_against_their_folder(name, shared_data, monkeypatch, tmp_path):
    """Data paths in a pipeline config resolve against the config's folder (as every recipe's config does), so the
    command works from any folder; the HH config's slices are disjoint."""
    monkeypatch.chdir(tmp_path)
    cfg = ig.load_instructgpt_config(ROOT / "configs" / name)
    sources = [*cfg.sft.data.sources, *cfg.reward_model.data.sources, *cfg.ppo.data.sources, *cfg.eval_prompts]
    for src in sources:
        assert Path(src.path).is_absolute() and Path(src.path).exists(), src.path
    if name == "instructgpt_hh.yaml":
        from instructkit.config import load_config, RewardModelConfig

        judge = load_config(RewardModelConfig, ROOT / "configs" / "reward_model_hh_judge.yaml").data.sources[0]
        rm = cfg.reward_model.data.sources[0]
        assert rm.skip + rm.max_examples <= judge.skip and judge.skip + judge.max_examples <= cfg.eval_prompts[0].skip
        assert cfg.reward_model.data.validation_split_by == "first_user_turn"


def test_held_out_judge_scores_the_same_responses(fast_run, shared_data, capsys, tmp_path):
    """judge_reward_model: a second RM scores both policies' responses. With the stage-2 RM itself as the judge the
    judge's scores, means and win rate equal the RM's exactly (same token ids, same normalisation)."""
    import shutil

    rc, run = fast_run
    assert rc == 0
    copy = tmp_path / "tiny_instructgpt"
    shutil.copytree(run, copy)
    judge = copy / "reward_model" / "final"
    assert _run(shared_data, tmp_path, FAST + [f"judge_reward_model={judge}"], capsys) == 0
    results = json.loads((copy / "results.json").read_text())
    s, pol = results["summary"], results["policies"]
    for name in ("sft", "ppo"):
        assert pol[name]["judge_scores"] == pytest.approx(pol[name]["scores"], abs=1e-6)
        assert s[f"{name}.judge_reward_mean"] == pytest.approx(s[f"{name}.reward_mean"], abs=1e-6)
    for k in ("winrate", "wins", "ties", "losses"):
        assert s[f"ppo_vs_sft.judge_{k}"] == s[f"ppo_vs_sft.{k}"]
    cells = _markdown_cells((copy / "report.md").read_text())
    assert cells["win rate under the held-out judge (ties count half)"] == [f"{s['ppo_vs_sft.judge_winrate']:.4f}"]
    assert cells["held-out judge's reward (mean)"] == [f"{s['sft.judge_reward_mean']:.4f}",
                                                        f"{s['ppo.judge_reward_mean']:.4f}"]
    # without a judge the report has no judge rows (the fixture's run)
    assert "held-out judge" not in (run / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.slow_ci
def test_tiny_config_ppo_beats_sft_under_the_reward_model(tmp_path, shared_data, capsys):
    """configs/tiny_instructgpt.yaml unchanged: on the synthetic rule (prefer "Happy to help." over
    "No."), the SFT model answers either; PPO moves it to the preferred answer."""
    assert _run(shared_data, tmp_path, [], capsys) == 0
    run = tmp_path / "tiny_instructgpt"
    s = json.loads((run / "results.json").read_text())["summary"]
    assert json.loads((run / "reward_model" / "summary.json").read_text())["eval_accuracy"] >= 0.9
    assert s["ppo.reward_mean"] > s["sft.reward_mean"] + 0.3
    assert s["ppo_vs_sft.winrate"] > 0.5
    assert s["ppo_vs_sft.kl_exact_per_sequence"] > 0
    assert math.isfinite(s["ppo_vs_sft.kl_per_sequence"])
    md = (run / "report.md").read_text()
    assert re.search(r"\| win rate under the RM \(ties count half\) \| [01]\.\d{4} \|", md)


def test_held_out_prompts_skip_invalid_records_only_when_asked(tmp_path):
    """eval_prompts read like training data: a bad record stops the comparison naming file and line, unless
    eval_skip_invalid, which writes it with its reason to <run>/eval_prompts/ and keeps counting valid examples."""
    import json

    from instructkit.config import DataSource, InstructGPTConfig
    from instructkit.data.schema import DataError
    from instructkit.recipes.instructgpt import load_heldout_prompts

    path = tmp_path / "pairs.jsonl"
    good = lambda i: {"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}  # noqa: E731
    path.write_text("\n".join(json.dumps(r) for r in [good(0), {"prompt": "q", "chosen": "", "rejected": "b"},
                                                       good(1), good(2), good(3)]) + "\n")
    src = [DataSource(path=str(path), skip=1, max_examples=2)]
    strict = InstructGPTConfig(synthetic_prompts="", eval_prompts=src, eval_max_prompts=0)
    with pytest.raises(DataError, match=r"pairs\.jsonl:2"):
        load_heldout_prompts(strict, tmp_path / "run", None)
    lenient = dataclasses.replace(strict, eval_skip_invalid=True, eval_max_invalid_fraction=0.5)
    prompts = load_heldout_prompts(lenient, tmp_path / "run", None)
    assert prompts == [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]  # valid 1-2
    rejects = (tmp_path / "run" / "eval_prompts" / "rejects_0.jsonl").read_text().splitlines()
    assert len(rejects) == 1 and json.loads(rejects[0])["line"] == 2
    offset = dataclasses.replace(lenient, eval_offset=1)  # one more valid example passed over: valid 2-3
    assert load_heldout_prompts(offset, tmp_path / "run3", None) == [[{"role": "user", "content": "q2"}],
                                                                      [{"role": "user", "content": "q3"}]]
    tight = dataclasses.replace(lenient, eval_max_invalid_fraction=0.0)
    with pytest.raises(DataError, match=r"1 of 4 records rejected \(25.0%\), above max_invalid_fraction=0.0"):
        load_heldout_prompts(tight, tmp_path / "run2", None)
