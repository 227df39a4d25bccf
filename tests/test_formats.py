"""Adapters: every source format -> schema, detection, precise errors, and property tests."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instructkit.data import formats as F
from instructkit.data.formats import FORMATS, canonical_format, convert_record, detect_format
from instructkit.data.schema import (Conversation, DataError, Message, PreferencePair, TextExample, ToolCall,
                                    UnpairedExample)


def roles(conv):
    return [(m.role, m.content) for m in conv.messages]


def one(record, fmt):
    out = convert_record(record, fmt)
    assert len(out) == 1
    return out[0]


# ---- SFT formats --------------------------------------------------------------------------------------------------


def test_alpaca_with_input_system_and_history():
    rec = {
        "instruction": "Translate.",
        "input": "bonjour",
        "output": "hello",
        "system": "Be brief.",
        "history": [["hi", "hey"], ["how are you?", "fine"]],
    }
    conv = one(rec, "alpaca")
    assert roles(conv) == [
        ("system", "Be brief."),
        ("user", "hi"),
        ("assistant", "hey"),
        ("user", "how are you?"),
        ("assistant", "fine"),
        ("user", "Translate.\n\nbonjour"),
        ("assistant", "hello"),
    ]
    # empty input: the instruction alone, no trailing blank line
    assert roles(one({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca")) == [
        ("user", "Say hi."),
        ("assistant", "hi"),
    ]


def test_dolly_keeps_category():
    conv = one({"instruction": "Summarise.", "context": "Long text.", "response": "Short.", "category": "summarization"}, "dolly")
    assert roles(conv) == [("user", "Summarise.\n\nLong text."), ("assistant", "Short.")]
    assert conv.meta == {"category": "summarization"}


def test_sharegpt_roles_and_tools():
    rec = {
        "system": "sys",
        "conversations": [
            {"from": "human", "value": "weather?"},
            {"from": "function_call", "value": '{"name": "w"}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny."},
            {"from": "user", "value": "thanks"},
            {"from": "assistant", "value": "welcome"},
        ],
    }
    conv = one(rec, "sharegpt")
    # the function_call turn is an assistant turn that calls the tool (not text to imitate); no arguments = {}
    assert conv.messages[2].tool_calls == (ToolCall("w", "{}"),)
    assert roles(conv) == [
        ("system", "sys"),
        ("user", "weather?"),
        ("assistant", ""),
        ("tool", "sunny"),
        ("assistant", "It is sunny."),
        ("user", "thanks"),
        ("assistant", "welcome"),
    ]


def test_messages_openai_with_content_parts_and_meta():
    rec = {
        "messages": [
            {"role": "developer", "content": "d"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
        ],
        "meta": {"task": "x"},
    }
    conv = one(rec, "messages")
    assert roles(conv) == [("system", "d"), ("user", "ab"), ("assistant", "c")]
    assert conv.meta == {"task": "x"}


def test_ultrachat_alternates():
    conv = one({"id": "7", "data": ["q1", "a1", "q2", "a2"]}, "ultrachat")
    assert roles(conv) == [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]
    assert conv.meta == {"id": "7"}


def test_prompt_completion_strings_and_lists_flan_and_prompt_only():
    assert roles(one({"prompt": "p", "completion": "c"}, "prompt_completion")) == [("user", "p"), ("assistant", "c")]
    rec = {"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]}
    assert roles(one(rec, "prompt_completion")) == [("user", "p"), ("assistant", "c")]
    assert roles(one({"inputs": "i", "targets": "t", "task": "nli"}, "flan")) == [("user", "i"), ("assistant", "t")]
    conv = one({"prompt": "Write.", "key": 3, "kwargs": [{}]}, "prompt_only")
    assert roles(conv) == [("user", "Write.")]
    assert conv.meta == {"key": 3, "kwargs": [{}]}


def test_self_instruct_one_conversation_per_instance():
    rec = {
        "id": "seed_task_9",
        "name": "sentiment",
        "instruction": "Classify the sentiment.",
        "instances": [{"input": "I love it", "output": "positive"}, {"input": "", "output": "neutral"}],
        "is_classification": True,
    }
    out = convert_record(rec, "self_instruct")
    assert [roles(c) for c in out] == [
        [("user", "Classify the sentiment.\n\nI love it"), ("assistant", "positive")],
        [("user", "Classify the sentiment."), ("assistant", "neutral")],
    ]
    assert out[1].meta == {"id": "seed_task_9", "name": "sentiment", "is_classification": True, "instance": 1}


# ---- preference formats -------------------------------------------------------------------------------------------


def test_preference_strings():
    pair = one({"prompt": "q", "chosen": "good", "rejected": "bad"}, "preference")
    assert pair.prompt == [Message("user", "q")]
    assert pair.chosen == [Message("assistant", "good")] and pair.rejected == [Message("assistant", "bad")]


def test_preference_full_conversations_strip_the_prompt():
    p = [{"role": "user", "content": "q"}]
    rec = {
        "prompt": p,
        "chosen": p + [{"role": "assistant", "content": "good"}],
        "rejected": p + [{"role": "assistant", "content": "bad"}],
        "margin": 2,
    }
    pair = one(rec, "preference")
    assert pair.prompt == [Message("user", "q")]
    assert pair.chosen == [Message("assistant", "good")] and pair.rejected == [Message("assistant", "bad")]
    assert pair.margin == 2.0


def test_preference_implicit_prompt_is_the_shared_prefix():
    common = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    rec = {"chosen": common + [{"role": "assistant", "content": "good"}], "rejected": common + [{"role": "assistant", "content": "bad"}]}
    pair = one(rec, "preference")
    assert [m.content for m in pair.prompt] == ["q", "a", "q2"]
    assert pair.chosen == [Message("assistant", "good")]


def test_internal_preference_round_trip():
    pair = PreferencePair([Message("user", "q")], [Message("assistant", "g")], [Message("assistant", "b")], margin=0.5)
    back = one(pair.to_dict(), detect_format(pair.to_dict()))
    assert (back.prompt, back.chosen, back.rejected, back.margin) == (pair.prompt, pair.chosen, pair.rejected, 0.5)


def test_sharegpt_preference_llama_factory():
    rec = {
        "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    pair = one(rec, "sharegpt_preference")
    assert pair.prompt == [Message("system", "s"), Message("user", "q")]
    assert pair.chosen == [Message("assistant", "good")] and pair.rejected == [Message("assistant", "bad")]


def test_hh_rlhf_split_turns_and_shared_prefix():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant:  Sure, here is how."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: No."
    pair = one({"chosen": chosen, "rejected": rejected}, "hh_rlhf")
    assert [(m.role, m.content) for m in pair.prompt] == [("user", "hi"), ("assistant", "hello"), ("user", "help me")]
    assert pair.chosen == [Message("assistant", "Sure, here is how.")]
    assert pair.rejected == [Message("assistant", "No.")]


def test_hh_rlhf_diverging_earlier_keeps_multi_turn_sides():
    chosen = "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y"
    rejected = "\n\nHuman: a\n\nAssistant: z"
    pair = one({"chosen": chosen, "rejected": rejected}, "hh_rlhf")
    assert pair.prompt == [Message("user", "a")]
    assert [m.content for m in pair.chosen] == ["x", "b", "y"]
    assert [m.content for m in pair.rejected] == ["z"]


# ---- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, fmt, reason",
    [
        ({"instruction": "x"}, "alpaca", "missing field 'output'"),
        ({"instruction": 3, "output": "y"}, "alpaca", "field 'instruction' must be a string, got int"),
        ({"instruction": "x", "output": "  "}, "alpaca", "empty assistant turn"),
        ({"instruction": "x", "output": "y", "history": [["a"]]}, "alpaca", r"history\[0\] must be a \[user, assistant\] pair"),
        ([1, 2], "alpaca", "must be a JSON object, got list"),
        ({"conversations": [{"from": "bot9", "value": "x"}]}, "sharegpt", "unknown role 'bot9'"),
        ({"conversations": [{"from": "gpt", "value": "x"}]}, "sharegpt", "roles out of order: 'assistant' after 'start'"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "sharegpt", "'user' after 'user'"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages", "unknown role 'wizard'"),
        ({"messages": "hi"}, "messages", "'messages' must be a list"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages", r"messages\[0\].content must be a string, got int"),
        ({"data": ["q", 1]}, "ultrachat", r"data\[1\] must be a string"),
        ({"instruction": "x", "instances": []}, "self_instruct", "field 'instances' is empty"),
        ({"instruction": "x", "instances": [{"input": "i"}]}, "self_instruct", r"instances\[0\]: missing field 'output'"),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "preference", "identical"),
        ({"prompt": "q", "chosen": "good"}, "preference", "missing field 'rejected'"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "hh_rlhf", "chosen turn 1: empty assistant turn"),
        ({"chosen": "Human: a", "rejected": "x"}, "hh_rlhf", "text before the first"),
        ({"message_id": "m", "parent_id": None, "role": "robot", "text": "x"}, "oasst", "unknown role 'robot'"),
    ],
)
def test_errors_name_the_reason(record, fmt, reason):
    with pytest.raises(DataError, match=reason):
        convert_record(record, fmt)


# ---- detection ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"instruction": "", "input": "", "output": ""}, "alpaca"),
        ({"instruction": "", "context": "", "response": "", "category": ""}, "dolly"),
        ({"conversations": []}, "sharegpt"),
        ({"conversations": [], "chosen": {}, "rejected": {}}, "sharegpt_preference"),
        ({"messages": []}, "messages"),
        ({"message_id": "a", "parent_id": None, "role": "prompter", "text": ""}, "oasst"),
        ({"id": "1", "data": []}, "ultrachat"),
        ({"prompt": "", "completion": ""}, "prompt_completion"),
        ({"prompt": "", "key": 1}, "prompt_only"),
        ({"inputs": "", "targets": ""}, "flan"),
        ({"instruction": "", "instances": [], "is_classification": False}, "self_instruct"),
        ({"prompt": "", "chosen": "", "rejected": ""}, "preference"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "hh_rlhf"),
        ({"chosen": [], "rejected": []}, "preference"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_detection_failure_and_aliases():
    with pytest.raises(DataError, match=r"cannot detect the format from the keys \['a', 'b'\]"):
        detect_format({"b": 1, "a": 2})
    with pytest.raises(DataError, match="expected a JSON object"):
        detect_format([1])
    assert canonical_format("OpenAI") == "messages"
    assert canonical_format("sharegpt-dpo") == "sharegpt_preference"
    with pytest.raises(DataError, match="unknown format 'nope'"):
        canonical_format("nope")


# ---- oasst trees --------------------------------------------------------------------------------------------------


def _msg(mid, parent, role, text, rank=None):
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "message_tree_id": "t"}


def _tree():
    # root P ─┬─ A1 (rank 1) ── P2 ── A3
    #         └─ A2 (rank 0) ─┬─ P3 (rank None) ── A4 (rank 1), A5 (rank 0)
    #                         └─ P4 (leaf: a prompter leaf is cut back to A2)
    return [
        _msg("P", None, "prompter", "root"),
        _msg("A1", "P", "assistant", "second best", 1),
        _msg("A2", "P", "assistant", "best", 0),
        _msg("P2", "A1", "prompter", "follow-up on 1"),
        _msg("A3", "P2", "assistant", "answer 3"),
        _msg("P3", "A2", "prompter", "follow-up on 2"),
        _msg("A4", "P3", "assistant", "worse", 1),
        _msg("A5", "P3", "assistant", "better", 0),
        _msg("P4", "A2", "prompter", "dangling"),
    ]


def test_oasst_best_path_and_all_paths():
    msgs = [F.parse_oasst_message(r, i) for i, r in enumerate(_tree())]
    convs, bad = F.oasst_conversations(msgs)
    assert bad == {}
    assert [[m.content for m in c.messages] for _, c in convs] == [["root", "best", "follow-up on 2", "better"]]
    convs, _ = F.oasst_conversations(msgs, all_paths=True)
    paths = sorted(tuple(m.content for m in c.messages) for _, c in convs)
    assert paths == sorted(
        [
            ("root", "second best", "follow-up on 1", "answer 3"),
            ("root", "best", "follow-up on 2", "worse"),
            ("root", "best", "follow-up on 2", "better"),
            ("root", "best"),  # P4 leaf cut back to A2
        ]
    )


def test_oasst_orphans_and_role_clashes_are_rejected_with_subtrees():
    recs = _tree() + [
        _msg("X", "missing", "assistant", "orphan"),
        _msg("B", "A5", "assistant", "assistant after assistant"),
        _msg("C", "B", "prompter", "below a bad message"),
    ]
    msgs = [F.parse_oasst_message(r, i) for i, r in enumerate(recs)]
    _, bad = F.oasst_conversations(msgs)
    assert bad == {
        9: "parent 'missing' not found",
        10: "roles out of order: 'assistant' reply to a 'assistant' message",
        11: "an ancestor message ('B') was rejected",
    }


# ---- property tests: anything JSON -> DataError or a valid example, never another exception ----------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
field_names = st.sampled_from(
    ["instruction", "input", "output", "system", "history", "context", "response", "category", "conversations",
     "from", "value", "messages", "role", "content", "message_id", "parent_id", "text", "rank", "data", "prompt",
     "completion", "inputs", "targets", "instances", "is_classification", "chosen", "rejected", "margin", "meta", "id"]
)
# Records shaped like the real formats (so adapters get past the first type check), with arbitrary values.
record_like = st.dictionaries(field_names, json_values | st.text(max_size=2000), max_size=8)
message_like = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "x"]) | json_values,
     "content": st.text() | json_values}
)
structured = st.fixed_dictionaries(
    {"messages": st.lists(message_like, max_size=5)},
    optional={"chosen": st.lists(message_like, max_size=3) | st.text(), "rejected": st.lists(message_like, max_size=3) | st.text(),
              "prompt": st.lists(message_like, max_size=3) | st.text()},
)
hh_text = st.lists(st.tuples(st.sampled_from(["\n\nHuman:", "\n\nAssistant:", "Human:", ""]), st.text(max_size=30)), max_size=6).map(
    lambda parts: "".join(a + b for a, b in parts)
)
anything = json_values | record_like | structured | st.fixed_dictionaries({"chosen": hh_text, "rejected": hh_text})


def _check(record, fmt):
    try:
        out = convert_record(record, fmt)
    except DataError:
        return
    for ex in out:
        assert isinstance(ex, (Conversation, PreferencePair, UnpairedExample, TextExample))  # the four kinds
        json.dumps(ex.to_dict())  # serialisable


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=anything, fmt=st.sampled_from(sorted(FORMATS)))
def test_property_adapters_raise_only_data_error(record, fmt):
    _check(record, fmt)


@settings(max_examples=300, deadline=None)
@given(record=anything)
def test_property_detection_then_conversion_raises_only_data_error(record):
    try:
        fmt = detect_format(record)
    except DataError:
        return
    assert fmt in FORMATS
    _check(record, fmt)


def test_property_huge_and_deep_values():
    huge = "x" * 5_000_000
    conv = one({"instruction": huge, "output": huge}, "alpaca")
    assert len(conv.messages[1].content) == 5_000_000
    deep = []
    for _ in range(5000):
        deep = [deep]
    for fmt in FORMATS:
        _check({"messages": deep, "conversations": deep, "data": deep, "instances": deep, "prompt": deep}, fmt)
    _check({"chosen": "\n\nHuman:" * 100_000, "rejected": "x"}, "hh_rlhf")
