"""Render a conversation to token ids and an assistant-only loss mask, for any chat template.

This is the one place that decides what is supervised. How, and why not otherwise:

- **Each assistant turn is trained in the context the template gives it at inference** (per-turn rendering), and the
  mask is derived by rendering, never written per template nor found by string search (both break silently on a
  template they were not written for).
  For assistant turn i, P = render(messages[:i]) with the generation prompt (what the model is served) and
  T = render(messages[:i+1]) without it (the turn as the template writes it when it is the last message). When P is
  a prefix of T (most templates), the characters T adds to P are the answer G. Supervised are G's tokens up to and
  including the last control token the template writes in it (its end of turn: <|im_end|>, <|eot_id|>; gpt-oss'
  <|return|> or <|call|>), so the model learns to stop; glue after it (ChatML's newline) and the
  generation prompt are not. Every turn whose P + G is a prefix of the whole conversation's render shares that one
  sequence (prefix-stable templates: one sequence per conversation, as before).
- **Templates that are not prefix-stable** re-render earlier assistant turns once a turn is appended: Qwen3 drops the
  reasoning of turns before the last user message (and writes an empty <think></think> only for the last turn),
  gpt-oss ends the last turn with <|return|> and earlier ones with <|end|>. Such a turn gets its own sequence P + G,
  exactly what the model sees and writes at inference; later turns still see it the way the template renders history.
  Only the turn's own text may change: if the context before it (render(messages[:i]) without the generation prompt)
  is not a prefix of the whole render (a template that rewrites its header or moves the system prompt as turns are
  added), ``TemplatePrefixError`` says so (training only the last turn, ``mask="last_assistant"``, still works).
  ``render_examples`` returns every sequence; ``render`` the one that ends with the last supervised turn.
- **Generation prompts that open or pre-fill a reasoning block** (Qwen3 with enable_thinking=false writes
  "<think>\\n\\n</think>\\n\\n"; DeepSeek-R1-Distill and QwQ open "<think>\\n"; GLM, Gemma 4, Cohere do the like):
  when P is not a prefix of T, both share the history H = render(messages[:i]); the prompt's part after H (X) and the
  turn's (Y) are aligned: their common start (the role header) is kept, and the rest of X must be reasoning markup
  (think tags, channel markers) or the alignment is refused (``TemplatePrefixError``: a training render that differs
  from the inference prompt). The sequence is P followed by Y without what X already wrote (so "<think></think>" is
  not doubled). If X leaves a reasoning block open that Y never closes (templates that strip reasoning from every
  assistant turn: DeepSeek-R1-Distill, QwQ), the answer is written as those models write it: reasoning,
  "\\n</think>\\n\\n", answer. A message with reasoning under a prompt that closes the block (thinking off) is
  refused, not trained wrong.
- **Options** (Renderer arguments, from DataConfig): ``reasoning`` = "train" (reasoning supervised with its answer),
  "mask" (kept in the sequence as context, not supervised: the reasoning block up to its closing tag) or "drop"
  (removed before rendering: the template's answer-only form); ``train_tool_calls`` (default True: an assistant turn
  that calls tools is supervised, its calls included; False: such turns are context only); tool results, system and
  user messages are never supervised. A message's ``weight``: None = by role (assistant 1, others 0), 0 = not trained,
  1 = trained; fractional weights are refused (the SFT loss trains a token or not: it has no per-token weights), as
  is a weight above 0 on a non-assistant message. ``mask`` (render argument) = "all_assistant" | "last_assistant" |
  "all" (every token, no per-turn logic).
- **Nothing silently dropped**: a turn whose content, reasoning or tool calls the template does not write, a context
  message whose content it drops, or ``tools`` given to a template that never reads them, raises ``TemplateError``.
- **Message data can never become control tokens** : the template is rendered a second time with
  every data string (contents, reasoning, tool-call names and string arguments) replaced by a unique placeholder,
  which locates each one in the real render (as is, trimmed, or JSON-escaped: templates that ``| trim``, ``strip``
  or ``tojson`` them are followed). Control tokens are looked for only in the template's own text and get their ids;
  everything between them is encoded in runs with ``split_special_tokens=True``, so "<|im_end|>" typed by a user is
  plain text. That is how the tokenizer treats the whole text anyway (added tokens are split out first, the rest is
  encoded run by run), so ids equal ``apply_chat_template``'s for ordinary text.
- **A token boundary where every answer starts**: runs are cut where the generation prompt ends, because that is where
  the prompt a model is served ends; training on a token that straddles it would teach a tokenisation the model never
  sees at inference. The one visible difference from ``apply_chat_template`` is an answer that begins with
  whitespace right after template whitespace (ChatML "assistant\\n" + " x": we give "\\n", " x").
- **No double BOS**: pieces are encoded with ``add_special_tokens=False``; BOS comes only from the template.
"""

from __future__ import annotations

import bisect
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from instructkit.chat.templates import (
    REASONING_KEYS,
    ChatTemplate,
    TemplateError,
    get_template,
    missing_tokens,
    render_text,
    template_messages,
)

MASK_STRATEGIES = ("all_assistant", "last_assistant", "all")
REASONING_MODES = ("train", "mask", "drop")


class TemplatePrefixError(TemplateError):
    """A template whose render of a conversation prefix is not a prefix of the full render."""


