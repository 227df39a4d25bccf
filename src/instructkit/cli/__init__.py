"""`instructkit <command> ...`: the command-line entry point.

Each command group lives in its own module under instructkit/cli/ and exposes ``register(subparsers)``, which adds its
argparse parser(s) and sets ``func`` to a handler ``func(args) -> int``. Handlers import heavy libraries (torch,
transformers) lazily so ``--help`` stays fast. The list below is explicit on purpose: no plugin registry.

Exit codes: 0 success, 1 a check failed (lint, validation), 2 bad usage or bad input (config, data, missing file).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from instructkit import __version__

# One module per command group, in the order `--help` lists them.
COMMAND_MODULES = (
    "data",
    "template",
    "models",
    "quickstart",
    "export",
    "train",
    "rlhf",
    "generate",
    "evaluate",
    "report",
    "chat",
    "tasks",
    "experiment",
    "ui",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructkit",
        description="Instruction tuning, end to end: data, templates, SFT, reward model, PPO, DPO, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"instructkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"instructkit.cli.{name}").register(sub)
    return parser


def quiet_libraries() -> None:
    """The console carries instructkit's own lines, not library noise: transformers' and the Hub's progress bars and
    advisory warnings, and FutureWarnings/DeprecationWarnings raised inside torch, transformers, peft or accelerate
    (set TRANSFORMERS_VERBOSITY=info or PYTHONWARNINGS to see them again)."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("PYTHONWARNINGS"):
        for lib in ("torch", "transformers", "peft", "accelerate", "huggingface_hub"):
            warnings.filterwarnings("ignore", category=FutureWarning, module=lib)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=lib)
    if "transformers" in sys.modules:  # already imported (tests, notebooks): set it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from instructkit.config import ConfigError
    from instructkit.data.schema import DataError

    quiet_libraries()

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
