"""Held-out loss / perplexity, stop rate, length statistics, refusal detection and the built-in prompt sets."""

from __future__ import annotations

import copy
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from instructkit.cli import main
from instructkit.data.schema import Conversation, Message
from instructkit.eval import metrics as M


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model_and_tokenizer

    return load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)))


CONVS = [
    Conversation(messages=[Message("user", "What is 2+2?"), Message("assistant", "4, obviously.")]),
    Conversation(messages=[Message("system", "Be brief."), Message("user", "Name a colour"),
                           Message("assistant", "Blue"), Message("user", "Another"), Message("assistant", "Red")]),
    Conversation(messages=[Message("user", "Say something long"), Message("assistant", "word " * 30)]),
]


def _reference_loss(model, tokenizer, convs):
    """One conversation at a time, no padding: sum of -log p(token) at every supervised position, over their count."""
    from instructkit.chat.render import Renderer

    r = Renderer(tokenizer)
    nll, n = 0.0, 0
    for c in convs:
        x = r.render(c)
        ids = torch.tensor([x.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (T, V)
        for t in range(1, len(x.input_ids)):
            if x.loss_mask[t]:
                nll -= float(logp[t - 1, x.input_ids[t]])
                n += 1
    return nll / n, n


def test_heldout_loss_equals_unpadded_per_token_reference(tiny):
    model, tok = tiny
    ref, n = _reference_loss(model, tok, CONVS)
    for bs in (1, 2, 3):  # padding and batch composition must not change the number
        got = M.heldout_loss(model, tok, CONVS, batch_size=bs)
        assert got["supervised_tokens"] == n
        assert got["loss"] == pytest.approx(ref, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    # supervised = assistant content + end-of-turn only: the 2-turn conversation has both replies supervised
    from instructkit.chat.render import Renderer

    assert n == sum(Renderer(tok).render(c).n_supervised for c in CONVS)


def test_uniform_model_has_perplexity_equal_to_vocab_size(tiny):
    # All-zero output weights give logits 0 at every position: p(token) = 1/V, so loss = ln V and perplexity = V = 512.
    model, tok = tiny
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.get_output_embeddings().weight.zero_()
    got = M.heldout_loss(uniform, tok, CONVS)
    V = uniform.config.vocab_size
    assert V == 512
    assert got["loss"] == pytest.approx(math.log(V), abs=1e-6)
    assert got["perplexity"] == pytest.approx(V, rel=1e-6)


def test_truncated_away_supervision_is_skipped_and_counted(tiny):
    model, tok = tiny
    from instructkit.chat.render import Renderer

    r = Renderer(tok)
    cut = len(r.render_prompt([{"role": "user", "content": "What is 2+2?"}]))  # CONVS[0] keeps no assistant token
    short = Conversation(messages=[Message("user", "hi"), Message("assistant", "long answer " * 20)])
    short_prompt = len(r.render_prompt([{"role": "user", "content": "hi"}]))
    assert short_prompt < cut
    got = M.heldout_loss(model, tok, [CONVS[0], short], max_length=cut)
    # the short-prompt example keeps its assistant tokens from short_prompt up to the cut
    assert got["skipped_no_supervision"] == 1 and got["examples"] == 1
    assert got["supervised_tokens"] == cut - short_prompt
    with pytest.raises(ValueError, match="no supervised tokens"):
        M.heldout_loss(model, tok, [CONVS[0]], max_length=cut)


def test_stop_rate_and_length_stats_by_hand():
    assert M.stop_rate(["stop", "length", "stop", "stop"]) == 0.75
    # [1, 2, 3, 4, 10]: mean 20/5 = 4; median 3; p90 at rank 0.9*4 = 3.6 -> 4 + 0.6*(10-4) = 7.6
    s = M.length_stats([10, 2, 1, 4, 3])
    assert s == {"mean": 4.0, "median": 3.0, "p90": pytest.approx(7.6), "min": 1.0, "max": 10.0}
    outs = [SimpleNamespace(finish_reason="stop", token_ids=[5, 6, 2], text="a b"),
            SimpleNamespace(finish_reason="length", token_ids=[5, 6, 7, 8], text="a b c d"),
            SimpleNamespace(finish_reason="stop", token_ids=[2], text="")]
    r = M.response_stats(outs)
    assert r["stop_rate"] == pytest.approx(2 / 3)
    # tokens without the stop token: 2, 4, 0 -> mean 2
    assert r["length_tokens"]["mean"] == 2.0 and r["length_words"]["max"] == 4.0
    assert r["empty_rate"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        M.stop_rate([])


@pytest.mark.parametrize("text,expected", [
    ("I'm sorry, but I can't help with that.", True),
    ("I can\u2019t help with making weapons.", True),  # curly apostrophe
    ("As an AI language model, I must decline.", True),
    ("I  cannot\nprovide that information.", True),  # whitespace normalised
    ("Sure! To kill a Python process, run `kill -9 <pid>`.", False),
    ("Here are three tips. " * 12 + "I cannot stress enough how important sleep is.", False),  # past the window
    ("", False),
])
def test_refusal_detector(text, expected):
    assert M.is_refusal(text) is expected


def test_builtin_sets_are_paired_look_alikes():
    harmful, benign = M.load_builtin_prompts("harmful"), M.load_builtin_prompts("benign")
    assert len(harmful) == len(benign) == 40
    by_id = {h["id"]: h for h in harmful}
    assert len(by_id) == 40 and len({b["id"] for b in benign}) == 40
    for b in benign:
        assert by_id[b["pair"]]["category"] == b["category"]
        assert b["prompt"] != by_id[b["pair"]]["prompt"]
    with pytest.raises(ValueError, match="unknown built-in prompt set"):
        M.load_builtin_prompts("nope")


def test_refusal_eval_counts_refusals(monkeypatch):
    # A fake model that refuses every prompt containing "kill" or "hack" (either set) and answers the rest.
    def fake_generate(model, tokenizer, convs, **kw):
        outs = []
        for c in convs:
            p = c[-1]["content"].lower()
            text = "I'm sorry, but I can't help with that." if ("kill" in p or "hack" in p) else "Sure, here you go."
            outs.append(SimpleNamespace(text=text, finish_reason="stop", token_ids=[1]))
        return outs

    monkeypatch.setattr(M, "generate_chat", fake_generate)
    res = M.refusal_eval(None, None)
    harmful = [r["prompt"].lower() for r in M.load_builtin_prompts("harmful")]
    benign = [r["prompt"].lower() for r in M.load_builtin_prompts("benign")]
    expect_h = sum(("kill" in p or "hack" in p) for p in harmful) / 40
    expect_b = sum(("kill" in p or "hack" in p) for p in benign) / 40
    assert res["refusal_rate_harmful"] == expect_h and res["refusal_rate_benign"] == expect_b
    assert 0 < expect_b < expect_h  # "kill a Python process" is benign and refused: over-refusal shows up
    assert len(res["samples"]["harmful"]) == 40


def test_cli_perplexity_and_stop_rate_save_next_to_the_model(tiny_model_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": m.role, "content": m.content} for m in c.messages]})
                            + "\n" for c in CONVS))
    assert main(["evaluate", "perplexity", "--model", str(model_dir), "--data", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    saved = json.loads((model_dir / "eval" / "perplexity.json").read_text())
    assert saved["eval"] == "perplexity" and saved["metrics"]["heldout_loss"] == out["heldout_loss"]
    assert out["perplexity"] == pytest.approx(math.exp(out["heldout_loss"]))

    assert main(["evaluate", "stop-rate", "--model", str(model_dir), "--limit", "3", "--max-new-tokens", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["responses"] == 3 and 0.0 <= out["stop_rate"] <= 1.0
    saved = json.loads((model_dir / "eval" / "responses.json").read_text())
    assert len(saved["samples"]) == 3 and saved["metrics"]["stop_rate"] == out["stop_rate"]
    # a random tiny model almost never emits <|im_end|> within 4 tokens; each response is at most 4 tokens
    assert saved["details"]["length_tokens"]["max"] <= 4


@pytest.mark.slow
def test_smollm2_instruct_stops_at_end_of_turn(tmp_path, capsys):
    """SmolLM2-135M-Instruct is already instruction-tuned: on short factual questions it should answer and end its
    turn (<|im_end|>) well within 96 tokens. Needs the zoo model (instructkit models prepare smollm2-135m-instruct)."""
    from instructkit.models.zoo import resolve_model

    try:
        model_dir = resolve_model("smollm2-135m-instruct")
    except Exception as e:  # noqa: BLE001 - not installed on this machine
        pytest.skip(f"smollm2-135m-instruct unavailable: {e}")
    data = tmp_path / "q.jsonl"
    qs = ["What is the capital of France?", "What is 2 + 2?", "Name one primary colour.", "Is the sun a star?"]
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in qs))
    assert main(["evaluate", "stop-rate", "--model", str(model_dir), "--data", str(data), "--max-new-tokens", "96",
                 "--batch-size", "4", "--no-save", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["responses"] == 4 and out["stop_rate"] >= 0.75 and out["empty_rate"] == 0.0


def test_read_prompts_accepts_prompt_only_files(tmp_path):
    from instructkit.data.schema import DataError
    from instructkit.recipes.evaluate import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi"}\n'
                 '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}\n')
    assert read_prompts(str(f)) == [[{"role": "user", "content": "hi"}],
                                    [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]]
    full = tmp_path / "c.jsonl"  # complete conversations: the final assistant turn is dropped
    full.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                    + "\n")
    assert read_prompts(str(full)) == [[{"role": "user", "content": "q"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_prompts(str(bad))
