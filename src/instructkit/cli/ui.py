"""`instructkit ui`: the local web UI (runs, data viewer, chat playground, evaluation results, launching recipes)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ui", help="local web UI: runs and curves, data viewer, chat playground, evaluations, launch a recipe",
        description="Serves a web page (Starlette on uvicorn) bound to 127.0.0.1. Data files and configs are read "
                    "from under --root, runs from --runs; nothing outside them is served.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", default=".", help="folder that data files and configs are read from")
    p.add_argument("--runs", default="runs", help="folder of run folders (relative to --root or absolute)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=run_ui)


def run_ui(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from instructkit.ui.app import serve_ui

    print(json.dumps({"ui": f"http://{args.host}:{args.port}/"}), flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: reachable from other machines", file=sys.stderr, flush=True)
    serve_ui(args.root, args.runs, args.host, args.port)
    return 0
