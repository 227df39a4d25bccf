"""Export a trained model: the LoRA adapter (peft format), a merged full model (safetensors), GGUF (f32, q8_0, q4_K_M)
and an Ollama ``Modelfile`` beside each GGUF.

    instructkit export --model runs/quickstart --out exports/qs --adapter --merge --gguf q4_K_M

``--model`` is anything the other commands accept: a run folder (its ``final/`` is used), an adapter folder, a full
model folder, a zoo name or a Hugging Face Hub id (``models.load.resolve_path``). The chat template the model was
trained with travels with every export: in the tokenizer files of the adapter and merged folders, as
``tokenizer.chat_template`` in the GGUF, and translated into Ollama's Go-template syntax in the Modelfile.

Quantisations: f32 and q8_0 are written here (q8_0 through the `gguf` package's own quantiser, byte-identical to
llama.cpp's converter). q4_K_M is llama.cpp's own k-quant mix (4-bit Q4_K blocks of 256 with 6-bit scales; Q6_K for
the output layer and half of the attention-value and feed-forward-down matrices), which the `gguf` package cannot
write: we write the f32 GGUF and run llama.cpp's quantiser on it (``llama_model_quantize`` from llama-cpp-python;
see ``llama_cpp_module`` for where it is looked for), exactly as llama.cpp's ``llama-quantize`` tool does.

Export time (``result["timings"]``): the export itself is a model load plus one pass over the tensors; most of the
time used to go into verification, where transformers parsed the GGUF's metadata three times (tokenizer, config,
weights) with gguf-py's element-by-element reader (SmolLM2, 49k tokens and merges: about 33 s per parse on this CPU
under load, 191 s in all). ``verify_gguf`` now parses it once and hands the same reader to all three loads.

GGUF is written with the `gguf` package (llama.cpp's own gguf-py) for two architectures, in the layout llama.cpp's
convert_hf_to_gguf.py produces (we write it ourselves because that converter script is not part of the `gguf` wheel):
- Llama (the tiny test model, SmolLM2): llama.cpp's tensor names, and the query/key rows permuted from Hugging Face's
  rotate-half rotary layout to llama.cpp's interleaved one (transformers undoes it when it loads a GGUF); a byte-level
  BPE vocabulary ("gpt2": tokens, merges, token types, and the pre-tokenizer name llama.cpp selects its regex by).
- Gemma 3 text (gemma-3-270m): sandwich and q/k norms, RMSNorm weights stored as 1 + w, tied embeddings; a
  SentencePiece-style vocabulary ("llama": tokens, scores, token types). For gemma-3-270m the tokens and token types
  we write equal those of Google's own GGUF, and the scores order the pieces the same way.
Every GGUF is verified by loading it back with transformers (``gguf_file=``) and comparing logits, tokenisation of
sample strings and the chat template with the source model (see ``gguf_check_passed`` for the tolerances).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

GGUF_TYPES = ("f32", "q8_0", "q4_K_M")
# Accepted difference when a GGUF is loaded back (see gguf_check_passed): f32 max |logit diff|; q8_0 and q4_K_M rms
# logit diff relative to the reference logits' standard deviation.
GGUF_TOLERANCE = {"f32": 1e-4, "q8_0": 0.05, "q4_K_M": 0.25}
LLAMA_CPP_CACHE = Path("~/.cache/instructkit/llama-cpp-python").expanduser()


class ExportError(ValueError):
    pass


def find_model_dir(run_or_model: str | Path) -> Path:
    """A run folder -> its final/; an adapter or model folder -> itself; a zoo name or Hub id -> its local folder
    (``models.load.resolve_path``, as every other command resolves ``--model``)."""
    p = Path(run_or_model).expanduser()
    if not p.exists():
        from instructkit.models.load import resolve_path

        try:
            p = Path(resolve_path(str(run_or_model)))
        except FileNotFoundError:
            raise
        except Exception as e:  # an unknown zoo name, a Hub id not in the cache while offline, ...
            raise FileNotFoundError(f"model not found: {run_or_model} ({e})") from None
    if (p / "final").is_dir():
        p = p / "final"
    if not ((p / "adapter_config.json").exists() or (p / "config.json").exists()):
        raise ExportError(f"{p}: neither a model folder (config.json) nor a LoRA adapter folder (adapter_config.json)")
    return p


def _permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half q/k rows -> llama.cpp's interleaved rotary layout (inverse of transformers' reverse permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Hugging Face -> llama.cpp tensor names inside a decoder layer (llama.cpp's gguf-py tensor_mapping.py, "blk.N.*").
_LLAMA_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# Gemma 3 has four norms per layer (sandwich norms) and q/k norms. Note the different meaning of ffn_norm: in Llama it
# is post_attention_layernorm (the pre-MLP norm), in Gemma 3 pre_feedforward_layernorm.
_GEMMA3_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, fp32 tensor) for every weight, in llama.cpp's conventions:
    Llama: q/k rows permuted to the interleaved rotary layout. Gemma 3: RMSNorm weights stored as 1 + w (Gemma's
    norm computes x * (1 + w), llama.cpp's x * w; transformers subtracts the 1 again when it loads a GGUF)."""
    cfg = model.config
    gemma = cfg.model_type == "gemma3_text"
    layer_names = _GEMMA3_LAYER_NAMES if gemma else _LLAMA_LAYER_NAMES
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    out = []
    for name, t in model.state_dict().items():
        t = t.detach().to(torch.float32)
        if gemma and name.endswith("norm.weight"):
            t = t + 1
        if name == "model.embed_tokens.weight":
            out.append(("token_embd.weight", t))
        elif name == "model.norm.weight":
            out.append(("output_norm.weight", t))
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:  # tied: llama.cpp (and transformers) reuse token_embd
                out.append(("output.weight", t))
        elif name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            if rest not in layer_names:
                raise ExportError(f"GGUF export: no llama.cpp name for tensor {name}")
            if not gemma and rest == "self_attn.q_proj.weight":
                t = _permute_for_gguf(t, n_head)
            elif not gemma and rest == "self_attn.k_proj.weight":
                t = _permute_for_gguf(t, n_kv)
            out.append((f"blk.{idx}.{layer_names[rest]}", t))
        else:
            raise ExportError(f"GGUF export: unexpected tensor {name}")
    return out


