"""Evaluation files next to the model, and the markdown report comparing runs."""

from __future__ import annotations

import json

import pytest

from instructkit.cli import main
from instructkit.eval.report import load_run, save_eval, shared_samples, write_report


def _make_run(root, name, losses, evals, rl=False):
    run = root / name
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for step, loss in enumerate(losses, 1):
            row = {"step": step, "loss": loss, "lr": 1e-4}
            if rl:
                row |= {"reward": 0.1 * step, "kl": 0.01 * step}
            f.write(json.dumps(row) + "\n")
        f.write('{"step": 99, "loss": 0.')  # a line cut by a kill mid-write is ignored
    for ev, (metrics, samples) in evals.items():
        save_eval(run / "final", ev, metrics, samples=samples)  # the model sits in a sub-folder of the run
    return run


@pytest.fixture
def runs(tmp_path):
    base = _make_run(tmp_path, "base", [], {
        "ifeval": ({"prompt_level_strict_acc": 0.10, "inst_level_strict_acc": 0.2, "num_prompts": 541},
                   [{"prompt": "Say hi | politely", "response": "hi\nthere"}, {"prompt": "only base", "response": "x"}]),
        "responses": ({"stop_rate": 0.0}, []),
    })
    (base / "metrics.jsonl").unlink()  # the base model was never trained
    sft = _make_run(tmp_path, "sft", [2.0, 1.5, 1.2], {
        "ifeval": ({"prompt_level_strict_acc": 0.25, "inst_level_strict_acc": 0.35, "num_prompts": 541},
                   [{"prompt": "Say hi | politely", "response": "Hello!"}]),
        "responses": ({"stop_rate": 0.95}, []),
        "perplexity": ({"heldout_loss": 1.3, "perplexity": 3.669}, []),
    })
    with open(sft / "metrics.jsonl", "a") as f:  # a final line with only the run's evaluation results
        f.write(json.dumps({"step": 3, "final_accuracy": 0.5}) + "\n")
    ppo = _make_run(tmp_path, "ppo", [1.0, 0.9], {"responses": ({"stop_rate": 1.0}, [])}, rl=True)
    return base, sft, ppo


def test_save_eval_writes_the_documented_file(tmp_path):
    p = save_eval(tmp_path / "m", "ifeval", {"prompt_level_strict_acc": 0.5}, samples=[{"prompt": "a", "response": "b"}])
    assert p == tmp_path / "m" / "eval" / "ifeval.json"
    doc = json.loads(p.read_text())
    assert doc["eval"] == "ifeval" and doc["metrics"] == {"prompt_level_strict_acc": 0.5}
    assert doc["samples"] == [{"prompt": "a", "response": "b"}] and "created" in doc
    assert not list((tmp_path / "m" / "eval").glob(".*tmp"))  # atomic write left no temp file
    with pytest.raises(ValueError):
        save_eval(tmp_path, "../escape", {})


def test_load_run_finds_curves_and_evals(runs):
    base, sft, ppo = runs
    r = load_run(sft)
    assert [row["loss"] for row in r.curve] == [2.0, 1.5, 1.2]  # the cut last line is skipped
    assert set(r.evals) == {"ifeval", "responses", "perplexity"}
    assert r.metric_table()["perplexity.heldout_loss"] == 1.3
    assert load_run(base).curve == []
    with pytest.raises(FileNotFoundError):
        load_run(base / "missing")


def test_shared_samples_side_by_side(runs):
    rs = [load_run(d) for d in runs]
    shared = shared_samples(rs, limit=5)
    # only "Say hi | politely" is answered by two runs; "only base" by one
    assert shared == [("Say hi | politely", ["hi\nthere", "Hello!", None])]


def test_report_cli_writes_markdown_and_pngs(runs, tmp_path, capsys):
    out = tmp_path / "out" / "report.md"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    md = out.read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| metric |"))
    assert header == "| metric | base | sft | ppo |"
    row = next(line for line in lines if line.startswith("| ifeval.prompt_level_strict_acc |"))
    assert row == "| ifeval.prompt_level_strict_acc | 0.1000 | 0.2500 | — |"
    assert "| responses.stop_rate | 0.0000 | 0.9500 | 1.0000 |" in lines
    assert "| ifeval.num_prompts | 541 | 541 | — |" in lines
    # the shared sample, with the pipe escaped and newlines as <br>
    assert "| Say hi \\| politely | hi<br>there | Hello! | — |" in lines
    files = out.parent / "report_files"
    for png in ("metrics.png", "curve_loss.png", "curve_reward.png", "curve_kl.png"):
        data = (files / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
        assert f"report_files/{png}" in md
    assert "- sft: 3 logged steps, last step 3: loss 1.2000, lr 0.0001" in lines
    assert "- ppo: 2 logged steps, last step 2: loss 0.9000, reward 0.2000, kl 0.0200, lr 0.0001" in lines
    assert (files / "curve_lr.png").exists() and not (files / "curve_score.png").exists()  # only what was logged


def test_report_with_no_results_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    out = write_report([tmp_path / "empty"], tmp_path / "r.md")
    md = out.read_text()
    assert "No evaluation results found" in md and "No `metrics.jsonl` found." in md


def test_evaluate_run_then_report_end_to_end(tiny_model_dir, shared_data, tmp_path, capsys):
    """`evaluate run` on the tiny model writes the four eval files next to it; `report` tabulates them."""
    import shutil

    model_dir = tmp_path / "runs" / "tiny" / "final"
    shutil.copytree(tiny_model_dir, model_dir)
    code = main(["evaluate", "run", "--config", "configs/evaluate.yaml", f"model.path={model_dir}",
                 f"ifeval_prompts={shared_data / 'ifeval_input_data.jsonl'}", "ifeval_limit=3", "max_new_tokens=3",
                 "heldout_limit=4", "stop_rate_limit=3", "refusal_max_new_tokens=2", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"ifeval", "perplexity", "stop_rate", "refusal"}
    assert {p.name for p in (model_dir / "eval").iterdir()} == {"ifeval.json", "perplexity.json", "responses.json",
                                                                 "refusal.json"}
    ife = json.loads((model_dir / "eval" / "ifeval.json").read_text())
    assert ife["metrics"]["num_prompts"] == 3 and len(ife["samples"]) == 3
    assert 0 <= ife["metrics"]["prompt_level_strict_acc"] <= ife["metrics"]["prompt_level_loose_acc"] <= 1
    assert summary["perplexity"]["metrics"]["examples"] + summary["perplexity"]["metrics"][
        "skipped_no_supervision"] == 4
    out = tmp_path / "report.md"
    assert main(["report", str(tmp_path / "runs" / "tiny"), "--out", str(out)]) == 0
    md = out.read_text()
    for key in ("ifeval.prompt_level_strict_acc", "perplexity.heldout_loss", "responses.stop_rate",
                "refusal.refusal_rate_harmful", "refusal.refusal_rate_benign"):
        assert f"| {key} |" in md
