"""`instructkit sft --config FILE [key.sub=value ...]`: supervised fine-tuning (full, LoRA, QLoRA)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning (full, LoRA or QLoRA) on conversations",
        description="Supervised fine-tuning. Settings come from --config (YAML) and key.sub=value overrides, e.g. "
                    "`instructkit sft --config configs/tiny_sft.yaml train.max_steps=20 lora.enabled=true`. "
                    "Several processes: `accelerate launch --num_processes 2 --cpu -m instructkit sft ...`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", "-c", default=None, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=run_sft)


def run_sft(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from instructkit.config import SFTConfig, load_config
    from instructkit.recipes import sft
    from instructkit.training.loop import NonFiniteError

    cfg = load_config(SFTConfig, args.config, args.overrides)
    try:
        summary = sft.main(cfg)
    except NonFiniteError as e:
        print(f"error: training stopped: {e} (no checkpoint was written after it)", file=sys.stderr)
        return 1
    from instructkit.training.tracking import finish_run

    finish_run(summary["run_dir"], summary)  # the trackers of train.report_to get the final summary
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: summary[k] for k in ("run_dir", "steps", "first_loss", "last_loss", "val_loss", "final")}))
    return 0
