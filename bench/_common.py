"""Pieces the benchmark scripts share (imported as a sibling module: the scripts run as `python bench/NAME.py`)."""

from __future__ import annotations

from pathlib import Path


def random_llama_with_smollm2_tokenizer(work: Path, arch: dict, seed: int) -> Path:
    """A randomly initialised Llama (``arch``: LlamaConfig fields) with SmolLM2's tokenizer, saved once to
    ``work/model`` after instructkit's own loading (pad token, chat template), so both sides of a benchmark load the
    same folder. Needs the zoo's smollm2-135m-instruct cache for the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.models.zoo import cache_dir

    model_dir = work / "model"
    if not (model_dir / "model.safetensors").exists():
        tok = AutoTokenizer.from_pretrained(cache_dir("smollm2-135m-instruct"))
        lcfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, **arch)
        torch.manual_seed(seed)
        LlamaForCausalLM(lcfg).save_pretrained(work / "init", safe_serialization=True)
        tok.save_pretrained(work / "init")
        model, tok = load_model_and_tokenizer(ModelConfig(path=str(work / "init")))
        model.save_pretrained(model_dir, safe_serialization=True)
        tok.save_pretrained(model_dir)
        del model
    return model_dir