@dataclass
class Rendered:
    """Token ids and the loss mask (1 = supervised) of one training sequence, same length."""

    input_ids: list[int]
    loss_mask: list[int]
    text: str = ""
    """The full rendered text (before any truncation)."""
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    """Token [start, end) of each supervised assistant turn's supervised tokens, in the untruncated ids."""
    truncated: bool = False
    eot_missing: list[int] = field(default_factory=list)
    """Indices (into turn_spans) of turns in which the template wrote no control token (linter reports them)."""
    turn_messages: list[int] = field(default_factory=list)
    """Message index of each entry of turn_spans."""
    other_sequences: int = 0
    """``render`` only: how many more sequences ``render_examples`` gives for this conversation (the turns a
    non-prefix-stable template re-renders; each trains in its own sequence)."""

    @property
    def n_supervised(self) -> int:
        return sum(self.loss_mask)

    def __len__(self) -> int:
        return len(self.input_ids)


def as_message_dicts(conversation: Any) -> list[dict[str, Any]]:
    """A Conversation, a list of Message, or a list of dicts -> the message dicts a template sees."""
    return template_messages(conversation)[0]


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def _variants(content: str) -> list[str]:
    """What a template may have made of a data string: itself, trimmed (Jinja `trim` == str.strip; Qwen3 strips
    newlines), or JSON-escaped (`tojson` of a string argument)."""
    import json

    out: list[str] = []
    for v in (content, content.strip(), content.lstrip(), content.rstrip(), content.strip("\n"), content.lstrip("\n"),
              content.rstrip("\n"), json.dumps(content, ensure_ascii=False)[1:-1], json.dumps(content)[1:-1]):
        if v not in out:
            out.append(v)
    return out


def _align(text: str, pieces: list[str], idxs: list[int], originals: list[str]) -> list[tuple[int, int, int]] | None:
    """Find each placeholder's data in ``text``: pieces[0] d0 pieces[1] d1 ... pieces[n] must equal text.

    Returns (start, end, placeholder number) per placeholder, or None. Depth-first over the few variants per string,
    iterative so long conversations do not hit the recursion limit.
    """
    n = len(idxs)
    if not text.startswith(pieces[0]):
        return None
    spans: list[tuple[int, int, int]] = []
    stack = [(0, len(pieces[0]), 0)]
    while stack:
        k, pos, vi = stack.pop()
        del spans[k:]
        if k == n:
            if pos == len(text):
                return spans
            continue
        variants = _variants(originals[idxs[k]])
        while vi < len(variants):
            cand = variants[vi]
            vi += 1
            end = pos + len(cand)
            if text.startswith(cand, pos) and text.startswith(pieces[k + 1], end):
                stack.append((k, pos, vi))  # come back for the other variants if this branch fails
                spans.append((pos, end, idxs[k]))
                stack.append((k + 1, end + len(pieces[k + 1]), 0))
                break
    return None


@dataclass
class _Layout:
    """A rendered text and where message data lies in it: (start, end, message index, field) with field one of
    content / reasoning / tool_call."""

    text: str
    spans: list[tuple[int, int, int, str]] = field(default_factory=list)

    def tail(self, a: int) -> "_Layout":
        """text[a:] with its spans (clipped) moved by -a."""
        return _Layout(self.text[a:], [(max(s, a) - a, e - a, m, f) for s, e, m, f in self.spans if e > a
                                       or (s == e == a)])

    def __add__(self, other: "_Layout") -> "_Layout":
        n = len(self.text)
        return _Layout(self.text + other.text, self.spans + [(s + n, e + n, m, f) for s, e, m, f in other.spans])

    def cut(self, a: int, b: int) -> "_Layout":
        """The layout without text[a:b] (spans inside it dropped)."""
        n = b - a
        spans = [(s if s < a else s - n, e if e <= a else e - n, m, f) for s, e, m, f in self.spans
                 if e <= a or s >= b]
        return _Layout(self.text[:a] + self.text[b:], spans)

    def template_text(self) -> str:
        """The text with message data left out (what the template itself writes)."""
        out, pos = [], 0
        for s, e, _, _ in sorted(self.spans):
            if s > pos:
                out.append(self.text[pos:s])
            pos = max(pos, e)
        out.append(self.text[pos:])
        return "\x00".join(out)

    def fields(self, msg: int, start: int = 0) -> set[str]:
        return {f for s, e, m, f in self.spans if m == msg and s >= start}


@dataclass
class _Turn:
    msg: int
    start: int
    """Character where the answer starts (the end of the generation prompt) in its sequence."""
    end: int
    """Character where the turn's text ends in its sequence."""
    unsupervised: list[tuple[int, int]] = field(default_factory=list)
    """Character ranges in [start, end) that are context only (a masked reasoning block)."""
    closed: bool = True
    """False when the template writes no control token to close the answer (end = the end of the turn's text)."""
    prefill: str | None = None
    """What the generation prompt writes that the training render does not (None: the prompt is a prefix of it)."""
    own: bool = False
    """True when the turn trains in its own sequence (the whole conversation's render re-renders it)."""


