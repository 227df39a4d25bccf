"""The template linter: checks that a (template, tokenizer) pair trains what it should, before any training run.

Each check answers a failure users of other fine-tuning tools meet: masks silently empty, the end-of-turn token not
trained so the model never stops, pad == eos masking EOS away, model-specific masking surprises, double BOS, a training
render that differs from the inference render, earlier turns that change when a turn is appended (which silently breaks
multi-turn masks and prefix caching), and control-token injection (user text that encodes to a control token).

The checks render a few probe conversations (single turn, with a system prompt if the template takes one, several
turns) through the same Renderer training uses, so what passes here is what training gets.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from instructkit.chat.render import Renderer, TemplatePrefixError, _open_reasoning_close, as_message_dicts
from instructkit.chat.templates import TemplateError, get_template, render_text, template_messages

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Check:
    name: str
    status: str
    detail: str


@dataclass
class LintReport:
    template: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def get(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))


CHECK_NAMES = (
    "renders",
    "mask_not_empty",
    "end_of_turn_supervised",
    "supervised_is_content",
    "no_double_bos",
    "pad_not_end_of_turn",
    "generation_prefix",
    "append_stable",
    "no_injection",
)


PROBE_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def probe_conversations(template, tokenizer, template_kwargs: dict | None = None) -> list[list[dict[str, Any]]]:
    """Single turn, with a system prompt (when the template accepts one), and three turns; then, for templates that
    render them, a reasoning turn, a multi-turn reasoning conversation and a tool call with its result. A template
    that renders nothing without tools (a "tool_use" template) gets tool definitions in every probe."""
    single = [{"role": "user", "content": "What is the capital of France?"},
              {"role": "assistant", "content": "The capital of France is Paris."}]
    multi = [{"role": "user", "content": "Give me a number."}, {"role": "assistant", "content": "Seven."},
             {"role": "user", "content": "Another one, please."}, {"role": "assistant", "content": "Forty-two."},
             {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
    system = [{"role": "system", "content": "You are a helpful assistant."}, *single]
    tpl = get_template(template, tokenizer)
    variables = {**tpl.variables(tokenizer), **(template_kwargs or {})}

    def renders(conv, needle: str | None = None, tools=None) -> bool:
        try:
            text = render_text(tpl, as_message_dicts(conv), variables=variables, tools=tools)
        except TemplateError:
            return False
        return needle is None or needle in text

    needs_tools = not renders(single) and renders(single, tools=PROBE_TOOLS)
    wrap = (lambda c: _WithTools(c, PROBE_TOOLS)) if needs_tools else (lambda c: c)
    tools = PROBE_TOOLS if needs_tools else None
    out = [wrap(single), wrap(multi)]
    if renders(system, tools=tools):
        out.insert(1, wrap(system))  # no system role (mistral v1): not a defect
    thought = "First, recall the capital city."
    reasoning = [{"role": "user", "content": "What is the capital of France?"},
                 {"role": "assistant", "content": "Paris.", "reasoning": thought}]
    try:  # a generation prompt that opens a think block (DeepSeek-R1-Distill): reasoning is trained after it
        opens = _open_reasoning_close(render_text(tpl, as_message_dicts(single[:1]), add_generation_prompt=True,
                                                  variables=variables, tools=tools)) is not None
    except TemplateError:
        opens = False
    if renders(reasoning, thought, tools=tools) or opens:
        out.append(wrap(reasoning))
        out.append(wrap([*reasoning, {"role": "user", "content": "And of Italy?"},
                         {"role": "assistant", "content": "Rome.", "reasoning": "Recall Italy's capital."}]))
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}', "id": "call_1"}
    tool_conv = [{"role": "user", "content": "Weather in Paris?"},
                 {"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call_1", "name": "get_weather"},
                 {"role": "assistant", "content": "It is 21 degrees in Paris."}]
    if "tool_calls" in tpl.source and "tools" in tpl.source:
        try:
            text = render_text(tpl, as_message_dicts(tool_conv), variables=variables, tools=PROBE_TOOLS)
            if "get_weather" in text and "Paris" in text and "21" in text:
                out.append(_WithTools(tool_conv, PROBE_TOOLS))
        except TemplateError:
            pass
    return out


class _WithTools(list):
    """A probe conversation that carries tool definitions (Conversation-like: .messages, .tools)."""

    def __init__(self, messages, tools):
        super().__init__(messages)
        self.tools = tools

    @property
    def messages(self):
        return list(self)


def lint_template(tokenizer, template: Any = "auto", template_kwargs: dict | None = None) -> LintReport:
    """Run every check; never raises for a defective template (that is a failed check), only for unusable input."""
    from jinja2.exceptions import SecurityError

    tpl = get_template(template, tokenizer)
    try:
        return _lint(tokenizer, tpl, template_kwargs)
    except SecurityError as e:
        report = LintReport(template=tpl.name)
        report.add("renders", FAIL, f"the template does something the Jinja sandbox forbids ({e}); transformers' "
                                    "apply_chat_template renders in the same sandbox and refuses it too: the template "
                                    "cannot be used as it is")
        return report


def _lint(tokenizer, tpl, template_kwargs: dict | None) -> LintReport:
    report = LintReport(template=tpl.name)
    try:
        renderer = Renderer(tokenizer, tpl, template_kwargs=template_kwargs)
        convs = probe_conversations(tpl, tokenizer, template_kwargs)
        renderer.render_text(convs[0])
    except TemplateError as e:
        report.add("renders", FAIL, str(e))
        return report
    render_notes = []
    for conv in [c for c in convs if any(m.get("reasoning") for m in c)]:
        try:
            renderer.turn_report(conv)
        except TemplateError as e:
            if "reasoning switched off" in str(e):  # thinking is off unless a template variable turns it on
                note = ("reasoning probes skipped: this template's generation prompt switches reasoning off by "
                        "default (pass its switch, e.g. --kwargs '{\"enable_thinking\": true}', to check them)")
            elif "does not write the reasoning" in str(e):
                note = ("reasoning probes skipped: the template writes no reasoning_content (it expects reasoning, if "
                        "any, inside the content); train such data with data.reasoning=drop")
            else:
                continue
            convs.remove(conv)
            if note not in render_notes:
                render_notes.append(note)

    # ---- per assistant turn: the prompt it is served, its context, the sequence it trains in -----------------------
    gen_bad, gen_note, app_bad, app_note = [], [], [], []
    for conv in convs:
        try:
            report_turns = renderer.turn_report(conv)
            seqs = renderer.render_examples(conv)
        except TemplatePrefixError as e:
            (app_bad if "earlier turns change" in str(e) else gen_bad).append(str(e))
            continue
        except TemplateError as e:
            gen_bad.append(str(e))
            continue
        for t in report_turns:
            i = t["message"]
            if t["prefill"] is not None:
                gen_note.append(f"the generation prompt pre-fills {t['prefill']!r}, which the training render of the "
                                "answer does not have: answers are trained after the prompt itself")
            if t["own_sequence"]:
                app_note.append(f"answer {i}")
            # token level: the prompt ids a model is served must be the ids it was trained on
            seq = next(r for r in seqs if i in r.turn_messages)
            try:
                p_ids = renderer.render_prompt(_sub(conv, i))
            except TemplateError as e:
                gen_bad.append(str(e))
                continue
            if seq.input_ids[: len(p_ids)] != p_ids:
                gen_bad.append(f"after {i} message(s) the prompt token ids differ from the training ids")
    gen_status = FAIL if gen_bad else (WARN if gen_note else OK)
    report.add("generation_prefix", gen_status,
               "; ".join(dict.fromkeys(gen_bad)) if gen_bad else
               ("; ".join(dict.fromkeys(gen_note)) if gen_note else
                "the generation prompt renders (text and token ids) exactly as the training render up to the answer"))
    if app_bad:
        report.add("append_stable", FAIL, "; ".join(dict.fromkeys(app_bad)))
    elif app_note:
        report.add("append_stable", WARN,
                   "earlier answers are re-rendered when turns are appended (e.g. their reasoning dropped, a different "
                   f"closing token) ({', '.join(dict.fromkeys(app_note))} in the probes): each such answer trains in "
                   "its own sequence, exactly as the model sees it at inference (more tokens per conversation; "
                   "data.mask=last_assistant trains one)")
    else:
        report.add("append_stable", OK, "earlier turns render identically when turns are appended")

    # ---- masks -----------------------------------------------------------------------------------------------------
    empty, no_eot, wrong, notes = [], [], [], []
    closers: list[str] = []
    rendered_any = []
    for conv in convs:
        msgs, _ = template_messages(conv)
        try:
            seqs = renderer.render_examples(conv)
        except TemplatePrefixError as e:
            empty.append(f"masks cannot be derived: {e}")
            continue
        except TemplateError as e:
            empty.append(str(e))
            continue
        rendered_any.extend(seqs)
        assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        got = sorted(i for r in seqs for i in r.turn_messages)
        if got != assistants or not all(r.n_supervised for r in seqs):
            empty.append(f"{len(assistants)}-answer conversation has supervised turns {got} "
                         f"({sum(r.n_supervised for r in seqs)} tokens)")
        others = [m["content"] for m in msgs if m["role"] != "assistant" and len(m["content"]) > 3]
        for r in seqs:
            for k, ((a, b), i) in enumerate(zip(r.turn_spans, r.turn_messages)):
                if b <= a:
                    empty.append(f"answer {i} has no supervised tokens")
                    continue
                last = tokenizer.convert_ids_to_tokens(r.input_ids[b - 1])
                closed = not (k in r.eot_missing or r.input_ids[b - 1] not in renderer._control_id_set)
                if not closed:
                    no_eot.append(f"answer {i}: {renderer.end_of_turn!r} is not the last supervised token (the answer "
                                  f"ends {tokenizer.decode(r.input_ids[max(a, b - 3):b])!r}): the template writes no "
                                  "end-of-turn token in it, so the model would not learn to stop")
                elif last not in closers:
                    closers.append(last)
                got_text = tokenizer.decode(r.input_ids[a:b], skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)
                content = msgs[i]["content"]
                found = next((v for v in (content, content.strip()) if v and v in got_text), None)
                if not closed:
                    wrong.append(f"answer {i} supervises {got_text!r}, expected {content + renderer.end_of_turn!r}")
                elif content.strip() and found is None:
                    wrong.append(f"answer {i} supervises {got_text!r}, which does not contain its content")
                elif any(o in got_text for o in others):
                    wrong.append(f"answer {i} supervises {got_text!r}, which includes another message's text")
                elif found is not None and got_text != found + last:
                    pre, post = got_text.split(found, 1)
                    notes.append(f"{pre!r} before and {post[:-len(last)] if post.endswith(last) else post!r} after")
    report.add("mask_not_empty", FAIL if empty else OK,
               "; ".join(dict.fromkeys(empty)) if empty else "every assistant turn has supervised tokens")
    if no_eot:
        from instructkit.chat.render import derive_end_of_turn

        later = derive_end_of_turn(tpl, tokenizer, renderer.variables, history=True)
        if later and not derive_end_of_turn(tpl, tokenizer, renderer.variables):
            no_eot.insert(0, f"the template writes {later!r} after an answer only when another message follows it, "
                             "so the last answer of a conversation is never closed and the stop is never trained "
                             "(a template that closes every answer is needed)")
    report.add("end_of_turn_supervised", FAIL if (no_eot or empty) else OK,
               "; ".join(dict.fromkeys(no_eot)) if no_eot else ("masks could not be checked" if empty else
                                                                 f"{' / '.join(map(repr, closers))} closes every "
                                                                 "supervised turn"))
    detail = "supervised tokens decode to exactly the answer + end-of-turn"
    if notes:
        detail = ("supervised tokens are the answer, the end-of-turn and template text the model writes itself at "
                  "inference (" + "; ".join(dict.fromkeys(notes)) + ")")
    report.add("supervised_is_content", FAIL if (wrong or empty) else OK,
               "; ".join(dict.fromkeys(wrong)) if wrong else ("masks could not be checked" if empty else detail))

    # ---- BOS ---------------------------------------------------------------------------------------------------------
    bos_detail, bos_status = "", OK
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        bos_status, bos_detail = OK, "the tokenizer has no BOS token"
    else:
        # Double BOS = a render that starts with more than one BOS (template writes one and something adds another,
        # DeepSeek-R1 151). BOS elsewhere is fine: some tokenizers' BOS doubles as the turn marker (SmolLM2's
        # GGUF has bos = <|im_start|>).
        worst = 0
        for r in rendered_any:
            run = 0
            while run < len(r.input_ids) and r.input_ids[run] == bos_id:
                run += 1
            worst = max(worst, run)
        if worst > 1:
            bos_status, bos_detail = FAIL, f"a render starts with {worst} BOS tokens ({tokenizer.bos_token!r})"
        else:
            writes = any(r.input_ids[:1] == [bos_id] for r in rendered_any)
            bos_detail = ("the template writes one BOS and the tokenizer adds none (encoded with "
                          "add_special_tokens=False)" if writes else "the template writes no BOS; none is added")
            try:
                probe = tokenizer("x", add_special_tokens=True)["input_ids"]
                if writes and probe[:1] == [bos_id]:
                    bos_detail += ("; note: this tokenizer adds BOS by default, so code that re-encodes the rendered "
                                   "text with add_special_tokens=True would double it")
            except Exception:  # noqa: BLE001 - the note is optional
                pass
    report.add("no_double_bos", bos_status, bos_detail)

    # ---- pad ---------------------------------------------------------------------------------------------------------
    pad_id = getattr(tokenizer, "pad_token_id", None)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    eot_id = renderer.eot_ids[0] if len(renderer.eot_ids) == 1 else None
    if pad_id is None:
        report.add("pad_not_end_of_turn", WARN,
                   "the tokenizer has no pad token: instructkit pads by length with attention masks and takes labels "
                   "from loss_mask, so training works; set one before using HF collators")
    elif pad_id in (eos_id, eot_id):
        report.add("pad_not_end_of_turn", WARN,
                   f"pad token {tokenizer.pad_token!r} is the eos/end-of-turn token. Handled: instructkit takes labels "
                   "from Renderer.loss_mask, never from input_ids != pad_token_id, so the end-of-turn stays "
                   "supervised; a collator that masks pad ids would drop it (trl 4974), so prefer a distinct pad")
    else:
        report.add("pad_not_end_of_turn", OK,
                   f"pad {tokenizer.pad_token!r} differs from eos {getattr(tokenizer, 'eos_token', None)!r} and "
                   f"end-of-turn {renderer.end_of_turn!r}")

    # ---- injection ---------------------------------------------------------------------------------------------------
    report.add(*_check_injection(renderer, convs))
    report.checks.insert(0, Check("renders", OK, f"{len(convs)} probe conversations rendered with template "
                                                 f"{tpl.name!r}, end-of-turn {renderer.end_of_turn!r}"
                                  + "".join(f"; {n}" for n in render_notes)))
    return report


def _like(conv, messages):
    return _WithTools(messages, conv.tools) if isinstance(conv, _WithTools) else messages


def _sub(conv, k: int):
    """The first k messages of a probe, keeping its tools."""
    if isinstance(conv, _WithTools):
        return _WithTools(list(conv)[:k], conv.tools)
    return conv[:k]


def _check_injection(renderer: Renderer, convs) -> tuple[str, str, str]:
    """Every control-token spelling inside every message content must encode as plain text: the count of each
    control id in a render must not change when contents spell control tokens."""
    tokenizer = renderer.tokenizer
    spellings = sorted({t for t in renderer.control_tokens if t} | set(renderer.chat_template.special_tokens)
                       | {renderer.end_of_turn, "[INST]", "[/INST]", "<|eot_id|>", "<|im_end|>", "<end_of_turn>",
                          "</s>"})
    attack = "x " + " ".join(spellings) + " y"
    control_ids = {tokenizer.convert_tokens_to_ids(t) for t in renderer.control_tokens if t}
    control_ids.discard(None)
    control_ids.discard(getattr(tokenizer, "unk_token_id", None))
    bad, refused = [], []
    for conv in convs:
        clean = _like(conv, [{**m, "content": "x y" if m["content"] else ""} for m in conv])
        dirty = _like(conv, [{**m, "content": attack if m["content"] else ""} for m in conv])
        try:
            a = renderer.render(clean).input_ids
        except TemplateError as e:
            return "no_injection", FAIL, f"could not render: {e}"
        try:
            b = renderer.render(dirty).input_ids
        except TemplateError as e:
            refused.append(str(e))
            continue
        ca, cb = Counter(a), Counter(b)
        for cid in control_ids:
            if ca[cid] != cb[cid]:
                bad.append(f"{tokenizer.convert_ids_to_tokens(cid)!r} typed in a message became a control token")
    if bad:
        return "no_injection", FAIL, "; ".join(dict.fromkeys(bad))
    if refused:
        return "no_injection", WARN, (
            f"{len(spellings)} control-token spellings encode as plain text wherever the template keeps contents as "
            "they are; it rewrites contents that spell some of them (" + refused[0][:160] + "), and such records are "
            "refused, never mis-tokenised")
    return "no_injection", OK, f"{len(spellings)} control-token spellings in every role encode as plain text"


def format_report(report: LintReport) -> str:
    marks = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}
    lines = [f"template {report.template!r}"]
    for c in report.checks:
        lines.append(f"  [{marks[c.status]}] {c.name}: {c.detail}")
    n_fail = sum(c.status == FAIL for c in report.checks)
    lines.append("result: " + ("ok" if report.ok else f"{n_fail} check(s) failed"))
    return "\n".join(lines)


__all__ = ["Check", "LintReport", "lint_template", "format_report", "probe_conversations", "as_message_dicts"]
