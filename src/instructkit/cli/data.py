"""`instructkit data ...`: inspect, convert, validate, mix, dedup and filter data files.

    instructkit data inspect FILE [--format F] [--tokenizer PATH] [--template NAME] [--json]
    instructkit data convert IN OUT [--format F]
    instructkit data validate FILE [--skip-invalid --rejects F --max-invalid-fraction X]
    instructkit data mix CONFIG --out OUT
    instructkit data dedup IN OUT [--threshold 0.8]
    instructkit data filter IN OUT [--min-words N --blacklist WORDS --max-length N]

Exit codes: 0 ok; 1 validation failed (``validate`` only); 2 bad input (a bad record in inspect/convert, a missing
file, a bad config).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _common_read_flags(p: argparse.ArgumentParser, *, formats: bool = True) -> None:
    if formats:
        p.add_argument("--format", default="auto", help="source format (default: detect from the first records)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad records instead of stopping at the first")
    p.add_argument("--rejects", default=None, metavar="FILE", help="with --skip-invalid: write rejected records here")
    p.add_argument(
        "--max-invalid-fraction", type=float, default=None, metavar="X",
        help="with --skip-invalid: fail if more than this fraction of records is rejected (default 0.0; inspect: 1.0)",
    )
    p.add_argument("--all-paths", action="store_true", help="oasst: every root-to-leaf path, not only the best-ranked")
    p.add_argument("--split", default=None, help="split of a saved Hugging Face DatasetDict (default: train)")
    p.add_argument("--tool-call-format", default="auto", choices=("auto", "hermes", "none"),
                   help="<tool_call> blocks in assistant content: parse when the example has tools (auto), always "
                        "(hermes) or never (none)")
    p.add_argument("--split-think", action="store_true",
                   help="move a leading <think>...</think> block of assistant content into reasoning")


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="inspect, convert, validate, mix, deduplicate and filter data files")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = sub.add_parser("inspect", help="format, counts, roles, length statistics and a rendered sample")
    p.add_argument("file")
    _common_read_flags(p)
    p.add_argument("--tokenizer", default=None, help="model folder (or zoo name) whose tokenizer counts tokens")
    p.add_argument("--template", default=None, help="chat template for the rendered sample (default: the tokenizer's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (default: count them)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert to internal JSONL (conversations, pairs, unpaired or text)")
    p.add_argument("input")
    p.add_argument("output")
    _common_read_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("validate", help="check every record; exit 1 if the file is invalid")
    p.add_argument("file")
    _common_read_flags(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("mix", help="mix sources from a YAML mixture config into one JSONL")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. total=1000 seed=1)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_mix)

    p = sub.add_parser("dedup", help="remove exact and near duplicates (MinHash + LSH)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--format", default="auto")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of word 3-grams (default 0.8)")
    p.add_argument("--exact-only", action="store_true", help="only exact duplicates (normalised text)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    p.add_argument("--ngram", type=int, default=3, help="words per shingle (default 3)")
    p.add_argument("--report", default=None, metavar="FILE", help="write one JSON line per removed example")
    p.set_defaults(func=cmd_dedup)

    p = sub.add_parser("filter", help="heuristic quality filters with counts per filter")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--format", default="auto")
    p.add_argument("--min-words", type=int, default=1, help="minimum words in a response (default 1)")
    p.add_argument("--blacklist", default="", help="comma-separated words/phrases; 'self-instruct' for that list")
    p.add_argument("--blacklist-in", default="both", choices=("prompt", "response", "both"))
    p.add_argument("--max-length", type=int, default=None, help="maximum response words")
    p.add_argument("--outlier-z", type=float, default=3.5, help="robust z-score for length outliers (0: off)")
    p.add_argument(
        "--eval", action="append", default=[], metavar="FILE", help="eval set to check contamination against"
    )
    p.add_argument("--report", default=None, metavar="FILE", help="write one JSON line per removed example")
    p.set_defaults(func=cmd_filter)

    _add_constraints_parser(sub)
    _reject_sample_parser(sub)

    from instructkit.cli.tasks import add_build_mixture_parser  # task bank mixtures (cli/tasks.py)

    add_build_mixture_parser(sub)


# ---------------------------------------------------------------------------------------------------------------------


def _read(args, path: str, stats):
    from instructkit.data.io import iter_examples

    return iter_examples(
        path,
        getattr(args, "format", "auto"),
        skip_invalid=getattr(args, "skip_invalid", False),
        rejects_path=getattr(args, "rejects", None),
        max_invalid_fraction=getattr(args, "max_invalid_fraction", None) or 0.0,
        stats=stats,
        all_paths=getattr(args, "all_paths", False),
        split=getattr(args, "split", None),
        tool_call_format=getattr(args, "tool_call_format", "auto"),
        split_think=getattr(args, "split_think", False),
    )


def describe(values: list[int | float]) -> dict[str, float] | None:
    if not values:
        return None
    s = sorted(values)
    p95 = s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]
    return {
        "min": s[0],
        "mean": round(statistics.fmean(s), 2),
        "median": statistics.median(s),
        "p95": p95,
        "max": s[-1],
    }


def _stats_line(d: dict | None) -> str:
    if not d:
        return "-"
    return f"min {d['min']}  mean {d['mean']}  median {d['median']}  p95 {d['p95']}  max {d['max']}"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.exists():
        from instructkit.models.zoo import resolve_model

        p = resolve_model(path, install_missing=False)
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def make_renderer(tokenizer, template: str | None):
    """The Renderer if chat/render.py exists (it is built alongside this module); None only if that module is absent."""
    try:
        from instructkit.chat.render import Renderer
    except ModuleNotFoundError as e:
        if e.name in ("instructkit.chat.render", "instructkit.chat.templates"):
            return None
        raise
    return Renderer(tokenizer, template=template or "auto")


def _mask_view(tokenizer, ids: list[int], mask: list[int]) -> str:
    """The rendered text with supervised spans wrapped in [[ ]]: what the model is trained to produce."""
    out, run, cur = [], [], None
    for t, m in zip(ids, mask):
        if cur is not None and m != cur:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if cur else text)
            run = []
        run.append(t)
        cur = m
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if cur else text)
    return "".join(out)


def cmd_inspect(args) -> int:
    from instructkit.data.formats import format_kind
    from instructkit.data.io import ReadStats
    from instructkit.data.schema import ROLES, Conversation, PreferencePair, TextExample, UnpairedExample

    if not args.strict:
        # Inspection reports bad records (kept/rejected, reasons) instead of stopping at the first one.
        args.skip_invalid = True
        if args.max_invalid_fraction is None:
            args.max_invalid_fraction = 1.0
    if args.template and not args.tokenizer:
        print("error: --template needs --tokenizer", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    try:
        renderer = make_renderer(tokenizer, args.template) if tokenizer is not None else None
    except ValueError as e:  # chat.templates.TemplateError: unknown template, missing special tokens, ...
        print(f"error: template: {e}", file=sys.stderr)
        return 2
    import jinja2

    render_errors: list[str] = []

    stats = ReadStats()
    roles = {r: 0 for r in ROLES}
    kinds = {"conversation": 0, "preference": 0, "unpaired": 0, "text": 0}
    content = {"examples_with_tools": 0, "tool_definitions": 0, "tool_calls": 0, "tool_results": 0,
               "reasoning_turns": 0, "weighted_turns": {"0": 0, "1": 0},
               "labels": {"desirable": 0, "undesirable": 0}}
    text_chars: list[int] = []
    turns: list[int] = []
    prompt_chars: list[int] = []
    response_chars: list[int] = []
    response_words: list[int] = []
    rejected_chars: list[int] = []
    tokens: list[int] = []
    supervised: list[int] = []
    first = None
    for ex in _read(args, args.file, stats):
        if first is None:
            first = ex
        if getattr(ex, "tools", None):
            content["examples_with_tools"] += 1
            content["tool_definitions"] += len(ex.tools)
        if isinstance(ex, TextExample):
            kinds["text"] += 1
            text_chars.append(len(ex.text))
            if tokenizer is not None:
                tokens.append(len(tokenizer.encode(ex.text, add_special_tokens=False)))
            continue
        if isinstance(ex, PreferencePair):
            every = ex.prompt + ex.chosen + ex.rejected
        elif isinstance(ex, UnpairedExample):
            every = ex.prompt + ex.completion
            content["labels"]["desirable" if ex.label else "undesirable"] += 1
        else:
            every = ex.messages
        for m in every:
            content["tool_calls"] += len(m.tool_calls or ())
            content["tool_results"] += m.role == "tool"
            content["reasoning_turns"] += m.reasoning is not None
            if m.weight is not None:
                content["weighted_turns"][str(int(m.weight))] += 1
        if isinstance(ex, Conversation):
            kinds["conversation"] += 1
            msgs = ex.messages
            turns.append(len(msgs))
            last_a = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=len(msgs))
            prompt_chars.append(sum(len(m.content) for m in msgs[:last_a]))
            if last_a < len(msgs):
                response_chars.append(len(msgs[last_a].content))
                response_words.append(len(msgs[last_a].content.split()))
            conv = ex
        elif isinstance(ex, UnpairedExample):
            kinds["unpaired"] += 1
            msgs = ex.prompt + ex.completion
            turns.append(len(ex.prompt))
            prompt_chars.append(sum(len(m.content) for m in ex.prompt))
            completion = "\n".join(m.content for m in ex.completion)
            response_chars.append(len(completion))
            response_words.append(len(completion.split()))
            conv = ex.conversation()
        else:
            kinds["preference"] += 1
            msgs = ex.prompt + ex.chosen
            turns.append(len(ex.prompt))
            prompt_chars.append(sum(len(m.content) for m in ex.prompt))
            chosen = "\n".join(m.content for m in ex.chosen)
            response_chars.append(len(chosen))
            response_words.append(len(chosen.split()))
            rejected_chars.append(sum(len(m.content) for m in ex.rejected))
            conv = ex.chosen_conversation()
        for m in msgs:
            roles[m.role] = roles.get(m.role, 0) + 1
        if tokenizer is not None:
            if renderer is not None:
                try:
                    if conv.messages[-1].role != "assistant":
                        tokens.append(len(renderer.render_prompt(conv.messages)))
                        supervised.append(0)
                    else:
                        r = renderer.render(conv)
                        tokens.append(len(r.input_ids))
                        supervised.append(r.n_supervised)
                except (ValueError, jinja2.TemplateError) as e:  # e.g. a template that refuses a role
                    render_errors.append(f"{ex.meta.get('source')} {ex.meta.get('line', ex.meta.get('record'))}: {e}")
            else:
                tokens.append(sum(len(tokenizer.encode(m.content, add_special_tokens=False)) for m in conv.messages))

    kind = format_kind(stats.format) if stats.format else "conversation"
    report: dict[str, Any] = {
        "file": args.file,
        "format": stats.format,
        "format_detected": args.format == "auto",
        "kind": kind,
        "records": stats.total,
        "kept": stats.kept,
        "rejected": stats.rejected,
        "by_reason": dict(stats.by_reason.most_common()),
        "examples": stats.examples,
        "roles": roles,
        "turns": describe(turns),
        "prompt_chars": describe(prompt_chars),
        "response_chars": describe(response_chars),
        "response_words": describe(response_words),
        "rejected_chars": describe(rejected_chars),
        "text_chars": describe(text_chars),
        "content": content,
        "tokens": describe(tokens),
        "supervised_tokens": describe(supervised) if renderer is not None else None,
        "render_errors": len(render_errors),
        "first_render_error": render_errors[0] if render_errors else None,
        "sample": None,
    }
    if first is not None:
        sample: dict[str, Any] = {"example": first.to_dict()}
        if renderer is not None and not isinstance(first, TextExample):
            conv = (first if isinstance(first, Conversation) else first.conversation()
                    if isinstance(first, UnpairedExample) else first.chosen_conversation())
            try:
                if conv.messages[-1].role == "assistant":
                    r = renderer.render(conv)
                    sample.update(
                        template=renderer.name,
                        tokens=len(r.input_ids),
                        supervised_tokens=r.n_supervised,
                        rendered=_mask_view(tokenizer, r.input_ids, r.loss_mask),
                    )
                else:
                    ids = renderer.render_prompt(conv.messages)
                    sample.update(
                        template=renderer.name, tokens=len(ids), supervised_tokens=0, rendered=tokenizer.decode(ids)
                    )
            except (ValueError, jinja2.TemplateError) as e:
                sample["render_error"] = str(e)
        elif tokenizer is not None:
            sample["render_skipped"] = "instructkit.chat.render is not available"
        report["sample"] = sample

    if args.json:
        print(json.dumps(report, ensure_ascii=False, default=str))
        return 0
    w = print
    w(f"file:      {args.file}")
    w(f"format:    {stats.format}{' (detected)' if args.format == 'auto' else ''}  [{kind}]")
    w(f"records:   {stats.total}  (kept {stats.kept}, rejected {stats.rejected})  ->  {stats.examples} examples")
    for reason, n in stats.by_reason.most_common(10):
        w(f"  rejected {n} x {reason}")
    w("roles:     " + ", ".join(f"{r} {n}" for r, n in roles.items()))
    c = content
    w(f"tools:     {c['examples_with_tools']} examples with tools ({c['tool_definitions']} definitions), "
      f"{c['tool_calls']} tool calls, {c['tool_results']} tool results")
    w(f"reasoning: {c['reasoning_turns']} turns;  weights: {c['weighted_turns']['1']} turns weight 1, "
      f"{c['weighted_turns']['0']} weight 0")
    if kind == "unpaired":
        w(f"labels:    {c['labels']['desirable']} desirable, {c['labels']['undesirable']} undesirable")
    if text_chars:
        w(f"text chars:      {_stats_line(report['text_chars'])}")
    w(f"turns:     {_stats_line(report['turns'])}" + ("  (prompt turns)" if kind == "preference" else ""))
    w(f"prompt chars:    {_stats_line(report['prompt_chars'])}")
    w(f"response chars:  {_stats_line(report['response_chars'])}" + ("  (chosen)" if kind == "preference" else ""))
    w(f"response words:  {_stats_line(report['response_words'])}")
    if rejected_chars:
        w(f"rejected chars:  {_stats_line(report['rejected_chars'])}")
    if tokenizer is not None:
        w(f"tokens:          {_stats_line(report['tokens'])}")
        if report["supervised_tokens"]:
            w(f"supervised:      {_stats_line(report['supervised_tokens'])}")
        if render_errors:
            w(f"render errors:   {len(render_errors)} (first: {render_errors[0]})")
    if report["sample"]:
        s = report["sample"]
        if "rendered" in s:
            w(
                f"\nsample (template {s['template']}, {s['tokens']} tokens, "
                f"{s['supervised_tokens']} supervised in [[ ]]):"
            )
            w(s["rendered"])
        else:
            w("\nsample:")
            w(json.dumps(s["example"], ensure_ascii=False, indent=2)[:2000])
            if "render_skipped" in s:
                w(f"(render skipped: {s['render_skipped']})")
            if "render_error" in s:
                w(f"(render failed: {s['render_error']})")
    return 0


def cmd_convert(args) -> int:
    from instructkit.data.io import ReadStats, write_jsonl

    stats = ReadStats()
    n = write_jsonl(args.output, _read(args, args.input, stats))
    print(
        f"wrote {n} examples ({stats.format}) to {args.output}; records {stats.total}: kept {stats.kept}, "
        f"rejected {stats.rejected}",
        file=sys.stderr,
    )
    return 0


def cmd_validate(args) -> int:
    from instructkit.data.formats import canonical_format
    from instructkit.data.io import ReadStats
    from instructkit.data.schema import DataError

    canonical_format(args.format)  # an unknown format name is bad usage (exit 2), not an invalid file
    stats = ReadStats()
    try:
        for _ in _read(args, args.file, stats):
            pass
    except DataError as e:
        print(f"invalid: {e}", file=sys.stderr)
        if args.skip_invalid:
            _print_counts(stats)
        return 1
    _print_counts(stats)
    if stats.rejected:
        limit = args.max_invalid_fraction or 0.0
        print(f"invalid records: {stats.rejected} (within --max-invalid-fraction {limit})")
        return 1 if limit == 0 else 0
    print("valid")
    return 0


def _print_counts(stats) -> None:
    print(
        f"format {stats.format}: records {stats.total}, kept {stats.kept}, rejected {stats.rejected}, "
        f"examples {stats.examples}"
    )
    for reason, n in stats.by_reason.most_common():
        print(f"  {n} x {reason}")


def cmd_mix(args) -> int:
    from instructkit.data.io import write_jsonl
    from instructkit.data.mixture import load_mixture_config, mix_from_config

    cfg = load_mixture_config(args.config, args.overrides)
    mixture = mix_from_config(cfg, base_dir=Path(args.config).parent)
    write_jsonl(args.out, mixture.examples)
    print(f"wrote {len(mixture.examples)} examples to {args.out} ({cfg.strategy}, seed {cfg.seed})")
    for name, d in mixture.summary()["sources"].items():
        print(f"  {name}: {d['count']} of {d['size']} (rate {d['rate']:.4f})")
    return 0


def _write_report(path: str | None, rows) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def cmd_dedup(args) -> int:
    from instructkit.data.dedup import dedup
    from instructkit.data.io import read_examples, write_jsonl

    examples = read_examples(args.input, args.format)
    kept, report = dedup(
        examples, near=not args.exact_only, threshold=args.threshold, num_perm=args.num_perm, ngram=args.ngram
    )
    write_jsonl(args.output, kept)
    c = report.counts()
    print(f"kept {report.kept} of {report.total}; removed {c['exact']} exact and {c['near']} near duplicates")
    _write_report(
        args.report,
        (
            {"index": r.index, "kind": r.kind, "duplicate_of": r.duplicate_of, "similarity": round(r.similarity, 4),
             "meta": examples[r.index].meta}
            for r in report.removed
        ),
    )
    return 0


def cmd_filter(args) -> int:
    from instructkit.data.io import read_examples, write_jsonl
    from instructkit.data.quality import SELF_INSTRUCT_BLACKLIST, QualityConfig, quality_filter, prompt_and_response

    words: list[str] = []
    for item in args.blacklist.split(","):
        item = item.strip()
        if item.lower() in ("self-instruct", "self_instruct"):
            words += SELF_INSTRUCT_BLACKLIST
        elif item:
            words.append(item)
    cfg = QualityConfig(
        min_response_words=args.min_words,
        blacklist=tuple(words),
        blacklist_in=args.blacklist_in,
        max_response_length=args.max_length,
        outlier_z=args.outlier_z or None,
    )
    eval_texts = []
    for path in args.eval:
        for ex in read_examples(path):
            eval_texts.append("\n".join(prompt_and_response(ex)))
    examples = read_examples(args.input, args.format)
    kept, report = quality_filter(examples, cfg, eval_texts=eval_texts)
    write_jsonl(args.output, kept)
    print(f"kept {report.kept} of {report.total}")
    for name, n in report.to_dict()["removed_by"].items():
        print(f"  {name}: removed {n} (flagged {report.flagged.get(name, 0)})")
    _write_report(
        args.report,
        (
            {"index": f.index, "filter": f.filter, "detail": f.detail, "meta": examples[f.index].meta}
            for f in report.removed
        ),
    )
    return 0


def _add_constraints_parser(sub) -> None:
    p = sub.add_parser("add-constraints",
                       help="prompts for RL with verifiable rewards: append checkable constraints (Tülu 3 style)")
    p.add_argument("input", help="any data file: the prompt of each example is kept, its answer dropped")
    p.add_argument("output", help="prompt records (JSONL) carrying their constraints for the `constraints` reward")
    p.add_argument("--format", default="auto")
    p.add_argument("--min", dest="n_min", type=int, default=1, help="fewest constraints per prompt (default 1)")
    p.add_argument("--max", dest="n_max", type=int, default=1, help="most constraints per prompt (default 1)")
    p.add_argument("--kinds", default="", help="comma-separated IFEval instruction ids to draw from (default: all "
                                               "of data/constraints.py's catalogue)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", action="append", default=[], metavar="FILE",
                   help="evaluation prompts (e.g. IFEval's input_data.jsonl) that must not become training prompts")
    p.add_argument("--ngram", type=int, default=8, help="words per n-gram of the contamination check (default 8)")
    p.add_argument("--drop-contaminated", action="store_true",
                   help="drop prompts that overlap an --eval set (written to --rejects) instead of refusing")
    p.add_argument("--rejects", default=None, metavar="FILE", help="where dropped prompts go (default OUTPUT.rejects)")
    p.set_defaults(func=cmd_add_constraints)


def _reject_sample_parser(sub) -> None:
    p = sub.add_parser("reject-sample",
                       help="constraint-following SFT data: a teacher answers add-constraints prompts, the IFEval "
                            "checkers keep only responses that satisfy every constraint")
    p.add_argument("input", help="prompt records from `instructkit data add-constraints`")
    p.add_argument("output", help="SFT conversations (internal JSONL); also OUTPUT.rejects and OUTPUT.report.json")
    p.add_argument("--teacher", default="smollm2-135m-instruct", help="model folder or zoo name (default: %(default)s)")
    p.add_argument("--template", default="auto")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=cmd_reject_sample)


def cmd_reject_sample(args) -> int:
    """Rejection sampling (recipes/rejection_sampling.py); prints the report's counts."""
    import logging

    from instructkit.config import RejectionSamplingConfig
    from instructkit.recipes import rejection_sampling

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # progress per chunk of prompts
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    cfg = RejectionSamplingConfig(input=args.input, output=args.output, teacher=args.teacher, template=args.template,
                                  samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                                  seed=args.seed, limit=args.limit)
    rep = rejection_sampling.main(cfg)
    print(f"kept {rep['kept']} of {rep['prompts']} prompts ({rep['acceptance']:.1%}), {rep['rejected']} rejected "
          f"(see {rep['rejects_file']}); report: {args.output}.report.json")
    return 0


