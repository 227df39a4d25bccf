"""The data contract of data/schema.py: tool calls, tool results, reasoning, weights, tools lists, unpaired (KTO) and
plain-text examples; what is refused and what each error says; to_dict writes only set fields and round-trips; the
OpenAI chat-completions reader keeps every field that changes training and refuses the rest, naming file, line and key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.chat.templates import template_messages
from instructkit.data import io
from instructkit.data.schema import (
    Conversation,
    DataError,
    Message,
    PreferencePair,
    TextExample,
    ToolCall,
    UnpairedExample,
    example_from_dict,
    example_kind,
    example_messages,
    validate_messages,
)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def tool_conversation() -> Conversation:
    return Conversation([
        Message("system", "Be brief."),
        Message("user", "Weather in Paris?"),
        Message("assistant", "", reasoning="I should call the tool.",
                tool_calls=(ToolCall("get_weather", '{"city": "Paris"}', "call_1"),)),
        Message("tool", '{"t": 21}', tool_call_id="call_1", name="get_weather"),
        Message("assistant", "21 degrees.", weight=1),
    ], {"source": "x"}, TOOLS)


def test_message_to_dict_writes_only_set_fields():
    assert Message("user", "hi").to_dict() == {"role": "user", "content": "hi"}
    conv = tool_conversation()
    assert conv.messages[2].to_dict() == {
        "role": "assistant", "content": "", "reasoning": "I should call the tool.",
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert conv.messages[3].to_dict() == {"role": "tool", "content": '{"t": 21}', "tool_call_id": "call_1",
                                          "name": "get_weather"}
    assert conv.messages[4].to_dict() == {"role": "assistant", "content": "21 degrees.", "weight": 1}
    assert ToolCall("f").to_dict() == {"type": "function", "function": {"name": "f", "arguments": "{}"}}


def test_every_kind_round_trips_through_to_dict_and_from_dict():
    conv = tool_conversation()
    pair = PreferencePair([Message("user", "q")], [Message("assistant", "good", reasoning="r")],
                          [Message("assistant", "bad")], {"id": 3}, 0.5, TOOLS)
    unpaired = UnpairedExample([Message("user", "q")], [Message("assistant", "bad answer")], False, {"k": 1}, TOOLS)
    text = TextExample("Plain text for pre-training.", {"source": "t.txt"})
    for ex, kind in ((conv, "conversation"), (pair, "preference"), (unpaired, "unpaired"), (text, "text")):
        d = ex.to_dict()
        assert json.loads(json.dumps(d)) == d
        back = example_from_dict(json.loads(json.dumps(d)))
        assert back == ex and example_kind(back) == kind
    assert set(conv.to_dict()) == {"messages", "tools", "meta"}
    assert set(pair.to_dict()) == {"prompt", "chosen", "rejected", "margin", "tools", "meta"}
    assert unpaired.to_dict()["label"] is False
    assert TextExample("t").to_dict() == {"text": "t"}
    assert Conversation([Message("user", "u"), Message("assistant", "a")]).to_dict() == {
        "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    assert [m.role for m in example_messages(pair)] == ["user", "assistant", "assistant"]
    assert [m.role for m in example_messages(unpaired)] == ["user", "assistant"]
    assert example_messages(text) == []
    assert pair.chosen_conversation().tools == TOOLS and unpaired.conversation().tools == TOOLS


def test_the_renderer_gets_every_field_and_the_tools():
    msgs, tools = template_messages(tool_conversation())
    assert tools == TOOLS
    assert msgs[2]["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert msgs[2]["reasoning_content"] == "I should call the tool." and msgs[3]["tool_call_id"] == "call_1"


@pytest.mark.parametrize("record, error", [
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "label": True},
     "conversation has an unknown key 'label' (known: messages, tools, meta): an example with a 'label' "
     "(desirable or not) is KTO data: train it with `instructkit kto`"),
    ({"messages": [{"role": "user", "content": "u", "extra": 1}, {"role": "assistant", "content": "a"}]},
     "messages[0] has an unknown key 'extra' (known: role, content, reasoning, tool_calls, tool_call_id, name, "
     "weight)"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     "messages[1]: a 'assistant' message has weight 0.5: a turn is trained (1) or not (0), or weighted by its role "
     "(no weight); fractional weights cannot be honoured (the SFT loss has no per-token weights), so they are "
     "refused rather than rounded"),
    ({"messages": [{"role": "user", "content": "u", "name": "bob"}, {"role": "assistant", "content": "a"}]},
     "messages[0]: a 'user' message has a participant name 'bob': only tool messages may carry 'name' (the function "
     "that answered); chat templates do not render participant names, so it would be silently dropped: remove it "
     "or merge it into the content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a"}]},
     "messages[0].content[0] has type 'image_url'; only text parts are supported (images, audio and files cannot "
     "be trained on)"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]},
     "conversation turn 1: empty assistant turn"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]},
     "messages[1].tool_calls[0]: tool call 'f': arguments are not valid JSON: '{'"),
    ({"messages": [{"role": "user", "content": "u"},
                   {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "function": {"name": "f"}}]},
                   {"role": "tool", "content": "r", "tool_call_id": "b"}, {"role": "assistant", "content": "ok"}]},
     "conversation turn 2: tool_call_id 'b' matches no call of the assistant turn before it (ids: a)"),
    ({"messages": [{"role": "user", "content": "u", "reasoning": "r"}, {"role": "assistant", "content": "a"}]},
     "conversation turn 0: a 'user' turn has 'reasoning' (only assistant turns reason)"),
    ({"prompt": [{"role": "user", "content": "u"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}], "margin": "big"},
     "field 'margin' must be a finite number, got 'big'"),
    ({"prompt": [{"role": "user", "content": "u"}], "completion": [{"role": "assistant", "content": "a"}],
      "label": "yes"},
     "field 'label' must be true (desirable) or false (undesirable), got 'yes'"),
    ({"text": "   "}, "empty text"),
    ({"text": "t", "source": "s"}, "text example has an unknown key 'source' (known: text, meta)"),
    ({"foo": 1}, "cannot tell the kind of the record from its keys ['foo']: expected 'messages', 'chosen'/'rejected', "
                 "'completion'/'label' or 'text'"),
])
def test_internal_records_are_refused_with_exact_reasons(record, error):
    with pytest.raises(DataError) as e:
        example_from_dict(record)
    assert e.value.reason == error


def test_assistant_turn_with_tool_calls_may_be_empty_and_ids_are_optional():
    validate_messages([Message("user", "u"), Message("assistant", " ", tool_calls=[ToolCall("f", "[]")]),
                       Message("tool", "r"), Message("tool", "s", tool_call_id="x"), Message("assistant", "a")])
    assert Message("assistant", "", tool_calls=[]).tool_calls is None  # an empty list is no calls
    assert Message("assistant", "a", weight=0).weight == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# The OpenAI chat-completions reader
# ---------------------------------------------------------------------------------------------------------------------


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def test_openai_reader_keeps_tools_calls_reasoning_and_weights(tmp_path):
    rows = [
        {"messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "reasoning_content": "Call it.", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": '{"t": 21}', "tool_call_id": "call_1"},
            {"role": "assistant", "content": "21 degrees.", "weight": 1}],
         "tools": TOOLS, "parallel_tool_calls": False},
        {"messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "5", "weight": 0, "thinking": "hm"},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": None, "function_call": {"name": "calc", "arguments": '{"x": "2+2"}'}},
            {"role": "function", "name": "calc", "content": "4"},
            {"role": "assistant", "content": "4", "reasoning": "checked"}]},
    ]
    convs = io.read_conversations(_write(tmp_path, rows))
    assert len(convs) == 2
    a, b = convs
    assert a.tools == TOOLS and b.tools is None
    assert a.meta["parallel_tool_calls"] is False and a.meta["line"] == 1 and a.meta["format"] == "messages"
    assert a.messages[0] == Message("system", "Be brief.")
    assert a.messages[2] == Message("assistant", "", reasoning="Call it.",
                                    tool_calls=(ToolCall("get_weather", '{"city": "Paris"}', "call_1"),))
    assert a.messages[3] == Message("tool", '{"t": 21}', tool_call_id="call_1")
    assert a.messages[4].weight == 1.0
    assert b.messages[1] == Message("assistant", "5", reasoning="hm", weight=0)
    assert b.messages[3].tool_calls == (ToolCall("calc", '{"x": "2+2"}'),)
    assert b.messages[4] == Message("tool", "4", name="calc")
    assert b.messages[5].reasoning == "checked"
    # written back and read again: the same examples (provenance aside)
    out = tmp_path / "internal.jsonl"
    assert io.write_jsonl(out, convs) == 2
    again = io.read_conversations(out)
    assert [(c.messages, c.tools) for c in again] == [(c.messages, c.tools) for c in convs]


@pytest.mark.parametrize("row, error", [
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "label": False},
     "field 'label' marks the completion desirable or not: an example with a 'label' (desirable or not) is KTO "
     "data: train it with `instructkit kto`; as SFT data its undesirable answers would be trained on"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
      "functions": [{"name": "f"}]},
     "field 'functions' (the legacy OpenAI function definitions) is not read: convert it to 'tools': "
     "[{\"type\": \"function\", \"function\": <definition>}, ...]"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "score": 3},
     "unknown field 'score' (known: messages, tools, meta, id, parallel_tool_calls)"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "audio": None}]},
     "messages[1] has an unknown key 'audio' (known: role, content, reasoning, reasoning_content, thinking, "
     "tool_calls, function_call, tool_call_id, name, weight, refusal)"),
    ({"messages": [{"role": "user", "content": "u"},
                   {"role": "assistant", "content": "a", "reasoning": "x", "thinking": "y"}]},
     "messages[1] has different reasoning in 'reasoning' and 'thinking': keep one"),
])
def test_openai_reader_refuses_naming_file_line_and_key(tmp_path, row, error):
    ok = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    p = _write(tmp_path, [ok, row])
    with pytest.raises(DataError) as e:
        io.read_conversations(p)
    assert str(e.value) == f"{p}:2: {error}"


def test_preference_and_unpaired_examples_render_their_tools_into_the_prompt():
    """DPO, RM, ORPO, SimPO (encode_pairs) and KTO (encode_response) give the template the example's tools, as SFT
    does: a model is never trained to call tools it was not shown."""
    from instructkit.chat.render import Renderer
    from instructkit.chat.standin import standin_tokenizer
    from instructkit.data.preference import encode_pairs, encode_response
    from instructkit.data.schema import Message, PreferencePair

    tok = standin_tokenizer("qwen3")
    tok.chat_template = (Path(__file__).parent / "fixtures" / "official_templates" / "qwen3_trl.jinja").read_text()
    renderer = Renderer(tok, "auto")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {}}}}]
    prompt = [Message("user", "Weather in Oslo?")]
    pair = PreferencePair(prompt, [Message("assistant", "Let me check.")], [Message("assistant", "No idea.")],
                          tools=tools)
    (enc,), dropped = encode_pairs(renderer, [pair])
    assert "get_weather" in tok.decode(enc.prompt) and dropped == {"too_long": 0, "identical": 0}
    without = encode_response(renderer, prompt, pair.chosen)
    with_tools = encode_response(renderer, prompt, pair.chosen, tools=tools)
    assert "get_weather" not in tok.decode(without[0]) and with_tools[0] == enc.prompt
    assert with_tools[1] == without[1]  # the response itself is the same tokens
