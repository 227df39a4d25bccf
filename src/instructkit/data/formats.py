"""Source formats -> the internal schema (adapters at the edge).

Each adapter takes ONE decoded record (whatever JSON value the file held) and returns a list of examples
(``Conversation`` or ``PreferencePair``), or raises ``DataError`` naming what is wrong (missing field, wrong type,
unknown role, roles out of order, empty assistant turn). Adapters never see a file: io.py adds the location
(file, line or record) and the provenance meta ``{"source", "line"|"record", "format"}``.

Formats (``FORMATS``; aliases in ``ALIASES``):

=====================  ==============================================================================================
alpaca                 ``instruction``, ``input``, ``output``; optional ``system``, ``history`` [[user, assistant], ...]
dolly                  ``instruction``, ``context``, ``response``, ``category``
sharegpt               ``conversations: [{from, value}]``; optional top-level ``system``
messages               OpenAI / internal ``messages: [{role, content}]`` (+ ``meta``)
oasst                  oasst1 flat messages (``message_id``, ``parent_id``, ``role``, ``text``, ``rank``): a whole
                       file is grouped into trees by ``oasst_conversations`` (one record alone is not an example)
ultrachat              ``data: [user, assistant, user, ...]``, optional ``id``
prompt_completion      ``prompt``, ``completion`` (strings or message lists)
prompt_only            ``prompt`` (evaluation and RL prompts such as IFEval), optional ``tools``: ends with a user turn
flan                   ``inputs``, ``targets``
self_instruct          seed tasks: ``instruction``, ``instances: [{input, output}]``, ``is_classification``
preference             ``prompt``, ``chosen``, ``rejected`` as strings or message lists (full conversations that
                       repeat the prompt are stripped of it; with no ``prompt`` the shared prefix is the prompt);
                       also the internal preference JSONL
sharegpt_preference    LLaMA-Factory DPO: ``conversations`` + ``chosen``/``rejected`` ``{from, value}`` objects
hh_rlhf                Anthropic HH-RLHF: ``chosen``/``rejected`` transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."
ranked                 K ranked responses: ``prompt`` + ``responses`` (best first) or ``completions: [{response,
                       score | rank}]``; one record -> all K-choose-2 pairs with meta ``group`` and ``ranks``
oasst_ranked           an oasst trees-export record (one whole tree, nested ``replies``): each prompter message with
                       2+ ranked assistant replies -> its ranked pairs (the flat oasst format gives conversations)
lf_v1                  LLaMA-Factory v1 SFT: ``messages`` whose ``content`` is a list of parts ``{"type": "text" |
                       "reasoning" | "tool_call" | "tools", "value"}`` and a per-message ``loss_weight`` (0 or 1)
lf_v1_dpo              LLaMA-Factory v1 DPO: ``chosen_messages`` / ``rejected_messages`` (full conversations in the
                       v1 message shape; their shared turns are the prompt)
kto                    unpaired (KTO) data -> UnpairedExample: ``messages`` (or ShareGPT ``conversations``) plus
                       ``label`` / ``kto_tag`` true or false (LLaMA-Factory's kto_en_demo); TRL's unpaired
                       ``prompt``, ``completion``, ``label``; also the internal unpaired JSONL
gsm8k                  GSM8K: ``question``, ``answer`` (a worked solution ending in ``#### N``): the question as the
                       user turn, the solution without its ``<<a*b=c>>`` calculator annotations as the answer, and
                       the original solution in meta ``answer`` (what the ``gsm8k`` reward of rl/rewards.py reads)
text                   plain text -> TextExample: ``{"text": ...}`` records, or a .txt file (one example per non-blank
                       line, as the ``text`` loader of Hugging Face datasets)
=====================  ==============================================================================================

Tool calls, tools and reasoning: the OpenAI reader keeps ``tools``, ``tool_calls`` (and the legacy ``function_call``),
``tool_call_id``, ``name`` (tool results), reasoning (``reasoning``, ``reasoning_content`` or ``thinking``) and
``weight``. ShareGPT / glaive (LLaMA-Factory) ``function_call`` turns (JSON ``{"name", "arguments"}`` or a list of
them) become assistant tool calls, ``observation`` turns tool results, and a ``tools`` key (a list or a JSON string
of one; bare function definitions are wrapped as ``{"type": "function", "function": ...}``) the conversation's tools.

Read options (``ReadOptions``; ``DataConfig.split_think`` / ``DataConfig.tool_call_format``, applied to every assistant
turn before validation):

- ``tool_call_format``: "auto" (default) parses Hermes-style ``<tool_call>{"name", "arguments"}</tool_call>`` blocks in
  assistant content into ``tool_calls`` when the example declares ``tools`` (the blocks are then calls of declared
  functions, and the template re-renders them in its own syntax); "hermes" parses them always; "none" never (they stay
  text). A ``<tool_call>`` block that is not a JSON ``{"name", "arguments"}`` is an error, not text. The parser is
  chat/parse.py's, the one the server uses on generated text.
- ``split_think``: false (default) keeps ``<think>...</think>`` in assistant content as text (LLaMA-Factory's
  convention for chain of thought); true moves a leading ``<think>`` block into ``reasoning`` (an unclosed block, a
  block not at the start, or a turn that already has reasoning is an error).

Fields that change training and that a reader cannot use are refused, naming the key: a ``label`` / ``kto_tag`` read
as SFT data points to ``instructkit kto``; the legacy ``functions`` list asks to be converted to ``tools``.
"""

from __future__ import annotations

import contextvars
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from instructkit.data.schema import (
    KTO_HINT,
    Conversation,
    DataError,
    Example,
    Message,
    PreferencePair,
    TextExample,
    ToolCall,
    UnpairedExample,
    content_text,
    parse_tool_calls,
    parse_tools,
    validate_conversation,
    validate_messages,
    validate_pair,
    validate_text,
    validate_unpaired,
)

# ---------------------------------------------------------------------------------------------------------------------
# Small typed accessors: every wrong shape becomes a DataError that names the field.
# ---------------------------------------------------------------------------------------------------------------------


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _typename(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require_object(record: Any, fmt: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"a {fmt} record must be a JSON object, got {_typename(record)}")
    return record


def _get_str(record: dict, key: str, *, required: bool = True, default: str = "") -> str:
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"missing field '{key}'")
        return default
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"field '{key}' must be a string, got {_typename(value)}")
    return value


def _get_list(record: dict, key: str, *, required: bool = True) -> list:
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"missing field '{key}'")
        return []
    value = record[key]
    if not isinstance(value, list):
        raise DataError(f"field '{key}' must be a list, got {_typename(value)}")
    return value


def _join(*parts: str) -> str:
    """Instruction and its input as one user turn, separated by a blank line (empty parts dropped)."""
    return "\n\n".join(p for p in parts if p.strip())


def _scalar_meta(record: dict, keys: Iterable[str]) -> dict[str, Any]:
    """Copy the JSON-scalar provenance fields that exist (ids, categories) into meta."""
    out = {}
    for k in keys:
        v = record.get(k)
        if v is None or isinstance(v, (str, int, float, bool)):
            if k in record:
                out[k] = v
    return out


@dataclass(frozen=True)
class ReadOptions:
    """How assistant turns are read (see the module docstring): ``tool_call_format`` "auto" | "hermes" | "none";
    ``split_think``: move a leading <think>...</think> block of the content into ``reasoning``."""

    tool_call_format: str = "auto"
    split_think: bool = False

    def __post_init__(self):
        if self.tool_call_format not in TOOL_CALL_FORMATS:
            raise DataError(f"tool_call_format must be one of {', '.join(TOOL_CALL_FORMATS)}, got "
                            f"{_short(self.tool_call_format)}")
        if not isinstance(self.split_think, bool):
            raise DataError(f"split_think must be true or false, got {_short(self.split_think)}")


