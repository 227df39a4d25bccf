"""The one internal data format.

Every source format is converted at the edge (data/formats.py) into these types; everything downstream
(rendering, training, evaluation) sees only them.

- ``ToolCall(name, arguments, id)``: one function call of an assistant turn; ``arguments`` is JSON text (as in the
  OpenAI API), ``id`` optional.
- ``Message(role, content, reasoning, tool_calls, tool_call_id, name, weight)``: one turn. Roles: system, user,
  assistant, tool. ``reasoning`` (assistant only): the model's thinking, kept apart from the content (OpenAI-style
  ``reasoning_content``); ``tool_calls`` (assistant only); ``tool_call_id`` and ``name`` (tool only: which call it
  answers, which function answered); ``weight``: None = trained by role (assistant yes, others no), 0 = not trained,
  1 = trained. Fractional weights are refused (the SFT loss trains a token or not), as are participant names on
  non-tool roles (no template renders them, so they would be silently dropped).
- ``Conversation(messages, meta, tools)``: an SFT example or a prompt. ``tools``: OpenAI JSON-schema function
  definitions (``[{"type": "function", "function": {"name", "description", "parameters"}}]``) the conversation was
  held with; the renderer shows them to the template. ``meta`` carries provenance (source file, line, task, template,
  seed, ...) and is never rendered.
- ``PreferencePair(prompt, chosen, rejected, meta, margin, tools)``: a prompt and two continuations (each a list of
  messages, usually one assistant message). ``margin`` is an optional preference strength (a finite number).
- ``UnpairedExample(prompt, completion, label, meta, tools)``: one completion judged desirable (``label=True``) or
  undesirable (``False``): KTO data. Never SFT data: an undesirable completion must not be trained as a target.
- ``TextExample(text, meta)``: plain text (continued pre-training, the PPO-ptx mix).

Internal JSONL: one ``to_dict()`` per line; ``example_from_dict`` tells the kinds apart by their keys (``messages``;
``chosen``/``rejected``; ``completion``/``label``; ``text``). Fields that are not set are not written; unknown keys are
refused (a key nobody reads is data silently dropped). Message content may be given as a list of OpenAI text parts
(``[{"type": "text", "text": ...}]``, joined); other part types (images, audio) are refused, naming the type.

Validation raises ``DataError`` naming the source, the line (or record index) and the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A bad record: says where (file, line or record) and what is wrong."""

    def __init__(self, reason: str, source: str | None = None, line: int | None = None, record: int | None = None):
        self.reason = reason
        self.source = source
        self.line = line
        self.record = record
        super().__init__(self.location() + reason if self.location() else reason)

    def location(self) -> str:
        where = self.source or ""
        if self.line is not None:
            where += f":{self.line}"
        elif self.record is not None:
            where += f" record {self.record}"
        return where + ": " if where else ""

    def at(self, source: str | None = None, line: int | None = None, record: int | None = None) -> "DataError":
        """The same error with a location filled in (keeps a location already set)."""
        return DataError(
            self.reason,
            source=self.source or source,
            line=self.line if self.line is not None else line,
            record=self.record if self.record is not None else record,
        )




