"""rl/rollout.encode_prompts, the prompts PPO and GRPO sample from: rendered with the example's tools, dropped by
reason (no prompt, too long), and too few of them refused naming what needs them."""

import pytest

from instructkit.data.schema import Conversation, DataError, Message
from instructkit.rl.rollout import encode_prompts


class CharRenderer:
    """One id per character of the user turns, plus one per tool: enough to check what is rendered and counted."""

    def render_prompt(self, messages, tools=None):
        return [ord(c) for m in messages for c in m.content] + [0] * len(tools or [])


def conv(*turns, tools=None, line=0):
    return Conversation(messages=[Message(role=r, content=c) for r, c in turns], meta={"line": line}, tools=tools)


def test_encode_prompts_keeps_renders_and_counts_drops():
    examples = [conv(("user", "abc"), ("assistant", "x")), conv(("assistant", "only an answer")),
                conv(("user", "a much longer prompt"), ("assistant", "y")),
                conv(("user", "hi"), ("assistant", "z"), tools=[{"type": "function", "function": {"name": "f"}}], line=4)]
    prompts, dropped = encode_prompts(examples, CharRenderer(), max_length=5)
    assert dropped == {"too_long": 1, "no_prompt": 1}
    assert [p["ids"] for p in prompts] == [[97, 98, 99], [104, 105, 0]]  # the tool is rendered: one more id
    assert prompts[0]["messages"] == [{"role": "user", "content": "abc"}]
    assert prompts[1]["meta"] == {"line": 4}  # provenance kept for rewards that read it
    with pytest.raises(DataError, match=r"2 usable prompts, fewer than the 3 of prompts_per_step=3 \(1 longer than "
                                        r"data.max_length=5, 1 without a prompt\)"):
        encode_prompts(examples, CharRenderer(), max_length=5, need=3, why="prompts_per_step=3")


def test_prompt_only_file_tools_are_the_prompts_tools_not_meta(tmp_path):
    """A prompt file record {"prompt", "tools", ...}: its tools are rendered with the prompt (as SFT renders a
    conversation's tools), not left in meta where no renderer sees them; its other fields stay meta for rewards."""
    import json

    from instructkit.data.io import read_examples

    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": params}}
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Weather in Oslo?", "tools": [tool], "answer": "sunny"}) + "\n"
                    + json.dumps({"prompt": "Hi"}) + "\n")
    examples = list(read_examples(path, "auto"))  # detected as prompt_only
    assert examples[0].tools == [tool] and "tools" not in examples[0].meta
    assert examples[0].meta["answer"] == "sunny" and examples[1].tools is None
    prompts, _ = encode_prompts(examples, CharRenderer(), max_length=100)
    assert prompts[0]["ids"] == [ord(c) for c in "Weather in Oslo?"] + [0]  # one id per rendered tool
    assert prompts[1]["ids"] == [ord(c) for c in "Hi"]
    path.write_text(json.dumps({"prompt": "p", "tools": [{"type": "function"}]}) + "\n")
    with pytest.raises(DataError, match=r"prompts\.jsonl:1: tools\[0\] has no function name"):
        list(read_examples(path, "prompt_only"))