TOOL_CALL_FORMATS = ("auto", "hermes", "none")
_OPTIONS: contextvars.ContextVar[ReadOptions] = contextvars.ContextVar("read_options", default=ReadOptions())


def _assistant_turn(m: Message, i: int, tools: list[dict] | None, opts: ReadOptions) -> Message:
    content, reasoning, calls = m.content, m.reasoning, m.tool_calls
    if opts.split_think and "<think>" in content:
        from instructkit.chat.parse import split_reasoning

        if reasoning is not None:
            raise DataError(f"turn {i}: the assistant turn has both 'reasoning' and a <think> block in its content")
        if not content.lstrip().startswith("<think>"):
            raise DataError(f"turn {i}: <think> is not at the start of the assistant content (split_think splits a "
                            "leading <think>...</think> block)")
        if "</think>" not in content:
            raise DataError(f"turn {i}: <think> without </think> in the assistant content")
        reasoning, content = split_reasoning(content)
    parse = opts.tool_call_format == "hermes" or (opts.tool_call_format == "auto" and bool(tools))
    if parse and "<tool_call>" in content:
        from instructkit.chat.parse import parse_tool_calls as parse_generated_calls

        if calls:
            raise DataError(f"turn {i}: the assistant turn has both 'tool_calls' and <tool_call> blocks in its content")
        rest, parsed = parse_generated_calls(content, "<tool_call>", tools)
        if not parsed:
            raise DataError(f"turn {i}: a <tool_call> block in the assistant content is not JSON "
                            "{\"name\", \"arguments\"} (or names a function not in 'tools')")
        # ids are the data's to give: the parser's random ids would make reading a file non-deterministic
        calls = tuple(ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in parsed)
        content = rest
    if (content, reasoning, calls) == (m.content, m.reasoning, m.tool_calls):
        return m
    return Message(m.role, content, reasoning=reasoning, tool_calls=calls, tool_call_id=m.tool_call_id,
                   name=m.name, weight=m.weight)


def apply_options(messages: list[Message], tools: list[dict] | None, offset: int = 0) -> list[Message]:
    """The read options (of the current read) applied to the assistant turns of ``messages``."""
    opts = _OPTIONS.get()
    if opts == ReadOptions() and not tools:
        return messages
    return [_assistant_turn(m, offset + i, tools, opts) if m.role == "assistant" else m
            for i, m in enumerate(messages)]


def _conversation(messages: list[Message], meta: dict[str, Any] | None = None, *, final: str = "assistant",
                  tools: list[dict] | None = None):
    conv = Conversation(apply_options(messages, tools), dict(meta or {}), tools)
    validate_conversation(conv, final=final)
    return conv


# ---------------------------------------------------------------------------------------------------------------------
# Roles
# ---------------------------------------------------------------------------------------------------------------------

# ShareGPT speaker tags (and LLaMA-Factory's tool tags): a function call is the assistant's turn, an observation is
# the tool's answer.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
    "function": "tool",
}

# OpenAI roles that have an internal equivalent; anything else is passed through and rejected by validation.
OPENAI_ROLES = {"developer": "system", "function": "tool"}


def _content_text(content: Any, what: str) -> str:
    """OpenAI content: a string, null, or a list of text parts (see schema.content_text)."""
    return content_text(content, what)


OPENAI_MESSAGE_KEYS = ("role", "content", "reasoning", "reasoning_content", "thinking", "tool_calls", "function_call",
                       "tool_call_id", "name", "weight", "refusal")
REASONING_FIELDS = ("reasoning", "reasoning_content", "thinking")


def _reasoning_field(m: dict, what: str) -> str | None:
    """The reasoning of a message from ``reasoning``, ``reasoning_content`` or ``thinking`` (one of them, or equal)."""
    found = {k: m[k] for k in REASONING_FIELDS if m.get(k) is not None}
    for k, v in found.items():
        if not isinstance(v, str):
            raise DataError(f"{what}.{k} must be a string, got {_typename(v)}")
    if len(set(found.values())) > 1:
        raise DataError(f"{what} has different reasoning in {' and '.join(map(repr, found))}: keep one")
    return next(iter(found.values()), None)


def _openai_message(m: Any, what: str) -> Message:
    """One OpenAI chat-completions message with everything that changes training: reasoning, tool calls (and the
    legacy ``function_call``), tool_call_id, name (tool results only), weight. Unknown keys are refused."""
    if not isinstance(m, dict):
        raise DataError(f"{what} must be an object, got {_typename(m)}")
    if "role" not in m:
        raise DataError(f"{what} has no 'role'")
    for k in m:
        if k not in OPENAI_MESSAGE_KEYS:
            hint = "; a LLaMA-Factory v1 file? read it with format lf_v1" if k == "loss_weight" else ""
            raise DataError(f"{what} has an unknown key {_short(k, 40)} (known: {', '.join(OPENAI_MESSAGE_KEYS)})"
                            f"{hint}")
    role = m["role"]
    if not isinstance(role, str):
        raise DataError(f"{what}.role must be a string, got {_typename(role)}")
    if m.get("refusal") is not None:
        raise DataError(f"{what} has a 'refusal': write the refusal as the message content")
    calls = parse_tool_calls(m.get("tool_calls"), what)
    if m.get("function_call") is not None:
        if calls:
            raise DataError(f"{what} has both 'tool_calls' and the legacy 'function_call': keep tool_calls")
        calls = (ToolCall.from_dict(m["function_call"], f"{what}.function_call"),)
    if "content" not in m and not calls:
        raise DataError(f"{what} has no 'content'")
    for k in ("tool_call_id", "name"):
        if m.get(k) is not None and not isinstance(m[k], str):
            raise DataError(f"{what}.{k} must be a string, got {_typename(m[k])}")
    content, reasoning = _content_text(m.get("content"), what), _reasoning_field(m, what)
    try:
        return Message(OPENAI_ROLES.get(role, role), content, reasoning=reasoning, tool_calls=calls,
                       tool_call_id=m.get("tool_call_id"), name=m.get("name"), weight=m.get("weight"))
    except DataError as e:
        raise DataError(f"{what}: {e.reason}") from None


def _openai_messages(value: Any, what: str) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(f"'{what}' must be a list of {{role, content}} objects, got {_typename(value)}")
    return [_openai_message(m, f"{what}[{i}]") for i, m in enumerate(value)]


def normalize_tools(value: Any, what: str = "tools") -> list[dict] | None:
    """Tool definitions -> the OpenAI shape ``[{"type": "function", "function": {...}}]``: a list (or, as LLaMA-Factory
    writes it, a JSON string of a list) of OpenAI tools or bare function definitions ``{"name", "description",
    "parameters"}``. None, "" and [] mean no tools."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise DataError(f"field '{what}' is a string but not JSON: {_short(value)}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"field '{what}' must be a list of function definitions, got {_typename(value)}")
    out = []
    for j, t in enumerate(value):
        if not isinstance(t, dict):
            raise DataError(f"{what}[{j}] must be a function definition object, got {_typename(t)}")
        if "function" in t:
            if t.get("type", "function") != "function":
                raise DataError(f"{what}[{j}].type is {_short(t.get('type'))}; only 'function' tools are supported")
            out.append(t if "type" in t else {"type": "function", **t})
        else:
            out.append({"type": "function", "function": t})
    return parse_tools(out, what)


def _sharegpt_messages(value: Any, what: str) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(f"'{what}' must be a list of {{from, value}} objects, got {_typename(value)}")
    return [_sharegpt_message(m, f"{what}[{i}]") for i, m in enumerate(value)]


def sharegpt_function_call(text: str, what: str) -> tuple[ToolCall, ...]:
    """A ShareGPT ``function_call`` turn's value: JSON ``{"name", "arguments"}`` or a list of them."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise DataError(f"{what}: a function_call turn must hold JSON {{\"name\", \"arguments\"}}, got "
                        f"{_short(text)}") from None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise DataError(f"{what}: a function_call turn holds an empty list")
    calls = []
    for j, c in enumerate(items):
        if not isinstance(c, dict) or "name" not in c:
            raise DataError(f"{what}: a function_call must be {{\"name\", \"arguments\"}}, got {_short(c)}")
        calls.append(ToolCall.from_dict({k: v for k, v in c.items()}, f"{what}[{j}]" if len(items) > 1 else what))
    return tuple(calls)


