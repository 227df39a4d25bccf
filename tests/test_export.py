"""`instructkit export`: adapter copy, merged model, GGUF f32/q8_0 verified by loading back with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from instructkit.cli import main as cli_main
from instructkit.models import export as ex


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run folder whose final/ is a LoRA adapter on the tiny model, with non-zero adapter weights (so a merge
    changes the logits) and the tokenizer + chat template saved beside it, as recipes/sft.py writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(run / "final")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run / "final")
    cfg = json.loads((run / "final/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
    return run


def _ids(tok, text="Give three tips for staying healthy."):
    return torch.tensor([tok(text).input_ids])


def test_export_adapter_merge_and_gguf_f32(lora_run, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    args = ["export", "--model", str(lora_run), "--out", str(out), "--adapter", "--merge", "--gguf", "f32"]
    assert cli_main(args) == 0
    result = json.loads(capsys.readouterr().out)
    # the adapter in peft format, with the chat template
    assert (out / "adapter/adapter_config.json").exists() and (out / "adapter/adapter_model.safetensors").exists()
    ref_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert AutoTokenizer.from_pretrained(out / "adapter").chat_template == ref_tok.chat_template
    # the merged model loads in plain transformers and equals base + adapter
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n in merged.state_dict())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    x = _ids(ref_tok)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, peft_model(x).logits, rtol=1e-5, atol=1e-5)
        assert (merged(x).logits - base(x).logits).abs().max() > 1e-3  # the adapter did change the model
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template == ref_tok.chat_template
    # GGUF f32: loads back with transformers to the same logits, tokenization and chat template
    gguf = out / "model-f32.gguf"
    assert result["gguf"] == str(gguf)
    assert result["gguf_check"]["max_abs_logit_diff"] <= 1e-4
    assert result["gguf_check"]["same_tokenization"] and result["gguf_check"]["same_chat_template"]
    assert result["gguf_check"]["tokenization_mismatches"] == [] and result["gguf_check"]["same_argmax"]
    g_model = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf.name, dtype=torch.float32)
    g_tok = AutoTokenizer.from_pretrained(out, gguf_file=gguf.name)
    assert g_tok.chat_template == ref_tok.chat_template
    assert g_tok.convert_tokens_to_ids("<|im_end|>") == ref_tok.eos_token_id
    assert g_tok("<|im_end|>", add_special_tokens=False).input_ids == [ref_tok.eos_token_id]  # a special token
    with torch.no_grad():
        torch.testing.assert_close(g_model(x).logits, merged(x).logits, rtol=1e-5, atol=1e-5)


def test_gguf_q8_0_is_quantised_and_close(tiny_model_dir, tmp_path):
    from gguf import GGUFReader

    f32 = ex.export_gguf(tiny_model_dir, tmp_path / "a", "f32")
    q8 = ex.export_gguf(tiny_model_dir, tmp_path / "b", "q8_0")
    check = ex.verify_gguf(q8, tiny_model_dir)
    # q8_0 rounds each weight to 1/127 of its 32-block's max (~0.5% rms of the weight scale, see gguf_check_passed):
    # logits move, but by a few percent of their spread at most: measured 0.95%, 0.96%, 0.99% for seeds 0, 1, 2
    assert 0.003 < check["rel_rms_logit_diff"] <= 0.02 < ex.GGUF_TOLERANCE["q8_0"]
    assert ex.gguf_check_passed(check, "q8_0") and check["same_tokenization"]
    # the same check with f32's tolerance must fail: the quantisation is really there
    assert not ex.gguf_check_passed(check, "f32")
    assert ex.gguf_check_passed(ex.verify_gguf(f32, tiny_model_dir), "f32")
    types = {t.name: t.tensor_type.name for t in GGUFReader(q8).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay f32
    # q8_0 stores a block of 32 weights in 34 bytes (32 int8 + one f16 scale) instead of 128: ratio 34/128 = 0.266
    f32_sizes = {t.name: int(t.n_bytes) for t in GGUFReader(f32).tensors}
    q8_sizes = {t.name: int(t.n_bytes) for t in GGUFReader(q8).tensors}
    assert q8_sizes["blk.0.ffn_up.weight"] * 128 == f32_sizes["blk.0.ffn_up.weight"] * 34


def test_gguf_tied_embeddings_round_trip(tmp_path):
    from instructkit.models.tiny import create_tiny

    tied = create_tiny(tmp_path / "tied", tie_word_embeddings=True)
    path = ex.export_gguf(tied, tmp_path / "g", "f32")
    from gguf import GGUFReader

    assert "output.weight" not in {t.name for t in GGUFReader(path).tensors}
    assert ex.verify_gguf(path, tied)["max_abs_logit_diff"] <= 1e-4


def test_full_model_export_and_merge_is_noop(tiny_model_dir, tmp_path):
    result = ex.export(tiny_model_dir, tmp_path / "o", merge=True)
    assert result == {"source": str(tiny_model_dir), "merged": str(tiny_model_dir)}


def test_verification_failure_is_exit_1(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ex.GGUF_TOLERANCE, "f32", -1.0)  # no difference can be below -1: the check must fail
    assert cli_main(["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--gguf", "f32"]) == 1
    assert "GGUF verification failed" in capsys.readouterr().err


def test_non_llama_gguf_is_refused(tiny_model_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512)).save_pretrained(d)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special", "chat_template")):
            shutil.copy(f, d / f.name)
    assert cli_main(["export", "--model", str(d), "--out", str(tmp_path / "o"), "--gguf", "f32"]) == 2
    assert "supports the Llama and Gemma 3 architectures" in capsys.readouterr().err


def test_missing_model_is_exit_2(tmp_path, capsys):
    assert cli_main(["export", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_permutation_is_inverted_by_transformers():
    """Our HF -> llama.cpp q/k permutation followed by transformers' reverse permutation is the identity."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(8 * 16 * 6, dtype=torch.float32).reshape(8 * 16, 6)  # 8 heads of dim 16
    back = LlamaTensorProcessor()._reverse_permute_weights(ex._permute_for_gguf(w, 8).numpy(), 8, 8)
    assert torch.equal(torch.as_tensor(back), w)
    assert not torch.equal(ex._permute_for_gguf(w, 8), w)