# reasoning markup in generation prompts: think tags, Cohere's <|START_THINKING|>, Gemma 4's thought channel
_REASONING_WORD = re.compile(r"(?i)think|thought|reason|analysis")
_TAG = re.compile(r"<[^<>\s]{1,60}>|\[[^\[\]\s]{1,40}\]")
_THINK_TAG = re.compile(r"<(/?)([\w:.-]*think[\w:.-]*)>|<\|(START|END)_(THINKING)\|>", re.IGNORECASE)
_CLOSING = re.compile(r"\s*(?:</[^<>\s]{1,60}>|<\|[^<>\s]{1,60}\|>|<[^<>\s|]{1,60}\|>|\[/[^\[\]\s]{1,40}\])\s*")


def _is_reasoning_markup(rest: str, prompt_part: str) -> bool:
    """True when ``rest`` (what a generation prompt writes beyond the training render) is only tags, whitespace and
    reasoning words, and the prompt's part is about reasoning at all."""
    words = _TAG.sub(" ", rest).split()
    return (all(_REASONING_WORD.fullmatch(w) or w.lower() in ("thought", "thinking") for w in words)
            and _REASONING_WORD.search(prompt_part) is not None)


def _open_reasoning_close(text: str) -> str | None:
    """The closing tag of a reasoning block left open at the end of ``text`` ("<think>" -> "</think>"), or None."""
    state = None
    for m in _THINK_TAG.finditer(text):
        if m.group(3):  # <|START_THINKING|> / <|END_THINKING|>
            state = f"<|END_{m.group(4)}|>" if m.group(3).upper() == "START" else None
        else:
            state = None if m.group(1) else f"</{m.group(2)}>"
    return state


_CLOSER = re.compile(r"end|eot|eos|eom|close|stop|return|^</|^\[/|^<[^|].*\|>$", re.IGNORECASE)
_OPENER = re.compile(r"start|begin|open|user|assistant|system|model|human|bot|^<\|[^|]*>$|^\[inst\]$|^<s>$|bos",
                     re.IGNORECASE)


def _opens(token: str) -> bool:
    """True for control tokens that open something (a turn, a header, a block): <|im_start|>, <start_of_turn>,
    Gemma 4's <|turn>, <|user|>; closers win (<|assistant_end|>, <|end_header_id|>, <turn|>)."""
    return _CLOSER.search(token) is None and _OPENER.search(token) is not None


def derive_end_of_turn(template: ChatTemplate, tokenizer, variables: dict | None = None,
                       history: bool = False) -> str | None:
    """The control token a template writes right after an assistant's content (optional whitespace between), or None.
    Control tokens: the tokenizer's special tokens. history: the answer followed by a user turn (else it is last)."""
    controls = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                if getattr(t, "special", False)} | set(getattr(tokenizer, "all_special_tokens", []))
    controls.discard("")
    ph = f"ik{secrets.token_hex(6)}p0q"
    variables = variables if variables is not None else template.variables(tokenizer)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ph}]
    try:
        text = render_text(template, msgs + ([{"role": "user", "content": "Ok"}] if history else []),
                           variables=variables)
    except Exception:  # noqa: BLE001 - a probe: a template may refuse it (or the sandbox may)
        return None
    if ph not in text:
        return None
    after = text.split(ph, 1)[1].lstrip()
    for tok in sorted(controls, key=len, reverse=True):
        if after.startswith(tok):
            return tok
    return None


