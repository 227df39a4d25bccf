"""Named chat templates and any tokenizer's own Jinja template, rendered only in a sandbox.

A chat template turns a list of messages into the text a model is trained on and prompted with. The built-in ones below
are the official Jinja sources of their families (byte-identical renders are checked in tests/test_templates.py
against vendored copies of the official files), each with what the rest of the toolkit needs to know about it:
its end-of-turn string (the token the model must learn to emit, and generation stops on), whether it writes BOS
itself, and the special tokens a tokenizer must have for it (``prepare_tokenizer`` adds missing ones).

Every template, built-in or taken from a tokenizer ("auto"), is rendered in jinja2's ImmutableSandboxedEnvironment
with the same globals and whitespace settings as transformers' ``apply_chat_template`` (so renders agree byte for
byte), never in a plain Environment: chat templates from model folders are untrusted code (llama-cpp-python
CVE-2024-34359).

Templates see what transformers' ``apply_chat_template`` gives them (``template_messages`` builds it from our
Message / Conversation): messages as plain dicts in the OpenAI / Hugging Face shape with keys whose value is None left
out, an assistant's ``tool_calls`` as ``[{"id", "type": "function", "function": {"name", "arguments": dict}}]``, its
reasoning under ``reasoning_content`` and ``thinking`` (transformers' aliases), a tool result's ``tool_call_id`` /
``name``; the conversation's function definitions as ``tools`` (None when it has none) and ``documents=None``; the
tokenizer's special tokens (``bos_token``, ``eos_token``, ...) and any extra keyword (``enable_thinking``) as
variables.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from importlib import resources
from typing import Any, Sequence

from instructkit.config import ConfigError


class TemplateError(ConfigError):
    """A template that cannot be used as asked: unknown name, missing tokens, render errors, non-prefix renders.

    A ConfigError (so a ValueError): the CLI reports it as "error: ..." with exit code 2, like any bad setting.
    """


# --------------------------------------------------------------------------------------------------------------------
# The official sources. Each is copied verbatim from the file named in its comment (the same file is vendored under
# tests/fixtures/official_templates/ and the tests check renders and token ids against it through transformers).
# --------------------------------------------------------------------------------------------------------------------

# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json "chat_template" (as vendored by TRL 1.16.0,
# trl/chat_templates/llama3.jinja). Note `message['content'] | trim`: contents are stripped of surrounding whitespace.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Generic ChatML: teknium/OpenHermes-2.5-Mistral-7B tokenizer_config.json "chat_template", as vendored by
# llama-cpp-python 0.3.36 (CHATML_CHAT_TEMPLATE). SmolLM2-Instruct's template is this plus a default system prompt
# when the conversation has none; the tiny test model carries this one.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# google/gemma-3-* chat template (TRL 1.16.0 trl/chat_templates/gemma3.jinja; the gemma-3-270m base GGUF carries
# none). The system prompt is prepended to the first user turn; user/assistant contents are trimmed.
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json "chat_template" (the v1 [INST] format), as vendored by
# llama-cpp-python 0.3.36 (llama_cpp/llama_chat_format.py MISTRAL_INSTRUCT_CHAT_TEMPLATE). No system role, no
# generation prompt: the prompt ends with ' [/INST]', the answer follows directly, closed by eos and a space.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# HuggingFaceH4/zephyr-7b-beta chat template: the DEFAULT_CHAT_TEMPLATE of the Zephyr authors' training code
# (alignment-handbook 0.3.0, alignment/data.py), which wrote it into that tokenizer. <|user|> etc. are plain text for
# that tokenizer; each turn ends with eos ('</s>').
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca train.py PROMPT_DICT["prompt_no_input"]) written as
# a multi-turn Jinja template; no official Jinja exists. As in alpaca-lora and axolotl, a newline follows
# "### Response:". A system message replaces the default preamble; each answer ends with the tokenizer's eos.
ALPACA = (
    "{% if messages[0]['role'] == 'system' %}{% set preamble = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}"
    "{% set preamble = 'Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.' %}{% set loop_messages = messages %}{% endif %}"
    "{{ preamble + '\n\n' }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% else %}{{ raise_exception('alpaca supports system (first), user and assistant roles only') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


def _resource_template(name: str) -> str:
    return resources.files("instructkit").joinpath("resources", "chat_templates", name).read_text(encoding="utf-8")


# Qwen/Qwen3-* tokenizer_config.json "chat_template" (TRL 1.16.0 trl/chat_templates/qwen3.jinja, the current revision;
# llama-cpp-python 0.3.36's Qwen-Qwen3-0.6B.jinja is the earlier one, equal for string contents). Reasoning is shown
# only for assistant turns after the last user query, so earlier turns change when a turn is appended; the generation
# prompt pre-fills an empty think block when enable_thinking=false. Tools as Hermes-style <tool_call> JSON.
QWEN3 = _resource_template("qwen3.jinja")

# meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json "chat_template" (TRL 1.16.0 trl/chat_templates/llama3_1.jinja,
# byte-identical to llama-cpp-python 0.3.36's meta-llama-Llama-3.1-8B-Instruct.jinja). Always writes a system header
# (knowledge cutoff, date "26 Jul 2024" unless date_string is passed); tools go into the first user message; one tool
# call per assistant turn, as JSON {"name", "parameters"} (the turn's content is not rendered); tool results as
# role "ipython".
LLAMA31 = _resource_template("llama3_1.jinja")


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and what callers need to know about it."""

    name: str
    """Built-in name, "auto" (the tokenizer's own), or "custom"."""
    source: str
    """The Jinja source."""
    end_of_turn: str | None = None
    """The string that closes an assistant turn (supervised; generation stops on it). None: derive it by rendering."""
    bos_token: str | None = None
    """The BOS string the template writes itself (passed as `bos_token`); None: the tokenizer's, if any."""
    eos_token: str | None = None
    """The `eos_token` the template uses; None: the tokenizer's."""
    special_tokens: tuple[str, ...] = ()
    """Control tokens the tokenizer must know as special tokens for this template (prepare_tokenizer adds them)."""
    plain_tokens: tuple[str, ...] = ()
    """Tags the family's tokenizer has as single, non-special added tokens (Qwen's <think>, <tool_call>):
    prepare_tokenizer adds missing ones as such (user text spelling them is tokenised like the model's own)."""
    trims_content: bool = False
    """True when the template strips whitespace around message contents (`| trim`)."""
    roles: tuple[str, ...] = ("system", "user", "assistant")
    """Roles the template accepts."""
    description: str = ""
    official_source: str = ""
    """Where the Jinja text comes from."""
    extra_vars: dict[str, Any] = field(default_factory=dict)

    def variables(self, tokenizer=None) -> dict[str, Any]:
        """The variables the template sees besides messages/add_generation_prompt, as transformers passes them."""
        out: dict[str, Any] = {}
        if tokenizer is not None:
            out.update({k: v for k, v in getattr(tokenizer, "special_tokens_map", {}).items() if isinstance(v, str)})
        if self.bos_token is not None:
            out["bos_token"] = self.bos_token
        if self.eos_token is not None:
            out["eos_token"] = self.eos_token
        out.setdefault("bos_token", "")
        out.setdefault("eos_token", "")
        out.update(self.extra_vars)
        return out


BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            name="llama3", source=LLAMA3, end_of_turn="<|eot_id|>", bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            trims_content=True, roles=("system", "user", "assistant", "tool"),
            description="Llama 3 / 3.x instruct (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>)",
            official_source="meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json (TRL 1.16.0 llama3.jinja)",
        ),
        ChatTemplate(
            name="llama3.1", source=LLAMA31, end_of_turn="<|eot_id|>", bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                            "<|eom_id|>", "<|python_tag|>"),
            trims_content=True, roles=("system", "user", "assistant", "tool", "ipython"),
            description="Llama 3.1 / 3.2 / 3.3 instruct with tool calls (JSON {name, parameters}; results as ipython)",
            official_source="meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json (TRL 1.16.0 llama3_1.jinja)",
        ),
        ChatTemplate(
            name="qwen3", source=QWEN3, end_of_turn="<|im_end|>", special_tokens=("<|im_start|>", "<|im_end|>"),
            plain_tokens=("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
            roles=("system", "user", "assistant", "tool"),
            description="Qwen3 (ChatML, <think> reasoning, <tool_call> tools; enable_thinking=false pre-fills an "
                        "empty think block)",
            official_source="Qwen/Qwen3-* tokenizer_config.json (TRL 1.16.0 qwen3.jinja)",
        ),
        ChatTemplate(
            name="chatml", source=CHATML, end_of_turn="<|im_end|>",
            special_tokens=("<|im_start|>", "<|im_end|>"), roles=("system", "user", "assistant", "tool"),
            description="ChatML (<|im_start|>role ... <|im_end|>): SmolLM2, Qwen, OpenHermes",
            official_source="teknium/OpenHermes-2.5-Mistral-7B tokenizer_config.json (llama-cpp-python 0.3.36)",
        ),
        ChatTemplate(
            name="gemma", source=GEMMA3, end_of_turn="<end_of_turn>", bos_token="<bos>", eos_token="<eos>",
            special_tokens=("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), trims_content=True,
            description="Gemma 3 (<start_of_turn>user|model ... <end_of_turn>; system folded into the first user turn)",
            official_source="google/gemma-3-* chat template (TRL 1.16.0 gemma3.jinja)",
        ),
        ChatTemplate(
            name="mistral", source=MISTRAL, end_of_turn="</s>", bos_token="<s>", eos_token="</s>",
            special_tokens=("<s>", "</s>"), roles=("user", "assistant"),
            description="Mistral v1 ([INST] user [/INST]answer</s>); no system role",
            official_source="mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json (llama-cpp-python 0.3.36)",
        ),
        ChatTemplate(
            name="zephyr", source=ZEPHYR, end_of_turn="</s>", eos_token="</s>", special_tokens=("</s>",),
            description="Zephyr (<|user|>\\n ...</s>\\n<|assistant|>\\n ...</s>)",
            official_source="HuggingFaceH4/zephyr-7b-beta (alignment-handbook 0.3.0 DEFAULT_CHAT_TEMPLATE)",
        ),
        ChatTemplate(
            name="alpaca", source=ALPACA, end_of_turn=None,
            description="Stanford Alpaca (### Instruction: / ### Response:), answers end with the tokenizer's eos",
            official_source="stanford_alpaca train.py PROMPT_DICT (no official Jinja exists)",
        ),
    )
}