def test_adapter_is_the_default_for_an_adapter_source(lora_run, tmp_path):
    result = ex.export(lora_run, tmp_path / "o")
    assert set(result) == {"source", "adapter"} and not (tmp_path / "o/merged").exists()
    assert (tmp_path / "o/adapter/adapter_model.safetensors").exists()


def test_adapter_without_tokenizer_gets_the_base_tokenizer_and_template(lora_run, tiny_model_dir, tmp_path):
    """An adapter folder saved without its tokenizer still exports with the chat template (from the base model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(lora_run / "final" / name, bare / name)
    result = ex.export(bare, tmp_path / "o", adapter=True)
    out = Path(result["adapter"])
    assert (AutoTokenizer.from_pretrained(out).chat_template
            == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template)
    # plain peft loads the exported adapter to the same weights as the source adapter
    a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).state_dict()
    b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), bare).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # merging a bare adapter also gives a merged folder with the chat template
    merged = Path(ex.export(bare, tmp_path / "m", merge=True)["merged"])
    assert (AutoTokenizer.from_pretrained(merged).chat_template
            == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template)
    assert not (tmp_path / "m/adapter").exists()  # only what was asked for


def test_adapter_flag_on_full_model_and_pickled_adapter_are_exit_2(lora_run, tiny_model_dir, tmp_path, capsys):
    assert cli_main(["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--adapter"]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(lora_run / "final/adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")  # a pickle: refused before anything reads it
    assert cli_main(["export", "--model", str(pickled), "--out", str(tmp_path / "o2")]) == 2
    assert "pickled adapter_model.bin is refused" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_gguf_q8_0_round_trip(tmp_path):
    """A real Llama-architecture model (SmolLM2-135M, byte-level BPE, ChatML): q8_0 GGUF loads back in transformers
    with the same tokenization and chat template and close logits."""
    from instructkit.models.zoo import resolve_model

    src = resolve_model("smollm2-135m-instruct", log=lambda m: None)
    result = ex.export(src, tmp_path, gguf="q8_0")
    check = result["gguf_check"]
    assert check["same_tokenization"] and check["same_chat_template"]
    # measured 2026-11-23: rms logit difference 3.5% of the reference logits' std (max abs difference 1.32)
    assert 0 < check["rel_rms_logit_diff"] <= ex.GGUF_TOLERANCE["q8_0"] and ex.gguf_check_passed(check, "q8_0")


GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
                  "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _tiny_gemma3(path: Path, shared_data: Path) -> Path:
    """A Gemma 3 text model from config (2 layers, hidden 64, head_dim 256 as Gemma 3 270M has, random norms so the
    1 + w norm convention is exercised) and a Gemma-style tokenizer: SentencePiece-like BPE with byte fallback, '▁'
    for spaces, vocabulary ordered specials / 256 byte tokens / pieces, merges derived from that order as in Gemma's
    GGUF files; pieces learned from Alpaca demo text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    records = json.loads((shared_data / "lf_alpaca_en_demo.json").read_text())[:300]
    texts = [(r["instruction"] + " " + r["output"]).replace(" ", "\u2581") for r in records]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Split("\u2581", "merged_with_next")
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, show_progress=False))
    pieces = [t for t, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]) if t != "<unk>"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab, {t: -i for i, t in enumerate(tokens)}),
                         add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": specials[5:]})
    tok.chat_template = GEMMA_TEMPLATE
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=256, vocab_size=len(tokens), max_position_embeddings=512,
                           sliding_window=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)  # Gemma inits these to 0 (the norm scales by 1 + w): make them matter
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_gemma3_gguf_round_trip(tmp_path, shared_data):
    """Gemma 3: llama.cpp's tensor names, norms stored as 1 + w, a SentencePiece ("llama") vocabulary with scores and
    token types; transformers loads it back to the same logits (f32) and the same tokens."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    src = _tiny_gemma3(tmp_path / "gemma", shared_data)
    result = ex.export(src, tmp_path / "o", gguf="f32")
    check = result["gguf_check"]
    assert check["max_abs_logit_diff"] <= 1e-4 and check["tokenization_mismatches"] == [], check
    assert check["same_chat_template"]
    reader = GGUFReader(result["gguf"])
    fields = {k: f.contents() for k, f in reader.fields.items() if k not in ("tokenizer.ggml.tokens",)}
    assert fields["general.architecture"] == "gemma3" and fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_bos_token"] is True  # Gemma's tokenizer adds <bos>
    types = fields["tokenizer.ggml.token_type"]
    assert types[:7] == [3] * 7 and types[7:7 + 256] == [6] * 256 and set(types[263:]) == {1}  # control, byte, normal
    # normal pieces score -rank, so SentencePiece's highest-score-first merging follows the vocabulary order
    assert fields["tokenizer.ggml.scores"][263:266] == [0.0, -1.0, -2.0]
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.0.post_ffw_norm.weight", "blk.1.ffn_norm.weight"} <= names
    assert "output.weight" not in names  # tied embeddings
    # the +1 on norms is really there (transformers subtracts it again on load, which the logit check proves)
    from safetensors.torch import load_file

    w = load_file(src / "model.safetensors")["model.layers.0.input_layernorm.weight"]
    (stored,) = [t for t in reader.tensors if t.name == "blk.0.attn_norm.weight"]
    torch.testing.assert_close(torch.as_tensor(stored.data.copy()), w + 1)
    # and a chat turn tokenises to the same ids through the GGUF's tokenizer
    g_tok = AutoTokenizer.from_pretrained(tmp_path / "o", gguf_file=Path(result["gguf"]).name)
    chat = [{"role": "user", "content": "Give three tips  for staying healthy, naïve café 🙂"}]
    ref_tok = AutoTokenizer.from_pretrained(src)
    assert (g_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    text = ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert g_tok(text, add_special_tokens=False).input_ids == ref_tok(text, add_special_tokens=False).input_ids


@pytest.mark.slow
def test_gemma3_270m_gguf_f32_and_q8_0(tmp_path):
    """The real Gemma-3-270M base (zoo cache): f32 round trip exact, q8_0 within the relative bound (measured
    2026-11-23: f32 max |logit diff| 0.0; q8_0 rms diff 2.9% of the logits' std, max abs 2.30)."""
    from instructkit.models.zoo import resolve_model

    src = resolve_model("gemma-3-270m", log=lambda m: None)
    for outtype in ("f32", "q8_0"):
        check = ex.export(src, tmp_path / outtype, gguf=outtype)["gguf_check"]
        assert ex.gguf_check_passed(check, outtype) and check["tokenization_mismatches"] == [], check


# ---------------------------------------------------------------------------------------------------------------------
# q4_K_M (llama.cpp's quantiser), Ollama Modelfiles, model references
# ---------------------------------------------------------------------------------------------------------------------
needs_llama_cpp = pytest.mark.skipif(ex.llama_cpp_module() is None, reason=(
    "llama-cpp-python is not installed and no build is cached in ~/.cache/instructkit/llama-cpp-python/site "
    "(q4_K_M is written by llama.cpp's own quantiser; see models/export.py llama_cpp_quantizer)"))


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory) -> Path:
    """Rows of 256 columns, so llama.cpp's k-quants (blocks of 256) apply to most matrices."""
    from instructkit.models.tiny import create_tiny

    return create_tiny(tmp_path_factory.mktemp("tiny256"), seed=0, hidden_size=256)