# llama.cpp chooses its pre-tokenizer regex by the name in tokenizer.ggml.pre (llama-vocab.cpp); these are the
# Hugging Face pre-tokenizers that correspond to names it knows.
_LLAMA3_SPLIT_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def _bpe_pre_name(pre: dict) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (see _LLAMA3_SPLIT_START), or an ExportError."""
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own regex
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # GPT-2's regex after splitting every digit
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex", "")
        if pattern.startswith(_LLAMA3_SPLIT_START):
            return "llama-bpe"
    raise ExportError(f"GGUF export: pre-tokenizer {kinds} has no llama.cpp equivalent we know of")


def _tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """The tokenizer.ggml.* fields: a byte-level BPE (llama.cpp's "gpt2" model: tokens, types, merges) or a
    SentencePiece-style BPE with byte fallback, as Gemma's (llama.cpp's "llama" model: tokens, scores, types)."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    pre = spec.get("pre_tokenizer") or {}
    pre_types = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", [])}
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export supports BPE tokenizers only, not {model.get('type')}")
    byte_level = "ByteLevel" in pre_types
    if not byte_level and not model.get("byte_fallback"):
        raise ExportError("GGUF export supports byte-level BPE (GPT-2 / Llama-3 / SmolLM style) or SentencePiece-style "
                          "BPE with byte fallback (Gemma style) tokenizers only")
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    tokens, types, scores = [], [], []
    n_normal = 0
    for i in range(vocab_size):
        tok = id_to_token.get(i)
        if tok is None:  # embedding rows beyond the vocabulary (padding): llama.cpp's convention
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1000.0)
            continue
        if tok in special:
            kind = gguf.TokenType.CONTROL
        elif tok in added:
            kind = gguf.TokenType.USER_DEFINED
        elif not byte_level and len(tok) > 1 and set(tok) == {"\u2581"}:
            # Gemma's runs of spaces are user-defined pieces in its SentencePiece model, spelled with real spaces in
            # its GGUF files (transformers' GGUF loader respells them with U+2581 again)
            tok, kind = " " * len(tok), gguf.TokenType.USER_DEFINED
        elif not byte_level and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(tok)
        types.append(kind)
        # SentencePiece BPE merges the pair whose result scores highest: -rank in vocabulary order, as Gemma's own
        # GGUF files have it (transformers rebuilds the merges from that same order)
        scores.append(-float(n_normal) if kind == gguf.TokenType.NORMAL else (0.0 if kind == gguf.TokenType.BYTE
                                                                             else -1000.0))
        n_normal += kind == gguf.TokenType.NORMAL
    if byte_level:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        return {"model": "gpt2", "pre": _bpe_pre_name(pre), "tokens": tokens, "types": types, "merges": merges}
    return {"model": "llama", "pre": "default", "tokens": tokens, "types": types, "scores": scores}


