"""`instructkit chat`, driven as a user would (pexpect) on the tiny model: streaming replies, multi-turn history, a
system prompt, /save, /reset, /exit."""

from __future__ import annotations

import json
import os
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "


@pytest.fixture
def chat(tiny_model_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    child = pexpect.spawn(sys.executable, ["-m", "instructkit", "chat", "--model", str(tiny_model_dir),
                                           "--temperature", "0", "--max-new-tokens", "6", "--system", "Be brief."],
                          env=env, encoding="utf-8", timeout=180, echo=False)
    child.expect_exact("/exit")  # the banner
    child.expect_exact(PROMPT)
    yield child
    if child.isalive():
        child.terminate(force=True)


def _greedy_reply(tiny_model_dir, messages):
    """What the engine generates greedily for this history: the chat must have streamed exactly this."""
    from instructkit.config import ModelConfig
    from instructkit.generation.engine import Engine, SamplingParams
    from instructkit.models.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    return Engine(model, tok).chat([messages], SamplingParams(max_new_tokens=6, temperature=0.0))[0].text


def test_multi_turn_save_reset_exit(chat, tiny_model_dir, tmp_path):
    chat.sendline("Hello there")
    chat.expect_exact(PROMPT)
    first_screen = chat.before
    chat.sendline("And again?")
    chat.expect_exact(PROMPT)
    saved = tmp_path / "conv.json"
    chat.sendline(f"/save {saved}")
    chat.expect_exact(f"saved {saved}")
    chat.expect_exact(PROMPT)

    doc = json.loads(saved.read_text())
    msgs = doc["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "Be brief." and msgs[1]["content"] == "Hello there"
    assert msgs[3]["content"] == "And again?"
    # the streamed text on screen is the reply stored in the history
    assert msgs[2]["content"].strip() and msgs[2]["content"].strip() in first_screen.replace("\r\n", "\n")
    # each reply equals greedy generation from the full history before it (system prompt and earlier turns included)
    assert msgs[2]["content"] == _greedy_reply(tiny_model_dir, msgs[:2])
    assert msgs[4]["content"] == _greedy_reply(tiny_model_dir, msgs[:4])
    # the saved file is the internal format data/io.py reads back
    from instructkit.data.schema import Conversation

    assert len(Conversation.from_dict(doc).messages) == 5

    chat.sendline("/reset")
    chat.expect_exact("(new conversation)")
    chat.expect_exact(PROMPT)
    chat.sendline(f"/save {tmp_path / 'empty.json'}")
    chat.expect_exact("(nothing to save yet)")
    chat.expect_exact(PROMPT)
    chat.sendline("Hi")
    chat.expect_exact(PROMPT)
    chat.sendline(f"/save {tmp_path / 'after_reset.json'}")
    chat.expect_exact("saved")
    chat.expect_exact(PROMPT)
    after = json.loads((tmp_path / "after_reset.json").read_text())["messages"]
    assert [m["role"] for m in after] == ["system", "user", "assistant"]  # history forgotten, system prompt kept
    assert after[1]["content"] == "Hi" and after[2]["content"] == _greedy_reply(tiny_model_dir, after[:2])

    chat.sendline("/help")
    chat.expect_exact("/reset")
    chat.expect_exact(PROMPT)
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
