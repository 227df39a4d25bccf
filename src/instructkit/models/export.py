"""Export a trained model: the LoRA adapter (peft format), a merged full model (safetensors), and GGUF (f32, q8_0).

    instructkit export --model runs/quickstart --out exports/qs --adapter --merge --gguf q8_0

``--model`` is a run folder (its ``final/`` is used), an adapter folder, or a full model folder. The chat template the
model was trained with travels with every export: in the tokenizer files of the adapter and merged folders, and as
``tokenizer.chat_template`` in the GGUF.

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

import json
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_TYPES = ("f32", "q8_0")
# Accepted difference when a GGUF is loaded back (see gguf_check_passed): f32 max |logit diff|; q8_0 rms logit diff
# relative to the reference logits' standard deviation.
GGUF_TOLERANCE = {"f32": 1e-4, "q8_0": 0.05}


class ExportError(ValueError):
    pass


def find_model_dir(run_or_model: str | Path) -> Path:
    """A run folder -> its final/; an adapter or model folder -> itself."""
    p = Path(run_or_model)
    if not p.exists():
        raise FileNotFoundError(f"model or run folder not found: {p}")
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

    if outtype not in GGUF_TYPES:
        raise ExportError(f"--gguf must be one of {', '.join(GGUF_TYPES)}, got {outtype!r}")
    model_dir = Path(model_dir)
    out = Path(out)
    if out.suffix != ".gguf":
        out = out / f"model-{outtype}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
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
    if outtype == "f32":
        return ok and check["max_abs_logit_diff"] <= GGUF_TOLERANCE["f32"]
    return ok and check["rel_rms_logit_diff"] <= GGUF_TOLERANCE[outtype]


@torch.no_grad()
def verify_gguf(gguf_path: str | Path, model_dir: str | Path,
                text: str = "Give three tips for staying healthy.") -> dict:
    """Load the GGUF back with transformers and compare its logits, tokenisation and chat template with the source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    ref_tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    got = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
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
    """Copy a peft adapter folder (safetensors only: S1, no pickle) and make sure the tokenizer with its chat template
    travels with it (taken from the base model when the adapter folder has none)."""
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
           gguf: str | None = None, verify: bool = True) -> dict:
    """Everything `instructkit export` writes; returns the paths and verification numbers.

    ``adapter``: write <out>/adapter (peft format); also the default for an adapter source when nothing else is asked.
    ``merge``: write <out>/merged (base + adapter merged; a full model source is already merged).
    ``gguf``: write <out>/model-<gguf>.gguf from the full weights (an adapter source is merged first)."""
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
        path = export_gguf(full_dir, out / f"model-{gguf}.gguf", gguf)
        result["gguf"] = str(path)
        if verify:
            check = verify_gguf(path, full_dir)
            result["gguf_check"] = check
            if not gguf_check_passed(check, gguf):
                raise ExportError(f"GGUF verification failed for {path}: {check}")
    return result
