"""Read a generated assistant message back: reasoning, content and tool calls, in the format its chat template teaches.

The inverse of what chat/render.py trains, for the engine and the OpenAI-compatible server (``message.tool_calls``,
``reasoning_content``). Formats, recognised from the template text (and tried in this order when it is unknown):

- Hermes / Qwen: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, any number of them;
- Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (v3) or ``[TOOL_CALLS]name[ARGS]{...}`` (v11+);
- Llama 3.1 / 3.2 / 3.3: the whole answer is one JSON object ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``).

A call counts only when its arguments are a JSON object and, when the request offered tools, it names one of them;
otherwise the whole text stays content: nothing is invented.

Reasoning: ``<think>...</think>`` at the start of the text, or, when the generation prompt already opened the block
(DeepSeek-R1-Distill, QwQ: ``prompt_opened_think=True``), everything up to the first ``</think>``. Text that does not
parse stays content: nothing is dropped.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_MISTRAL_V11 = re.compile(r"\[TOOL_CALLS\]([^\[\]\s]+)\[ARGS\](.*?)(?=\[TOOL_CALLS\]|$)", re.DOTALL)


@dataclass
class ParsedMessage:
    """An assistant message as the OpenAI API returns it."""

    content: str
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """``[{"id", "type": "function", "function": {"name", "arguments": JSON text}}]``."""


def _call(name: Any, arguments: Any, tools: list[dict] | None) -> dict[str, Any] | None:
    """The OpenAI-shaped call, or None when it is not one: arguments that are not a JSON object (or its text), or a
    name the request did not offer (when it offered tools)."""
    if isinstance(arguments, str):
        arguments = _json(arguments)
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    if tools and name not in {(t.get("function") or t).get("name") for t in tools if isinstance(t, dict)}:
        return None
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def split_reasoning(text: str, prompt_opened_think: bool = False, final: bool = True) -> tuple[str | None, str]:
    """(reasoning, rest) of a generated text: a leading <think>...</think> block (or, after a prompt that opened it,
    everything up to </think>); (None, text) when there is none. With ``final`` False (a stream in progress), a
    trailing partial ``</think>`` is held back, so neither side ever shrinks as more text arrives."""
    stripped = text.lstrip()
    if stripped.startswith("<think>"):
        body = stripped[len("<think>"):]
    elif prompt_opened_think:
        body = text
    else:
        return None, text
    if "</think>" in body:
        reasoning, rest = body.split("</think>", 1)
        return reasoning.strip("\n"), rest.lstrip("\n")
    if not final:  # hold back what may become "</think>"
        for k in range(min(len("</think>") - 1, len(body)), 0, -1):
            if body.endswith("</think>"[:k]):
                body = body[:-k]
                break
        return body.lstrip("\n"), ""
    return body.strip("\n"), ""  # cut off inside its reasoning (length limit): all of it is reasoning


def _format_of(template: Any) -> str | None:
    source = getattr(template, "source", template) or ""
    if not isinstance(source, str):
        return None
    if "<tool_call>" in source:
        return "hermes"
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if '"parameters": ' in source or "<|python_tag|>" in source:
        return "llama3"
    return None


def parse_tool_calls(text: str, template: Any = None, tools: list[dict] | None = None
                     ) -> tuple[str, list[dict[str, Any]]]:
    """(content without the calls, tool calls in the OpenAI shape) of a generated text; ``template`` (a ChatTemplate
    or Jinja source) picks the format (all are tried without it), ``tools`` (the request's definitions): only calls of
    these functions count."""
    fmt = _format_of(template)
    formats = [fmt] if fmt else ["hermes", "mistral", "llama3"]
    for f in formats:
        content, calls = _PARSERS[f](text, tools)
        if calls:
            return content, calls
    return text, []


def _hermes(text: str, tools) -> tuple[str, list[dict]]:
    calls = []
    for m in _HERMES.finditer(text):
        obj = _json(m.group(1))
        call = _call(obj.get("name"), obj.get("arguments", {}), tools) if isinstance(obj, dict) else None
        if call is None:
            return text, []  # a malformed call: leave the text as it is rather than guess
        calls.append(call)
    return (_HERMES.sub("", text).strip(), calls) if calls else (text, [])


def _mistral(text: str, tools) -> tuple[str, list[dict]]:
    if "[TOOL_CALLS]" not in text:
        return text, []
    head, tail = text.split("[TOOL_CALLS]", 1)
    obj = _json(tail.strip().split("</s>")[0])
    if isinstance(obj, (list, dict)):
        calls = [_call(c.get("name"), c.get("arguments", {}), tools) if isinstance(c, dict) else None
                 for c in (obj if isinstance(obj, list) else [obj])]
        return (head.strip(), calls) if calls and all(calls) else (text, [])
    calls = []
    for m in _MISTRAL_V11.finditer("[TOOL_CALLS]" + tail):
        call = _call(m.group(1), _json(m.group(2).strip()), tools)
        if call is None:
            return text, []
        calls.append(call)
    return (head.strip(), calls) if calls else (text, [])


def _llama3(text: str, tools) -> tuple[str, list[dict]]:
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].strip()
    obj = _json(body)
    if not (isinstance(obj, dict) and ("parameters" in obj or "arguments" in obj)):
        return text, []
    call = _call(obj.get("name"), obj.get("parameters", obj.get("arguments")), tools)
    return ("", [call]) if call else (text, [])


_PARSERS = {"hermes": _hermes, "mistral": _mistral, "llama3": _llama3}


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """True when a rendered generation prompt ends inside an open reasoning block (DeepSeek-R1-Distill's
    "<think>\n"), so the generated text starts with reasoning: pass it as ``prompt_opened_think``."""
    from instructkit.chat.render import _open_reasoning_close

    return _open_reasoning_close(prompt_text) == "</think>"


def parse_assistant_output(text: str, template: Any = None, tools: list[dict] | None = None,
                           prompt_opened_think: bool = False) -> ParsedMessage:
    """Reasoning, content and tool calls of a generated assistant message (see the module docstring)."""
    reasoning, rest = split_reasoning(text, prompt_opened_think)
    content, calls = parse_tool_calls(rest, template, tools)
    return ParsedMessage(content=content, reasoning=reasoning, tool_calls=calls)


__all__ = ["ParsedMessage", "parse_assistant_output", "parse_tool_calls", "prompt_opens_reasoning", "split_reasoning"]
