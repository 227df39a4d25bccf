"""A run that tells the truth at its start and on its way, through the CLI on tiny models: the data summary on the
console before the first step (counts equal data_stats.json), the dropped-fraction ceiling that stops a run, relative
data paths resolved against the config file, resume falling back past a truncated checkpoint, a progress bar for every
recipe, and a console without library noise."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from instructkit.cli import main as cli
from pref_helpers import write_pairs
from sft_helpers import ROOT, env, write_config, write_data

CONFIGS = ROOT / "configs"


def records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if not k.endswith("_per_s")}
            for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_sft_prints_the_data_summary_before_the_first_step(tmp_path, capsys):
    cfg = write_config(tmp_path, "r", data={"max_length": 32, "validation_fraction": 0.0},
                       train={"max_steps": 1, "pack_length": 32})
    assert cli(["sft", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    stats = json.loads((tmp_path / "runs" / "r" / "data_stats.json").read_text())["train"]
    dropped = sum(stats["dropped"].values())
    assert dropped > 0 and stats["truncated"] > 0
    line = next(x for x in err.splitlines() if x.startswith("data: "))
    assert line.startswith(f"data: 24 records read, 0 rejected; {stats['total']} training examples: {stats['kept']} "
                           f"kept, {stats['truncated']} truncated, {dropped} dropped")
    for reason, n in stats["dropped"].items():
        assert f"{reason} {n}" in line
    assert err.index(line) < err.index("step 1/1")  # before the first step's progress line
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["data_counts"]["kept"] == stats["kept"]


def test_dropped_fraction_ceiling_stops_the_run(tmp_path, capsys):
    cfg = write_config(tmp_path, "r", data={"max_length": 32, "validation_fraction": 0.0, "max_dropped_fraction": 0.05},
                       train={"max_steps": 1, "pack_length": 32})
    assert cli(["sft", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "data.max_dropped_fraction=0.05" in err and "no_supervised_tokens_after_truncation" in err
    assert not (tmp_path / "runs" / "r" / "checkpoints").exists()
    # DPO: pairs longer than max_length are dropped, counted, and the ceiling stops the run before any step
    pairs = write_pairs(tmp_path / "pairs.jsonl", 16, 0)
    argv = ["dpo", "--config", str(CONFIGS / "tiny_dpo.yaml"), f"data.sources=[{{path: {pairs}}}]",
            "data.validation_fraction=0", "data.max_length=24", f"train.output_dir={tmp_path}", "train.run_name=d",
            "train.max_steps=1", "data.max_dropped_fraction=0.5"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "data: 16 records read, 0 rejected; 16 training pairs: 0 kept, 0 truncated, 16 dropped (100%: too_long 16)" \
        in err and "data.max_dropped_fraction=0.5" in err
    assert not (tmp_path / "d" / "metrics.jsonl").exists()


def test_relative_data_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    sub = tmp_path / "project" / "configs"
    sub.mkdir(parents=True)
    write_data(sub.parent / "data.jsonl")
    cfg = yaml.safe_load(write_config(tmp_path, "r", train={"max_steps": 1}).read_text())
    cfg["data"]["sources"] = [{"path": "../data.jsonl"}]  # relative to the config file's folder
    (sub / "sft.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli(["sft", "--config", str(sub / "sft.yaml")]) == 0
    saved = yaml.safe_load((tmp_path / "runs" / "r" / "config.yaml").read_text())
    assert saved["data"]["sources"][0]["path"] == str((sub.parent / "data.jsonl").resolve())
    # a path given on the command line keeps resolving against the current folder
    assert cli(["sft", "--config", str(sub / "sft.yaml"), "data.sources=[{path: ../data.jsonl}]"]) == 2


def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path, capsys, caplog):
    cfg = write_config(tmp_path, "ref", train={"max_steps": 6, "save_every": 2, "keep_checkpoints": 3})
    assert cli(["sft", "--config", str(cfg)]) == 0
    cfg = write_config(tmp_path, "r", train={"max_steps": 6, "save_every": 2, "keep_checkpoints": 3})
    assert cli(["sft", "--config", str(cfg)]) == 0
    run = tmp_path / "runs" / "r"
    # the newest checkpoints are cut short on disk (a full disk, a copy interrupted): 6 and 4 cannot be read back
    for step in (6, 4):
        f = run / "checkpoints" / f"step-{step}" / "trainable.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert cli(["sft", "--config", str(cfg)]) == 0  # resume: auto
    err = caplog.text  # a warning (on the console through logging's last-resort handler outside pytest)
    assert re.search(r"skipped checkpoint step-6: it cannot be read back \(.*SafetensorError.*\); trying step-4", err)
    assert "skipped checkpoint step-4" in err and "trying step-2" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2
    assert records(run) == records(tmp_path / "runs" / "ref")


def test_every_recipe_shows_progress_and_the_console_has_no_library_noise(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 16, 0)
    argv = [sys.executable, "-m", "instructkit", "reward-model", "--config", str(CONFIGS / "tiny_reward_model.yaml"),
            f"data.sources=[{{path: {pairs}}}]", "data.validation=[]", "data.validation_fraction=0.25",
            f"train.output_dir={tmp_path}", "train.run_name=rm", "train.max_steps=3", "train.threads=1"]
    p = subprocess.run(argv, env=env(), cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    err = p.stderr
    assert "data: 16 records read" in err
    assert re.search(r"step 3/3 loss=\d\.\d{4} tokens/s=\d+ eta 0:00", err)
    assert "\r" not in err and "\x1b[" not in err  # no carriage returns or ANSI codes in a log
    assert "Warning" not in err and "deprecated" not in err, err


def test_tokenisation_is_cached_by_data_template_and_tokenizer(tmp_path, capsys):
    cfg = write_config(tmp_path, "a", train={"max_steps": 1})
    assert cli(["sft", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"tokenised: \d+ rows computed, cached in ", err)
    cfg = write_config(tmp_path, "b", train={"max_steps": 1})  # another run on the same data: a cache hit
    assert cli(["sft", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"tokenised: \d+ rows from the cache ", err) and "computed" not in err.split("tokenised:")[1][:40]
    stats = [json.loads((tmp_path / "runs" / n / "data_stats.json").read_text()) for n in ("a", "b")]
    assert stats[0] == stats[1]
    assert records(tmp_path / "runs" / "a")[0]["loss"] == records(tmp_path / "runs" / "b")[0]["loss"]
    # another template or other data: computed again
    cfg = write_config(tmp_path, "c", train={"max_steps": 1}, data={"mask": "last_assistant", "max_length": 96,
                                                                    "validation_fraction": 0.1, "seed": 0})
    assert cli(["sft", "--config", str(cfg)]) == 0
    assert re.search(r"tokenised: \d+ rows computed", capsys.readouterr().err)
