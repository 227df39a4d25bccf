import pytest

from instructkit.data.schema import Conversation, DataError, Message, PreferencePair, ToolCall, validate_messages


def msgs(*pairs):
    return [Message(r, c) for r, c in pairs]


def test_valid_multi_turn_with_system_and_tool():
    call = Message("assistant", "a", tool_calls=(ToolCall("f", "{}"),))
    validate_messages([Message("system", "s"), Message("user", "u"), call, Message("tool", "t"),
                       Message("assistant", "b")])


def test_a_tool_result_needs_the_call_it_answers():
    with pytest.raises(DataError, match="turn 3: a tool result must follow an assistant turn with tool_calls"):
        validate_messages(msgs(("system", "s"), ("user", "u"), ("assistant", "a"), ("tool", "t"), ("assistant", "b")))


@pytest.mark.parametrize(
    "messages, reason",
    [
        (msgs(("user", "u"), ("bot", "a")), "unknown role 'bot'"),
        (msgs(("user", "u"), ("user", "v"), ("assistant", "a")), "roles out of order: 'user' after 'user'"),
        (msgs(("assistant", "a"),), "'assistant' after 'start'"),
        (msgs(("user", "u"), ("system", "s"), ("assistant", "a")), "system message may only be the first"),
        (msgs(("user", "u"), ("assistant", "  ")), "empty assistant turn"),
        (msgs(("user", "u"),), "has no assistant turn"),
        ([], "has no messages"),
    ],
)
def test_invalid_conversations_name_the_reason(messages, reason):
    with pytest.raises(DataError, match=reason):
        validate_messages(messages)


def test_error_location_formats():
    e = DataError("missing field 'output'").at("data.jsonl", line=7)
    assert str(e) == "data.jsonl:7: missing field 'output'"
    e = DataError("bad").at("data.json", record=3)
    assert str(e) == "data.json record 3: bad"


def test_round_trip_conversation_and_pair():
    c = Conversation(msgs(("user", "u"), ("assistant", "a")), {"source": "x"})
    assert Conversation.from_dict(c.to_dict()) == c
    p = PreferencePair(msgs(("user", "q")), msgs(("assistant", "good")), msgs(("assistant", "bad")), margin=1.5)
    assert PreferencePair.from_dict(p.to_dict()) == p
    with pytest.raises(DataError, match="identical"):
        PreferencePair.from_dict(PreferencePair(p.prompt, p.chosen, p.chosen).to_dict())


def test_config_reads_exponent_floats_and_rejects_unknown_keys():
    from instructkit.config import ConfigError, TrainConfig, load_config

    cfg = load_config(TrainConfig, None, ["lr=3e-3", "max_steps=5"])
    assert cfg.lr == 0.003 and cfg.max_steps == 5
    with pytest.raises(ConfigError, match="lrr"):
        load_config(TrainConfig, None, ["lrr=1"])
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(TrainConfig, None, ["lr=fast"])