def cmd_add_constraints(args) -> int:
    """Constraint-augmented prompts, checked against evaluation sets: a source prompt sharing an n-gram with an
    evaluation prompt is refused (exit 1, naming it) or, with --drop-contaminated, dropped and counted."""
    from instructkit.data.constraints import add_constraints
    from instructkit.data.io import read_examples
    from instructkit.data.schema import Conversation, Message
    from instructkit.data.sources import prompt_messages_of
    from instructkit.eval.contamination import check_contamination

    examples = read_examples(args.input, args.format)
    evals = []
    for path in args.eval:
        evals += [Conversation(prompt_messages_of(ex) or [Message("user", "")]) for ex in read_examples(path)]
    dropped: list[tuple[int, str]] = []
    if evals:
        prompts = [Conversation(prompt_messages_of(ex), {"task": str(i)}) for i, ex in enumerate(examples)]
        report = check_contamination(evals, prompts, n=args.ngram, what="prompt")
        dropped = [(o.index, o.ngram) for o in report.overlaps]
        if dropped and not args.drop_contaminated:
            i, gram = dropped[0]
            print(f"{args.input}: {len(dropped)} of {len(examples)} prompts overlap the evaluation set(s) "
                  f"{', '.join(args.eval)} (first: example {i}, shared words '{gram}'); evaluation prompts must "
                  "never be trained on. Remove them or pass --drop-contaminated.", file=sys.stderr)
            return 1
    bad = {i for i, _ in dropped}
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    keep = [ex for i, ex in enumerate(examples) if i not in bad]
    records = add_constraints(keep, n_min=args.n_min, n_max=args.n_max, seed=args.seed, kinds=kinds or None)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    if dropped:
        rejects = args.rejects or args.output + ".rejects"
        with open(rejects, "w", encoding="utf-8") as f:
            for i, gram in dropped:
                f.write(json.dumps({"index": i, "reason": "overlaps an evaluation prompt", "ngram": gram,
                                    "prompt": [m.to_dict() for m in prompt_messages_of(examples[i])]},
                                   ensure_ascii=False) + "\n")
        print(f"dropped {len(dropped)} prompts that overlap the evaluation set(s) (see {rejects})")
    n_cons = sum(len(r["constraints"]) for r in records)
    print(f"wrote {len(records)} prompts with {n_cons} constraints to {args.output}")
    return 0