def _check_gemma3(cfg) -> None:
    """Refuse Gemma 3 configs whose settings a GGUF cannot carry (transformers and llama.cpp assume these)."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    local = (rope.get("sliding_attention") or {}).get("rope_theta", 10000.0)
    problems = {
        "query_pre_attn_scalar": (cfg.query_pre_attn_scalar, cfg.head_dim),
        "final_logit_softcapping": (cfg.final_logit_softcapping, None),
        "attn_logit_softcapping": (cfg.attn_logit_softcapping, None),
        "sliding rope_theta": (local, 10000.0),
        "hidden_activation": (cfg.hidden_activation, "gelu_pytorch_tanh"),
    }
    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    if list(cfg.layer_types) != [pattern[i % 6] for i in range(cfg.num_hidden_layers)]:
        problems["layer_types"] = (cfg.layer_types, "5 sliding : 1 full")
    bad = {k: v for k, (v, want) in problems.items() if v != want}
    if bad:
        raise ExportError(f"GGUF export: Gemma 3 settings a GGUF cannot express: {bad}")


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f32") -> Path:
    """Write ``model_dir`` (a full HF model folder: Llama or Gemma 3 text) as GGUF; ``out`` is a file or a folder."""
    import gguf
    from gguf.quants import quantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    outtype = gguf_type(outtype)
    model_dir = Path(model_dir)
    out = Path(out)
    if out.suffix != ".gguf":
        out = out / f"model-{outtype}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    if outtype in LLAMA_CPP_FTYPES:  # llama.cpp's own quantiser, from the f32 file
        quantize = llama_cpp_quantizer()  # before the f32 export: fail fast when llama.cpp is missing
        f32 = out.with_name(out.stem + ".f32-tmp.gguf")
        try:
            export_gguf(model_dir, f32, "f32")
            quantize(f32, out, outtype)
        finally:
            f32.unlink(missing_ok=True)
        return out
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    if cfg.model_type not in ("llama", "gemma3_text"):
        raise ExportError(f"GGUF export supports the Llama and Gemma 3 architectures; {model_dir} is "
                          f"{cfg.model_type!r} (export the merged safetensors folder and convert it with llama.cpp's "
                          "convert_hf_to_gguf.py)")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ExportError("GGUF export: biased attention / MLP variants are not supported")
    gemma = cfg.model_type == "gemma3_text"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if gemma:
        _check_gemma3(cfg)
        rope = rope.get("full_attention") or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    vocab_size = model.get_input_embeddings().weight.shape[0]

    w = gguf.GGUFWriter(str(out), "gemma3" if gemma else "llama")
    w.add_name(model_dir.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(theta))
    if gemma:  # what llama.cpp's converter writes for Gemma 3: head size and the sliding window
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg.sliding_window)
    else:
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_Q8_0)

    tok = _tokenizer_fields(tokenizer, vocab_size)
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "merges" in tok:
        w.add_token_merges(tok["merges"])
    else:
        w.add_token_scores(tok["scores"])
        w.add_add_space_prefix(False)
        w.add_add_sep_token(False)
    for setter, tid in ((w.add_bos_token_id, tokenizer.bos_token_id), (w.add_eos_token_id, tokenizer.eos_token_id),
                        (w.add_pad_token_id, tokenizer.pad_token_id), (w.add_unk_token_id, tokenizer.unk_token_id)):
        if tid is not None:
            setter(int(tid))
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    w.add_add_bos_token(adds_bos)
    w.add_add_eos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)

    for name, t in _gguf_tensors(model):
        arr = t.numpy()
        # q8_0 blocks are 32 values along a row; 1-D tensors (norms) and odd rows stay f32, as llama.cpp does.
        if outtype == "q8_0" and arr.ndim == 2 and arr.shape[1] % 32 == 0:
            w.add_tensor(name, quantize(arr, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def gguf_type(name: str) -> str:
    """The canonical spelling of a GGUF type name (case-insensitive: q4_k_m -> q4_K_M), or an ExportError."""
    for t in GGUF_TYPES:
        if t.lower() == str(name).lower():
            return t
    raise ExportError(f"--gguf must be one of {', '.join(GGUF_TYPES)}, got {name!r}")


# llama.cpp file types its quantiser writes for us (llama.h: enum llama_ftype)
LLAMA_CPP_FTYPES = {"q4_K_M": 15}


_LLAMA_CPP_WHY: str | None = None  # why the last llama_cpp_module() call returned None


def llama_cpp_module():
    """llama-cpp-python's ``llama_cpp`` module: the installed package, else a build kept in the cache folder
    (``~/.cache/instructkit/llama-cpp-python/site``: the wheel built once from the sdist and unpacked, as the slow
    tests use it; ``INSTRUCTKIT_LLAMA_CPP_DIR`` overrides the folder). None when neither imports; then
    :func:`llama_cpp_unavailable_reason` says why (not installed, or which import failed: a dependency missing from
    this environment such as ``diskcache``, a shared library that does not load), and a build that exists but does
    not import is logged as a warning naming the error."""
    import importlib
    import logging
    import os
    import sys

    global _LLAMA_CPP_WHY
    _LLAMA_CPP_WHY = None
    installed_error = None
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as e:
        if e.name != "llama_cpp":  # installed, but something it imports is missing
            installed_error = f"the installed llama_cpp package does not import: {_import_error(e)}"
    except Exception as e:  # noqa: BLE001 - e.g. its shared library fails to load
        installed_error = f"the installed llama_cpp package does not import: {type(e).__name__}: {e}"
    site = Path(os.environ.get("INSTRUCTKIT_LLAMA_CPP_DIR") or LLAMA_CPP_CACHE / "site")
    if not (site / "llama_cpp" / "__init__.py").exists():
        _LLAMA_CPP_WHY = installed_error or (f"llama-cpp-python is not installed and no build is cached at {site}")
        if installed_error:
            logging.getLogger(__name__).warning("llama.cpp unavailable: %s", _LLAMA_CPP_WHY)
        return None
    sys.path.insert(0, str(site))
    try:
        return importlib.import_module("llama_cpp")
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError/RuntimeError from loading libllama
        sys.path.remove(str(site))
        for name in [m for m in sys.modules if m == "llama_cpp" or m.startswith("llama_cpp.")]:
            del sys.modules[name]  # a half-imported package would shadow a later, fixed import
        detail = _import_error(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {e}"
        _LLAMA_CPP_WHY = f"the llama-cpp-python build cached at {site} does not import: {detail}"
        logging.getLogger(__name__).warning("llama.cpp unavailable: %s", _LLAMA_CPP_WHY)
        return None


def _import_error(e: ImportError) -> str:
    missing = getattr(e, "name", None)
    if isinstance(e, ModuleNotFoundError) and missing and not missing.startswith("llama_cpp"):
        return (f"it needs the Python package {missing!r}, which is not installed in this environment "
                f"(pip install {missing.split('.')[0]})")
    return f"{type(e).__name__}: {e}"


def llama_cpp_unavailable_reason() -> str | None:
    """Why llama-cpp-python cannot be used here (None when :func:`llama_cpp_module` finds it)."""
    return None if llama_cpp_module() is not None else _LLAMA_CPP_WHY


def llama_cpp_quantizer():
    """``quantize(src_f32_gguf, dst, outtype)`` through llama.cpp's own ``llama_model_quantize``, or an ExportError
    that says how to get llama.cpp (its Python binding builds from source in 15-35 minutes on 2 cores)."""
    import ctypes

    lc = llama_cpp_module()
    if lc is None:
        raise ExportError(
            f"GGUF q4_K_M needs llama.cpp's quantiser (the gguf package has no k-quant writer; "
            f"{_LLAMA_CPP_WHY or 'llama-cpp-python was not found'}): "
            "install llama-cpp-python "
            "(pip install llama-cpp-python==0.3.36, a source build), or build it once into the cache with `pip wheel "
            f"--no-deps llama-cpp-python==0.3.36 -w {LLAMA_CPP_CACHE}` and unpack the wheel into {LLAMA_CPP_CACHE}/site")

    def quantize(src: Path, dst: Path, outtype: str) -> None:
        params = lc.llama_model_quantize_default_params()
        params.ftype = LLAMA_CPP_FTYPES[outtype]
        params.nthread = max(1, torch.get_num_threads())
        rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise ExportError(f"llama.cpp's quantiser failed on {src} (return code {rc})")

    return quantize


# ---------------------------------------------------------------------------------------------------------------------
# Ollama Modelfile
# ---------------------------------------------------------------------------------------------------------------------
# Chat formats as Ollama writes them: each message wrapped by its role's prefix and suffix; the generation prompt after
# the last message; BOS left to the tokenizer (llama.cpp adds it when the GGUF says add_bos_token). ``system_in_user``:
# the format has no system turn and puts the system text at the start of the first user turn, followed by this separator
# (Gemma's official template does that).
_OLLAMA_FORMATS = {
    "chatml": {"wrap": {"system": ("<|im_start|>system\n", "<|im_end|>\n"),
                        "user": ("<|im_start|>user\n", "<|im_end|>\n"),
                        "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n")},
               "gen": "<|im_start|>assistant\n", "stop": ["<|im_end|>", "<|im_start|>"]},
    "llama3": {"wrap": {r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>")
                        for r in ("system", "user", "assistant")},
               "gen": "<|start_header_id|>assistant<|end_header_id|>\n\n",
               "stop": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]},
    "gemma": {"wrap": {"user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
                       "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n")},
              "system_in_user": "\n\n", "gen": "<start_of_turn>model\n",
              "stop": ["<end_of_turn>", "<start_of_turn>"]},
    "zephyr": {"wrap": {r: (f"<|{r}|>\n", "</s>\n") for r in ("system", "user", "assistant")},
               "gen": "<|assistant|>\n", "stop": ["</s>", "<|user|>", "<|system|>"]},
}


def _simulate(fmt: dict, messages: list[dict], add_generation_prompt: bool) -> str:
    """What the Ollama template built from ``fmt`` renders for ``messages`` (mirrors ``ollama_template``)."""
    wrap = fmt["wrap"]
    out, system = [], None
    for i, m in enumerate(messages):
        if m["role"] == "system" and "system_in_user" in fmt:
            system = m["content"]
            continue
        pre, suf = wrap[m["role"]]
        content = m["content"]
        if m["role"] == "user" and system is not None:
            content, system = system + fmt["system_in_user"] + content, None
        out.append(pre + content + suf)
    if add_generation_prompt:
        out.append(fmt["gen"])
    return "".join(out)


def ollama_template(fmt: dict) -> str:
    """The Go template (Ollama's TEMPLATE) for a chat format: a loop over .Messages, one line, no whitespace trimming
    (every character between actions is the format's own text)."""
    def lit(s: str) -> str:
        if "{{" in s or "}}" in s:
            raise ExportError("chat format text contains '{{' or '}}', which Ollama's template syntax cannot hold")
        return s

    parts = ['{{- range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}']
    roles = list(fmt["wrap"])
    first = True
    if "system_in_user" in fmt:
        parts.append('{{ if eq .Role "system" }}')
        first = False
    for r in roles:
        pre, suf = fmt["wrap"][r]
        cond = f'{{{{ {"if" if first else "else if"} eq .Role "{r}" }}}}'
        first = False
        body = lit(pre)
        if r == "user" and "system_in_user" in fmt:
            body += ('{{ if and $.System (eq $i 1) }}{{ $.System }}' + lit(fmt["system_in_user"]) + "{{ end }}")
        body += "{{ .Content }}"
        if r == "assistant":  # a last assistant message is a prefill Ollama continues: no end of turn after it
            body += "{{ if not $last }}" + lit(suf) + "{{ end }}"
        else:
            body += lit(suf) + "{{ if $last }}" + lit(fmt["gen"]) + "{{ end }}"
        parts.append(cond + body)
    parts.append("{{ end }}{{ end }}")
    return "".join(parts)


# Conversations the Modelfile's format must render exactly as the model's own template does
_PROBES = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "U2"}],
)