def list_templates() -> list[ChatTemplate]:
    return list(BUILTIN_TEMPLATES.values())


def tokenizer_template_source(tokenizer) -> str | None:
    """The tokenizer's own Jinja chat template (the "default" one if it has several), or None."""
    src = getattr(tokenizer, "chat_template", None)
    if isinstance(src, dict):
        src = src.get("default")
    return src or None


def get_template(template: "str | ChatTemplate" = "auto", tokenizer=None) -> ChatTemplate:
    """Resolve a template: a ChatTemplate, a built-in name, "auto" (the tokenizer's Jinja), a .jinja file, or Jinja
    source."""
    if isinstance(template, ChatTemplate):
        return template
    if not isinstance(template, str) or not template:
        raise TemplateError(f"template must be a name, 'auto' or Jinja source, got {template!r}")
    if template == "auto":
        src = tokenizer_template_source(tokenizer) if tokenizer is not None else None
        if not src:
            raise TemplateError(
                "template 'auto' needs a tokenizer with a chat_template; this tokenizer has none: choose one of "
                + ", ".join(BUILTIN_TEMPLATES)
            )
        for t in BUILTIN_TEMPLATES.values():  # a tokenizer carrying a built-in template gets its metadata
            if t.source == src:
                return t
        return ChatTemplate(name="auto", source=src)
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    if template.endswith((".jinja", ".j2")) and "{" not in template:
        from pathlib import Path

        path = Path(template).expanduser()
        if not path.is_file():
            raise TemplateError(f"template file not found: {path}")
        template = path.read_text(encoding="utf-8")
    if "{{" in template or "{%" in template:
        for t in BUILTIN_TEMPLATES.values():  # a built-in's text (a .jinja file of it) gets its metadata
            if t.source == template:
                return t
        return ChatTemplate(name="custom", source=template)
    raise TemplateError(
        f"unknown template {template!r}: choose one of {', '.join(BUILTIN_TEMPLATES)}, 'auto', a .jinja file, or Jinja "
        "source")


