"""The one internal data format.

Every source format is converted at the edge (data/formats.py) into these types; everything downstream
(rendering, training, evaluation) sees only them.

- ``Message(role, content)``: one turn. Roles: system, user, assistant, tool.
- ``Conversation(messages, meta)``: an SFT example or a prompt. ``meta`` carries provenance (source file, line, task,
  template, seed, ...) and is never rendered.
- ``PreferencePair(prompt, chosen, rejected, meta)``: a prompt conversation and two continuations (each a list of
  messages, usually one assistant message). ``margin`` is an optional preference strength.

Validation raises ``DataError`` naming the source, the line (or record index) and the reason (RELIABILITY R7).
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class Conversation:
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": [m.to_dict() for m in self.messages]}
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Conversation":
        """Parse the internal JSONL form ``{"messages": [...], "meta": {...}}`` and validate it."""
        if not isinstance(d, dict) or "messages" not in d:
            raise DataError("expected an object with a 'messages' list")
        conv = cls(messages=parse_messages(d["messages"], "messages"), meta=dict(d.get("meta") or {}))
        validate_conversation(conv)
        return conv


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)
    margin: float | None = None

    def chosen_conversation(self) -> Conversation:
        return Conversation(self.prompt + self.chosen, dict(self.meta))

    def rejected_conversation(self) -> Conversation:
        return Conversation(self.prompt + self.rejected, dict(self.meta))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": [m.to_dict() for m in self.prompt],
            "chosen": [m.to_dict() for m in self.chosen],
            "rejected": [m.to_dict() for m in self.rejected],
        }
        if self.margin is not None:
            out["margin"] = self.margin
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
        pair = cls(
            prompt=parse_messages(d["prompt"], "prompt"),
            chosen=parse_messages(d["chosen"], "chosen"),
            rejected=parse_messages(d["rejected"], "rejected"),
            meta=dict(d.get("meta") or {}),
            margin=d.get("margin"),
        )
        validate_pair(pair)
        return pair


Example = Conversation | PreferencePair


def parse_messages(value: Any, what: str = "messages") -> list[Message]:
    """``[{"role", "content"}, ...]`` -> list of Message, with type checks that name the offending turn."""
    if not isinstance(value, list):
        raise DataError(f"'{what}' must be a list of {{role, content}} objects, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{what}[{i}] must be an object, got {type(m).__name__}")
        if "role" not in m:
            raise DataError(f"{what}[{i}] has no 'role'")
        if "content" not in m:
            raise DataError(f"{what}[{i}] has no 'content'")
        role, content = m["role"], m["content"]
        if not isinstance(role, str):
            raise DataError(f"{what}[{i}].role must be a string, got {type(role).__name__}")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise DataError(f"{what}[{i}].content must be a string, got {type(content).__name__}")
        out.append(Message(role, content))
    return out


def validate_messages(
    messages: list[Message],
    *,
    require_assistant: bool = True,
    final: str | None = "assistant",
    what: str = "conversation",
) -> None:
    """Check roles and their order.

    Rules: every role is one of ROLES; a system message may only come first; the first non-system turn is a user turn;
    user turns are followed by an assistant turn; a tool turn follows an assistant or tool turn and is followed by an
    assistant turn; an assistant turn is followed by a user or tool turn (two assistant turns in a row, or two user turns,
    are out of order); assistant content is not empty or whitespace. ``final`` names the role the conversation must end
    with (``"assistant"`` for SFT, ``"user"`` for a prompt awaiting a reply, ``None`` for either).
    """
    if not messages:
        raise DataError(f"{what} has no messages")
    prev = None
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise DataError(f"{what} turn {i}: unknown role '{m.role}' (expected one of {', '.join(ROLES)})")
        if m.role == "system":
            if i != 0:
                raise DataError(f"{what} turn {i}: a system message may only be the first turn")
        elif m.role == "user":
            if prev not in (None, "system", "assistant"):
                raise DataError(f"{what} turn {i}: roles out of order: 'user' after '{prev}'")
        elif m.role == "assistant":
            if prev not in ("user", "tool"):
                raise DataError(f"{what} turn {i}: roles out of order: 'assistant' after '{prev or 'start'}'")
            if not m.content.strip():
                raise DataError(f"{what} turn {i}: empty assistant turn")
        elif m.role == "tool":
            if prev not in ("assistant", "tool"):
                raise DataError(f"{what} turn {i}: roles out of order: 'tool' after '{prev or 'start'}'")
        prev = m.role
    if prev == "system":
        raise DataError(f"{what} has only a system message")
    if require_assistant and not any(m.role == "assistant" for m in messages):
        raise DataError(f"{what} has no assistant turn")
    if final is not None and prev != final:
        raise DataError(f"{what} must end with a '{final}' turn, ends with '{prev}'")


def validate_conversation(conv: Conversation, *, final: str | None = "assistant") -> None:
    validate_messages(conv.messages, require_assistant=final == "assistant", final=final)


def validate_pair(pair: PreferencePair) -> None:
    """The prompt ends with a user (or tool) turn; chosen and rejected each continue it validly and differ."""
    if not pair.prompt:
        raise DataError("preference pair has an empty prompt")
    validate_messages(pair.prompt, require_assistant=False, final=None, what="prompt")
    if pair.prompt[-1].role not in ("user", "tool"):
        raise DataError(f"prompt must end with a user turn, ends with '{pair.prompt[-1].role}'")
    for name, side in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if not side:
            raise DataError(f"'{name}' is empty")
        validate_messages(pair.prompt + side, what=name)
    if pair.chosen == pair.rejected:
        raise DataError("'chosen' and 'rejected' are identical")


def is_pair(example: Example) -> bool:
    return isinstance(example, PreferencePair)


def example_to_dict(example: Example) -> dict[str, Any]:
    return example.to_dict()


def example_from_dict(d: dict[str, Any]) -> Example:
    """Internal JSONL record -> Conversation or PreferencePair, by its keys."""
    if isinstance(d, dict) and "messages" in d:
        return Conversation.from_dict(d)
    return PreferencePair.from_dict(d)


def count_roles(examples: Iterable[Example]) -> dict[str, int]:
    counts: dict[str, int] = {r: 0 for r in ROLES}
    for ex in examples:
        msgs = ex.messages if isinstance(ex, Conversation) else ex.prompt + ex.chosen
        for m in msgs:
            counts[m.role] = counts.get(m.role, 0) + 1
    return counts