def detect_ollama_format(tokenizer) -> tuple[str | None, str]:
    """(name of the format in _OLLAMA_FORMATS that renders every probe conversation exactly as the tokenizer's chat
    template does, BOS stripped; or None) and a sentence saying why."""
    if not tokenizer.chat_template:
        return None, "the tokenizer has no chat template"
    bos = tokenizer.bos_token or ""
    renders = []
    for msgs in _PROBES:
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # e.g. a template without a system role: only probes it accepts count
            continue
        renders.append((msgs, text[len(bos):] if bos and text.startswith(bos) else text))
    if not renders:
        return None, "the chat template renders none of the probe conversations"
    for name, fmt in _OLLAMA_FORMATS.items():
        if all(_simulate(fmt, m, True) == t for m, t in renders):
            return name, f"the model's chat template renders as the {name} format"
    return None, ("the model's chat template matches none of the formats written for Ollama "
                  f"({', '.join(_OLLAMA_FORMATS)}): Ollama will use the template stored in the GGUF if it knows it")


def write_modelfile(gguf_path: Path, tokenizer, system: str | None = None) -> tuple[Path, str | None, str]:
    """Write <gguf folder>/Modelfile: FROM the GGUF, TEMPLATE in Ollama's Go-template syntax, a PARAMETER stop per
    end-of-turn marker, SYSTEM when given. Returns (path, format name or None, why)."""
    name, why = detect_ollama_format(tokenizer)
    lines = [f"# Ollama Modelfile written by instructkit export ({why})", f"FROM ./{gguf_path.name}", ""]
    if name is not None:
        fmt = _OLLAMA_FORMATS[name]
        lines += [f'TEMPLATE """{ollama_template(fmt)}"""', ""]
        for stop in fmt["stop"]:
            lines.append(f"PARAMETER stop {json.dumps(stop)}")
    elif tokenizer.eos_token:
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.eos_token)}")
    if system:
        if '"""' in system:
            raise ExportError('the system prompt cannot contain """ (Ollama\'s Modelfile quoting)')
        lines += ["", f'SYSTEM """{system}"""']
    path = gguf_path.parent / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, name, why


