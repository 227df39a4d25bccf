"""`instructkit quickstart [--config FILE] [key.sub=value ...]`: base model -> assistant on CPU, with a report."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="LoRA SFT of gemma-3-270m (base) on built-in instructions, with a before/after report",
        description="Installs and prepares gemma-3-270m if needed (Gemma Terms of Use), generates from held-out "
                    "instructions, tunes a LoRA adapter on the built-in instruction set, generates again and writes "
                    "runs/quickstart/report.md. `model.path=tiny` runs it on a tiny random model in seconds. Without "
                    "--config the defaults are the tuned settings (also in configs/quickstart.yaml).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", "-c", default=None, help="YAML config file (see configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=run_quickstart)


def load_quickstart_config(path: str | None, overrides: list[str]):
    """Defaults, then the YAML file, then overrides, merged key by key: overriding `lora.r` keeps `lora.enabled`
    (a plain dataclass load would rebuild the whole section from its class defaults)."""
    from pathlib import Path

    import yaml

    from instructkit.config import ConfigError, QuickstartConfig, apply_overrides, from_dict, to_dict

    data = to_dict(QuickstartConfig())
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        _deep_merge(data, loaded)
    # `model.path=tiny:` parses as a YAML mapping; accept it as the tiny model's name
    overrides = [o if o.replace(" ", "") not in ("model.path=tiny:",) else "model.path=tiny" for o in overrides]
    apply_overrides(data, overrides)
    try:
        return from_dict(QuickstartConfig, data)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def _deep_merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v


def run_quickstart(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from instructkit.recipes import quickstart

    cfg = load_quickstart_config(args.config, args.overrides)
    result = quickstart.main(cfg)
    print(json.dumps({k: result[k] for k in ("report", "stop_fraction_before", "stop_fraction_after",
                                             "heldout_loss_before", "heldout_loss_after", "steps")}))
    print({k: round(v) for k, v in result["timings"].items()})
    return 0
