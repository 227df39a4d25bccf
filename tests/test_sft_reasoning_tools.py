"""`instructkit sft` on tool-call data and on reasoning data, with Qwen3's official chat template on a tokenizer and a
tiny Qwen3 built in-process: the run trains exactly the sequences and tokens chat/render.py derives (Qwen3 re-renders
a tool-calling turn once its result follows, so each such conversation gives two training sequences), losses are
finite and fall, and the saved tokenizer carries the template it was trained with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from instructkit.cli import main as cli
from instructkit.data.schema import Message

pytestmark = pytest.mark.skipif(
    "reasoning" not in getattr(Message, "__dataclass_fields__", {}),
    reason="needs the data contract of issue 15 (Message.reasoning / tool_calls, Conversation.tools) in data/schema.py")

FIXTURES = Path(__file__).parent / "fixtures" / "official_templates"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo"]


def tool_rows():
    for k, city in enumerate(CITIES):
        yield {"messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": f"call_{k}", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "content": json.dumps({"temperature": 10 + k}), "tool_call_id": f"call_{k}"},
            {"role": "assistant", "content": f"It is {10 + k} degrees in {city}."}], "tools": TOOLS}


def reasoning_rows():
    for a in range(1, 7):
        yield {"messages": [
            {"role": "user", "content": f"Compute {a} plus {a}."},
            {"role": "assistant", "content": f"The answer is {2 * a}.", "reasoning": f"{a} plus {a} is {2 * a}."}]}


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A tiny random Qwen3 and a byte-level tokenizer carrying Qwen3's official template (trl 1.16.0 qwen3.jinja)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from instructkit.chat.standin import standin_tokenizer

    out = tmp_path_factory.mktemp("qwen3_tiny")
    tok = standin_tokenizer("qwen3")
    tok.chat_template = (FIXTURES / "qwen3_trl.jinja").read_text(encoding="utf-8")
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _run(qwen3_dir, rows, tmp_path, name):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["sft", f"model.path={qwen3_dir}", "model.template=auto", f"data.sources=[{{path: {data}}}]",
                "data.max_length=512", "data.validation_fraction=0", f"train.output_dir={tmp_path}",
                f"train.run_name={name}", "train.max_steps=4", "train.micro_batch_size=4", "train.pack_length=1024",
                "train.lr=0.01", "train.threads=1", "train.resume=never"]) == 0
    run = tmp_path / name
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    return run, data


def _expected(qwen3_dir, data):
    from transformers import AutoTokenizer

    from instructkit.chat.render import Renderer
    from instructkit.data.io import read_conversations

    renderer = Renderer(AutoTokenizer.from_pretrained(qwen3_dir), "auto")
    seqs = [r for c in read_conversations(str(data), "auto") for r in renderer.render_examples(c)]
    return len(seqs), seqs


def test_sft_on_tool_call_data(qwen3_dir, tmp_path):
    run, data = _run(qwen3_dir, tool_rows(), tmp_path, "tools")
    n, seqs = _expected(qwen3_dir, data)
    assert n == 2 * len(CITIES)  # the tool-calling turn and the final answer each in their own sequence
    stats = json.loads((run / "data_stats.json").read_text())["train"]
    assert stats["total"] == stats["kept"] == n
    assert all("get_weather" in s.text and "# Tools" in s.text for s in seqs)  # the tools are in every prompt
    assert (run / "final" / "chat_template.jinja").read_text() == (FIXTURES / "qwen3_trl.jinja").read_text()


def test_sft_on_reasoning_data(qwen3_dir, tmp_path):
    run, data = _run(qwen3_dir, reasoning_rows(), tmp_path, "reasoning")
    n, seqs = _expected(qwen3_dir, data)
    assert n == 6
    stats = json.loads((run / "data_stats.json").read_text())["train"]
    assert stats["total"] == stats["kept"] == n
    assert all("<think>\n" in s.text and " plus " in s.text.split("<think>")[1] for s in seqs)  # reasoning trained