# Strings whose tokenisation must survive the GGUF round trip: plain English, leading/trailing/multiple spaces and
# newlines, digits, punctuation, non-ASCII (byte fallback in byte-level BPE), and a special token spelled in the text.
TOKENIZATION_SAMPLES = (
    "Give three tips for staying healthy.",
    "  leading spaces,\ttabs and\n\nnewlines  ",
    "Numbers 1234567 and 3.14159; symbols: #@$%^&*()[]{}<>",
    "Ünïcödé: naïve café, 日本語, emoji 🙂, Ελληνικά",
    "<|im_start|>user\nhi<|im_end|>\n",
)


def gguf_check_passed(check: dict, outtype: str) -> bool:
    """f32: max |logit difference| <= 1e-4 (exact up to float summation order).

    q8_0 rounds every weight to a multiple of (max |w| in its block of 32) / 127, an error uniform in +-step/2: about
    0.5% of a weight's scale (for Gaussian blocks max |w| ~ 2.1 sigma, so rms error ~ 2.1 / 127 / sqrt(12) ~ 0.5%
    sigma). Those errors add up over the matmuls of every layer, so the meaningful bound is relative to the logits'
    own scale: rms(logit difference) / std(reference logits) <= 5%. Measured: the tiny test model 1.0%, SmolLM2-135M
    (30 layers) 3.5%, Gemma-3-270M 2.9%. The argmax can flip where two logits are close, so it is reported
    (``same_argmax``), not required."""
    ok = check["same_tokenization"] and check["same_chat_template"]
    outtype = gguf_type(outtype)
    if outtype == "f32":
        return ok and check["max_abs_logit_diff"] <= GGUF_TOLERANCE["f32"]
    return ok and check["rel_rms_logit_diff"] <= GGUF_TOLERANCE[outtype]


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers builds a new gguf-py GGUFReader for the tokenizer, the config and the weights of one file; its
    metadata parse reads token arrays element by element (about a third of a minute per parse for SmolLM2's 49k
    tokens and merges on this CPU). Within this block a file is parsed once and its reader reused."""
    import gguf as mg  # transformers imports GGUFReader from the package at each call

    original = mg.GGUFReader
    readers: dict = {}

    def cached(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    mg.GGUFReader = cached
    try:
        yield
    finally:
        mg.GGUFReader = original


@torch.no_grad()
def verify_gguf(gguf_path: str | Path, model_dir: str | Path,
                text: str = "Give three tips for staying healthy.") -> dict:
    """Load the GGUF back with transformers and compare its logits, tokenisation and chat template with the source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    ref_tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with _one_gguf_parse():
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        got = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                   dtype=torch.float32).eval()
    chat = ref_tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True) if ref_tok.chat_template else text
    samples = (chat, *TOKENIZATION_SAMPLES)
    mismatched = [s for s in samples
                  if ref_tok(s, add_special_tokens=False).input_ids != tok(s, add_special_tokens=False).input_ids]
    if ref_tok(text).input_ids != tok(text).input_ids:  # the tokenizer's own BOS/EOS additions must match too
        mismatched.append(f"{text} (with special tokens)")
    x = torch.tensor([ref_tok(chat, add_special_tokens=False).input_ids])  # (1, T)
    ref_logits, got_logits = ref(x).logits.double(), got(x).logits.double()  # (1, T, V)
    diff = got_logits - ref_logits
    return {"max_abs_logit_diff": diff.abs().max().item(),
            "rel_rms_logit_diff": (diff.pow(2).mean().sqrt() / ref_logits.std()).item(),
            "same_argmax": bool((got_logits.argmax(-1) == ref_logits.argmax(-1)).all()),
            "same_tokenization": not mismatched, "tokenization_mismatches": mismatched,
            "same_chat_template": tok.chat_template == ref_tok.chat_template}


