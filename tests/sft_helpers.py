"""Helpers for the SFT recipe tests: a small memorisable data file and a config, and running the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_data(path: Path, n: int = 24, seed: int = 0) -> Path:
    """Short arithmetic conversations (some multi-turn, some with a system prompt): easy to memorise."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = r.randint(1, 50), r.randint(1, 50)
        msgs = [{"role": "user", "content": f"Compute {a} plus {b}."},
                {"role": "assistant", "content": f"The answer is {a + b}."}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "Answer briefly."}] + msgs
        if i % 4 == 0:
            msgs += [{"role": "user", "content": "And doubled?"},
                     {"role": "assistant", "content": f"Doubled it is {2 * (a + b)}."}]
        rows.append({"messages": msgs})
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


def write_config(tmp: Path, run_name: str = "run", **overrides) -> Path:
    """A tiny SFT config; ``overrides`` are nested dicts merged section by section."""
    data = write_data(tmp / "data.jsonl") if not (tmp / "data.jsonl").exists() else tmp / "data.jsonl"
    cfg = {
        "model": {"path": "tiny:"},
        "data": {"sources": [{"path": str(data)}], "max_length": 96, "validation_fraction": 0.1, "seed": 0},
        "train": {"output_dir": str(tmp / "runs"), "run_name": run_name, "max_steps": 12, "micro_batch_size": 2,
                  "grad_accum": 2, "pack_length": 128, "lr": 0.003, "schedule": "cosine", "warmup_steps": 2,
                  "threads": 1, "seed": 0},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = tmp / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict:
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    return e


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "instructkit", *args], env=env(), cwd=ROOT, capture_output=True,
                       text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-5000:]}")
    return p


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in lines if "loss" in r]
