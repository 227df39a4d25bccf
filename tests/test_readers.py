"""The readers of issue 15 on hand-written fixtures (tests/fixtures/formats/), with exact counts: ShareGPT / glaive tool
calls with a tools key (rendered into the prompt), LLaMA-Factory v1 SFT and DPO, Hermes <tool_call> blocks, <think>
splitting, KTO files (messages + label, kto_tag, TRL unpaired), plain text (JSONL and .txt); a KTO or text file read as
SFT/DPO data is refused; `data inspect / convert / validate` on the new kinds; the real files in ../shared/data; a
property test that every kind of example round-trips through to_dict/from_dict and the internal JSONL.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from instructkit.cli import main as cli
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
)

FIX = Path(__file__).parent / "fixtures" / "formats"
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def calls(conv):
    return [(c.name, json.loads(c.arguments), c.id) for m in conv.messages for c in (m.tool_calls or ())]


# ---------------------------------------------------------------------------------------------------------------------
# ShareGPT / glaive with function_call, observation and tools
# ---------------------------------------------------------------------------------------------------------------------


def test_glaive_tool_calls_and_tools():
    stats = io.ReadStats()
    convs = io.read_conversations(FIX / "glaive_toolcall.json", stats=stats)
    assert stats.format == "sharegpt" and (stats.total, stats.kept, stats.examples) == (3, 3, 3)
    a, b, c = convs
    assert a.tools == [{"type": "function", "function": WEATHER}, b.tools[1]] and len(b.tools) == 2
    assert b.tools[1]["function"]["name"] == "convert_currency" and c.tools is None  # "tools": "" is no tools
    assert [m.role for m in a.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert a.messages[2] == Message("assistant", "", tool_calls=(ToolCall("get_weather", '{"city": "Oslo"}'),))
    assert a.messages[3] == Message("tool", '{"temperature": 3}')
    assert calls(b) == [("get_weather", {"city": "Lima"}, None), ("convert_currency", {"amount": 10, "to": "USD"}, None)]
    assert [m.role for m in b.messages].count("tool") == 2
    assert sum(len(calls(x)) for x in convs) == 3


def _qwen3_renderer():
    from instructkit.chat.render import Renderer
    from instructkit.chat.standin import standin_tokenizer

    tok = standin_tokenizer("qwen3")
    tok.chat_template = (Path(__file__).parent / "fixtures" / "official_templates" / "qwen3_trl.jinja").read_text(
        encoding="utf-8")
    return Renderer(tok, "auto")


def test_sharegpt_tools_are_rendered_into_the_prompt():
    conv = io.read_conversations(FIX / "glaive_toolcall.json")[0]
    renderer = _qwen3_renderer()
    text = renderer.render_text(conv)
    # the tool definitions are in the system prompt, the call is rendered in the template's own syntax
    assert text.count('"name": "get_weather"') == 2 and '"name": "convert_currency"' in text
    assert text.index("# Tools") < text.index("What is the weather in Oslo?")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>\n{\"temperature\": 3}\n</tool_response>" in text
    seqs = renderer.render_examples(conv)
    assert seqs and all('"name": "convert_currency"' in s.text for s in seqs)


# ---------------------------------------------------------------------------------------------------------------------
# LLaMA-Factory v1
# ---------------------------------------------------------------------------------------------------------------------


def test_llama_factory_v1_sft():
    stats = io.ReadStats()
    convs = io.read_conversations(FIX / "lf_v1_sft.jsonl", stats=stats)
    assert stats.format == "lf_v1" and len(convs) == 3
    a, b, c = convs
    assert a.messages == [Message("system", "Answer briefly."), Message("user", "What is 6 times 7?"),
                          Message("assistant", "42.", reasoning="6 * 7 = 42.", weight=1)]
    assert b.tools == [{"type": "function", "function": WEATHER}]
    assert b.messages[1] == Message("assistant", "", reasoning="Use the tool.",
                                    tool_calls=(ToolCall("get_weather", '{"city": "Rome"}'),), weight=1)
    assert b.messages[2] == Message("tool", '{"temperature": 24}')
    assert [m.weight for m in c.messages] == [None, 0.0, None, 1.0] and c.messages[3].content == "Bonjour."
    assert c.meta["extra_info"] == "greeting"


def test_llama_factory_v1_dpo():
    stats = io.ReadStats()
    pairs = io.read_pairs(FIX / "lf_v1_dpo.jsonl", stats=stats)
    assert stats.format == "lf_v1_dpo" and len(pairs) == 2
    assert pairs[0].prompt == [Message("user", "Capital of France?")]
    assert pairs[0].chosen == [Message("assistant", "Paris.", weight=1)]
    assert pairs[0].rejected == [Message("assistant", "Lyon.", weight=1)]
    assert [m.role for m in pairs[1].prompt] == ["system", "user"]
    assert pairs[1].chosen[0].reasoning == "Two plus two." and pairs[1].rejected[0].reasoning is None


@pytest.mark.parametrize("message, error", [
    ({"role": "user", "content": [{"type": "image_url", "value": "x.png"}]},
     "messages[0].content[0] has type 'image_url'; supported: text, reasoning, tool_call, tools (images, audio and "
     "video cannot be trained on)"),
    ({"role": "assistant", "content": [{"type": "text", "value": "a"}], "loss_weight": 0.5},
     "messages[1]: a 'assistant' message has weight 0.5: a turn is trained (1) or not (0), or weighted by its role "
     "(no weight); fractional weights cannot be honoured (the SFT loss has no per-token weights), so they are "
     "refused rather than rounded"),
    ({"role": "user", "content": [{"type": "text", "value": "u"}], "loss_weight": 1.0},
     "messages[0] is a 'user' turn with loss_weight 1.0: only assistant turns are trained (use 0 or leave it out)"),
])
def test_llama_factory_v1_refusals(tmp_path, message, error):
    user = {"role": "user", "content": [{"type": "text", "value": "u"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "value": "a"}], "loss_weight": 1.0}
    msgs = [message, answer] if message["role"] == "user" else [user, message]
    p = tmp_path / "v1.jsonl"
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    with pytest.raises(DataError) as e:
        io.read_conversations(p, "lf_v1")
    assert str(e.value) == f"{p}:1: {error}"


# ---------------------------------------------------------------------------------------------------------------------
# Hermes <tool_call> blocks and <think> splitting
# ---------------------------------------------------------------------------------------------------------------------


def test_hermes_tool_calls_are_parsed_when_tools_are_declared(tmp_path):
    convs = io.read_conversations(FIX / "hermes_tool_calls.jsonl")
    assert len(convs) == 2
    assert convs[0].messages[1] == Message("assistant", "", tool_calls=(ToolCall("get_weather", '{"city": "Cairo"}'),))
    assert convs[1].messages[1].content == "Checking both."
    assert calls(convs[1]) == [("get_weather", {"city": "Oslo"}, None), ("get_weather", {"city": "Rome"}, None)]
    # "none": the blocks stay text, and the tool results then answer no call: refused, naming the turn
    with pytest.raises(DataError, match=r"hermes_tool_calls.jsonl:1: conversation turn 2: a tool result must follow"):
        io.read_conversations(FIX / "hermes_tool_calls.jsonl", tool_call_format="none")
    # without tools, "auto" leaves the text alone; "hermes" parses anyway
    row = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content":
                        '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'}]}
    p = tmp_path / "h.jsonl"
    p.write_text(json.dumps(row) + "\n")
    assert io.read_conversations(p)[0].messages[1].content == row["messages"][1]["content"]
    assert calls(io.read_conversations(p, tool_call_format="hermes")[0]) == [("f", {"x": 1}, None)]
    bad = {"messages": row["messages"][:1] + [{"role": "assistant", "content": "<tool_call>{oops</tool_call>"}],
           "tools": [{"type": "function", "function": {"name": "f"}}]}
    p.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        io.read_conversations(p)
    assert str(e.value) == (f"{p}:1: turn 1: a <tool_call> block in the assistant content is not JSON "
                            '{"name", "arguments"} (or names a function not in \'tools\')')


def test_think_blocks_split_into_reasoning_when_asked(tmp_path):
    kept = io.read_conversations(FIX / "think_in_content.jsonl")
    assert kept[0].messages[1] == Message("assistant", "<think>\nThree plus four is seven.\n</think>\n\n7")
    split = io.read_conversations(FIX / "think_in_content.jsonl", split_think=True)
    assert split[0].messages[1] == Message("assistant", "7", reasoning="Three plus four is seven.")
    assert split[1].messages[1] == Message("assistant", "Hello!")
    assert split[1].messages[3] == Message("assistant", "25", reasoning="Five fives.")
    for content, error in (("<think>never closed", "turn 1: <think> without </think> in the assistant content"),
                           ("Answer. <think>late</think>", "turn 1: <think> is not at the start of the assistant "
                                                           "content (split_think splits a leading <think>...</think> "
                                                           "block)")):
        p = tmp_path / "t.jsonl"
        p.write_text(json.dumps({"messages": [{"role": "user", "content": "u"},
                                              {"role": "assistant", "content": content}]}) + "\n")
        with pytest.raises(DataError) as e:
            io.read_conversations(p, split_think=True)
        assert str(e.value) == f"{p}:1: {error}"


# ---------------------------------------------------------------------------------------------------------------------
# KTO and plain text
# ---------------------------------------------------------------------------------------------------------------------


def test_kto_files_give_unpaired_examples():
    ex = io.read_unpaired(FIX / "kto_messages.json")
    assert [e.label for e in ex] == [True, False, True, False, True]
    assert ex[1].prompt == [Message("user", "Name a primary colour.")]
    assert ex[1].completion == [Message("assistant", "Purple.")]
    assert [m.role for m in ex[3].prompt] == ["user", "assistant", "user"] and ex[3].completion[0].content == "13"
    assert [m.role for m in ex[2].prompt] == ["system", "user"]
    tagged = io.read_unpaired(FIX / "kto_tag_sharegpt.jsonl")
    assert [(e.completion[0].content, e.label) for e in tagged] == [("No, it is blue.", True), ("Yes.", False)]
    stats = io.ReadStats()
    trl = io.read_unpaired(FIX / "kto_trl_unpaired.jsonl", stats=stats)
    assert stats.format == "kto" and [e.label for e in trl] == [True, False, True]
    assert trl[0].prompt == [Message("user", "The sky is")] and trl[0].completion == [Message("assistant", " blue.")]
    assert trl[2].completion == [Message("assistant", "A cat.")]


@pytest.mark.parametrize("name", ["kto_messages.json", "kto_tag_sharegpt.jsonl", "kto_trl_unpaired.jsonl"])
def test_a_kto_file_read_for_sft_or_dpo_is_refused(name):
    for read, expect in ((io.read_conversations, "conversation"), (io.read_pairs, "preference")):
        with pytest.raises(DataError) as e:
            read(FIX / name)
        assert str(e.value) == (
            f"{FIX / name}: format 'kto' holds unpaired (KTO) data: each example has a 'label' key (or 'kto_tag') "
            f"marking its completion desirable or not, so it is not {expect} data (as SFT data its undesirable "
            "answers would be trained on): train it with the KTO recipe, `instructkit kto`")


def test_a_label_on_a_later_record_of_an_sft_file_is_refused(tmp_path):
    p = tmp_path / "mixed.jsonl"
    rows = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "b"}], "label": False}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"mixed.jsonl:2: field 'label' marks the completion desirable or not: .* "
                                        r"train it with `instructkit kto`"):
        io.read_conversations(p)


def test_plain_text_jsonl_and_txt():
    stats = io.ReadStats()
    texts = io.read_texts(FIX / "plain_text.jsonl", stats=stats)
    assert stats.format == "text" and len(texts) == 3
    assert texts[1] == TextExample("Water boils at 100 degrees Celsius at sea level.",
                                   {"id": "t2", "source": str(FIX / "plain_text.jsonl"), "line": 2, "format": "text"})
    assert texts[2].text == "Paris is the capital of France.\nIt lies on the Seine."
    txt = io.read_texts(FIX / "plain_text.txt")
    assert [(t.text, t.meta["line"]) for t in txt] == [
        ("First line of a document.", 1), ("Second line.", 2), ("Third line after blank lines.", 5), ("Last line.", 6)]
    for name in ("plain_text.jsonl", "plain_text.txt"):
        with pytest.raises(DataError) as e:
            io.read_conversations(FIX / name)
        assert str(e.value) == (f"{FIX / name}: format 'text' holds plain text (no roles, no prompt/response), not "
                                "conversation data: use it for continued pre-training or the PPO-ptx mix, or convert "
                                "it to conversations first")


# ---------------------------------------------------------------------------------------------------------------------
# The CLI: inspect counts, convert keeps every field, validate accepts the new kinds
# ---------------------------------------------------------------------------------------------------------------------


def _inspect(capsys, path, *extra):
    assert cli(["data", "inspect", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_data_inspect_counts(capsys):
    r = _inspect(capsys, FIX / "glaive_toolcall.json")
    assert (r["format"], r["kind"], r["examples"]) == ("sharegpt", "conversation", 3)
    assert r["content"] == {"examples_with_tools": 2, "tool_definitions": 4, "tool_calls": 3, "tool_results": 3,
                            "reasoning_turns": 0, "weighted_turns": {"0": 0, "1": 0},
                            "labels": {"desirable": 0, "undesirable": 0}}
    r = _inspect(capsys, FIX / "lf_v1_sft.jsonl")
    assert r["content"]["reasoning_turns"] == 2 and r["content"]["weighted_turns"] == {"0": 1, "1": 4}
    assert r["content"]["tool_calls"] == 1 and r["content"]["examples_with_tools"] == 1
    r = _inspect(capsys, FIX / "kto_messages.json")
    assert (r["kind"], r["content"]["labels"]) == ("unpaired", {"desirable": 3, "undesirable": 2})
    r = _inspect(capsys, FIX / "think_in_content.jsonl", "--split-think")
    assert r["content"]["reasoning_turns"] == 2
    r = _inspect(capsys, FIX / "plain_text.txt")
    assert (r["format"], r["kind"], r["examples"], r["text_chars"]["max"]) == ("text", "text", 4, 29)


@pytest.mark.parametrize("name", ["glaive_toolcall.json", "lf_v1_sft.jsonl", "lf_v1_dpo.jsonl",
                                  "hermes_tool_calls.jsonl", "kto_messages.json", "kto_trl_unpaired.jsonl",
                                  "plain_text.txt"])
def test_data_convert_keeps_every_field_and_validate_accepts_it(tmp_path, capsys, name):
    out = tmp_path / "internal.jsonl"
    assert cli(["data", "convert", str(FIX / name), str(out)]) == 0
    before = io.read_examples(FIX / name)
    after = io.read_examples(out)
    strip = lambda d: {k: v for k, v in d.items() if k != "meta"}  # noqa: E731 (provenance differs)
    assert [strip(a.to_dict()) for a in after] == [strip(b.to_dict()) for b in before]
    assert [type(a) for a in after] == [type(b) for b in before]
    assert cli(["data", "validate", str(out)]) == 0
    assert "valid" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# Real files in ../shared/data (not copied into the repository)
# ---------------------------------------------------------------------------------------------------------------------

# file -> (format, kind, records, examples); LLaMA-Factory demos that are not present are skipped, saying so.
REAL_FILES = {
    "lf_alpaca_en_demo.json": ("alpaca", "conversation", 999, 999),
    "lf_dpo_en_demo.json": ("sharegpt_preference", "preference", 300, 300),
    "glaive_toolcall_en_demo.json": None,
    "kto_en_demo.json": None,
    "dpo_en_demo.json": None,
}


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_files_in_shared_data(name):
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} is not present")
    expected = REAL_FILES[name]
    if expected is None:
        pytest.skip(f"{name} is present but has no recorded counts yet: add them to REAL_FILES")
    stats = io.ReadStats()
    examples = io.read_examples(path, stats=stats)
    fmt, kind, records, n = expected
    assert (stats.format, stats.total, stats.kept, len(examples)) == (fmt, records, records, n)
    from instructkit.data.formats import format_kind

    assert format_kind(stats.format) == kind


# ---------------------------------------------------------------------------------------------------------------------
# Property: every example round-trips through to_dict/from_dict and the internal JSONL writer/reader
# ---------------------------------------------------------------------------------------------------------------------

WORDS = ["alpha", "beta", "gamma", "δέλτα", "东京", "\"quoted\"", "back\\slash", "new\nline", "<tag>", " spaced "]


def _text(rng, empty=False):
    if empty and rng.random() < 0.3:
        return ""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))


def _turns(rng, start_user=True):
    """user (assistant [tool ...] assistant?) ... ending with an assistant turn."""
    msgs = []
    for _ in range(rng.randint(1, 3)):
        msgs.append(Message("user", _text(rng)))
        if rng.random() < 0.4:
            ids = [f"call_{rng.randint(0, 99)}" if rng.random() < 0.5 else None for _ in range(rng.randint(1, 2))]
            tc = tuple(ToolCall(rng.choice(["f", "g"]), json.dumps({"x": _text(rng)}), i) for i in ids)
            msgs.append(Message("assistant", _text(rng, empty=True), reasoning=_text(rng) if rng.random() < .5 else None,
                                tool_calls=tc, weight=rng.choice([None, 0, 1])))
            for c in tc:
                msgs.append(Message("tool", _text(rng), tool_call_id=c.id, name=rng.choice([None, c.name])))
        msgs.append(Message("assistant", _text(rng), reasoning=_text(rng) if rng.random() < 0.5 else None,
                            weight=rng.choice([None, 0, 1])))
    if rng.random() < 0.3:
        msgs.insert(0, Message("system", _text(rng)))
    return msgs


def _example(rng):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}] \
        if rng.random() < 0.5 else None
    meta = {"k": _text(rng)} if rng.random() < 0.5 else {}
    kind = rng.choice(["conversation", "preference", "unpaired", "text"])
    if kind == "conversation":
        return Conversation(_turns(rng), meta, tools)
    msgs = _turns(rng)
    prompt = msgs[:-1]
    while prompt and prompt[-1].role == "assistant":
        prompt = prompt[:-1]
    if not prompt or prompt[-1].role not in ("user", "tool"):
        prompt = [Message("user", _text(rng))]
    if kind == "preference":
        return PreferencePair(prompt, [Message("assistant", "chosen " + _text(rng))],
                              [Message("assistant", "rejected " + _text(rng), reasoning=_text(rng))], meta,
                              rng.choice([None, 0.5, 2.0]), tools)
    if kind == "unpaired":
        return UnpairedExample(prompt, [Message("assistant", _text(rng))], rng.random() < 0.5, meta, tools)
    return TextExample(_text(rng), meta)


def test_every_example_round_trips(tmp_path):
    rng = random.Random(15)
    examples = [_example(rng) for _ in range(300)]
    for ex in examples:
        d = json.loads(json.dumps(ex.to_dict()))
        assert example_from_dict(d) == ex
    path = tmp_path / "all.jsonl"
    # one file per kind (a file holds one kind), through the writer and the auto-detecting reader
    for kind in (Conversation, PreferencePair, UnpairedExample, TextExample):
        same = [e for e in examples if type(e) is kind]
        assert io.write_jsonl(path, same) == len(same)
        back = io.read_examples(path)
        assert [type(b) for b in back] == [kind] * len(same)
        for a, b in zip(same, back):
            assert b.to_dict() | {"meta": None} == a.to_dict() | {"meta": None}
            assert {k: v for k, v in b.meta.items() if k not in ("source", "line", "format")} == a.meta


def test_dedup_and_filter_on_the_new_kinds(tmp_path, capsys):
    """Exact duplicates: a tool call's arguments, the reasoning and a KTO label make examples different."""
    def conv(args, reasoning=None):
        return {"messages": [{"role": "user", "content": "Weather?"},
                             {"role": "assistant", "content": "", "reasoning": reasoning, "tool_calls": [
                                 {"type": "function", "function": {"name": "get_weather", "arguments": args}}]},
                             {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
                "tools": [{"type": "function", "function": WEATHER}]}
    rows = [conv('{"city": "Oslo"}'), conv('{"city": "Rome"}'), conv('{"city": "Oslo"}'),
            conv('{"city": "Oslo"}', "think")]
    src, out = tmp_path / "tools.jsonl", tmp_path / "dedup.jsonl"
    src.write_text("".join(json.dumps({k: v for k, v in r.items()}) + "\n" for r in rows).replace(
        '"reasoning": null, ', ""))
    assert cli(["data", "dedup", str(src), str(out), "--exact-only"]) == 0
    assert "kept 3 of 4; removed 1 exact" in capsys.readouterr().out
    kto = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "c", "label": False},
           {"prompt": "p", "completion": "c", "label": True}]
    src.write_text("".join(json.dumps(r) + "\n" for r in kto))
    assert cli(["data", "dedup", str(src), str(out), "--exact-only"]) == 0
    assert "kept 2 of 3; removed 1 exact" in capsys.readouterr().out
    assert [e.label for e in io.read_unpaired(out)] == [True, False]
    assert cli(["data", "filter", str(FIX / "plain_text.txt"), str(out), "--min-words", "3", "--outlier-z", "0"]) == 0
    assert "kept 2 of 4" in capsys.readouterr().out  # "Second line." and "Last line." have 2 words
    assert [t.text for t in io.read_texts(out)] == ["First line of a document.", "Third line after blank lines."]