def _export_adapter(src: Path, adapter_out: Path) -> Path:
    """Copy a peft adapter folder (safetensors only: a pickle could run code) and make sure the tokenizer with its
    chat template travels with it (taken from the base model when the adapter folder has none)."""
    if not (src / "adapter_model.safetensors").exists():
        raise ExportError(f"{src}: no adapter_model.safetensors (pickled adapter_model.bin is refused; re-save the "
                          "adapter with safe_serialization=True)")
    if adapter_out.exists():
        shutil.rmtree(adapter_out)
    shutil.copytree(src, adapter_out, ignore=shutil.ignore_patterns("instructkit_config.yaml", "*.bin", "*.pt"))
    if not (adapter_out / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        from instructkit.models.load import resolve_path

        base = json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"]
        AutoTokenizer.from_pretrained(resolve_path(base)).save_pretrained(adapter_out)
    return adapter_out


def export(run_or_model: str | Path, out: str | Path, *, merge: bool = False, adapter: bool = False,
           gguf: str | None = None, verify: bool = True, modelfile: bool = True, system: str | None = None) -> dict:
    """Everything `instructkit export` writes; returns the paths and verification numbers.

    ``adapter``: write <out>/adapter (peft format); also the default for an adapter source when nothing else is asked.
    ``merge``: write <out>/merged (base + adapter merged; a full model source is already merged).
    ``gguf``: write <out>/model-<gguf>.gguf from the full weights (an adapter source is merged first), and with
    ``modelfile`` an Ollama Modelfile beside it (``system``: its SYSTEM prompt)."""
    gguf = gguf_type(gguf) if gguf else None
    src = find_model_dir(run_or_model)
    is_adapter = (src / "adapter_config.json").exists()
    if adapter and not is_adapter:
        raise ExportError(f"--adapter: {src} is a full model folder, not a LoRA adapter (adapter_config.json)")
    if is_adapter and not (merge or gguf):
        adapter = True
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"source": str(src)}
    full_dir: Path | None = None
    if is_adapter:
        if adapter:
            result["adapter"] = str(_export_adapter(src, out / "adapter"))
        if merge or gguf:  # GGUF needs the full weights, so it implies a merge
            from instructkit.models.load import merge_and_save

            if adapter or (src / "tokenizer_config.json").exists():
                full_dir = merge_and_save(out / "adapter" if adapter else src, out / "merged")
            else:  # merge_and_save takes the tokenizer from the adapter folder: complete one first
                with tempfile.TemporaryDirectory() as tmp:
                    full_dir = merge_and_save(_export_adapter(src, Path(tmp) / "adapter"), out / "merged")
            result["merged"] = str(full_dir)
    else:
        full_dir = src
        if merge:
            result["merged"] = str(src)  # already a full model: nothing to merge
    if gguf:
        assert full_dir is not None
        timings = result.setdefault("timings", {})
        t0 = time.perf_counter()
        path = export_gguf(full_dir, out / f"model-{gguf}.gguf", gguf)
        timings["gguf_s"] = round(time.perf_counter() - t0, 2)
        result["gguf"] = str(path)
        if modelfile:
            from transformers import AutoTokenizer

            mf, fmt, why = write_modelfile(path, AutoTokenizer.from_pretrained(full_dir), system)
            result["modelfile"] = str(mf)
            result["modelfile_format"] = fmt
            if fmt is None:
                result["modelfile_note"] = why
        if verify:
            t0 = time.perf_counter()
            check = verify_gguf(path, full_dir)
            timings["verify_s"] = round(time.perf_counter() - t0, 2)
            result["gguf_check"] = check
            if not gguf_check_passed(check, gguf):
                raise ExportError(f"GGUF verification failed for {path}: {check}")
    return result
