"""The template linter: checks that a (template, tokenizer) pair trains what it should, before any training run.

Each check answers one complaint users of the peers have (PEERS.md): masks silently empty (1), the end-of-turn token
not trained so the model never stops (2), pad == eos masking EOS away (3), model-specific masking surprises (5),
double BOS (14), a training render that differs from the inference render, earlier turns that change when a turn is
appended (which silently breaks multi-turn masks and prefix caching), and control-token injection (RELIABILITY S3).

The checks render a few probe conversations (single turn, with a system prompt if the template takes one, several
turns) through the same Renderer training uses, so what passes here is what training gets.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from instructkit.chat.render import Renderer, TemplatePrefixError, as_message_dicts
from instructkit.chat.templates import TemplateError, get_template, render_text

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


def probe_conversations(template, tokenizer) -> list[list[dict[str, str]]]:
    """Single turn, with a system prompt (when the template accepts one), and three turns."""
    single = [{"role": "user", "content": "What is the capital of France?"},
              {"role": "assistant", "content": "The capital of France is Paris."}]
    multi = [{"role": "user", "content": "Give me a number."}, {"role": "assistant", "content": "Seven."},
             {"role": "user", "content": "Another one, please."}, {"role": "assistant", "content": "Forty-two."},
             {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
    out = [single, multi]
    system = [{"role": "system", "content": "You are a helpful assistant."}, *single]
    tpl = get_template(template, tokenizer)
    try:
        render_text(tpl, system, variables=tpl.variables(tokenizer))
        out.insert(1, system)
    except TemplateError:
        pass  # no system role (mistral v1): not a defect
    return out


def _expected_supervised(content: str, renderer: Renderer) -> set[str]:
    # the template may trim contents (llama3, gemma); either form followed by the end-of-turn is right
    return {c + renderer.end_of_turn for c in (content, content.strip())}


def lint_template(tokenizer, template: Any = "auto") -> LintReport:
    """Run every check; never raises for a defective template (that is a failed check), only for unusable input."""
    tpl = get_template(template, tokenizer)
    report = LintReport(template=tpl.name)
    try:
        renderer = Renderer(tokenizer, tpl)
    except TemplateError as e:
        report.add("renders", FAIL, str(e))
        return report
    convs = probe_conversations(tpl, tokenizer)

    # ---- text-level prefix properties (independent of masks) -------------------------------------------------------
    gen_bad, app_bad = [], []
    for conv in convs:
        full = renderer.render_text(conv)
        for i in range(1, len(conv) + 1):
            upto = renderer.render_text(conv[:i])
            if not full.startswith(upto):
                app_bad.append(f"render of the first {i} message(s) is not a prefix of the {len(conv)}-message render")
            if i < len(conv) and conv[i]["role"] == "assistant":
                gen = renderer.render_text(conv[:i], add_generation_prompt=True)
                nxt = renderer.render_text(conv[: i + 1])
                if not nxt.startswith(gen):
                    gen_bad.append(f"generation prompt after {i} message(s) ends {gen[-30:]!r}, training render "
                                   f"continues {nxt[max(0, len(gen) - 30):len(gen) + 10]!r}")
                else:
                    # token level too: the prompt ids a model is served must be the ids it was trained on
                    try:
                        p_ids = renderer.render_prompt(conv[:i])
                        t_ids = renderer.render(conv[: i + 1]).input_ids
                        if t_ids[: len(p_ids)] != p_ids:
                            gen_bad.append(f"after {i} message(s) the prompt token ids differ from the training ids")
                    except TemplateError as e:
                        gen_bad.append(str(e))
    report.add("generation_prefix", FAIL if gen_bad else OK,
               "; ".join(dict.fromkeys(gen_bad)) if gen_bad else
               "the generation prompt renders (text and token ids) exactly as the training render up to the answer")
    report.add("append_stable", FAIL if app_bad else OK,
               "; ".join(dict.fromkeys(app_bad)) if app_bad else
               "earlier turns render identically when turns are appended")

    # ---- masks -----------------------------------------------------------------------------------------------------
    empty, no_eot, wrong = [], [], []
    bos_detail, bos_status = "", OK
    rendered_any = []
    for conv in convs:
        try:
            r = renderer.render(conv)
        except TemplatePrefixError as e:
            empty.append(f"masks cannot be derived: {e}")
            continue
        except TemplateError as e:
            empty.append(str(e))
            continue
        rendered_any.append(r)
        assistants = [m for m in conv if m["role"] == "assistant"]
        if r.n_supervised == 0 or len(r.turn_spans) != len(assistants):
            empty.append(f"{len(assistants)}-answer conversation has {r.n_supervised} supervised tokens")
        for k, ((a, b), m) in enumerate(zip(r.turn_spans, assistants)):
            if b <= a:
                empty.append(f"answer {k} has no supervised tokens")
                continue
            if k in r.eot_missing or r.input_ids[b - len(renderer.eot_ids):b] != renderer.eot_ids:
                no_eot.append(f"answer {k}: {renderer.end_of_turn!r} is not the last supervised token")
            got = tokenizer.decode(r.input_ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if got not in _expected_supervised(m["content"], renderer):
                wrong.append(f"answer {k} supervises {got!r}, expected {m['content'] + renderer.end_of_turn!r}")
    report.add("mask_not_empty", FAIL if empty else OK,
               "; ".join(empty) if empty else "every assistant turn has supervised tokens")
    report.add("end_of_turn_supervised", FAIL if (no_eot or empty) else OK,
               "; ".join(no_eot) if no_eot else ("masks could not be checked" if empty else
                                                 f"{renderer.end_of_turn!r} closes every supervised turn"))
    report.add("supervised_is_content", FAIL if (wrong or empty) else OK,
               "; ".join(wrong) if wrong else ("masks could not be checked" if empty else
                                               "supervised tokens decode to exactly the answer + end-of-turn"))

    # ---- BOS ---------------------------------------------------------------------------------------------------------
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
                                                 f"{tpl.name!r}, end-of-turn {renderer.end_of_turn!r}"))
    return report


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
    bad = []
    for conv in convs:
        clean = [{**m, "content": "x y"} for m in conv]
        dirty = [{**m, "content": attack} for m in conv]
        try:
            a, b = renderer.render(clean).input_ids, renderer.render(dirty).input_ids
        except TemplateError as e:
            return "no_injection", FAIL, f"could not render: {e}"
        ca, cb = Counter(a), Counter(b)
        for cid in control_ids:
            if ca[cid] != cb[cid]:
                bad.append(f"{tokenizer.convert_ids_to_tokens(cid)!r} typed in a message became a control token")
    if bad:
        return "no_injection", FAIL, "; ".join(dict.fromkeys(bad))
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