def _typename(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unknown_keys(d: dict, known: Iterable[str], what: str, hint: str = "") -> None:
    known = tuple(known)
    extra = [k for k in d if k not in known]
    if extra:
        raise DataError(f"{what} has an unknown key {_short(extra[0], 40)} (known: {', '.join(known)}){hint}")


# ---------------------------------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant turn. ``arguments``: JSON text (what the OpenAI API sends); ``id`` links the
    call to the tool message that answers it (``Message.tool_call_id``)."""

    name: str
    arguments: str = "{}"
    id: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise DataError(f"a tool call's name must be a non-empty string, got {_short(self.name)}")
        if not isinstance(self.arguments, str):
            raise DataError(f"tool call '{self.name}': arguments must be JSON text, got {_typename(self.arguments)}")
        try:
            json.loads(self.arguments)
        except (ValueError, RecursionError):
            raise DataError(f"tool call '{self.name}': arguments are not valid JSON: {_short(self.arguments)}") from None
        if self.id is not None and not isinstance(self.id, str):
            raise DataError(f"tool call '{self.name}': id must be a string, got {_typename(self.id)}")

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI shape: ``{"id"?, "type": "function", "function": {"name", "arguments"}}``."""
        out: dict[str, Any] = {}
        if self.id is not None:
            out["id"] = self.id
        out["type"] = "function"
        out["function"] = {"name": self.name, "arguments": self.arguments}
        return out

    @classmethod
    def from_dict(cls, d: Any, what: str = "tool_call") -> "ToolCall":
        """The OpenAI shape (``{"id", "type": "function", "function": {"name", "arguments"}}``) or a flat
        ``{"name", "arguments", "id"}``; arguments given as a JSON object are written as JSON text."""
        if not isinstance(d, dict):
            raise DataError(f"{what} must be an object, got {_typename(d)}")
        if "function" in d:
            _unknown_keys(d, ("id", "type", "function"), what)
            if d.get("type", "function") != "function":
                raise DataError(f"{what}.type is {_short(d.get('type'))}; only 'function' calls are supported")
            fn = d["function"]
            if not isinstance(fn, dict):
                raise DataError(f"{what}.function must be an object, got {_typename(fn)}")
            _unknown_keys(fn, ("name", "arguments"), f"{what}.function")
        else:
            _unknown_keys(d, ("id", "type", "name", "arguments"), what)
            if d.get("type", "function") != "function":
                raise DataError(f"{what}.type is {_short(d.get('type'))}; only 'function' calls are supported")
            fn = d
        if "name" not in fn:
            raise DataError(f"{what} has no function 'name'")
        arguments = arguments_text(fn.get("arguments"), what)
        try:
            return cls(fn["name"], arguments, d.get("id"))
        except DataError as e:
            raise DataError(f"{what}: {e.reason}") from None


def arguments_text(value: Any, what: str = "tool_call") -> str:
    """Tool-call arguments as JSON text: a string is kept (it must be JSON), an object is written as JSON."""
    if value is None:
        return "{}"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            raise DataError(f"{what}.arguments cannot be written as JSON") from None
    raise DataError(f"{what}.arguments must be JSON text or an object, got {_typename(value)}")


@dataclass(frozen=True)
class Message:
    """One turn (see the module docstring for the fields)."""

    role: str
    content: str
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    weight: float | None = None

    def __post_init__(self):
        if self.tool_calls is not None:
            calls = tuple(self.tool_calls)
            for c in calls:
                if not isinstance(c, ToolCall):
                    raise DataError(f"tool_calls must hold ToolCall objects, got {_typename(c)}")
            object.__setattr__(self, "tool_calls", calls or None)
        if self.weight is not None:
            w = self.weight
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise DataError(f"a '{self.role}' message: weight must be 0 or 1, got {_short(w)}")
            if w not in (0, 1):
                raise DataError(
                    f"a '{self.role}' message has weight {w!r}: a turn is trained (1) or not (0), or weighted by "
                    "its role (no weight); fractional weights cannot be honoured (the SFT loss has no per-token "
                    "weights), so they are refused rather than rounded")
            object.__setattr__(self, "weight", float(w))
        if self.name is not None and self.role != "tool":
            raise DataError(
                f"a '{self.role}' message has a participant name {_short(self.name, 40)}: only tool messages may "
                "carry 'name' (the function that answered); chat templates do not render participant names, so it "
                "would be silently dropped: remove it or merge it into the content")

    def to_dict(self) -> dict[str, Any]:
        """``{"role", "content"}`` plus only the fields that are set (tool calls in the OpenAI shape)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        if self.weight is not None:
            out["weight"] = int(self.weight)
        return out


MESSAGE_KEYS = ("role", "content", "reasoning", "tool_calls", "tool_call_id", "name", "weight")


def content_text(content: Any, what: str) -> str:
    """Message content: a string, null (empty), or a list of OpenAI text parts ``[{"type": "text", "text": ...}]``
    (joined without separator, as the API does). Other part types (images, audio, files) are refused, named."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise DataError(f"{what}.content[{j}] must be a text part object, got {_typename(part)}")
            kind = part.get("type", "text")
            if kind != "text":
                raise DataError(f"{what}.content[{j}] has type {_short(kind)}; only text parts are supported "
                                "(images, audio and files cannot be trained on)")
            text = part.get("text")
            if not isinstance(text, str):
                raise DataError(f"{what}.content[{j}].text must be a string, got {_typename(text)}")
            texts.append(text)
        return "".join(texts)
    raise DataError(f"{what}.content must be a string, got {_typename(content)}")


def _opt_str(m: dict, key: str, what: str) -> str | None:
    v = m.get(key)
    if v is not None and not isinstance(v, str):
        raise DataError(f"{what}.{key} must be a string, got {_typename(v)}")
    return v


def parse_tool_calls(value: Any, what: str) -> tuple[ToolCall, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise DataError(f"{what}.tool_calls must be a list, got {_typename(value)}")
    return tuple(ToolCall.from_dict(c, f"{what}.tool_calls[{j}]") for j, c in enumerate(value))


def parse_message(m: Any, what: str) -> Message:
    """One internal message object -> Message; unknown keys are refused."""
    if not isinstance(m, dict):
        raise DataError(f"{what} must be an object, got {_typename(m)}")
    if "role" not in m:
        raise DataError(f"{what} has no 'role'")
    _unknown_keys(m, MESSAGE_KEYS, what)
    role = m["role"]
    if not isinstance(role, str):
        raise DataError(f"{what}.role must be a string, got {_typename(role)}")
    calls = parse_tool_calls(m.get("tool_calls"), what)
    if "content" not in m and not calls:
        raise DataError(f"{what} has no 'content'")
    content = content_text(m.get("content"), what)
    reasoning, call_id, name = (_opt_str(m, k, what) for k in ("reasoning", "tool_call_id", "name"))
    try:
        return Message(role, content, reasoning=reasoning, tool_calls=calls, tool_call_id=call_id, name=name,
                       weight=m.get("weight"))
    except DataError as e:
        raise DataError(f"{what}: {e.reason}") from None


def parse_messages(value: Any, what: str = "messages") -> list[Message]:
    """``[{"role", "content", ...}, ...]`` -> list of Message, with type checks that name the offending turn."""
    if not isinstance(value, list):
        raise DataError(f"'{what}' must be a list of {{role, content}} objects, got {_typename(value)}")
    return [parse_message(m, f"{what}[{i}]") for i, m in enumerate(value)]


def parse_tools(value: Any, what: str = "tools") -> list[dict] | None:
    """A tools list: JSON-schema function definitions, each an object (None or [] = no tools)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise DataError(f"'{what}' must be a list of function definitions, got {_typename(value)}")
    for j, t in enumerate(value):
        if not isinstance(t, dict):
            raise DataError(f"{what}[{j}] must be a function definition object, got {_typename(t)}")
        fn = t.get("function", t)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{what}[{j}] has no function name (expected {{\"type\": \"function\", \"function\": "
                            "{\"name\", \"description\", \"parameters\"}})")
    return list(value) or None


def _meta(d: dict) -> dict[str, Any]:
    meta = d.get("meta")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise DataError(f"field 'meta' must be an object, got {_typename(meta)}")
    return dict(meta)


def _margin(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"field 'margin' must be a finite number, got {_short(value)}")
    return float(value)


KTO_HINT = ": an example with a 'label' (desirable or not) is KTO data: train it with `instructkit kto`"


# ---------------------------------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[dict] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": [m.to_dict() for m in self.messages]}
        if self.tools:
            out["tools"] = self.tools
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Conversation":
        """Parse the internal JSONL form ``{"messages": [...], "tools"?: [...], "meta"?: {...}}`` and validate it."""
        if not isinstance(d, dict) or "messages" not in d:
            raise DataError("expected an object with a 'messages' list")
        _unknown_keys(d, ("messages", "tools", "meta"), "conversation", KTO_HINT if "label" in d else "")
        conv = cls(parse_messages(d["messages"], "messages"), _meta(d), parse_tools(d.get("tools")))
        validate_conversation(conv)
        return conv


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)
    margin: float | None = None
    tools: list[dict] | None = None

    def chosen_conversation(self) -> Conversation:
        return Conversation(self.prompt + self.chosen, dict(self.meta), self.tools)

    def rejected_conversation(self) -> Conversation:
        return Conversation(self.prompt + self.rejected, dict(self.meta), self.tools)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": [m.to_dict() for m in self.prompt],
            "chosen": [m.to_dict() for m in self.chosen],
            "rejected": [m.to_dict() for m in self.rejected],
        }
        if self.margin is not None:
            out["margin"] = self.margin
        if self.tools:
            out["tools"] = self.tools
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreferencePair":
        """Parse the internal preference JSONL form and validate it."""
        if not isinstance(d, dict):
            raise DataError("expected an object with 'prompt', 'chosen' and 'rejected'")
        for key in ("prompt", "chosen", "rejected"):
            if key not in d:
                raise DataError(f"missing field '{key}'")
        _unknown_keys(d, ("prompt", "chosen", "rejected", "margin", "tools", "meta"), "preference pair")
        pair = cls(
            prompt=parse_messages(d["prompt"], "prompt"),
            chosen=parse_messages(d["chosen"], "chosen"),
            rejected=parse_messages(d["rejected"], "rejected"),
            meta=_meta(d),
            margin=_margin(d.get("margin")),
            tools=parse_tools(d.get("tools")),
        )
        validate_pair(pair)
        return pair


@dataclass
class UnpairedExample:
    """KTO data: one completion of a prompt with a desirable (True) / undesirable (False) label."""

    prompt: list[Message]
    completion: list[Message]
    label: bool
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[dict] | None = None

    def conversation(self) -> Conversation:
        """Prompt and completion as one conversation (for rendering; not SFT data)."""
        return Conversation(self.prompt + self.completion, dict(self.meta), self.tools)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": [m.to_dict() for m in self.prompt],
            "completion": [m.to_dict() for m in self.completion],
            "label": self.label,
        }
        if self.tools:
            out["tools"] = self.tools
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UnpairedExample":
        """Parse the internal unpaired JSONL form ``{"prompt", "completion", "label", "tools"?, "meta"?}``."""
        if not isinstance(d, dict):
            raise DataError("expected an object with 'prompt', 'completion' and 'label'")
        for key in ("prompt", "completion", "label"):
            if key not in d:
                raise DataError(f"missing field '{key}'")
        _unknown_keys(d, ("prompt", "completion", "label", "tools", "meta"), "unpaired example")
        ex = cls(parse_messages(d["prompt"], "prompt"), parse_messages(d["completion"], "completion"),
                 _label(d["label"]), _meta(d), parse_tools(d.get("tools")))
        validate_unpaired(ex)
        return ex


def _label(value: Any, key: str = "label") -> bool:
    if not isinstance(value, bool):
        raise DataError(f"field '{key}' must be true (desirable) or false (undesirable), got {_short(value)}")
    return value


@dataclass
class TextExample:
    """Plain text: continued pre-training, the PPO-ptx mix."""

    text: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text}
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextExample":
        if not isinstance(d, dict) or "text" not in d:
            raise DataError("expected an object with a 'text' string")
        _unknown_keys(d, ("text", "meta"), "text example")
        if not isinstance(d["text"], str):
            raise DataError(f"field 'text' must be a string, got {_typename(d['text'])}")
        ex = cls(d["text"], _meta(d))
        validate_text(ex)
        return ex


Example = Conversation | PreferencePair | UnpairedExample | TextExample

KINDS = ("conversation", "preference", "unpaired", "text")


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


def validate_messages(
    messages: list[Message],
    *,
    require_assistant: bool = True,
    final: str | None = "assistant",
    what: str = "conversation",
) -> None:
    """Check roles, their order and the fields each role may carry.

    Rules: every role is one of ROLES; a system message may only come first; the first non-system turn is a user turn;
    user turns are followed by an assistant turn; an assistant turn is followed by a user or tool turn (two assistant
    turns in a row, or two user turns, are out of order); assistant content is not empty or whitespace unless the turn
    calls tools. Tool results follow an assistant turn with ``tool_calls`` (or another tool result of that turn) and
    are followed by an assistant turn; when the calls have ids, a result's ``tool_call_id`` must be one of them.
    ``reasoning`` and ``tool_calls`` belong to assistant turns, ``tool_call_id`` to tool turns; a weight of 1 only to
    assistant turns (only they are trained). ``final`` names the role the conversation must end with
    (``"assistant"`` for SFT, ``"user"`` for a prompt awaiting a reply, ``None`` for either).
    """
    if not messages:
        raise DataError(f"{what} has no messages")
    prev = None
    calls: tuple[ToolCall, ...] = ()
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise DataError(f"{what} turn {i}: unknown role '{m.role}' (expected one of {', '.join(ROLES)})")
        if m.role != "assistant":
            if m.reasoning is not None:
                raise DataError(f"{what} turn {i}: a '{m.role}' turn has 'reasoning' (only assistant turns reason)")
            if m.tool_calls:
                raise DataError(f"{what} turn {i}: a '{m.role}' turn has 'tool_calls' (only assistant turns call tools)")
            if m.weight:
                raise DataError(f"{what} turn {i}: a '{m.role}' turn has weight 1: only assistant turns are trained")
        if m.role != "tool" and m.tool_call_id is not None:
            raise DataError(f"{what} turn {i}: a '{m.role}' turn has 'tool_call_id' (only tool results answer calls)")
        if m.role == "system":
            if i != 0:
                raise DataError(f"{what} turn {i}: a system message may only be the first turn")
        elif m.role == "user":
            if prev not in (None, "system", "assistant"):
                raise DataError(f"{what} turn {i}: roles out of order: 'user' after '{prev}'")
        elif m.role == "assistant":
            if prev not in ("user", "tool"):
                raise DataError(f"{what} turn {i}: roles out of order: 'assistant' after '{prev or 'start'}'")
            if not m.content.strip() and not m.tool_calls:
                raise DataError(f"{what} turn {i}: empty assistant turn")
            calls = m.tool_calls or ()
        elif m.role == "tool":
            if prev not in ("assistant", "tool"):
                raise DataError(f"{what} turn {i}: roles out of order: 'tool' after '{prev or 'start'}'")
            if not calls:
                raise DataError(f"{what} turn {i}: a tool result must follow an assistant turn with tool_calls "
                                "(the call it answers)")
            ids = [c.id for c in calls if c.id is not None]
            if ids and m.tool_call_id is not None and m.tool_call_id not in ids:
                raise DataError(f"{what} turn {i}: tool_call_id {_short(m.tool_call_id, 40)} matches no call of the "
                                f"assistant turn before it (ids: {', '.join(ids)})")
        prev = m.role
    if prev == "system":
        raise DataError(f"{what} has only a system message")
    if require_assistant and not any(m.role == "assistant" for m in messages):
        raise DataError(f"{what} has no assistant turn")
    if final is not None and prev != final:
        raise DataError(f"{what} must end with a '{final}' turn, ends with '{prev}'")


def validate_tools(tools: Any) -> None:
    if tools is not None:
        parse_tools(tools)


def validate_conversation(conv: Conversation, *, final: str | None = "assistant") -> None:
    validate_messages(conv.messages, require_assistant=final == "assistant", final=final)
    validate_tools(conv.tools)


def _validate_prompt(prompt: list[Message]) -> None:
    if not prompt:
        raise DataError("the prompt is empty")
    validate_messages(prompt, require_assistant=False, final=None, what="prompt")
    if prompt[-1].role not in ("user", "tool"):
        raise DataError(f"prompt must end with a user turn, ends with '{prompt[-1].role}'")


def validate_pair(pair: PreferencePair) -> None:
    """The prompt ends with a user (or tool) turn; chosen and rejected each continue it validly and differ."""
    if not pair.prompt:
        raise DataError("preference pair has an empty prompt")
    _validate_prompt(pair.prompt)
    for name, side in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if not side:
            raise DataError(f"'{name}' is empty")
        validate_messages(pair.prompt + side, what=name)
    if pair.chosen == pair.rejected:
        raise DataError("'chosen' and 'rejected' are identical")
    _margin(pair.margin)
    validate_tools(pair.tools)


def validate_unpaired(ex: UnpairedExample) -> None:
    """The prompt ends with a user (or tool) turn; the completion continues it validly; the label is a boolean."""
    _validate_prompt(ex.prompt)
    if not ex.completion:
        raise DataError("'completion' is empty")
    validate_messages(ex.prompt + ex.completion, what="completion")
    _label(ex.label)
    validate_tools(ex.tools)


def validate_text(ex: TextExample) -> None:
    if not isinstance(ex.text, str) or not ex.text.strip():
        raise DataError("empty text")


def validate_example(ex: Example) -> None:
    if isinstance(ex, Conversation):
        validate_conversation(ex)
    elif isinstance(ex, PreferencePair):
        validate_pair(ex)
    elif isinstance(ex, UnpairedExample):
        validate_unpaired(ex)
    elif isinstance(ex, TextExample):
        validate_text(ex)
    else:
        raise DataError(f"not an example: {_typename(ex)}")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers over every kind
# ---------------------------------------------------------------------------------------------------------------------


def example_kind(example: Example) -> str:
    """"conversation", "preference", "unpaired" or "text"."""
    if isinstance(example, Conversation):
        return "conversation"
    if isinstance(example, PreferencePair):
        return "preference"
    if isinstance(example, UnpairedExample):
        return "unpaired"
    if isinstance(example, TextExample):
        return "text"
    raise TypeError(f"not an example: {type(example).__name__}")


def example_messages(example: Example) -> list[Message]:
    """Every message of an example: a conversation's turns; a pair's prompt, chosen and rejected; an unpaired
    example's prompt and completion; none for plain text."""
    if isinstance(example, Conversation):
        return list(example.messages)
    if isinstance(example, PreferencePair):
        return example.prompt + example.chosen + example.rejected
    if isinstance(example, UnpairedExample):
        return example.prompt + example.completion
    return []


def example_tools(example: Example) -> list[dict] | None:
    return getattr(example, "tools", None)


def is_pair(example: Example) -> bool:
    return isinstance(example, PreferencePair)


def example_to_dict(example: Example) -> dict[str, Any]:
    return example.to_dict()


def example_from_dict(d: dict[str, Any]) -> Example:
    """Internal JSONL record -> its kind, by its keys: ``messages`` -> Conversation; ``chosen``/``rejected`` ->
    PreferencePair; ``completion``/``label`` -> UnpairedExample; ``text`` -> TextExample."""
    if not isinstance(d, dict):
        raise DataError(f"expected a JSON object, got {_typename(d)}")
    if "messages" in d:
        return Conversation.from_dict(d)
    if "chosen" in d or "rejected" in d:
        return PreferencePair.from_dict(d)
    if "completion" in d or "label" in d:
        return UnpairedExample.from_dict(d)
    if "text" in d:
        return TextExample.from_dict(d)
    shown = ", ".join(_short(k, 30) for k in list(d)[:12])
    raise DataError(f"cannot tell the kind of the record from its keys [{shown}]: expected 'messages', "
                    "'chosen'/'rejected', 'completion'/'label' or 'text'")


def count_roles(examples: Iterable[Example]) -> dict[str, int]:
    """Messages per role (pairs count the prompt and the chosen side; unpaired the prompt and completion)."""
    counts: dict[str, int] = {r: 0 for r in ROLES}
    for ex in examples:
        if isinstance(ex, PreferencePair):
            msgs = ex.prompt + ex.chosen
        else:
            msgs = example_messages(ex)
        for m in msgs:
            counts[m.role] = counts.get(m.role, 0) + 1
    return counts
