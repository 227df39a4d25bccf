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


def main(argv: list[str] | None = None) -> int:
    from instructkit.config import ConfigError
    from instructkit.data.schema import DataError

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