def test_sft_through_the_cli_refuses_a_kto_file_before_loading_a_model(tmp_path, capsys):
    src = FIX / "kto_messages.json"
    assert cli(["sft", "model.path=/nonexistent", f"data.sources=[{{path: {src}}}]",
                f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{src}: format 'kto' holds unpaired (KTO) data: each example has a 'label' key" in err
    assert "train it with the KTO recipe, `instructkit kto`" in err


def test_data_config_read_options_reach_the_readers(tmp_path):
    from instructkit.config import DataConfig, DataSource
    from instructkit.data.sources import prompt_messages_of, read_sources

    think = [DataSource(path=str(FIX / "think_in_content.jsonl"))]
    plain, _ = read_sources(DataConfig(), think, tmp_path)
    assert plain[0].messages[1].reasoning is None
    split, stats = read_sources(DataConfig(split_think=True), think, tmp_path)
    assert [m.reasoning for m in split[0].messages] == [None, "Three plus four is seven."]
    assert stats[str(FIX / "think_in_content.jsonl")]["examples"] == 2
    hermes = [DataSource(path=str(FIX / "hermes_tool_calls.jsonl"))]
    with pytest.raises(DataError, match="a tool result must follow an assistant turn with tool_calls"):
        read_sources(DataConfig(tool_call_format="none"), hermes, tmp_path)
    assert len(read_sources(DataConfig(), hermes, tmp_path)[0]) == 2
    text = io.read_texts(FIX / "plain_text.jsonl")[0]
    with pytest.raises(DataError) as e:
        prompt_messages_of(text)
    assert str(e.value) == (f"{FIX / 'plain_text.jsonl'}:1: a plain-text example has no prompt to generate from: "
                            "prompts need conversations (messages ending with a user turn) or preference / unpaired "
                            "examples")


@pytest.mark.parametrize("record, fmt, error", [
    ({"instruction": "i", "output": "o", "kto_tag": False}, "alpaca",
     "field 'kto_tag' marks the completion desirable or not: an example with a 'label' (desirable or not) is KTO data: "
     "train it with `instructkit kto` (format kto); as alpaca data its undesirable answers would be trained on"),
    ({"inputs": "i", "targets": "t", "tools": [{"name": "f"}]}, "flan",
     "field 'tools' is not read by format flan: use a format that keeps tool definitions (alpaca, kto, lf_v1, "
     "lf_v1_dpo, messages, preference, prompt_completion, sharegpt, sharegpt_preference)"),
    ({"instruction": "i", "output": "o", "reasoning_content": "r"}, "alpaca",
     "field 'reasoning_content' is not read by format alpaca: put reasoning on the assistant message (messages "
     "format: 'reasoning' / 'reasoning_content') or in a leading <think> block of the answer with data.split_think"),
    ({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}], "functions": []}, "sharegpt",
     "field 'functions' (the legacy OpenAI function definitions) is not read: convert it to 'tools': "
     "[{\"type\": \"function\", \"function\": <definition>}, ...]"),
])
def test_keys_a_format_does_not_read_are_refused(tmp_path, record, fmt, error):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        io.read_examples(p, fmt)
    assert str(e.value) == f"{p}:1: {error}"


def test_alpaca_keeps_a_tools_column():
    from instructkit.data.formats import convert_record

    (conv,) = convert_record({"instruction": "i", "output": "o", "tools": json.dumps([WEATHER])}, "alpaca")
    assert conv.tools == [{"type": "function", "function": WEATHER}]
