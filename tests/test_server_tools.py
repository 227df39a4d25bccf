"""Tools and reasoning through the server (issue 15 item 6), with the official `openai` client: `tools` rendered into
the prompt by the model's own template, tool calls read back into `message.tool_calls` (and streamed deltas),
`<think>` reasoning returned as `reasoning_content`; multi-turn requests with assistant tool calls and tool results.

The tiny random model cannot be asked to emit a tool call, so these tests script its reply (the server's decoding batch
is replaced by one that emits fixed tokens); the tokenizer, the template, the server, the parser and the client are
the real ones. Engine decoding itself is tested in test_engine.py."""

from __future__ import annotations

import json

import pytest
import torch

openai = pytest.importorskip("openai")

from instructkit.generation.engine import Engine  # noqa: E402
from instructkit.chat.parse import parse_tool_calls, split_reasoning  # noqa: E402
from instructkit.generation.server import OpenAIServer  # noqa: E402

TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}{% if m.role == 'system' and loop.first %}"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments }}}\n</tool_call>{% endfor %}{% endif %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
REPLY = ('<think>\nThe user wants the weather.\nI will call the tool.\n</think>\n\n<tool_call>\n'
         '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return Engine(model, tok)


class _ScriptedBatch:
    """Stands in for the server's continuous batch (generation/continuous.py): each row gets the scripted reply, one
    token per step (the first at admission, as after a prefill), then the end-of-turn token."""

    def __init__(self, engine, state: dict, eot: int):
        self.engine, self.state, self.eot = engine, state, eot
        self.rows: list = []
        self.steps = self.max_rows = 0

    @property
    def live(self) -> list:
        return [r for r in self.rows if r.finish_reason is None]

    def __len__(self) -> int:
        return len(self.live)

    def add(self, rows) -> None:
        for r in rows:
            r.stop_ids = frozenset([self.eot])
            self.state["prompts"].append(self.engine.tokenizer.decode(r.prompt))
        self.rows += rows
        self._emit(rows)

    def step(self) -> None:
        self._emit(self.live)

    def _emit(self, rows) -> None:
        ids = self.engine.tokenizer(self.state["reply"], add_special_tokens=False)["input_ids"] + [self.eot]
        for r in rows:
            t = ids[len(r.tokens)]
            r.tokens.append(t)
            r.finish_reason = "stop" if t == self.eot else None

    def clear(self) -> None:
        self.rows = self.live


@pytest.fixture()
def scripted(engine, server, monkeypatch):
    """Replace the decoding by a batch that emits ``reply`` then the end-of-turn token; records the prompts."""
    state = {"reply": REPLY, "prompts": []}
    eot = engine.chat_stop_token_ids()[0]
    assert server.scheduler.continuous
    monkeypatch.setattr(server.scheduler, "_batch", _ScriptedBatch(engine, state, eot))
    return state


@pytest.fixture(scope="module")
def server(engine):
    s = OpenAIServer(engine, "tiny", port=0).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)


def test_tool_call_and_reasoning_read_back(client, scripted):
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=200)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert c.message.model_extra["reasoning_content"] == "The user wants the weather.\nI will call the tool."
    # the tools were rendered into the prompt by the model's template
    assert '"name": "get_weather"' in scripted["prompts"][-1] and "<tools>" in scripted["prompts"][-1]


def test_streamed_reasoning_and_tool_call_deltas(client, scripted):
    stream = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=200, stream=True)
    reasoning, content, calls, reasons = [], [], [], []
    for chunk in stream:
        for ch in chunk.choices:
            d = ch.delta
            if (d.model_extra or {}).get("reasoning_content"):
                reasoning.append(d.model_extra["reasoning_content"])
            if d.content:
                content.append(d.content)
            calls += d.tool_calls or []
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    assert "".join(reasoning) == "The user wants the weather.\nI will call the tool." and len(reasoning) > 1
    assert content == [] and reasons == ["tool_calls"]
    (call,) = calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_multi_turn_with_tool_calls_and_results_and_plain_replies(client, scripted):
    scripted["reply"] = "<think>\nok\n</think>\n\nIt is sunny in Paris."
    msgs = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=100)
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.content == "It is sunny in Paris." and not c.message.tool_calls
    assert c.message.model_extra["reasoning_content"] == "ok"
    prompt = scripted["prompts"][-1]
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt and prompt.count('"name": "get_weather"') == 2 and "Paris" in prompt
    # without tools offered, a reply that looks like a call is content
    scripted["reply"] = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=100)
    assert r.choices[0].message.content.startswith("<tool_call>") and not r.choices[0].message.tool_calls


def test_tool_requests_the_server_cannot_honour_are_400(client, tiny_model_dir):
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny", messages=USER, tools=[{"type": "function"}])
    with pytest.raises(openai.BadRequestError, match="functions"):
        client.chat.completions.create(model="tiny", messages=USER, functions=[{"name": "f"}])
    # a template that never reads `tools` would drop them: refused
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eng = Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tok)
    s = OpenAIServer(eng, "tiny", port=0).start()
    try:
        c = openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="tools"):
            c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=2)
    finally:
        s.stop()


def test_parsers_on_each_format():
    names = TOOLS
    assert split_reasoning("<think>a\n</think>\n\nb", prompt_opened_think=False) == ("a", "b")
    assert split_reasoning("a</think>b", prompt_opened_think=True) == ("a", "b")  # the prompt opened it
    assert split_reasoning("<think>a, cut by max_tokens", prompt_opened_think=False) == ("a, cut by max_tokens", "")
    assert split_reasoning("no tags", prompt_opened_think=False) == (None, "no tags")
    assert split_reasoning("<think>abc</thi", prompt_opened_think=False, final=False) == ("abc", "")
    content, calls = parse_tool_calls('Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "A"}}'
                                      '</tool_call><tool_call>{"name": "get_weather", "arguments": {"city": "B"}}'
                                      "</tool_call>", tools=names)
    assert content == "Sure." and [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["A", "B"]
    _, calls = parse_tool_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "C"}}', tools=names)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "C"}  # Llama 3.1
    _, calls = parse_tool_calls('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "D"}}]', tools=names)
    assert calls[0]["function"]["name"] == "get_weather"  # Mistral
    for text in ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not an offered function
                 "<tool_call>{not json}</tool_call>", '{"name": "get_weather", "arguments": "not an object"}'):
        assert parse_tool_calls(text, tools=names) == (text, [])