def _sharegpt_message(m: Any, what: str) -> Message:
    if not isinstance(m, dict):
        raise DataError(f"{what} must be an object, got {_typename(m)}")
    # ShareGPT uses from/value; some exports use role/content in the same place.
    speaker_key = "from" if "from" in m else "role" if "role" in m else None
    text_key = "value" if "value" in m else "content" if "content" in m else None
    if speaker_key is None:
        raise DataError(f"{what} has no 'from'")
    if text_key is None:
        raise DataError(f"{what} has no 'value'")
    speaker, text = m[speaker_key], m[text_key]
    if not isinstance(speaker, str):
        raise DataError(f"{what}.{speaker_key} must be a string, got {_typename(speaker)}")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise DataError(f"{what}.{text_key} must be a string, got {_typename(text)}")
    role = SHAREGPT_ROLES.get(speaker.lower())
    if role is None:
        raise DataError(f"{what}: unknown role {_short(speaker)} (expected one of {', '.join(SHAREGPT_ROLES)})")
    if speaker.lower() == "function_call":
        return Message("assistant", "", tool_calls=sharegpt_function_call(text, what))
    return Message(role, text)


def _with_system(record: dict, messages: list[Message]) -> list[Message]:
    system = _get_str(record, "system", required=False)
    if system.strip() and not (messages and messages[0].role == "system"):
        return [Message("system", system)] + messages
    return messages


# ---------------------------------------------------------------------------------------------------------------------
# SFT adapters
# ---------------------------------------------------------------------------------------------------------------------


def from_alpaca(record: Any) -> list[Example]:
    r = _require_object(record, "alpaca")
    instruction = _get_str(r, "instruction")
    inp = _get_str(r, "input", required=False)
    output = _get_str(r, "output")
    messages: list[Message] = []
    for i, turn in enumerate(_get_list(r, "history", required=False)):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(f"history[{i}] must be a [user, assistant] pair of strings, got {_short(turn)}")
        messages += [Message("user", turn[0]), Message("assistant", turn[1])]
    messages.append(Message("user", _join(instruction, inp)))
    messages.append(Message("assistant", output))
    return [_conversation(_with_system(r, messages), _scalar_meta(r, ("id",)), tools=normalize_tools(r.get("tools")))]


def from_dolly(record: Any) -> list[Example]:
    r = _require_object(record, "dolly")
    instruction = _get_str(r, "instruction")
    context = _get_str(r, "context", required=False)
    response = _get_str(r, "response")
    messages = [Message("user", _join(instruction, context)), Message("assistant", response)]
    return [_conversation(messages, _scalar_meta(r, ("category", "id")))]


def from_sharegpt(record: Any) -> list[Example]:
    r = _require_object(record, "sharegpt")
    if "conversations" not in r:
        raise DataError("missing field 'conversations'")
    messages = _with_system(r, _sharegpt_messages(r["conversations"], "conversations"))
    return [_conversation(messages, _scalar_meta(r, ("id",)), tools=normalize_tools(r.get("tools")))]


MESSAGES_RECORD_KEYS = ("messages", "tools", "meta", "id", "parallel_tool_calls")


def _refuse_record_keys(r: dict, known: Iterable[str]) -> None:
    """Keys that would change training but that an SFT reader cannot use are refused, named."""
    for key in ("label", "kto_tag"):
        if key in r:
            raise DataError(f"field '{key}' marks the completion desirable or not{KTO_HINT}; as SFT data its "
                            "undesirable answers would be trained on")
    if "functions" in r:
        raise DataError("field 'functions' (the legacy OpenAI function definitions) is not read: convert it to "
                        "'tools': [{\"type\": \"function\", \"function\": <definition>}, ...]")
    known = tuple(known)
    for k in r:
        if k not in known:
            raise DataError(f"unknown field {_short(k, 40)} (known: {', '.join(known)})")


def from_messages(record: Any) -> list[Example]:
    """OpenAI chat-completions (fine-tuning) records: ``messages`` with reasoning, tool calls, tool results and
    weights, a ``tools`` list, ``meta``, ``id``, ``parallel_tool_calls`` (kept in meta). Other keys are refused."""
    r = _require_object(record, "messages")
    if "messages" not in r:
        raise DataError("missing field 'messages'")
    _refuse_record_keys(r, MESSAGES_RECORD_KEYS)
    messages = _openai_messages(r["messages"], "messages")
    meta = r.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise DataError(f"field 'meta' must be an object, got {_typename(meta)}")
    out_meta = dict(meta or {})
    out_meta.update(_scalar_meta(r, ("id", "parallel_tool_calls")))
    return [_conversation(messages, out_meta, tools=normalize_tools(r.get("tools")))]


def from_ultrachat(record: Any) -> list[Example]:
    r = _require_object(record, "ultrachat")
    turns = _get_list(r, "data")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, str):
            raise DataError(f"data[{i}] must be a string, got {_typename(t)}")
        messages.append(Message("user" if i % 2 == 0 else "assistant", t))
    return [_conversation(messages, _scalar_meta(r, ("id",)))]


def _text_or_messages(value: Any, what: str, role: str) -> list[Message]:
    if isinstance(value, str):
        return [Message(role, value)]
    if isinstance(value, dict):
        return _openai_messages([value], what)
    if isinstance(value, list):
        return _openai_messages(value, what)
    raise DataError(f"field '{what}' must be a string or a list of messages, got {_typename(value)}")


def from_prompt_completion(record: Any) -> list[Example]:
    r = _require_object(record, "prompt_completion")
    for key in ("prompt", "completion"):
        if key not in r:
            raise DataError(f"missing field '{key}'")
    for key in ("label", "kto_tag"):
        if key in r:
            raise DataError(f"field '{key}' marks the completion desirable or not{KTO_HINT}; as SFT data its "
                            "undesirable answers would be trained on")
    prompt = _text_or_messages(r["prompt"], "prompt", "user")
    completion = _text_or_messages(r["completion"], "completion", "assistant")
    return [_conversation(prompt + completion, _scalar_meta(r, ("id",)), tools=normalize_tools(r.get("tools")))]


