"""GSM8K accuracy (eval/gsm8k.py, `instructkit evaluate gsm8k`) and the GRPO experiment report (`instructkit
experiment grpo-report`), end to end through the CLI on a tiny random model: a 2-iteration GRPO run on GSM8K-format
prompts, the evaluation saved twice, the report's numbers equal to the files they come from."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from instructkit.cli import main as cli
from instructkit.cli.grpo_report import curve_summary, moving_average
from instructkit.data.schema import DataError
from instructkit.eval.gsm8k import grade, load_problems

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs in 2 boxes?", "answer": "12 * 2 = 24\n#### 24"},
    {"question": "Sam pays $1,250 for rent and $50 for food. Total?", "answer": "#### 1,300"},
]


def write_problems(path: Path) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def test_grade_uses_the_rewards_final_answer(tmp_path):
    probs = load_problems(write_problems(tmp_path / "g.jsonl"), limit=3)
    assert [p["reference"] for p in probs] == [7, 24, 1300]
    responses = ["3 + 4 = 7 apples. The answer is 7.",  # last number 7: right
                 "12 * 2 = 24 so \\boxed{25}",  # a boxed answer wins over the last number: wrong
                 "no idea"]  # no number: wrong, not answered
    metrics, samples = grade(probs, responses)
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["answered"] == pytest.approx(2 / 3)
    assert [s["correct"] for s in samples] == [True, False, False]
    assert samples[1]["extracted"] == "25" and samples[2]["extracted"] is None
    assert load_problems(tmp_path / "g.jsonl", limit=2)[-1]["reference"] == Fraction(24)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_problems(tmp_path / "bad.jsonl")


def test_moving_average_and_quarter_means():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    rows = [{"step": i + 1, "reward": v} for i, v in enumerate([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, None])]
    s = curve_summary(rows, "reward")  # 7 numbers, quarter = 1: first 0.0, last 6.0
    assert (s["points"], s["first_quarter_mean"], s["last_quarter_mean"], s["max"]) == (7, 0.0, 6.0, 6.0)


def test_gsm8k_eval_and_report_through_the_cli(tmp_path, capsys):
    data = write_problems(tmp_path / "gsm8k.jsonl")
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_grpo.yaml").read_text())
    cfg["data"]["sources"] = [{"path": str(data), "format": "gsm8k"}]
    cfg["train"].update(output_dir=str(tmp_path / "runs"), run_name="g", max_steps=2, save_every=0)
    cfg.update(rewards=[{"name": "gsm8k", "weight": 1.0}, {"name": "ends_turn", "weight": 0.1}],
               prompts_per_step=2, num_generations=2, max_new_tokens=4, kl_coef=0.1,
               dynamic_sampling=False)  # flat groups still update, so the KL is logged
    cfg["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["grpo", "--config", str(tmp_path / "g.yaml")]) == 0
    run = tmp_path / "runs" / "g"
    for side in ("before", "after"):
        assert cli(["evaluate", "gsm8k", "--model", str(run / "final"), "--data", str(data), "--limit", "2",
                    "--max-new-tokens", "4", "--save-dir", str(tmp_path / side)]) == 0
    saved = json.loads((tmp_path / "before" / "eval" / "gsm8k.json").read_text())
    assert saved["metrics"]["num_problems"] == 2 and saved["metrics"]["max_new_tokens"] == 4
    assert len(saved["samples"]) == 2
    out = tmp_path / "report"
    assert cli(["experiment", "grpo-report", "--run", str(run), "--before", str(tmp_path / "before"),
                "--after", str(tmp_path / "after"), "--eval", "gsm8k", "--out", str(out),
                "--wall", "grpo=12.5", "--command", "instructkit grpo --config g.yaml"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["before"]["accuracy"] == saved["metrics"]["accuracy"]
    assert res["delta"]["accuracy"] == 0.0  # the same model evaluated twice, greedy
    assert res["training"]["iterations"] == 2 and res["wall_seconds"] == {"grpo": 12.5}
    assert res["training"]["curves"]["kl"]["points"] == 2
    md = (out / "report.md").read_text()
    assert f"| accuracy | {saved['metrics']['accuracy']:.4f} |" in md and "instructkit grpo --config g.yaml" in md
    for png in ("curves.png", "eval.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli(["experiment", "grpo-report", "--run", str(run), "--before", str(tmp_path / "nowhere"),
                "--after", str(tmp_path / "after"), "--eval", "gsm8k", "--out", str(out)]) == 2
    assert "no gsm8k evaluation" in capsys.readouterr().out


def test_ifeval_per_instruction_pooling():
    from instructkit.cli.grpo_report import per_instruction_table

    def ev(acc):  # punctuation:no_comma is in the training catalogue, combination:repeat_prompt is not
        return {"details": {"per_instruction": {
            "punctuation:no_comma": {"n": 3, "strict_acc": acc[0]},
            "keywords:existence": {"n": 1, "strict_acc": acc[1]},
            "combination:repeat_prompt": {"n": 2, "strict_acc": acc[2]}}}}

    t = per_instruction_table(ev([1 / 3, 0.0, 0.5]), ev([1.0, 1.0, 0.0]))
    cat, other = t["pooled"]["catalogue_types"], t["pooled"]["other_types"]
    assert (cat["types"], cat["instructions"]) == (2, 4)
    assert cat["before"] == pytest.approx(1 / 4) and cat["after"] == pytest.approx(1.0)  # (1+0)/4, (3+1)/4
    assert (other["instructions"], other["before"], other["after"]) == (2, 0.5, 0.0)
