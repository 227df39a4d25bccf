"""Reading a chat reply back into the OpenAI message shape: reasoning (``reasoning_content``) and tool calls.

- Reasoning: templates of reasoning models (Qwen3, QwQ, DeepSeek-R1 distills) wrap it in ``<think>...</think>``; the
  reply opens the block itself, or the generation prompt opened it (DeepSeek-R1: the reply starts inside it). Only
  applied when the model's template knows the tags, so a reply of another model that mentions them is left alone.
- Tool calls, in the formats chat templates teach (only parsed when the request offered tools):
  Hermes / Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (one or several), Llama 3.1's bare JSON
  object ``{"name": ..., "parameters": {...}}`` (after an optional ``<|python_tag|>``), Mistral's
  ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``. A call must name an offered function and carry a JSON
  object of arguments, else the text stays content: nothing is invented.
"""

from __future__ import annotations

import json
import re
import uuid

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def split_reasoning(text: str, opened: bool, final: bool = True) -> tuple[str | None, str]:
    """(reasoning or None, content). ``opened``: the generation prompt ended inside a think block. With ``final``
    False (a stream in progress), a trailing partial ``</think>`` stays unassigned so neither side ever shrinks."""
    body = text
    started = opened
    if not opened and body.lstrip().startswith(THINK_OPEN):
        body = body.lstrip()[len(THINK_OPEN):]
        started = True
    if not started:
        return None, text
    if THINK_CLOSE in body:
        reasoning, _, content = body.partition(THINK_CLOSE)
        return reasoning.strip("\n"), content.lstrip("\n")
    if not final:  # hold back what may become "</think>"
        for k in range(min(len(THINK_CLOSE) - 1, len(body)), 0, -1):
            if body.endswith(THINK_CLOSE[:k]):
                body = body[:-k]
                break
        return body.lstrip("\n"), ""
    return body.strip("\n"), ""  # the reply ended inside its reasoning (e.g. max_tokens)


def _call(obj, names: set[str]) -> dict | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or name not in names or not isinstance(args, dict):
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(content without the calls, or None when nothing else was said; the calls in the OpenAI shape)."""
    names = {(t.get("function") or {}).get("name") for t in tools if isinstance(t, dict)}
    calls: list[dict] = []
    if "<tool_call>" in text:
        for m in _HERMES.finditer(text):
            try:
                call = _call(json.loads(m.group(1)), names)
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []  # a malformed call: keep the text as it is rather than guess
            calls.append(call)
        rest = _HERMES.sub("", text).strip()
        return (rest or None), calls
    stripped = text.strip()
    if stripped.startswith("[TOOL_CALLS]"):
        try:
            objs = json.loads(stripped[len("[TOOL_CALLS]"):].strip())
        except json.JSONDecodeError:
            return text, []
        objs = objs if isinstance(objs, list) else [objs]
        calls = [_call(o, names) for o in objs]
        return (None, calls) if calls and all(calls) else (text, [])
    stripped = stripped.removeprefix("<|python_tag|>").strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        try:
            call = _call(json.loads(stripped), names)
        except json.JSONDecodeError:
            call = None
        if call is not None:
            return None, [call]
    return text, []