def from_prompt_only(record: Any) -> list[Example]:
    """A prompt (evaluation prompts such as IFEval, RL prompts): the conversation ends with the user turn; ``tools``
    (function definitions) are the conversation's tools, rendered with the prompt as in SFT; the other scalar/list
    fields go to meta (reward and checker inputs)."""
    r = _require_object(record, "prompt_only")
    if "prompt" not in r:
        raise DataError("missing field 'prompt'")
    prompt = _text_or_messages(r["prompt"], "prompt", "user")
    meta = {k: v for k, v in r.items() if k not in ("prompt", "tools", "meta", "source", "line", "record", "format")}
    return [_conversation(prompt, meta, final="user", tools=normalize_tools(r.get("tools")))]


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def from_gsm8k(record: Any) -> list[Example]:
    """GSM8K (Cobbe et al. 2021): the question, and its solution with the calculator annotations removed."""
    r = _require_object(record, "gsm8k")
    for key in ("question", "answer"):
        if not isinstance(r.get(key), str) or not r[key].strip():
            raise DataError(f"field '{key}' must be a non-empty string")
    if "####" not in r["answer"]:
        raise DataError("field 'answer' has no final '#### N' line")
    extra = sorted(set(r) - {"question", "answer"})
    meta = {"answer": r["answer"], **_scalar_meta(r, extra)}
    dropped = [k for k in extra if k not in meta]
    if dropped:
        raise DataError(f"gsm8k record has non-scalar field(s) {', '.join(dropped)}: instructkit would not use them")
    return [_conversation([Message("user", r["question"]), Message("assistant", _CALCULATOR.sub("", r["answer"]))],
                          meta)]


def from_flan(record: Any) -> list[Example]:
    r = _require_object(record, "flan")
    inputs = _get_str(r, "inputs")
    targets = _get_str(r, "targets")
    meta = _scalar_meta(r, ("task", "task_name", "_task_name", "template_type", "_template_type", "template_idx"))
    return [_conversation([Message("user", inputs), Message("assistant", targets)], meta)]


def from_self_instruct(record: Any) -> list[Example]:
    """A Self-Instruct seed task: one conversation per instance; meta keeps id, name, is_classification."""
    r = _require_object(record, "self_instruct")
    instruction = _get_str(r, "instruction")
    instances = _get_list(r, "instances")
    if not instances:
        raise DataError("field 'instances' is empty")
    is_cls = r.get("is_classification", False)
    if not isinstance(is_cls, bool):
        raise DataError(f"field 'is_classification' must be a boolean, got {_typename(is_cls)}")
    base_meta = _scalar_meta(r, ("id", "name"))
    base_meta["is_classification"] = is_cls
    out: list[Example] = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise DataError(f"instances[{i}] must be an object, got {_typename(inst)}")
        try:
            inp = _get_str(inst, "input", required=False)
            output = _get_str(inst, "output")
        except DataError as e:
            raise DataError(f"instances[{i}]: {e.reason}") from None
        meta = dict(base_meta, instance=i)
        try:
            out.append(_conversation([Message("user", _join(instruction, inp)), Message("assistant", output)], meta))
        except DataError as e:
            raise DataError(f"instances[{i}]: {e.reason}") from None
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Preference adapters
# ---------------------------------------------------------------------------------------------------------------------


def split_shared_prefix(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], list, list]:
    """Two full conversations -> (prompt, chosen continuation, rejected continuation).

    The prompt is the longest common prefix of turns, cut back so that it ends with a user (or tool) turn: the two
    sides then each start with the assistant's reply. Identical conversations give identical continuations, which
    ``validate_pair`` rejects.
    """
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and chosen[k - 1].role not in ("user", "tool"):
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def _margin(r: dict) -> float | None:
    m = r.get("margin")
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, (int, float)) or m != m or m in (float("inf"), float("-inf")):
        raise DataError(f"field 'margin' must be a finite number, got {_short(m)}")
    return float(m)


def _pair(prompt, chosen, rejected, meta, margin=None, tools=None) -> PreferencePair:
    n = len(prompt)
    prompt, chosen, rejected = (apply_options(prompt, tools), apply_options(chosen, tools, n),
                                apply_options(rejected, tools, n))
    pair = PreferencePair(prompt, chosen, rejected, dict(meta), margin, tools)
    validate_pair(pair)
    return pair


def from_preference(record: Any) -> list[Example]:
    r = _require_object(record, "preference")
    for key in ("chosen", "rejected"):
        if key not in r:
            raise DataError(f"missing field '{key}'")
    chosen = _text_or_messages(r["chosen"], "chosen", "assistant")
    rejected = _text_or_messages(r["rejected"], "rejected", "assistant")
    prompt = _text_or_messages(r["prompt"], "prompt", "user") if r.get("prompt") is not None else []
    prompt = _with_system(r, prompt) if prompt else prompt
    if not prompt:
        # Implicit prompt: chosen and rejected are full conversations; what they share is the prompt.
        prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
    else:
        n = len(prompt)
        body = [m for m in prompt if m.role != "system"]
        for side_name in ("chosen", "rejected"):
            side = chosen if side_name == "chosen" else rejected
            # Full conversations that repeat the prompt (with or without its system turn): strip it.
            if len(side) > n and side[:n] == prompt:
                side = side[n:]
            elif body and len(side) > len(body) and side[: len(body)] == body:
                side = side[len(body) :]
            if side_name == "chosen":
                chosen = side
            else:
                rejected = side
    meta = r.get("meta") if isinstance(r.get("meta"), dict) else {}
    meta = dict(meta, **_scalar_meta(r, ("id",)))
    return [_pair(prompt, chosen, rejected, meta, _margin(r), normalize_tools(r.get("tools")))]


def from_sharegpt_preference(record: Any) -> list[Example]:
    r = _require_object(record, "sharegpt_preference")
    if "conversations" not in r:
        raise DataError("missing field 'conversations'")
    prompt = _with_system(r, _sharegpt_messages(r["conversations"], "conversations"))
    sides = []
    for key in ("chosen", "rejected"):
        if key not in r:
            raise DataError(f"missing field '{key}'")
        v = r[key]
        if isinstance(v, dict):
            sides.append([_sharegpt_message(v, key)])
        elif isinstance(v, list):
            sides.append(_sharegpt_messages(v, key))
        else:
            raise DataError(f"field '{key}' must be a {{from, value}} object, got {_typename(v)}")
    return [_pair(prompt, sides[0], sides[1], _scalar_meta(r, ("id",)), _margin(r), normalize_tools(r.get("tools")))]


HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str, what: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [user a, assistant b].

    Only '\\n\\nHuman:' / '\\n\\nAssistant:' start a turn (a 'Human:' inside a line is text); contents are stripped
    of surrounding whitespace."""
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise DataError(f"'{what}' has text before the first '\\n\\nHuman:' turn: {_short(parts[0])}")
    if len(parts) < 3:
        raise DataError(f"'{what}' has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    return [Message(HH_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def from_hh_rlhf(record: Any) -> list[Example]:
    """HH-RLHF: both sides are whole transcripts; their shared turns are the prompt, the rest are the answers."""
    r = _require_object(record, "hh_rlhf")
    chosen_text = _get_str(r, "chosen")
    rejected_text = _get_str(r, "rejected")
    chosen = parse_hh_transcript(chosen_text, "chosen")
    rejected = parse_hh_transcript(rejected_text, "rejected")
    # Name the side that is broken before comparing them (a clearer error than one on the pair).
    validate_messages(chosen, what="chosen")
    validate_messages(rejected, what="rejected")
    prompt, c, rj = split_shared_prefix(chosen, rejected)
    return [_pair(prompt, c, rj, {})]


# ---------------------------------------------------------------------------------------------------------------------
# Ranked responses (InstructGPT's reward-model data): K responses to one prompt -> every K-choose-2 comparison.
# ---------------------------------------------------------------------------------------------------------------------

RANKED_TEXT_KEYS = ("response", "text", "content")


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value in (float("inf"), float("-inf")):
        raise DataError(f"{what} must be a finite number, got {_short(value)}")
    return float(value)


def ranked_group_id(prompt: list[Message], responses: list[list[Message]]) -> str:
    """A stable id of a ranked record, from its content: adapters never see a file, and the id must survive
    ``data convert`` / mixing (which renumber lines), so it cannot be source:line."""
    import hashlib
    import json

    # ASCII JSON: a lone surrogate (valid in a JSON string escape) cannot break the encoding
    blob = json.dumps([[m.to_dict() for m in prompt], [[m.to_dict() for m in r] for r in responses]], sort_keys=True)
    return "ranked:" + hashlib.sha1(blob.encode("ascii")).hexdigest()[:16]


def _ranked_completions(items: list) -> tuple[list[list[Message]], list[float]]:
    """The scored variant: ``[{"response"|"text"|"content": ..., "score"|"rank": n}]`` -> responses and a goodness per
    response (the score, or minus the rank: rank 0 is best)."""
    responses, goodness, kinds = [], [], set()
    for i, c in enumerate(items):
        what = f"completions[{i}]"
        if not isinstance(c, dict):
            raise DataError(f"{what} must be an object with a response and a 'score' or 'rank', got {_typename(c)}")
        text_key = next((k for k in RANKED_TEXT_KEYS if k in c), None)
        if text_key is None:
            raise DataError(f"{what} has none of the fields {', '.join(map(repr, RANKED_TEXT_KEYS))}")
        kind = [k for k in ("score", "rank") if k in c]
        if len(kind) != 1:
            raise DataError(f"{what} must have exactly one of 'score' (higher is better) or 'rank' (0 is best)")
        kinds.add(kind[0])
        value = _finite(c[kind[0]], f"{what}.{kind[0]}")
        responses.append(_text_or_messages(c[text_key], f"{what}.{text_key}", "assistant"))
        goodness.append(value if kind[0] == "score" else -value)
    if len(kinds) > 1:
        raise DataError("completions mix 'score' and 'rank': use one of them for every completion")
    return responses, goodness


def from_ranked(record: Any) -> list[Example]:
    """K ranked responses to one prompt -> all K-choose-2 (better, worse) PreferencePairs (InstructGPT, Ouyang et al.
    2022, sec. 3.5), in best-first order: (0,1), (0,2), ..., (K-2,K-1) for a strict ranking.

    ``responses`` lists the responses best first; ``completions`` carries a ``score`` (higher is better) or a
    ``rank`` (0 is best) per response, and tied responses give no pair. Each pair's meta has ``group`` (a content id
    shared by the record's pairs: the reward model regroups them to forward each response once) and ``ranks`` =
    [i, j], the positions of the better and the worse response in the record's list.
    """
    r = _require_object(record, "ranked")
    if r.get("prompt") is None:
        raise DataError("missing field 'prompt'")
    prompt = _with_system(r, _text_or_messages(r["prompt"], "prompt", "user"))
    if ("responses" in r) == ("completions" in r):
        raise DataError("a ranked record needs exactly one of 'responses' (best first) or 'completions' (scored)")
    if "responses" in r:
        key = "responses"
        responses = [_text_or_messages(v, f"responses[{i}]", "assistant")
                     for i, v in enumerate(_get_list(r, "responses"))]
        goodness = [-float(i) for i in range(len(responses))]
    else:
        key = "completions"
        responses, goodness = _ranked_completions(_get_list(r, "completions"))
    if len(responses) < 2:
        raise DataError(f"field '{key}' needs at least 2 responses to rank, got {len(responses)}")
    meta = r.get("meta") if isinstance(r.get("meta"), dict) else {}
    meta = dict(meta, **_scalar_meta(r, ("id",)), group=ranked_group_id(prompt, responses))
    return ranked_pairs(prompt, responses, goodness, meta, key)


def ranked_pairs(prompt: list[Message], responses: list[list[Message]], goodness: list[float], meta: dict[str, Any],
                 what: str = "responses", positions: list[int] | None = None) -> list[PreferencePair]:
    """Every (better, worse) pair of ``responses`` to ``prompt`` by ``goodness`` (higher is better; ties give no
    pair), best first, each with ``meta`` plus ``ranks`` = [i, j] (``positions`` of the two, default their indices).
    Errors name ``what[i]``: an empty or invalid response, identical responses ranked differently, all tied."""
    pos = positions if positions is not None else list(range(len(responses)))
    validate_messages(prompt, require_assistant=False, final=None, what="prompt")
    for i, resp in enumerate(responses):
        if not resp:
            raise DataError(f"{what}[{pos[i]}] is empty")
        validate_messages(prompt + resp, what=f"{what}[{pos[i]}]")
    seen: dict[tuple, int] = {}
    for i, resp in enumerate(responses):
        j = seen.setdefault(tuple(resp), i)
        if j != i and goodness[i] != goodness[j]:
            raise DataError(f"{what}[{pos[j]}] and {what}[{pos[i]}] are identical but ranked differently")
    if len(set(goodness)) == 1:
        raise DataError(f"all {len(responses)} responses are tied: no comparison to learn from")
    order = sorted(range(len(responses)), key=lambda i: (-goodness[i], i))  # best first; ties keep list order
    pairs = []
    for a, i in enumerate(order):
        for j in order[a + 1:]:
            if goodness[i] == goodness[j]:
                continue  # a tie says nothing about which is better
            pairs.append(_pair(prompt, responses[i], responses[j], dict(meta, ranks=[pos[i], pos[j]])))
    return pairs


def from_oasst_ranked(record: Any) -> list[Example]:
    """One OpenAssistant message tree (the oasst "trees" export: ``{"message_tree_id", "prompt": {root message with
    nested "replies"}}``) -> ranked pairs: every prompter message with 2 or more ranked assistant replies is a group
    (prompt = the path from the root to it; replies ordered by ``rank``, 0 best; unranked and deleted replies left
    out). ``meta["group"]`` is "oasst:<tree id>:<prompter message id>", ``ranks`` the positions in ``replies``.
    A tree without such a message gives no pairs (a record kept with 0 examples)."""
    r = _require_object(record, "oasst_ranked")
    root = r.get("prompt")
    if not isinstance(root, dict):
        raise DataError(f"field 'prompt' must be the tree's root message object, got {_typename(root)}")
    tree_id = r.get("message_tree_id", root.get("message_id"))
    if not isinstance(tree_id, str):
        raise DataError(f"field 'message_tree_id' must be a string, got {_typename(tree_id)}")
    out: list[Example] = []
    # Iterative, and each node keeps only a link to its parent's (message, link): deep trees cost O(nodes).
    stack: list[tuple[Any, Any, str]] = [(root, None, "prompt")]
    while stack:
        node, parent, what = stack.pop()
        if not isinstance(node, dict):
            raise DataError(f"{what} must be a message object, got {_typename(node)}")
        if node.get("deleted") is True:
            continue
        role = OASST_ROLES.get(node.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise DataError(f"{what}: unknown role {_short(node.get('role'))} (expected prompter or assistant)")
        if role == (parent[0].role if parent else "assistant"):
            raise DataError(f"{what}: roles out of order: '{role}' after '{parent[0].role if parent else 'start'}'")
        text = node.get("text")
        if not isinstance(text, str):
            raise DataError(f"{what}.text must be a string, got {_typename(text)}")
        replies = node.get("replies")
        replies = [] if replies is None else replies  # the export writes "replies": null on leaves
        if not isinstance(replies, list):
            raise DataError(f"{what}.replies must be a list, got {_typename(replies)}")
        link = (Message(role, text), parent)
        if role == "user":
            ranked = [(i, c) for i, c in enumerate(replies) if isinstance(c, dict) and c.get("rank") is not None
                      and c.get("deleted") is not True]
            ranks = [_finite(c["rank"], f"{what}.replies[{i}].rank") for i, c in ranked]
            if len(ranked) >= 2 and len(set(ranks)) > 1:
                for i, c in ranked:
                    if OASST_ROLES.get(c.get("role")) != "assistant" or not isinstance(c.get("text"), str):
                        raise DataError(f"{what}.replies[{i}]: a ranked reply to a prompter must be an assistant text")
                msgs, at = [], link
                while at is not None:
                    msgs.append(at[0])
                    at = at[1]
                msgs.reverse()
                mid = node.get("message_id")
                meta = {"message_tree_id": tree_id, "group": f"oasst:{tree_id}:{mid if isinstance(mid, str) else what}"}
                out += ranked_pairs(msgs, [[Message("assistant", c["text"])] for _, c in ranked], [-x for x in ranks],
                                    meta, f"{what}.replies", [i for i, _ in ranked])
        for i in range(len(replies) - 1, -1, -1):
            stack.append((replies[i], link, f"{what}.replies[{i}]"))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# oasst: a file of messages is a forest; conversations are root-to-leaf paths.
# ---------------------------------------------------------------------------------------------------------------------

OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclass
class OasstMessage:
    message_id: str
    parent_id: str | None
    role: str  # internal role: user | assistant
    text: str
    rank: int | None
    tree_id: str | None
    order: int  # position in the file: ties between equally ranked siblings go to the first one


def parse_oasst_message(record: Any, order: int = 0) -> OasstMessage:
    r = _require_object(record, "oasst")
    message_id = r.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        raise DataError(f"field 'message_id' must be a non-empty string, got {_short(message_id)}")
    if "parent_id" not in r:
        raise DataError("missing field 'parent_id'")
    parent_id = r["parent_id"]
    if parent_id is not None and not isinstance(parent_id, str):
        raise DataError(f"field 'parent_id' must be a string or null, got {_typename(parent_id)}")
    role_raw = _get_str(r, "role")
    role = OASST_ROLES.get(role_raw)
    if role is None:
        raise DataError(f"unknown role {_short(role_raw)} (expected prompter or assistant)")
    text = _get_str(r, "text")
    rank = r.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank != rank):
        raise DataError(f"field 'rank' must be a number or null, got {_short(rank)}")
    if parent_id is None and role != "user":
        raise DataError("roles out of order: a tree's root message must be from the prompter")
    if role == "assistant" and not text.strip():
        raise DataError("empty assistant turn")
    tree = r.get("message_tree_id")
    return OasstMessage(message_id, parent_id, role, text, rank, tree if isinstance(tree, str) else None, order)


def oasst_conversations(
    messages: list[OasstMessage], *, all_paths: bool = False
) -> tuple[list[tuple[OasstMessage, Conversation]], dict[int, str]]:
    """Group parsed oasst messages into trees and read conversations off them.

    Returns ``(conversations, rejected)``: each conversation with the message that ends it (its location is the
    conversation's location), and ``rejected = {message.order: reason}`` for messages that cannot sit in a valid tree
    (duplicate id, missing parent, same role as the parent) together with everything below them.

    Default: the best-ranked path of each tree (at each level the child with the lowest rank, None counting as 0,
    ties to the first in the file). ``all_paths=True``: every root-to-leaf path. A path that ends with a prompter turn
    is cut back to its last assistant turn; a path with no assistant turn gives nothing.
    """
    by_id: dict[str, OasstMessage] = {}
    rejected: dict[int, str] = {}
    for m in messages:
        if m.message_id in by_id:
            rejected[m.order] = f"duplicate message_id {_short(m.message_id)}"
            continue
        by_id[m.message_id] = m
    children: dict[str | None, list[OasstMessage]] = {}
    for m in by_id.values():
        children.setdefault(m.parent_id, []).append(m)

    # Walk from the roots; anything not reached hangs off a missing parent (or is part of a cycle).
    valid: set[str] = set()
    stack = list(children.get(None, []))
    while stack:
        m = stack.pop()
        valid.add(m.message_id)
        for c in children.get(m.message_id, []):
            if c.role == m.role:
                bad_subtree(c, children, rejected, f"roles out of order: '{c.role}' reply to a '{m.role}' message")
            else:
                stack.append(c)
    for m in by_id.values():
        if m.message_id not in valid and m.order not in rejected:
            reason = (
                f"parent {_short(m.parent_id)} not found"
                if m.parent_id not in by_id
                else "an ancestor message was rejected or the parent chain has a cycle"
            )
            rejected[m.order] = reason

    def kids(m: OasstMessage) -> list[OasstMessage]:
        return [c for c in children.get(m.message_id, []) if c.message_id in valid]

    def rank_key(m: OasstMessage):
        return (m.rank if m.rank is not None else 0, m.order)

    ends: list[list[OasstMessage]] = []
    roots = sorted((m for m in children.get(None, []) if m.message_id in valid), key=lambda m: m.order)
    for root in roots:
        if all_paths:
            stack2 = [[root]]
            while stack2:
                path = stack2.pop()
                ks = sorted(kids(path[-1]), key=lambda m: m.order, reverse=True)
                if not ks:
                    ends.append(path)
                for k in ks:
                    stack2.append(path + [k])
        else:
            path = [root]
            while ks := kids(path[-1]):
                path.append(min(ks, key=rank_key))
            ends.append(path)

    out: list[tuple[OasstMessage, Conversation]] = []
    seen_ends: set[str] = set()
    for path in ends:
        while path and path[-1].role != "assistant":
            path = path[:-1]
        if not path or path[-1].message_id in seen_ends:
            continue
        seen_ends.add(path[-1].message_id)
        tree_id = path[0].tree_id or path[0].message_id
        conv = Conversation([Message(m.role, m.text) for m in path], {"message_tree_id": tree_id})
        validate_conversation(conv)  # alternation holds by construction; this guards the invariant
        out.append((path[-1], conv))
    return out, rejected


def bad_subtree(m: OasstMessage, children: dict, rejected: dict[int, str], reason: str) -> None:
    rejected[m.order] = reason
    for c in children.get(m.message_id, []):
        bad_subtree(c, children, rejected, f"an ancestor message ({_short(m.message_id)}) was rejected")


def from_oasst(record: Any) -> list[Example]:
    """One oasst message alone is not an example: read oasst files with io.read_examples (which builds the trees)."""
    parse_oasst_message(record)
    raise DataError("oasst records must be read as a whole file (io.read_examples groups them into trees)")


# ---------------------------------------------------------------------------------------------------------------------
# LLaMA-Factory v1: typed content parts and per-message loss weights
# ---------------------------------------------------------------------------------------------------------------------

LF_V1_ROLES = ("system", "user", "assistant", "tool")
LF_V1_RECORD_KEYS = ("messages", "tools", "extra_info", "_dataset_name")


def _lf_v1_message(m: Any, what: str, tools: list[dict]) -> Message:
    """``{"role", "content": [{"type", "value"}, ...] | str, "loss_weight"}`` -> Message; a "tools" part adds to
    ``tools``. loss_weight: on assistant turns the weight (0 or 1); on other turns only 0 (their default)."""
    if not isinstance(m, dict):
        raise DataError(f"{what} must be an object, got {_typename(m)}")
    for k in m:
        if k not in ("role", "content", "loss_weight"):
            raise DataError(f"{what} has an unknown key {_short(k, 40)} (known: role, content, loss_weight)")
    role = m.get("role")
    if role not in LF_V1_ROLES:
        raise DataError(f"{what}: unknown role {_short(role)} (expected one of {', '.join(LF_V1_ROLES)})")
    content = m.get("content")
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            where = f"{what}.content[{j}]"
            if not isinstance(part, dict):
                raise DataError(f"{where} must be a {{type, value}} part, got {_typename(part)}")
            kind, value = part.get("type"), part.get("value")
            for k in part:
                if k not in ("type", "value"):
                    raise DataError(f"{where} has an unknown key {_short(k, 40)} (known: type, value)")
            if not isinstance(value, str):
                raise DataError(f"{where}.value must be a string, got {_typename(value)}")
            if kind == "text":
                texts.append(value)
            elif kind == "reasoning":
                reasoning.append(value)
            elif kind in ("tool_call", "tool_calls"):
                calls += sharegpt_function_call(value, where)
            elif kind == "tools":
                tools += normalize_tools(value, f"{where}.value") or []
            else:
                raise DataError(f"{where} has type {_short(kind)}; supported: text, reasoning, tool_call, tools "
                                "(images, audio and video cannot be trained on)")
    elif content is not None:
        raise DataError(f"{what}.content must be a list of {{type, value}} parts, got {_typename(content)}")
    weight = m.get("loss_weight")
    if weight is not None and role != "assistant":
        if isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight == 0:
            weight = None  # the default of a non-assistant turn
        else:
            raise DataError(f"{what} is a '{role}' turn with loss_weight {_short(weight)}: only assistant turns are "
                            "trained (use 0 or leave it out)")
    try:
        return Message(role, "".join(texts), reasoning="".join(reasoning) if reasoning else None,
                       tool_calls=tuple(calls) or None, weight=weight)
    except DataError as e:
        raise DataError(f"{what}: {e.reason}") from None


def _lf_v1_messages(value: Any, what: str, tools: list[dict]) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(f"'{what}' must be a list of messages, got {_typename(value)}")
    return [_lf_v1_message(m, f"{what}[{i}]", tools) for i, m in enumerate(value)]


def _lf_v1_meta(r: dict) -> dict[str, Any]:
    return _scalar_meta(r, ("extra_info", "_dataset_name"))


def from_lf_v1(record: Any) -> list[Example]:
    """LLaMA-Factory v1 SFT sample: ``messages`` (typed parts, loss_weight), optional ``tools`` (a JSON string)."""
    r = _require_object(record, "lf_v1")
    if "messages" not in r:
        raise DataError("missing field 'messages'")
    _refuse_record_keys(r, LF_V1_RECORD_KEYS)
    tools = normalize_tools(r.get("tools")) or []
    messages = _lf_v1_messages(r["messages"], "messages", tools)
    return [_conversation(messages, _lf_v1_meta(r), tools=tools or None)]


def from_lf_v1_dpo(record: Any) -> list[Example]:
    """LLaMA-Factory v1 DPO sample: ``chosen_messages`` and ``rejected_messages``, two full conversations whose shared
    turns are the prompt."""
    r = _require_object(record, "lf_v1_dpo")
    for key in ("chosen_messages", "rejected_messages"):
        if key not in r:
            raise DataError(f"missing field '{key}'")
    _refuse_record_keys(r, ("chosen_messages", "rejected_messages", "tools", "margin", "extra_info", "_dataset_name"))
    tools = normalize_tools(r.get("tools")) or []
    chosen = _lf_v1_messages(r["chosen_messages"], "chosen_messages", tools)
    rejected = _lf_v1_messages(r["rejected_messages"], "rejected_messages", tools)
    validate_messages(chosen, what="chosen_messages")
    validate_messages(rejected, what="rejected_messages")
    prompt, c, rj = split_shared_prefix(chosen, rejected)
    return [_pair(prompt, c, rj, _lf_v1_meta(r), _margin(r), tools or None)]


def _looks_lf_v1(record: dict) -> bool:
    msgs = record.get("messages")
    if not isinstance(msgs, list):
        return False
    for m in msgs:
        if isinstance(m, dict):
            if "loss_weight" in m:
                return True
            c = m.get("content")
            if isinstance(c, list) and any(isinstance(p, dict) and "value" in p and "text" not in p for p in c):
                return True
    return False


# ---------------------------------------------------------------------------------------------------------------------
# Unpaired (KTO) and plain text
# ---------------------------------------------------------------------------------------------------------------------

KTO_LABEL_KEYS = ("label", "kto_tag")


def _kto_label(r: dict) -> bool:
    keys = [k for k in KTO_LABEL_KEYS if k in r]
    if len(keys) != 1:
        raise DataError("an unpaired (KTO) record needs exactly one of 'label' or 'kto_tag' (true = desirable, "
                        "false = undesirable)")
    value = r[keys[0]]
    if not isinstance(value, bool):
        raise DataError(f"field '{keys[0]}' must be true (desirable) or false (undesirable), got {_short(value)}")
    return value


def _unpaired(prompt: list[Message], completion: list[Message], label: bool, meta: dict, tools) -> UnpairedExample:
    n = len(prompt)
    ex = UnpairedExample(apply_options(prompt, tools), apply_options(completion, tools, n), label, dict(meta), tools)
    validate_unpaired(ex)
    return ex


def split_completion(messages: list[Message]) -> tuple[list[Message], list[Message]]:
    """A whole conversation -> (prompt, completion): the completion is the assistant turn(s) after the last user or
    tool turn."""
    k = len(messages)
    while k > 0 and messages[k - 1].role == "assistant":
        k -= 1
    return messages[:k], messages[k:]


def from_kto(record: Any) -> list[Example]:
    """Unpaired (KTO) data -> one UnpairedExample: ``messages`` (OpenAI) or ``conversations`` (ShareGPT) whose last
    assistant turn is the completion, or ``prompt`` + ``completion`` (strings or message lists; TRL's unpaired
    format and the internal form); the label from ``label`` or ``kto_tag``."""
    r = _require_object(record, "kto")
    label = _kto_label(r)
    meta = r.get("meta") if isinstance(r.get("meta"), dict) else {}
    meta = dict(meta, **_scalar_meta(r, ("id",)))
    if r.get("meta") is not None and not isinstance(r.get("meta"), dict):
        raise DataError(f"field 'meta' must be an object, got {_typename(r.get('meta'))}")
    label_key = next(k for k in KTO_LABEL_KEYS if k in r)
    if "messages" in r or "conversations" in r:
        key = "messages" if "messages" in r else "conversations"
        _refuse_record_keys({k: v for k, v in r.items() if k != label_key},
                            (key, "tools", "meta", "id", "system"))
        msgs = (_openai_messages(r[key], key) if key == "messages"
                else _with_system(r, _sharegpt_messages(r[key], key)))
        prompt, completion = split_completion(msgs)
        if not completion:
            raise DataError(f"'{key}' does not end with an assistant turn: there is no completion to label")
    else:
        for key in ("prompt", "completion"):
            if key not in r:
                raise DataError(f"missing field '{key}' (an unpaired record is messages + label, or prompt + "
                                "completion + label)")
        _refuse_record_keys({k: v for k, v in r.items() if k != label_key},
                            ("prompt", "completion", "tools", "meta", "id", "system"))
        prompt = _with_system(r, _text_or_messages(r["prompt"], "prompt", "user"))
        completion = _text_or_messages(r["completion"], "completion", "assistant")
    return [_unpaired(prompt, completion, label, meta, normalize_tools(r.get("tools")))]


def from_text(record: Any) -> list[Example]:
    """Plain text: ``{"text": ..., "meta"?, "id"?}`` -> TextExample."""
    r = _require_object(record, "text")
    text = _get_str(r, "text")
    for k in r:
        if k not in ("text", "meta", "id"):
            raise DataError(f"unknown field {_short(k, 40)} in a plain-text record (known: text, meta, id)")
    meta = r.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise DataError(f"field 'meta' must be an object, got {_typename(meta)}")
    ex = TextExample(text, dict(meta or {}, **_scalar_meta(r, ("id",))))
    validate_text(ex)
    return [ex]


# ---------------------------------------------------------------------------------------------------------------------
# Registry and detection
# ---------------------------------------------------------------------------------------------------------------------

Adapter = Callable[[Any], list[Example]]

FORMATS: dict[str, Adapter] = {
    "alpaca": from_alpaca,
    "dolly": from_dolly,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "oasst": from_oasst,
    "ultrachat": from_ultrachat,
    "prompt_completion": from_prompt_completion,
    "prompt_only": from_prompt_only,
    "flan": from_flan,
    "self_instruct": from_self_instruct,
    "preference": from_preference,
    "sharegpt_preference": from_sharegpt_preference,
    "hh_rlhf": from_hh_rlhf,
    "ranked": from_ranked,
    "oasst_ranked": from_oasst_ranked,
    "lf_v1": from_lf_v1,
    "lf_v1_dpo": from_lf_v1_dpo,
    "kto": from_kto,
    "text": from_text,
    "gsm8k": from_gsm8k,
}

PREFERENCE_FORMATS = frozenset({"preference", "sharegpt_preference", "hh_rlhf", "ranked", "oasst_ranked", "lf_v1_dpo"})
UNPAIRED_FORMATS = frozenset({"kto"})
TEXT_FORMATS = frozenset({"text"})


def format_kind(fmt: str) -> str:
    """The kind of example a (canonical) format gives: conversation, preference, unpaired or text."""
    if fmt in PREFERENCE_FORMATS:
        return "preference"
    if fmt in UNPAIRED_FORMATS:
        return "unpaired"
    if fmt in TEXT_FORMATS:
        return "text"
    return "conversation"

ALIASES = {
    "openai": "messages",
    "internal": "messages",
    "chatml": "messages",
    "internal_preference": "preference",
    "dpo": "preference",
    "sharegpt_dpo": "sharegpt_preference",
    "llama_factory_dpo": "sharegpt_preference",
    "hh": "hh_rlhf",
    "anthropic_hh": "hh_rlhf",
    "oasst1": "oasst",
    "self_instruct_seed": "self_instruct",
    "seed_tasks": "self_instruct",
    "prompts": "prompt_only",
    "ranking": "ranked",
    "kwise": "ranked",
    "oasst_trees": "oasst_ranked",
    "llama_factory_v1": "lf_v1",
    "llamafactory_v1": "lf_v1",
    "llama_factory_v1_dpo": "lf_v1_dpo",
    "llamafactory_v1_dpo": "lf_v1_dpo",
    "unpaired": "kto",
    "kto_unpaired": "kto",
    "internal_unpaired": "kto",
    "plain_text": "text",
    "txt": "text",
    "pretrain": "text",
}


def canonical_format(name: str) -> str:
    """A format name or alias -> its canonical name ("auto" stays "auto"); unknown names are a DataError."""
    key = name.strip().lower().replace("-", "_")
    if key == "auto" or key in FORMATS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    raise DataError(f"unknown format '{name}' (known: auto, {', '.join(FORMATS)})")


def detect_format(record: Any) -> str:
    """The format of one record, from its keys (and, for HH-RLHF, the transcript markers)."""
    if not isinstance(record, dict):
        raise DataError(f"cannot detect the format of a {_typename(record)} record: expected a JSON object")
    keys = set(record)
    labelled = bool(keys & set(KTO_LABEL_KEYS))
    if {"chosen_messages", "rejected_messages"} & keys:
        return "lf_v1_dpo"
    if "messages" in keys:
        if labelled:
            return "kto"
        return "lf_v1" if _looks_lf_v1(record) else "messages"
    if "conversations" in keys:
        if labelled:
            return "kto"
        return "sharegpt_preference" if {"chosen", "rejected"} <= keys else "sharegpt"
    if labelled and {"prompt", "completion"} <= keys:
        return "kto"
    if {"chosen", "rejected"} <= keys:
        chosen = record["chosen"]
        if "prompt" not in keys and isinstance(chosen, str) and HH_TURN.search(chosen):
            return "hh_rlhf"
        return "preference"
    if {"message_id", "parent_id"} <= keys:
        return "oasst"
    if {"instruction", "instances"} <= keys:
        return "self_instruct"
    if "data" in keys and isinstance(record["data"], list):
        return "ultrachat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"inputs", "targets"} <= keys:
        return "flan"
    if {"question", "answer"} <= keys and isinstance(record["answer"], str) and "####" in record["answer"]:
        return "gsm8k"
    if "prompt" in keys and ("responses" in keys or "completions" in keys):
        return "ranked"
    if isinstance(record.get("prompt"), dict) and "replies" in record["prompt"]:
        return "oasst_ranked"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt_only"
    if "text" in keys and isinstance(record["text"], str):
        return "text"
    shown = ", ".join(_short(k, 30) for k in sorted(keys, key=str)[:12])
    raise DataError(f"cannot detect the format from the keys [{shown}]; pass format= one of {', '.join(FORMATS)}")


# Formats whose adapter reads a record-level `tools` list; formats that check every key themselves; formats whose other
# keys all go to meta (nothing is dropped).
TOOLS_FORMATS = frozenset({"alpaca", "sharegpt", "messages", "prompt_completion", "preference", "sharegpt_preference",
                           "lf_v1", "lf_v1_dpo", "kto"})
STRICT_FORMATS = frozenset({"messages", "lf_v1", "lf_v1_dpo", "kto", "text", "prompt_only"})


def _refuse_unread_keys(record: Any, fmt: str) -> None:
    """Record keys that would change what is trained but that format ``fmt`` does not read are refused by name (a
    column nobody reads is data silently dropped): a KTO label, tool definitions, reasoning."""
    if not isinstance(record, dict) or fmt in STRICT_FORMATS:
        return
    for key in KTO_LABEL_KEYS:
        if record.get(key) is not None:  # (a null cell of a Parquet / datasets column is no label)
            raise DataError(f"field '{key}' marks the completion desirable or not{KTO_HINT} (format kto); as {fmt} "
                            "data its undesirable answers would be trained on")
    if record.get("functions") is not None:
        raise DataError("field 'functions' (the legacy OpenAI function definitions) is not read: convert it to "
                        "'tools': [{\"type\": \"function\", \"function\": <definition>}, ...]")
    if "tools" in record and fmt not in TOOLS_FORMATS and record["tools"] not in (None, "", []):
        raise DataError(f"field 'tools' is not read by format {fmt}: use a format that keeps tool definitions "
                        f"({', '.join(sorted(TOOLS_FORMATS))})")
    for key in REASONING_FIELDS:
        if key in record and record[key] is not None:
            raise DataError(f"field '{key}' is not read by format {fmt}: put reasoning on the assistant message "
                            "(messages format: 'reasoning' / 'reasoning_content') or in a leading <think> block of "
                            "the answer with data.split_think")


def convert_record(record: Any, fmt: str, options: ReadOptions | None = None) -> list[Example]:
    """One record in format ``fmt`` (canonical name, not "auto") -> examples; raises only DataError. ``options``: how
    assistant turns are read (Hermes tool calls, <think> blocks; see ReadOptions)."""
    try:
        adapter = FORMATS[fmt]
    except KeyError:
        raise DataError(f"unknown format '{fmt}'") from None
    _refuse_unread_keys(record, fmt)
    token = _OPTIONS.set(options or ReadOptions())
    try:
        return adapter(record)
    finally:
        _OPTIONS.reset(token)
