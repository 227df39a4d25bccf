"""The model families people fine-tune, each as a tiny random model built from its transformers config (no download),
through the toolkit's paths: SFT (LoRA and full), DPO, generation, merged export.

Per architecture (2 layers, hidden 32, grouped-query attention where the family has it, the ChatML tiny tokenizer):
- SFT with LoRA through the CLI, 2 steps: finite losses, the adapter changed and the base did not;
- the merged export of that adapter reloads with plain transformers and gives the logits of the adapter model;
- greedy generation through the engine equals ``model.generate`` token for token; the fast decode step is used
  where it applies (Llama, Gemma 3) and everywhere else it declines with a reason and the ordinary forward is used;
- full SFT and DPO through the CLI, 2 steps each (DPO's first loss is log 2: the policy is its reference).
Ten architectures, well under a second each once the first has warmed up the imports.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from instructkit.cli import main as cli

from pref_helpers import write_pairs
from sft_helpers import write_data

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)


def _configs(vocab: int, pad: int, bos: int, eos: int) -> dict:
    import transformers as tf

    ids = dict(vocab_size=vocab, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    return {
        "llama": lambda: tf.LlamaConfig(**COMMON, **ids, head_dim=8),
        "mistral": lambda: tf.MistralConfig(**COMMON, **ids, head_dim=8, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**COMMON, **ids),
        "qwen3": lambda: tf.Qwen3Config(**COMMON, **ids, head_dim=8),
        "gemma2": lambda: tf.Gemma2Config(**COMMON, **ids, head_dim=8, sliding_window=16),
        "gemma3": lambda: tf.Gemma3TextConfig(**COMMON, **ids, head_dim=8, sliding_window=16),
        "phi3": lambda: tf.Phi3Config(**COMMON, **ids),
        "olmo2": lambda: tf.Olmo2Config(**COMMON, **ids),
        "granite": lambda: tf.GraniteConfig(**COMMON, **ids),
        "smollm3": lambda: tf.SmolLM3Config(**COMMON, **ids),
    }


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "granite", "smollm3"]
FAST_DECODE = {"llama", "gemma3"}  # generation/fast_decode.py's architectures


@functools.lru_cache(maxsize=None)
def _tokenizer():
    from instructkit.models.tiny import build_tokenizer

    return build_tokenizer()


def build_model_dir(root: Path, arch: str) -> Path:
    """A tiny random ``arch`` model (seed 0) and the ChatML tiny tokenizer, saved as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM

    out = root / arch
    if (out / "config.json").exists():
        return out
    tok = _tokenizer()
    cfg = _configs(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)[arch]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def arch_root(tmp_path_factory):
    return tmp_path_factory.mktemp("archs")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("arch_data") / "data.jsonl", n=8)


def _sft_args(model_dir, data, out, name, *extra):
    return ["sft", f"model.path={model_dir}", f"data.sources=[{{path: {data}}}]", "data.max_length=64",
            "data.validation_fraction=0", f"train.output_dir={out}", f"train.run_name={name}", "train.max_steps=2",
            "train.micro_batch_size=2", "train.pack_length=128", "train.lr=0.01", "train.threads=1",
            "train.resume=never", "train.log_every=1", *extra]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _greedy_equal_to_generate(model, tok, arch):
    from instructkit.generation import fast_decode
    from instructkit.generation.engine import Engine, SamplingParams

    model.eval()
    reason = fast_decode.unsupported_reason(model)
    if arch in FAST_DECODE:
        assert reason is None
    else:
        assert reason  # declines, saying why; the engine then decodes with the ordinary forward
    engine = Engine(model, tok)
    conv = [[{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "user", "content": "Give three tips."}, {"role": "assistant", "content": "Eat."},
             {"role": "user", "content": "More?"}]]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, seed=0, logprobs=False, stop_token_ids=[])
    outs = engine.chat(conv, params)
    for c, o in zip(conv, outs):
        prompt = engine.chat_prompt_ids(c)
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert list(o.token_ids) == ref[0, len(prompt):].tolist(), arch


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_sft_merge_and_generation(arch, arch_root, sft_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_model_dir(arch_root, arch)
    assert cli(_sft_args(model_dir, sft_data, tmp_path, "lora", "lora.enabled=true", "lora.r=4", "lora.alpha=8",
                         "lora.dropout=0")) == 0
    run = tmp_path / "lora"
    losses = _losses(run)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    final = run / "final"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), final)
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the adapter learned (B starts at zero)
    base_sd = base.state_dict()
    for n, p in tuned.get_base_model().state_dict().items():
        if "lora_" not in n and n.replace("base_layer.", "") in base_sd:
            assert torch.equal(p, base_sd[n.replace("base_layer.", "")]), n  # the base stayed as it was
    # merged export: plain transformers loads it and gives the adapter model's logits
    assert cli(["export", "--model", str(final), "--out", str(tmp_path / "export"), "--merge"]) == 0
    merged = tmp_path / "export" / "merged"
    m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    ids = torch.tensor([tok("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, tuned.eval()(ids).logits, rtol=1e-4, atol=1e-5)
    _greedy_equal_to_generate(m, tok, arch)


def _full_and_dpo(arch, arch_root, sft_data, tmp_path):
    model_dir = build_model_dir(arch_root, arch)
    assert cli(_sft_args(model_dir, sft_data, tmp_path, "full")) == 0
    losses = _losses(tmp_path / "full")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8, 0)
    assert cli(["dpo", f"model.path={model_dir}", f"data.sources=[{{path: {pairs}}}]", "data.validation_fraction=0",
                "data.max_length=64", f"train.output_dir={tmp_path}", "train.run_name=dpo", "train.max_steps=2",
                "train.micro_batch_size=4", "train.lr=0.001", "train.threads=1", "train.resume=never"]) == 0
    losses = _losses(tmp_path / "dpo")
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert math.isfinite(losses[1])
    shutil.rmtree(tmp_path / "full" / "checkpoints", ignore_errors=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_sft_and_dpo(arch, arch_root, sft_data, tmp_path):
    _full_and_dpo(arch, arch_root, sft_data, tmp_path)