@needs_llama_cpp
def test_gguf_q4_K_M_header_tensors_and_modelfile(tiny256, tmp_path):
    from gguf import GGUFReader

    result = ex.export(tiny256, tmp_path / "o", gguf="q4_k_m")  # any capitalisation
    path = Path(result["gguf"])
    assert path.name == "model-q4_K_M.gguf" and not list(path.parent.glob("*tmp*"))
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    from transformers import AutoTokenizer

    assert fields["tokenizer.chat_template"] == AutoTokenizer.from_pretrained(tiny256).chat_template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    # llama.cpp's q4_K_M mix: Q4_K in general, Q6_K for the output layer and the later attention-value matrices;
    # rows of 128 (ffn_down here) cannot hold a 256-block and fall back to a 32-block type
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["token_embd.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] in ("Q5_0", "Q8_0", "Q5_1", "Q4_1")
    check = result["gguf_check"]  # transformers dequantises it back: close, not equal
    assert check["same_tokenization"] and check["same_chat_template"]
    assert 0.01 < check["rel_rms_logit_diff"] <= ex.GGUF_TOLERANCE["q4_K_M"]
    assert result["modelfile_format"] == "chatml" and Path(result["modelfile"]).read_text().startswith("# Ollama")


def test_q4_K_M_without_llama_cpp_says_how_to_get_it(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "llama_cpp_module", lambda: None)
    with pytest.raises(ex.ExportError, match="llama-cpp-python"):
        ex.export_gguf(tiny_model_dir, tmp_path, "q4_K_M")
    assert not list(tmp_path.glob("*.gguf"))


def test_modelfile_template_stops_and_system(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    result = ex.export(tiny_model_dir, tmp_path / "o", gguf="q8_0", verify=False, system="You are terse.")
    text = Path(result["modelfile"]).read_text()
    assert "FROM ./model-q8_0.gguf" in text and 'SYSTEM """You are terse."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert "{{ .Content }}" in text and "{{-" not in text.split('TEMPLATE """', 1)[1][3:]  # no whitespace trimming
    # the format written renders the probe conversations exactly as the model's own Jinja template
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    fmt = ex._OLLAMA_FORMATS[result["modelfile_format"]]
    for msgs in ex._PROBES:
        assert ex._simulate(fmt, msgs, True) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_modelfile_formats_match_their_families():
    """Each Ollama format against a reference Jinja template of its family (Gemma: the system prompt opens the
    first user turn; Llama 3: BOS comes from the tokenizer, not the Modelfile)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment()
    refs = {
        "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}", "<|begin_of_text|>"),
        "gemma": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + "
                  "'\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = "
                  "messages %}{% endif %}{% for m in loop_messages %}<start_of_turn>{{ 'model' if m['role'] == "
                  "'assistant' else m['role'] }}\n{{ (first if loop.first else '') + m['content'] }}<end_of_turn>\n"
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}", "<bos>"),
    }
    for name, (src, bos) in refs.items():
        t = env.from_string(src)
        for msgs in ex._PROBES:
            want = t.render(messages=msgs, add_generation_prompt=True, bos_token=bos)[len(bos):]
            assert ex._simulate(ex._OLLAMA_FORMATS[name], msgs, True) == want, (name, msgs)