# --------------------------------------------------------------------------------------------------------------------
# What templates see
# --------------------------------------------------------------------------------------------------------------------

REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
"""Names a message's reasoning goes by; templates read one of them (transformers fills the first two)."""


def _arguments_value(arguments: Any) -> Any:
    """Tool-call arguments for a template: a dict when they are JSON text of an object (what apply_chat_template
    documents and templates expect: ``arguments | tojson``, ``arguments | items``), else as given."""
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return arguments


def _tool_call_dict(call: Any) -> dict[str, Any]:
    """A ToolCall (name, arguments JSON, id) or an OpenAI-shape dict -> {"id"?, "type", "function": {name,
    arguments}}."""
    if isinstance(call, dict):
        fn = call.get("function", call)
        name, arguments, call_id = fn.get("name"), fn.get("arguments", {}), call.get("id")
    else:
        name, arguments, call_id = call.name, call.arguments, getattr(call, "id", None)
    out: dict[str, Any] = {}
    if call_id is not None:
        out["id"] = call_id
    out["type"] = "function"
    out["function"] = {"name": name, "arguments": _arguments_value(arguments)}
    return out


def message_dict(m: Any) -> dict[str, Any]:
    """One message (our Message, or a dict in our JSONL / the OpenAI shape) as a template sees it.

    Keys with no value are left out (apply_chat_template drops None values: templates test ``'tool_calls' in
    message``); reasoning is given as ``thinking`` and ``reasoning_content`` (transformers' aliases); ``weight`` is ours
    and never shown to the template."""
    get = m.get if isinstance(m, dict) else (lambda k, d=None: getattr(m, k, d))
    out: dict[str, Any] = {"role": get("role"), "content": get("content")}
    if out["content"] is None:
        out["content"] = ""
    reasoning = next((get(k) for k in ("reasoning", "reasoning_content", "thinking") if get(k) is not None), None)
    calls = get("tool_calls") or ()
    if calls:
        out["tool_calls"] = [_tool_call_dict(c) for c in calls]
    for key in ("tool_call_id", "name"):
        if get(key) is not None:
            out[key] = get(key)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def template_messages(conversation: Any) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """(messages, tools) of a Conversation, a list of Message, or a list of dicts, as apply_chat_template passes
    them to a template."""
    messages = getattr(conversation, "messages", conversation)
    tools = getattr(conversation, "tools", None)
    return [message_dict(m) for m in messages], (list(tools) if tools else None)


# --------------------------------------------------------------------------------------------------------------------
# Sandboxed rendering
# --------------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def compile_template(source: str):
    """Compile Jinja source in an ImmutableSandboxedEnvironment configured like transformers' apply_chat_template.

    Same whitespace rules (trim_blocks, lstrip_blocks), loop controls, `raise_exception`, `strftime_now`, a `tojson`
    that does not HTML-escape, and a no-op `{% generation %}` block (TRL-style templates use it): these decide the
    rendered bytes, so they must match for byte-identity with apply_chat_template.
    """
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant output in TRL's training templates; we derive masks
        # by prefix rendering instead, so the block only renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        # `dict(...)` without the class itself (its attributes are a way out of the sandbox), as in transformers
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespaces refuse underscore-prefixed attributes (CPython internals), as in transformers
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"chat templates cannot store underscore-prefixed attributes ({name!r})")

    from jinja2.exceptions import SecurityError

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template has a Jinja syntax error at line {e.lineno}: {e.message}") from e


