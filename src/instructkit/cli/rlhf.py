"""`instructkit reward-model | ppo | dpo | kto | orpo | simpo | grpo --config FILE [key.sub=value ...]`: the
preference-learning and RL stages."""

from __future__ import annotations

import argparse
import json
import sys

_COMMANDS = {
    "reward-model": ("reward model: a scalar head on a backbone, pairwise (Bradley-Terry) loss on preference pairs",
                     "RewardModelConfig", "reward_model", "configs/tiny_reward_model.yaml"),
    "ppo": ("PPO with a per-token KL penalty to the frozen SFT model, GAE, clipped losses, optional PPO-ptx",
            "PPOConfig", "ppo", "configs/tiny_ppo.yaml"),
    "dpo": ("Direct Preference Optimization (sigmoid, cDPO label smoothing, IPO) against a frozen reference",
            "DPOConfig", "dpo", "configs/tiny_dpo.yaml"),
    "kto": ("Kahneman-Tversky Optimization on unpaired desirable / undesirable completions against a frozen reference",
            "KTOConfig", "kto", "configs/tiny_kto.yaml"),
    "orpo": ("ORPO: SFT plus an odds-ratio preference term in one stage, no reference model",
             "ORPOConfig", "orpo", "configs/tiny_orpo.yaml"),
    "simpo": ("SimPO: a length-normalised reward margin on preference pairs, no reference model",
              "SimPOConfig", "simpo", "configs/tiny_simpo.yaml"),
    "grpo": ("GRPO / RLOO: RL with verifiable rewards, G samples per prompt, group-relative advantages, clip-higher",
             "GRPOConfig", "grpo", "configs/tiny_grpo.yaml"),
}


def register(subparsers) -> None:
    for name, (help_text, _, _, example) in _COMMANDS.items():
        p = subparsers.add_parser(
            name, help=help_text,
            description=f"{help_text[0].upper()}{help_text[1:]}. Settings come from --config (YAML) and key.sub=value "
                        f"overrides, e.g. `instructkit {name} --config {example} train.max_steps=5`. Metrics go to "
                        "<train.output_dir>/<train.run_name>/metrics.jsonl.",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        p.add_argument("--config", "-c", default=None, help="YAML config file (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        p.set_defaults(func=_run, rlhf_command=name)


def _run(args) -> int:
    import importlib
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from instructkit import config as config_module
    from instructkit.training.loop import NonFiniteError

    _, cls_name, module, _ = _COMMANDS[args.rlhf_command]
    cfg = config_module.load_config(getattr(config_module, cls_name), args.config, args.overrides)
    recipe = importlib.import_module(f"instructkit.recipes.{module}")
    try:
        summary = recipe.main(cfg)
    except NonFiniteError as e:
        print(f"error: training stopped: {e} (no checkpoint was written after it)", file=sys.stderr)
        return 1
    if isinstance(summary, dict) and summary.get("run_dir"):
        from instructkit.training.tracking import finish_run

        finish_run(summary["run_dir"], summary)  # the trackers of train.report_to get the final summary
    print(json.dumps(summary, default=str))
    return 0
