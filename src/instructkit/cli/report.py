"""`instructkit report RUN_DIR [RUN_DIR ...] --out FILE.md`: one markdown report comparing runs side by side."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="markdown report comparing runs: metric table, training curves, metric bars, sample responses",
        description="Reads each RUN_DIR's metrics.jsonl and every eval/*.json in it or its sub-folders "
                    "(written by `instructkit evaluate`), and writes FILE.md with PNG plots in FILE_files/.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run or model folders, in the order of the columns")
    p.add_argument("--out", required=True, help="the markdown file to write")
    p.add_argument("--names", nargs="+", help="column names (default: folder names)")
    p.add_argument("--samples", type=int, default=5, help="sample prompts shown side by side")
    p.add_argument("--title", default="instructkit report")
    p.set_defaults(func=_report)


def _report(args) -> int:
    from instructkit.eval.report import write_report

    try:
        path = write_report(args.runs, args.out, names=args.names, samples=args.samples, title=args.title)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    print(f"wrote {path}")
    return 0