def render_text(
    template: ChatTemplate,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    variables: dict[str, Any] | None = None,
    tools: list[dict] | None = None,
) -> str:
    """Render messages (dicts as ``template_messages`` makes them) to text, in the sandbox, as apply_chat_template
    does: ``tools`` (None when there are none) and ``documents=None`` are always passed.

    Raises jinja2.exceptions.SecurityError for sandbox escapes (never caught here), TemplateError for the template's
    own `raise_exception` and other render errors.
    """
    import jinja2
    from jinja2.exceptions import SecurityError

    compiled = compile_template(template.source)
    try:
        return compiled.render(
            messages=[dict(m) for m in messages], tools=tools, documents=None,
            add_generation_prompt=add_generation_prompt, **(variables or {})
        )
    except SecurityError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"template {template.name!r} refused the conversation: {e}") from e
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise TemplateError(f"template {template.name!r} failed to render: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer preparation
# --------------------------------------------------------------------------------------------------------------------

def required_tokens(template: ChatTemplate) -> list[str]:
    """Special tokens a tokenizer must have for this template."""
    out = list(template.special_tokens)
    for tok in (template.bos_token, template.eos_token, template.end_of_turn):
        if tok and tok not in out and tok in template.special_tokens:
            out.append(tok)
    return out


def missing_tokens(tokenizer, template: ChatTemplate) -> list[str]:
    """Required special tokens the tokenizer does not have as single (special) tokens."""
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []))
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    return [t for t in required_tokens(template) if not (t in vocab and (t in special or t in added))]


def prepare_tokenizer(tokenizer, template: "str | ChatTemplate") -> int:
    """Make ``tokenizer`` ready for ``template``; returns how many tokens were added (the caller resizes embeddings).

    Adds the template's missing control tokens as special tokens (so they encode to one id and user text can never
    produce them, see chat/render.py), and sets ``tokenizer.chat_template`` to the template's source, so a tokenizer
    saved after training carries the template it was trained with (serving it with another template
    would prompt it in a format it never saw).
    """
    from tokenizers import AddedToken

    tpl = get_template(template, tokenizer)
    missing = missing_tokens(tokenizer, tpl)
    n_added = 0
    if missing:
        n_added = tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in missing],
            special_tokens=True,
        )
    vocab = tokenizer.get_vocab()
    plain = [t for t in tpl.plain_tokens if t not in vocab]
    if plain:
        n_added += tokenizer.add_tokens(
            [AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False) for t in plain])
    tokenizer.chat_template = tpl.source
    return n_added


# --------------------------------------------------------------------------------------------------------------------
# Stand-in tokenizers: a family's control tokens on a small byte-level BPE, so the linter and tests run with no model
# --------------------------------------------------------------------------------------------------------------------

# bos, eos, pad and the other control tokens of each family's real tokenizer (pad: Llama 3.1's reserved pad token,
# Gemma's <pad>; Mistral/Zephyr ship none, so "<unk>" as many fine-tuning setups do).
FAMILY_TOKENS: dict[str, dict[str, Any]] = {
    "llama3": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>",
               "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"]},
    "chatml": {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "extra": ["<|im_start|>"]},
    "gemma": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "extra": ["<start_of_turn>", "<end_of_turn>"]},
    "mistral": {"bos": "<s>", "eos": "</s>", "pad": "<unk>", "extra": []},
    "zephyr": {"bos": "<s>", "eos": "</s>", "pad": "<unk>", "extra": []},
    "alpaca": {"bos": "<s>", "eos": "</s>", "pad": "<unk>", "extra": []},
}


FAMILY_TOKENS["llama3.1"] = {**FAMILY_TOKENS["llama3"], "extra": FAMILY_TOKENS["llama3"]["extra"] + ["<|eom_id|>"]}
FAMILY_TOKENS["qwen3"] = {**FAMILY_TOKENS["chatml"]}