class Renderer:
    """Render conversations with one template and one tokenizer.

    ``render_examples(conversation, mask=..., max_length=None) -> list[Rendered]`` for training (one sequence unless
    the template re-renders earlier turns); ``render(...)`` the sequence that ends with the last supervised turn;
    ``render_prompt(messages, tools=None)`` for generation; ``stop_token_ids`` / ``end_of_turn`` for stopping;
    ``template`` (Jinja source) and ``name``.
    """

    def __init__(self, tokenizer, template: "str | ChatTemplate" = "auto", *, reasoning: str = "train",
                 train_tool_calls: bool = True, template_kwargs: dict[str, Any] | None = None):
        if reasoning not in REASONING_MODES:
            raise TemplateError(f"reasoning must be one of {REASONING_MODES}, got {reasoning!r}")
        self.tokenizer = tokenizer
        self.chat_template = get_template(template, tokenizer)
        self.reasoning = reasoning
        self.train_tool_calls = bool(train_tool_calls)
        missing = missing_tokens(tokenizer, self.chat_template)
        if missing:
            raise TemplateError(
                f"the tokenizer lacks special tokens {missing} that template {self.chat_template.name!r} needs: call "
                "instructkit.chat.templates.prepare_tokenizer(tokenizer, template) and resize the model's embeddings"
            )
        self.variables = {**self.chat_template.variables(tokenizer), **(template_kwargs or {})}
        self._nonce = secrets.token_hex(6)
        self._ph_re = re.compile(f"ik{self._nonce}p" + r"(\d+)q")
        self.control_tokens = {
            t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)
        } | set(getattr(tokenizer, "all_special_tokens", []))
        self.control_tokens.discard("")
        self._control_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in self.control_tokens}
        self._control_id_set = set(self._control_ids.values())
        longest_first = sorted(self.control_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None
        self._fast = bool(getattr(tokenizer, "is_fast", False))
        self._closing = ""
        self.end_of_turn = self.chat_template.end_of_turn or self._derive_end_of_turn()
        self.eot_ids = self._encode([self.end_of_turn], special=True)[0]
        if not self.eot_ids:
            raise TemplateError(f"end-of-turn {self.end_of_turn!r} encodes to no tokens")
        self._closing = self._derive_closing()

    @classmethod
    def from_config(cls, tokenizer, template: "str | ChatTemplate", data_cfg: Any) -> "Renderer":
        """A Renderer with a DataConfig's options (reasoning, train_tool_calls, chat_template_kwargs)."""
        return cls(tokenizer, template, reasoning=getattr(data_cfg, "reasoning", "train"),
                   train_tool_calls=getattr(data_cfg, "train_tool_calls", True),
                   template_kwargs=getattr(data_cfg, "chat_template_kwargs", None) or None)

    # ---- public API ------------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.chat_template.name

    @property
    def template(self) -> str:
        return self.chat_template.source

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids generation stops on: the end-of-turn token (if it is one token) and the tokenizer's eos."""
        out: list[int] = []
        if len(self.eot_ids) == 1:
            out.append(self.eot_ids[0])
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and eos not in out:
            out.append(eos)
        return out

    def render_text(self, messages: Any, add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        msgs, conv_tools = template_messages(messages)
        return render_text(self.chat_template, msgs, add_generation_prompt=add_generation_prompt,
                           variables=self.variables, tools=tools if tools is not None else conv_tools)

    def render_prompt(self, messages: Any, tools: list[dict] | None = None) -> list[int]:
        """Token ids of the conversation plus the assistant generation prompt (what a model continues from).

        Tokenised like the training render of the same prefix (cut where each earlier answer starts), so a model is
        served the ids it was trained on. ``tools``: function definitions (default: the conversation's own).
        """
        conv = _Conv(self, messages, tools)
        p = conv.layout(len(conv.tm), gen=True)
        cuts = {len(t) for t in (conv.text(j, gen=True) for j in conv.assistants) if p.text.startswith(t)}
        ids, _, _ = self._tokenize(p.text, self._segments(p), cuts)
        return ids

    def render_examples(self, conversation: Any, mask: str = "all_assistant",
                        max_length: int | None = None) -> list[Rendered]:
        """Every training sequence of a conversation (no generation prompt): one for prefix-stable templates, one per
        re-rendered turn otherwise (see the module docstring). Each keeps its first ``max_length`` tokens."""
        if mask not in MASK_STRATEGIES:
            raise ValueError(f"mask must be one of {MASK_STRATEGIES}, got {mask!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        conv = _Conv(self, conversation)
        return [self._to_rendered(conv, layout, turns, mask, max_length) for layout, turns in self._plan(conv, mask)]

    def render(self, conversation: Any, mask: str = "all_assistant", max_length: int | None = None) -> Rendered:
        """Token ids and loss mask of the sequence that ends with the conversation's last supervised turn.

        mask: "all_assistant" (every assistant turn), "last_assistant" (only the last one), "all" (every token). Each
        supervised turn is its answer plus its end-of-turn token. For templates that re-render earlier turns, those
        turns train in other sequences (``other_sequences`` counts them; ``render_examples`` gives them all).
        ``max_length`` keeps the first max_length tokens (mask stays aligned); if no supervised token survives, the
        mask sums to 0 and callers count it.
        """
        out = self.render_examples(conversation, mask=mask, max_length=max_length)
        last = out[-1]
        last.other_sequences = len(out) - 1
        return last

    def turn_report(self, conversation: Any, mask: str = "all_assistant") -> list[dict[str, Any]]:
        """Per supervised turn: its message index, what the generation prompt pre-fills (None if nothing) and whether
        it trains in its own sequence. Raises like ``render_examples`` (the linter reports these)."""
        plan = self._plan(_Conv(self, conversation), mask)
        return [{"message": t.msg, "prefill": t.prefill, "own_sequence": t.own} for _, turns in plan for t in turns]

    # ---- planning: which sequences, which turns ----------------------------------------------------------------------

    def _plan(self, conv: "_Conv", mask: str) -> list[tuple[_Layout, list[_Turn]]]:
        n = len(conv.tm)
        full = conv.layout(n, gen=False)
        if conv.tools and "tools" not in self.chat_template.source:
            raise TemplateError(f"template {self.name!r} does not render tool definitions, so the conversation's "
                                f"{len(conv.tools)} tools would be silently dropped: use a template that renders "
                                "`tools` (llama3.1, qwen3, the model's own)")
        if mask == "all":
            return [(full, [])]
        supervised = self._supervised(conv, mask)
        groups: list[tuple[_Layout, list[_Turn]]] = []
        current: tuple[_Layout, list[_Turn]] = (full, [])
        for i in reversed(supervised):
            seq, turn = self._turn_sequence(conv, i, full)
            if current[0].text.startswith(seq.text):
                current[1].append(turn)
            else:
                if current[1]:
                    groups.append(current)
                current = (seq, [turn])
        if current[1] or not groups:
            groups.append(current)
        return [(layout, turns[::-1]) for layout, turns in groups[::-1]]

    def _supervised(self, conv: "_Conv", mask: str) -> list[int]:
        """Message indices of the assistant turns to train, by mask, weight and train_tool_calls."""
        out = []
        for i, m in enumerate(conv.tm):
            w = conv.weights[i]
            if w is not None and not isinstance(w, bool) and w not in (0, 1):
                raise TemplateError(
                    f"message {i} ({m['role']}) has weight {w!r}: instructkit trains a turn or not (weight 1 or 0, "
                    "None = by role); the SFT loss has no per-token weights, so fractional weights cannot be honoured")
            if m["role"] != "assistant":
                if w:
                    raise TemplateError(f"message {i} ({m['role']}) has weight {w!r}: only assistant turns are "
                                        "trained (tool results, system and user messages never are)")
                continue
            if w == 0 or (m.get("tool_calls") and not self.train_tool_calls):
                continue
            out.append(i)
        if mask == "last_assistant":
            last = max((i for i, m in enumerate(conv.tm) if m["role"] == "assistant"), default=None)
            out = [i for i in out if i == last]
        return out

    def _turn_sequence(self, conv: "_Conv", i: int, full: _Layout) -> tuple[_Layout, _Turn]:
        """The sequence in which assistant turn i is trained (prompt P + answer G) and the turn's place in it."""
        p = conv.layout(i, gen=True)
        t = conv.layout(i + 1, gen=False)
        # The turn's context: the prompt up to the end of the last earlier message's data. The training render and
        # the whole conversation's render must agree with it; past it, only the turn's own text may differ.
        b = max((e for s, e, m, f in p.spans if m < i), default=0)
        if full.text[:b] != p.text[:b] or t.text[:b] != full.text[:b]:
            k = _first_difference(p.text, full.text)
            raise TemplatePrefixError(
                f"template {self.name!r}: the context of assistant message {i} (messages[:{i}]) renders differently "
                f"once later messages are appended: earlier turns change when a turn is appended (at character {k}: "
                f"{p.text[max(0, k - 20):k + 20]!r} vs {full.text[max(0, k - 20):k + 20]!r}); train only the last "
                "turn (data.mask=last_assistant) or use a template that keeps earlier turns as they were")
        if t.text[:b] != p.text[:b]:
            raise self._prompt_error(i, p.text, t.text)
        prefill = None
        if t.text.startswith(p.text):
            seq, start = t, len(p.text)
        else:
            seq, prefill = self._prefilled(conv, i, p, t, b)
            start = len(p.text)
        self._check_rendered(conv, i, seq, start)
        close = self._close_of(seq, i, start)
        end = close if close is not None else len(seq.text)
        seq = _Layout(seq.text[:end], [sp for sp in seq.spans if sp[1] <= end])
        turn = _Turn(i, start, end, closed=close is not None, prefill=prefill, own=not full.text.startswith(seq.text))
        if self.reasoning == "mask":
            turn.unsupervised = self._reasoning_block(seq, i, start)
        return seq, turn

    def _prompt_error(self, i: int, prompt: str, train: str) -> TemplatePrefixError:
        k = _first_difference(prompt, train)
        return TemplatePrefixError(
            f"template {self.name!r}: the prompt rendered for generation (messages[:{i}] + generation prompt) is "
            f"not a prefix of the training render of messages[:{i + 1}]; a model trained on it would be prompted "
            f"differently at inference (at character {k}: generation render {prompt[max(0, k - 20):k + 20]!r}, "
            f"training render {train[max(0, k - 20):k + 20]!r})")

    def _prefilled(self, conv: "_Conv", i: int, p: _Layout, t: _Layout, b: int) -> tuple[_Layout, str]:
        """P + G for a generation prompt that writes more than the training render (module docstring), and what the
        prompt pre-fills."""
        c = max(b, self._safe_common_prefix(p.text, t.text))
        x = p.text[b:]  # the generation prompt's own part (role header, pre-filled markup)
        rest = p.text[c:]
        if not _is_reasoning_markup(rest, x):
            raise self._prompt_error(i, p.text, t.text)
        y = t.tail(c)
        prefill = rest
        wrapped = False
        reasoning = self._reasoning_of(conv, i)
        close = _open_reasoning_close(x)
        if close is not None and close not in y.template_text():
            # The prompt opens a reasoning block the training render never closes. If the template writes reasoning
            # when there is some, the empty block is written its way (render with a stand-in reasoning, take it out:
            # Cohere's <|START_THINKING|><|END_THINKING|>); if it never does (it strips reasoning from every
            # assistant turn: DeepSeek-R1-Distill, QwQ), the answer is written the way these models write it:
            # reasoning, "\n</think>\n\n", the rest.
            own = None if reasoning else self._empty_reasoning_form(conv, i, p, b)
            if own is not None:
                c, y = own
                rest = p.text[c:]
            else:
                lead = "" if p.text.endswith("\n") else "\n"
                body = reasoning.strip("\n") if reasoning else ""
                wrap = _Layout(lead + body, [(len(lead), len(lead) + len(body), i, "reasoning")] if body else [])
                y = wrap + _Layout("\n" + close + "\n\n") + y
                wrapped = True
        elif reasoning and "reasoning" in y.fields(i) and rest.strip():
            raise TemplateError(
                f"template {self.name!r}: the generation prompt writes {rest!r} (reasoning switched off, e.g. "
                f"enable_thinking=false) but message {i} has reasoning: set data.reasoning=drop to train the answer "
                "alone, or switch thinking on (data.chat_template_kwargs)")
        first_data = min((s for s, e, m, f in y.spans), default=len(y.text))
        k = 0 if wrapped else max((k for k in range(min(len(rest), first_data) + 1) if rest.endswith(y.text[:k])),
                                  default=0)
        return p + y.tail(k), prefill

    def _empty_reasoning_form(self, conv: "_Conv", i: int, p: _Layout, b: int) -> tuple[int, _Layout] | None:
        """(common prefix with the prompt, rest of the turn) as the template writes it with an empty reasoning, if it
        writes reasoning at all; else None."""
        marker = f"ik{self._nonce}r0q"
        probe = _Conv(self, [*conv.tm[:i], {**conv.tm[i], "reasoning_content": marker, "thinking": marker}],
                      conv.tools)
        try:
            t2 = probe.layout(i + 1, gen=False)
        except TemplateError:
            return None
        where = [(s, e) for s, e, m, f in t2.spans if m == i and f == "reasoning"]
        if len(where) != 1 or t2.text[:b] != p.text[:b]:
            return None
        s0, e0 = where[0]
        t2 = t2.cut(s0, e0)
        c = max(b, self._safe_common_prefix(p.text, t2.text))
        return c, t2.tail(c)

    def _safe_common_prefix(self, a: str, b: str) -> int:
        """Length of the common prefix of a and b, moved back so that it does not end inside a tag or control token."""
        c = _first_difference(a, b)
        head = a[:c]
        for opener, closer in (("<", ">"), ("[", "]")):
            o = head.rfind(opener)
            if o > head.rfind(closer):
                c = min(c, o)
        if self._special_re is not None:
            for m in self._special_re.finditer(a):
                if m.start() < c < m.end():
                    c = m.start()
        return c

    def _reasoning_of(self, conv: "_Conv", i: int) -> str:
        if self.reasoning == "drop":
            return ""
        return conv.tm[i].get("reasoning_content") or ""

    def _check_rendered(self, conv: "_Conv", i: int, seq: _Layout, start: int) -> None:
        """Nothing silently dropped: the turn's content, reasoning and tool calls are in its answer, and every earlier
        message's content is in its context."""
        m = conv.tm[i]
        got = seq.fields(i, start)
        missing = []
        if m.get("content") and "content" not in got:
            missing.append("content")
        if self._reasoning_of(conv, i) and "reasoning" not in got:
            missing.append("reasoning")
        if m.get("tool_calls") and "tool_call" not in got:
            missing.append("tool calls")
        if missing:
            hint = (" (set data.reasoning=drop to train without it, or use a template that renders reasoning_content)"
                    if "reasoning" in missing else "")
            raise TemplateError(f"template {self.name!r} does not write the {' and '.join(missing)} of assistant "
                                f"message {i}, so it would be silently dropped from training{hint}")
        present = {mi for s, e, mi, f in seq.spans if f == "content" and s < start}
        for j in range(i):
            if conv.tm[j].get("content") and j not in present:
                raise TemplateError(
                    f"template {self.name!r} does not write the content of message {j} (role {conv.tm[j]['role']!r}"
                    f"{', which has tool calls' if conv.tm[j].get('tool_calls') else ''}), so it would be silently "
                    "dropped from what the model is trained on")

    def _reasoning_block(self, seq: _Layout, i: int, start: int) -> list[tuple[int, int]]:
        """[start, end of the reasoning block): the reasoning and the markup up to its closing tag (reasoning=mask)."""
        ends = [e for s, e, m, f in seq.spans if m == i and f == "reasoning" and s >= start]
        if not ends:
            return []
        end = max(ends)
        close = _CLOSING.match(seq.text, end)
        if close:
            end = close.end()
        return [(start, end)]

    # ---- tokens ------------------------------------------------------------------------------------------------------

    def _to_rendered(self, conv: "_Conv", layout: _Layout, turns: list[_Turn], mask: str,
                     max_length: int | None) -> Rendered:
        text = layout.text
        cuts = {t.start for t in turns}
        cuts |= {len(s) for s in (conv.text(j, gen=True) for j in conv.assistants if j) if text.startswith(s)}
        if not self._fast:
            cuts |= {t.end for t in turns}
        ids, starts, in_content = self._tokenize(text, self._segments(layout), cuts)
        turn_spans: list[tuple[int, int]] = []
        eot_missing: list[int] = []
        loss_mask = [1] * len(ids) if mask == "all" else [0] * len(ids)
        for turn in turns:
            first = bisect.bisect_left(starts, turn.start)  # token starts are non-decreasing
            stop = bisect.bisect_left(starts, turn.end)  # exclusive: the closing control token is the last one
            if not turn.closed:
                eot_missing.append(len(turn_spans))
            turn_spans.append((first, stop))
            if mask != "all":
                loss_mask[first:stop] = [1] * (stop - first)
                for a, b in turn.unsupervised:  # a masked reasoning block: context, not a target
                    for t in range(bisect.bisect_left(starts, a, first, stop), bisect.bisect_left(starts, b, first,
                                                                                                     stop)):
                        loss_mask[t] = 0
        truncated = False
        if max_length is not None and len(ids) > max_length:
            ids, loss_mask, truncated = ids[:max_length], loss_mask[:max_length], True
        return Rendered(input_ids=ids, loss_mask=loss_mask, text=text, turn_spans=turn_spans, truncated=truncated,
                        eot_missing=eot_missing, turn_messages=[t.msg for t in turns])

    @staticmethod
    def _segments(layout: _Layout) -> list[tuple[int, int, bool]]:
        """(start, end, is_data) segments covering the text."""
        segments: list[tuple[int, int, bool]] = []
        pos = 0
        for s, e, _, _ in sorted(layout.spans):
            if s < pos:
                continue
            if s > pos:
                segments.append((pos, s, False))
            if e > s:
                segments.append((s, e, True))
            pos = max(pos, e)
        if pos < len(layout.text):
            segments.append((pos, len(layout.text), False))
        return segments

    def _encode(self, texts: Sequence[str], special: bool) -> list[list[int]]:
        """Encode texts without adding BOS/EOS; special=False encodes control-token spellings as plain text."""
        if not texts:
            return []
        enc = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=not special)
        return [list(x) for x in enc["input_ids"]]

    def _tokenize(self, text: str, segments: list[tuple[int, int, bool]], cuts: Iterable[int]):
        """Token ids of ``text``; per token its start character and whether it starts inside message data.

        Control tokens written by the template (found only in template segments) get their ids directly. The text
        between them, template text and data alike, is encoded in runs with split_special_tokens=True: that is
        what the tokenizer itself does with the whole text (added tokens are split out first, the rest is encoded
        per run), except that control-token spellings inside data stay plain text. Runs are also cut at ``cuts``.
        """
        controls: list[tuple[int, int]] = []
        content_spans: list[tuple[int, int]] = []
        for s, e, is_content in segments:
            if is_content:
                content_spans.append((s, e))
            elif self._special_re is not None:
                controls.extend(m.span() for m in self._special_re.finditer(text, s, e))
        cut_list = sorted(c for c in cuts if 0 < c < len(text))
        pieces: list[tuple[int, int, bool]] = []  # (start, end, is_control)
        pos = 0
        for cs, ce in [*controls, (len(text), len(text))]:
            if cs > pos:
                bounds = [pos, *(c for c in cut_list if pos < c < cs), cs]
                pieces.extend((a, b, False) for a, b in zip(bounds, bounds[1:]))
            if ce > cs:
                pieces.append((cs, ce, True))
            pos = ce
        runs = [p for p in pieces if not p[2]]
        run_enc = iter([])
        if runs:
            kwargs = {"return_offsets_mapping": True} if self._fast else {}
            enc = self.tokenizer([text[a:b] for a, b, _ in runs], add_special_tokens=False, split_special_tokens=True,
                                 **kwargs)
            offsets = enc["offset_mapping"] if self._fast else [None] * len(runs)
            run_enc = iter(zip(enc["input_ids"], offsets))
        ids: list[int] = []
        starts: list[int] = []
        for a, b, is_control in pieces:
            if is_control:
                ids.append(self._control_ids[text[a:b]])
                starts.append(a)
                continue
            run_ids, offs = next(run_enc)
            ids.extend(run_ids)
            if offs is None:
                starts.extend([a] * len(run_ids))
            else:
                # Tokens of a run tile it, so a token starts where the previous one ended. (Its own start offset
                # can be "trimmed" past leading whitespace by ByteLevel post-processing, e.g. a "\n" token.)
                prev_end = a
                for o in offs:
                    starts.append(min(prev_end, b - 1))
                    prev_end = max(prev_end, a + o[1])
        content_starts = [s for s, _ in content_spans]
        in_content = []
        for st in starts:
            k = bisect.bisect_right(content_starts, st) - 1
            in_content.append(k >= 0 and st < content_spans[k][1])
        return ids, starts, in_content

    def _walk_closers(self, text: str, start: int, end: int) -> int | None:
        """End of the last control token in text[start:end] before the first one that opens something (the next
        turn's header), or None: where an answer's closing run ends (<|im_end|>; Cohere's
        <|END_TEXT|><|END_OF_TURN_TOKEN|>; Kimi's <|close|>response<|sep|>...<|end_of_msg|>)."""
        last = None
        if self._special_re is None:
            return None
        for m in self._special_re.finditer(text, start, end):
            if _opens(m.group()):
                break
            last = m.end()
        return last

    def _derive_closing(self) -> str:
        """How the template ends an answer whatever follows it: the common start of the text after an answer when it
        is the last message and when another message follows, up to its last closing control token (Phi-3.5 appends
        eos only at the very end; Command R writes the next turn's opener), or ""."""
        ph = f"ik{self._nonce}c0q"
        msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ph}]
        try:
            last = render_text(self.chat_template, msgs, variables=self.variables)
            hist = render_text(self.chat_template, msgs + [{"role": "user", "content": "Ok"}], variables=self.variables)
        except Exception:  # noqa: BLE001 - a probe: a template may refuse it (or the sandbox may)
            return ""
        if ph not in last or ph not in hist:
            return ""
        a, b = last.split(ph, 1)[1], hist.split(ph, 1)[1]
        common = a[:_first_difference(a, b)]
        end = self._walk_closers(common, 0, len(common))
        return common[:end] if end else ""

    def _close_of(self, seq: _Layout, i: int, start: int) -> int | None:
        """Where turn i's supervised text ends in seq: after the template's closing run when it follows the turn's
        data, else after the last closing control token the template writes in the turn (gpt-oss' <|call|> after a
        tool call); None when it writes none."""
        data_end = max((e for s, e, m, f in seq.spans if m == i and s >= start), default=start)
        if self._closing and seq.text.startswith(self._closing, data_end):
            return data_end + len(self._closing)
        return self._walk_closers(seq.text, data_end, len(seq.text))

    def _derive_end_of_turn(self) -> str:
        """The end-of-turn of a template without metadata: the last control token of its closing run, else the
        control token right after an assistant content."""
        if self._special_re is not None:
            self._closing = self._derive_closing()
            closers = self._special_re.findall(self._closing)
            if closers:
                return closers[-1]
        tok = derive_end_of_turn(self.chat_template, self.tokenizer, self.variables)
        if tok:
            return tok
        eos = getattr(self.tokenizer, "eos_token", None)
        if eos:
            return eos
        raise TemplateError(
            f"cannot tell the end-of-turn token of template {self.name!r}, and the tokenizer has no eos")


