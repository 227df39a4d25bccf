"""`instructkit template list|render|lint`: inspect chat templates and check their assistant masks."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("template", help="chat templates: list, render with supervised spans, lint")
    sub = p.add_subparsers(dest="template_command", metavar="ACTION")

    p_list = sub.add_parser("list", help="list the built-in chat templates")
    p_list.set_defaults(func=cmd_list)

    p_render = sub.add_parser("render", help="render a conversation, supervised (loss) spans highlighted")
    p_render.add_argument("--template", default="auto",
                          help="built-in name (see `template list`), 'auto' (the tokenizer's own) or a .jinja file")
    p_render.add_argument("--messages", required=True,
                          help="JSON file: a list of {role, content} (or {messages: [...]})")
    p_render.add_argument("--tokenizer", default=None,
                          help="tokenizer folder (default: a stand-in tokenizer with the template's special tokens)")
    p_render.add_argument("--mask", default="all_assistant", choices=("all_assistant", "last_assistant", "all"))
    p_render.add_argument("--plain", action="store_true", help="print exactly the rendered text and nothing else")
    p_render.set_defaults(func=cmd_render)

    p_lint = sub.add_parser("lint", help="check a template's assistant masks, BOS, pad, prefix stability, injection")
    p_lint.add_argument("--template", default="auto",
                        help="built-in name, 'auto' (the tokenizer's own) or a .jinja file")
    p_lint.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (default: a stand-in tokenizer with the control tokens the template "
                             "writes, and its end of turn)")
    p_lint.add_argument("--kwargs", default=None, metavar="JSON",
                        help='extra template variables, as data.chat_template_kwargs: \'{"enable_thinking": false}\'')
    p_lint.set_defaults(func=cmd_lint)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _template_arg(value: str) -> str:
    """A .jinja path is read (its text is then rendered in the sandbox like any template); names pass through."""
    if value.endswith((".jinja", ".j2")) or ("/" in value and not ("{{" in value or "{%" in value)):
        path = Path(value)
        if not path.exists():
            raise FileNotFoundError(f"template file not found: {path}")
        return path.read_text(encoding="utf-8")
    return value


def load_tokenizer_for(template_arg: str, tokenizer_path: str | None):
    """The tokenizer to use: the given folder, or the stand-in tokenizer of a built-in template."""
    from instructkit.chat.standin import standin_tokenizer
    from instructkit.chat.templates import TemplateError

    if tokenizer_path:
        from transformers import AutoTokenizer

        path = Path(tokenizer_path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer folder not found: {path}")
        return AutoTokenizer.from_pretrained(str(path))  # trust_remote_code stays off: no code from the folder runs
    if template_arg == "auto":
        raise TemplateError("--template auto needs --tokenizer PATH (the tokenizer whose template to use)")
    # a built-in: its family's tokens; any other template: the control tokens and end of turn it writes itself
    return standin_tokenizer(template_arg)


def cmd_list(args) -> int:
    from instructkit.chat.templates import list_templates

    for t in list_templates():
        eot = t.end_of_turn or "(tokenizer eos)"
        print(f"{t.name:<8} end-of-turn {eot:<16} {t.description}")
    return 0


def _read_messages(path: str):
    from instructkit.data.schema import DataError, parse_messages

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"messages file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg}", source=str(p), line=e.lineno) from e
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    try:
        return [m.to_dict() for m in parse_messages(data, "messages")]
    except DataError as e:
        raise e.at(str(p)) from e


def cmd_render(args) -> int:
    from instructkit.chat.render import Renderer
    from instructkit.chat.templates import TemplateError

    template = _template_arg(args.template)
    messages = _read_messages(args.messages)
    try:
        tokenizer = load_tokenizer_for(template, args.tokenizer)
        renderer = Renderer(tokenizer, template)
        if args.plain:
            sys.stdout.write(renderer.render_text(messages))
            return 0
        rendered = renderer.render(messages, mask=args.mask)
    except TemplateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spans = _supervised_char_runs(tokenizer, rendered)
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.text import Text

        text = Text()
        for chunk, supervised in spans:
            text.append(chunk, style="bold green on grey15" if supervised else "dim")
        Console().print(text, end="")
        print()
    else:
        sys.stdout.write("".join(f"[[{c}]]" if s else c for c, s in spans))
        print()
    n = rendered.n_supervised
    print(f"-- template {renderer.name}: {len(rendered.input_ids)} tokens, {n} supervised "
          f"({'[[...]]' if not sys.stdout.isatty() else 'highlighted'})")
    return 0


def _supervised_char_runs(tokenizer, rendered) -> list[tuple[str, bool]]:
    """Decode token runs of equal mask value (runs decode cleanly where single tokens may split a character)."""
    runs: list[tuple[str, bool]] = []
    ids, mask = rendered.input_ids, rendered.loss_mask
    start = 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or mask[t] != mask[start]:
            runs.append((tokenizer.decode(ids[start:t], skip_special_tokens=False), bool(mask[start])))
            start = t
    return runs


def cmd_lint(args) -> int:
    from instructkit.chat.lint import format_report, lint_template
    from instructkit.chat.templates import TemplateError

    template = _template_arg(args.template)
    try:
        kwargs = json.loads(args.kwargs) if args.kwargs else None
    except json.JSONDecodeError as e:
        print(f"error: --kwargs is not JSON: {e.msg}", file=sys.stderr)
        return 2
    if kwargs is not None and not isinstance(kwargs, dict):
        print("error: --kwargs must be a JSON object", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer_for(template, args.tokenizer)
        report = lint_template(tokenizer, template, template_kwargs=kwargs)
    except TemplateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.ok else 1