def test_export_accepts_a_zoo_name_and_says_what_is_missing(tmp_path, capsys):
    assert cli_main(["export", "--model", "no-such-model-xyz", "--out", str(tmp_path), "--gguf", "q8_0"]) == 2
    assert "no-such-model-xyz" in capsys.readouterr().err
    from instructkit.models.zoo import ZOO, is_prepared

    name = "smollm2-135m-instruct"
    if name in ZOO and is_prepared(name):  # CI installs it before the tests: the zoo name resolves like a folder
        assert ex.find_model_dir(name).is_dir()


def test_llama_cpp_module_says_why_a_cached_build_does_not_import(tmp_path):
    """A build in the cache folder that fails to import (here: a dependency missing from the environment, as
    llama-cpp-python's ``diskcache`` was) gives None and a reason naming the missing package, not a silent None."""
    import os
    import subprocess
    import sys

    pkg = tmp_path / "site" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import ik_missing_dependency_xyz\n")
    code = ("import sys, importlib.util\n"
            "if importlib.util.find_spec('llama_cpp') is not None: print('INSTALLED'); sys.exit()\n"
            "from instructkit.models import export as ex\n"
            "print(ex.llama_cpp_module() is None, 'llama_cpp' in sys.modules, ex.llama_cpp_unavailable_reason())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "INSTRUCTKIT_LLAMA_CPP_DIR": str(tmp_path / "site")})
    if out.stdout.startswith("INSTALLED"):
        pytest.skip("llama-cpp-python is installed in this environment: the cache folder is not looked at")
    assert out.stdout.startswith("True False ")
    assert "ik_missing_dependency_xyz" in out.stdout and str(tmp_path / "site") in out.stdout
    assert "ik_missing_dependency_xyz" in out.stderr  # logged too, for callers that only print None