class _Conv:
    """One conversation prepared for a Renderer: the template's message dicts, a copy with every data string replaced
    by a placeholder, and cached renders of its prefixes."""

    def __init__(self, renderer: Renderer, conversation: Any, tools: list[dict] | None = None):
        self.r = renderer
        messages = getattr(conversation, "messages", conversation)
        self.tm, conv_tools = template_messages(conversation)
        self.tools = tools if tools is not None else conv_tools
        self.weights = [(m.get("weight") if isinstance(m, dict) else getattr(m, "weight", None)) for m in messages]
        if renderer.reasoning == "drop":
            self.tm = [{k: v for k, v in m.items() if k not in REASONING_KEYS} for m in self.tm]
        self.assistants = [i for i, m in enumerate(self.tm) if m["role"] == "assistant"]
        self.originals: list[str] = []
        self.owner: list[tuple[int, str]] = []
        self.ph = [self._with_placeholders(i, m) for i, m in enumerate(self.tm)]
        self._texts: dict[tuple[int, bool], str] = {}
        self._layouts: dict[tuple[int, bool], _Layout] = {}

    def _placeholder(self, value: Any, msg: int, field_name: str) -> Any:
        if not isinstance(value, str) or not value:
            return value
        self.originals.append(value)
        self.owner.append((msg, field_name))
        return f"ik{self.r._nonce}p{len(self.originals) - 1}q"

    def _leaves(self, value: Any, msg: int) -> Any:
        if isinstance(value, dict):
            return {k: self._leaves(v, msg) for k, v in value.items()}
        if isinstance(value, list):
            return [self._leaves(v, msg) for v in value]
        return self._placeholder(value, msg, "tool_call")

    def _with_placeholders(self, i: int, m: dict[str, Any]) -> dict[str, Any]:
        out = dict(m)
        out["content"] = self._placeholder(m.get("content"), i, "content")
        reasoning = m.get("reasoning_content")
        if reasoning:
            ph = self._placeholder(reasoning, i, "reasoning")
            for k in REASONING_KEYS:
                if k in m:
                    out[k] = ph
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = call["function"]
                calls.append({**call, "function": {"name": self._placeholder(fn["name"], i, "tool_call"),
                                                   "arguments": self._leaves(fn["arguments"], i)}})
            out["tool_calls"] = calls
        return out

    def text(self, k: int, gen: bool) -> str:
        """render(messages[:k]) (with the generation prompt if gen); "" for an empty prefix the template refuses."""
        key = (k, gen)
        if key not in self._texts:
            try:
                self._texts[key] = render_text(self.r.chat_template, self.tm[:k], add_generation_prompt=gen,
                                               variables=self.r.variables, tools=self.tools)
            except TemplateError:
                if k:
                    raise
                self._texts[key] = ""
        return self._texts[key]

    def layout(self, k: int, gen: bool) -> _Layout:
        key = (k, gen)
        if key in self._layouts:
            return self._layouts[key]
        text = self.text(k, gen)
        if not text:
            self._layouts[key] = _Layout("")
            return self._layouts[key]
        full = self._layouts.get((len(self.tm), False))
        if full is not None and full.text.startswith(text):
            # a prefix of the whole conversation's render (prefix-stable templates): its data lies where it lies there
            n = len(text)
            if not any(s < n < e for s, e, _, _ in full.spans):
                self._layouts[key] = _Layout(text, [sp for sp in full.spans if sp[1] <= n and sp[0] < n
                                                    or sp[0] == sp[1] == n])
                return self._layouts[key]
        ph_text = render_text(self.r.chat_template, self.ph[:k], add_generation_prompt=gen,
                              variables=self.r.variables, tools=self.tools)
        parts = self.r._ph_re.split(ph_text)
        pieces, idxs = parts[0::2], [int(x) for x in parts[1::2]]
        spans = _align(text, pieces, idxs, self.originals)
        if spans is None:
            raise TemplateError(
                f"template {self.r.name!r} transforms message contents (or other message data) in a way the renderer "
                "cannot follow (it follows strings used as-is, trimmed or JSON-escaped), so it cannot keep them from "
                "becoming control tokens")
        self._layouts[key] = _Layout(text, [(s, e, *self.owner[n]) for s, e, n in spans])
        return self._layouts[key]