# Control-token spellings, as chat templates write them: <|im_end|>, <｜Assistant｜> (DeepSeek's full-width bars),
# Gemma 4's <|turn> / <turn|>, Mistral's [INST] / [TOOL_CALLS], SentencePiece <s> </s> <bos> <eos>, Gemma's
# <start_of_turn>, Cohere's <BOS_TOKEN>, ByteDance's <seed:eos>, MiniMax's ]~b] / [e~[. Tags such as <think>, <tools>
# or <tool_call> are not among them: most tokenizers keep those as text or as non-special tokens.
_CONTROL_RE = re.compile(
    r"<\|[^<>|\s]{1,60}\|>|<｜[^<>｜\n]{1,60}｜>|<\|[A-Za-z_][\w.-]{0,40}>|<[A-Za-z_][\w.-]{0,40}\|>"
    r"|\[/?[A-Z][A-Z_]{1,30}\]|</?s>|<(?:bos|eos|pad|unk|sep|cls|mask)>|<(?:start|end)_of_[a-z_]+>"
    r"|<[A-Z][A-Z_]*_TOKEN>|<seed:[a-z_]+>|<end_of_sentence>|\]~!?b[\[\]]|\[e~\[|<SPECIAL_\d+>"
    r"|〈\|[^〈〉|\s]{1,40}\|〉"
    r"|</?(?:system|user|assistant|developer|tool)>"
)
_BOS_HINTS = ("begin_of_text", "bos", "begin▁of▁sentence", "BOS_TOKEN", "startoftext", "<s>", "seed:bos")
_EOS_HINTS = ("end_of_text", "eos", "end▁of▁sentence", "endoftext", "</s>", "seed:eos", "EOS_TOKEN")


def _template_literals(source: str) -> list[str]:
    """Every literal string in a template: its text outside tags and its string constants."""
    import jinja2
    from jinja2 import nodes

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(_strip_generation_tags(source))
    except jinja2.TemplateSyntaxError:
        return [source]
    out = [n.data for n in ast.find_all(nodes.TemplateData)]
    out += [n.value for n in ast.find_all(nodes.Const) if isinstance(n.value, str)]
    return out


def _strip_generation_tags(source: str) -> str:
    return re.sub(r"\{%-?\s*(?:end)?generation\s*-?%\}", "", source)


def template_control_tokens(template: "str | ChatTemplate") -> list[str]:
    """Control-token spellings a template writes: in its literal text, and in a probe render (templates that build
    them, '<|' + role + '|>'), in order of first appearance."""
    tpl = get_template(template)
    found: list[str] = []
    texts = _template_literals(tpl.source)
    sys_, user, answer = ({"role": r, "content": r[0].upper()} for r in ("system", "user", "assistant"))
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object",
                                                                                          "properties": {}}}}]
    for msgs, gen in (([sys_, user, answer], False), ([user, answer], False), ([user, answer, user], False),
                      ([sys_, user], True), ([user], True)):
        for tl in (None, tools):
            try:
                texts.append(render_text(tpl, msgs, add_generation_prompt=gen, tools=tl,
                                         variables={"bos_token": "", "eos_token": ""}))
            except Exception:  # noqa: BLE001 - probing only; a template may refuse a probe
                pass
    for text in texts:
        for m in _CONTROL_RE.finditer(text):
            if m.group() not in found and "{" not in m.group():  # '<｜hy_eos{}｜>'.format(...): the render has it
                found.append(m.group())
    return found


def template_family_tokens(template: "str | ChatTemplate") -> dict[str, Any]:
    """bos / eos / pad / control tokens for a stand-in tokenizer of any template, read off the template itself.

    Control tokens: ``template_control_tokens``. bos: a BOS-like one among them (<|begin_of_text|>, <bos>, ...), else
    "<s>" when the template writes ``bos_token``, else none. eos: an EOS-like one when the template writes
    ``eos_token`` ("</s>" if none is), else the template's own end of turn (left to the renderer to derive), so that a
    tokenizer's eos is what ends an answer, as in the real instruct tokenizers."""
    tpl = get_template(template)
    controls = template_control_tokens(tpl)
    uses_bos = re.search(r"\bbos_token\b", tpl.source) is not None
    uses_eos = re.search(r"\beos_token\b", tpl.source) is not None
    bos = next((t for t in controls if any(h in t for h in _BOS_HINTS)), None)
    if bos is None and uses_bos:
        bos = "<s>"
    eos = next((t for t in controls if any(h in t for h in _EOS_HINTS) and t != bos), None) if uses_eos else None
    if eos is None and uses_eos:
        eos = "</s>"
    # not uses_eos: the stand-in's eos becomes the token the template closes answers with (standin_tokenizer), or
    # "<|endoftext|>" when it closes them with none (the linter then reports that)
    pad = "<pad>" if "<pad>" not in controls else "<|pad|>"
    return {"bos": bos, "eos": eos, "pad": pad, "extra": [t for t in controls if t not in (bos, eos, pad)]}
