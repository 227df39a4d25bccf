"""The GGUF round trip through llama.cpp itself (llama-cpp-python 0.3.36): every export loads, tokenises a chat turn as
transformers does, carries the chat template and the end-of-turn token; f32 gives greedy tokens identical to
transformers' on the merged model, q8_0 and q4_K_M give logits close to them.

Slow and optional: llama-cpp-python builds from its sdist in 15-35 minutes on 2 cores, so it is not a dependency. Build
it once into the cache these tests look in (models/export.py ``llama_cpp_module``):

    pip wheel --no-deps llama-cpp-python==0.3.36 -w ~/.cache/instructkit/llama-cpp-python
    python -m zipfile -e ~/.cache/instructkit/llama-cpp-python/llama_cpp_python-0.3.36-*.whl \
        ~/.cache/instructkit/llama-cpp-python/site
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from instructkit.models import export as ex

pytestmark = [pytest.mark.slow, pytest.mark.skipif(ex.llama_cpp_module() is None, reason=(
    "llama-cpp-python not installed and no build cached in ~/.cache/instructkit/llama-cpp-python/site "
    "(see this module's docstring for the one-time build)"))]

CHAT = [{"role": "user", "content": "Give three tips for staying healthy."}]
# llama.cpp's logits against transformers' on the source model, rms difference over the logits' std: looser than
# ex.GGUF_TOLERANCE (transformers dequantising the same file) because llama.cpp also keeps keys and values in f16 and
# quantises activations to 8 bits for quantised matmuls. Measured on SmolLM2-135M: f32 0.0008, q8_0 0.061,
# q4_K_M 0.167.
LLAMA_CPP_TOLERANCE = {"q8_0": 0.10, "q4_K_M": 0.25}


def _llama(path: Path):
    lc = ex.llama_cpp_module()
    return lc.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0)


def _llama_greedy(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the prompt's logits (T, V) from llama.cpp."""
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)], dtype=np.float64)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out, logits


def _hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double().numpy()
        gen = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return gen[0, len(ids):].tolist(), logits


def _merged_run(tmp_path: Path, base: Path) -> Path:
    """A run folder whose final/ is a LoRA adapter with non-zero weights on ``base``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "run" / "final")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "run" / "final")
    return tmp_path / "run"


def _round_trip(src, out: Path, outtype: str, n: int = 16):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = ex.export(src, out, gguf=outtype, merge=True)
    full = Path(result.get("merged") or result["source"])
    tok = AutoTokenizer.from_pretrained(full)
    model = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).eval()
    llm = _llama(Path(result["gguf"]))
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    # llama.cpp tokenises the rendered chat turn (special tokens parsed) as transformers does
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    eot = tok.convert_tokens_to_ids(ex._OLLAMA_FORMATS["chatml"]["stop"][0]) if "<|im_end|>" in tok.get_vocab() \
        else tok.eos_token_id
    assert llm.token_eos() == tok.eos_token_id or eot in (llm.token_eos(), tok.eos_token_id)
    theirs, l_logits = _llama_greedy(llm, ids, n)
    ours, h_logits = _hf_greedy(model, ids, n)
    rel = float(np.sqrt(((l_logits - h_logits) ** 2).mean()) / h_logits.std())
    return theirs, ours, rel, result


@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_K_M"])
def test_tiny_lora_run_round_trip(tmp_path, outtype):
    from instructkit.models.tiny import create_tiny

    base = create_tiny(tmp_path / "base", seed=0, hidden_size=256)
    theirs, ours, rel, _ = _round_trip(_merged_run(tmp_path, base), tmp_path / "o", outtype)
    if outtype == "f32":  # llama.cpp keeps its KV cache in f16 by default: logits agree to ~1e-3, tokens exactly
        assert theirs == ours and rel < 5e-3, rel
    else:
        assert rel <= LLAMA_CPP_TOLERANCE[outtype], rel


@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_K_M"])
def test_smollm2_round_trip(tmp_path, outtype):
    """A real model (SmolLM2-135M-Instruct, from the zoo by name): f32 greedy tokens identical to transformers';
    quantised logits close (relative rms difference)."""
    theirs, ours, rel, result = _round_trip("smollm2-135m-instruct", tmp_path / "o", outtype)
    print(outtype, result["timings"], rel)
    if outtype == "f32":
        assert theirs == ours and rel < 5e-3, rel
    else:
        assert rel <= LLAMA_CPP_TOLERANCE[outtype], rel
