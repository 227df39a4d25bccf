"""models/precision.py: what ``model.dtype: auto`` resolves to, and how weights are loaded under mixed precision.

The hardware is mocked where the test needs another machine: AMX tiles and the bf16 matmul probe on the CPU, a CUDA
GPU. ``INSTRUCTKIT_AUTO_DTYPE`` (set to float32 for the whole suite by conftest.py) is removed where auto itself is
under test."""

from __future__ import annotations

import pytest
import torch

from instructkit.config import ConfigError, LoRAConfig, ModelConfig
from instructkit.models import precision as P


@pytest.fixture
def unpinned(monkeypatch):
    monkeypatch.delenv(P.AUTO_ENV, raising=False)
    return monkeypatch


def test_the_default_is_auto():
    assert ModelConfig().dtype == "auto"


def test_auto_is_fp32_on_a_cpu_without_amx(unpinned):
    unpinned.setattr(P, "cpu_has_amx", lambda: False)
    unpinned.setattr(P, "bf16_matmul_probe", lambda: pytest.fail("no probe without AMX"))
    p = P.resolve_precision("auto", "cpu")
    assert p.dtype == torch.float32 and not p.mixed
    assert "no AMX" in p.reason and p.as_dict()["dtype"] == "float32"


def test_auto_on_this_cpu_without_amx_is_fp32(unpinned):
    if P.cpu_has_amx():
        pytest.skip("this CPU has AMX tiles: covered by the mocked tests")
    assert P.resolve_precision("auto", "cpu").dtype == torch.float32


def test_auto_is_bf16_on_amx_when_the_probe_measures_it_faster(unpinned):
    unpinned.setattr(P, "cpu_has_amx", lambda: True)
    unpinned.setattr(P, "bf16_matmul_probe", lambda: (1800.0, 400.0))  # GFLOP/s seen on Sapphire Rapids
    p = P.resolve_precision("auto", "cpu")
    assert p.dtype == torch.bfloat16 and p.mixed
    assert "AMX" in p.reason and "1800" in p.reason


def test_auto_stays_fp32_on_amx_when_bf16_is_not_faster(unpinned):
    unpinned.setattr(P, "cpu_has_amx", lambda: True)
    unpinned.setattr(P, "bf16_matmul_probe", lambda: (450.0, 400.0))  # 1.12x < MIN_SPEEDUP
    assert P.resolve_precision("auto", "cpu").dtype == torch.float32


def test_auto_is_bf16_on_a_cuda_gpu_with_bf16(unpinned):
    unpinned.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    unpinned.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H100")
    p = P.resolve_precision("auto", "cuda")
    assert p.dtype == torch.bfloat16 and "H100" in p.reason
    unpinned.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert P.resolve_precision("auto", "cuda").dtype == torch.float32


def test_the_probe_is_cached(unpinned):
    calls = []
    P.bf16_matmul_probe.cache_clear()
    unpinned.setattr(P.time, "perf_counter", lambda: calls.append(1) or float(len(calls)))
    first = P.bf16_matmul_probe(8, 1)
    n = len(calls)
    assert P.bf16_matmul_probe(8, 1) == first and len(calls) == n  # no second measurement
    P.bf16_matmul_probe.cache_clear()


def test_explicit_settings_and_the_pin(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_amx", lambda: False)
    assert P.resolve_precision("float32", "cpu").dtype == torch.float32
    bf = P.resolve_precision("bfloat16", "cpu")
    assert bf.dtype == torch.bfloat16 and "no AMX" in bf.reason  # honoured, with the warning
    monkeypatch.setenv(P.AUTO_ENV, "bfloat16")
    assert P.resolve_precision("auto", "cpu").dtype == torch.bfloat16
    monkeypatch.setenv(P.AUTO_ENV, "float32")
    assert "pinned" in P.resolve_precision("auto", "cpu").reason
    with pytest.raises(ConfigError, match="model.dtype"):
        P.resolve_precision("int8", "cpu")


def test_mixed_precision_keeps_trainable_weights_fp32():
    p = P.Precision(torch.device("cpu"), torch.bfloat16, "bfloat16", "test")
    assert p.weight_dtype(trainable=True) == torch.float32 and p.weight_dtype(trainable=False) == torch.bfloat16
    f = P.Precision(torch.device("cpu"), torch.float32, "float32", "test")
    assert f.weight_dtype(trainable=True) == f.weight_dtype(trainable=False) == torch.float32


def test_bf16_loading_lora_base_bf16_adapter_fp32_and_fp32_gradients(tiny_model_dir):
    """Under bf16 (here on the CPU, tiny model): a LoRA base loads in bf16 and its adapter in fp32; full fine-tuning
    keeps fp32 master weights; a forward under autocast computes in bf16 and the gradients arrive in fp32."""
    from instructkit.models.load import load_model_and_tokenizer

    p = P.Precision(torch.device("cpu"), torch.bfloat16, "bfloat16", "test")
    lora, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)),
                                       LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0), precision=p)
    dtypes = {n: q.dtype for n, q in lora.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    full, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)), precision=p)
    assert {q.dtype for q in full.parameters()} == {torch.float32}
    ids = torch.randint(5, 500, (2, 12))
    for model in (lora, full):
        with p.autocast():
            logits = model(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        torch.nn.functional.cross_entropy(logits.float()[:, :-1].reshape(-1, logits.shape[-1]),
                                          ids[:, 1:].reshape(-1)).backward()
        grads = [q.grad for q in model.parameters() if q.requires_grad]
        assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
