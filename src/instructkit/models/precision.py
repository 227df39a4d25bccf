"""Which device and number format a run trains in: ``model.dtype`` (``auto`` by default) resolved once, with a reason.

``auto`` picks
- **bf16 on a CUDA GPU** that supports it (Ampere and later): its tensor cores run bf16 matmuls 10-15x faster than fp32;
- **bf16 on a CPU with AMX tiles** (Intel Sapphire Rapids and later) *when a probe measures a bf16 matmul faster than
  fp32 there* (seen: 1.5-2.2 TFLOP/s against 0.4 for fp32);
- **fp32 everywhere else**: on AVX2 or AVX-512 CPUs without AMX a bf16 matmul has no hardware units and ran about 100x
  slower than fp32 (AMD EPYC: 1 against 130-150 GFLOP/s).
The choice and its reason are logged and written to ``summary.json``. fp32 stays one setting away
(``model.dtype=float32``); ``INSTRUCTKIT_AUTO_DTYPE=float32`` pins what ``auto`` resolves to (the test suite sets it,
so tests run in fp32 on every CPU, AMX or not).

Mixed precision with bf16: matrix products run in bf16 (``torch.autocast``), while fp32 is kept where rounding would
change the result:
- **trainable weights and their optimizer state** (full fine-tuning: the fp32 master weights; LoRA: the adapter A/B
  matrices, which peft keeps in fp32 over a bf16 base): an AdamW update is often smaller than bf16's 8-bit mantissa
  can resolve against the weight (a relative step below 2^-8 would round away), and the moment estimates lose the
  small squared gradients;
- **gradients of fp32 weights** (autocast's backward returns them in the weight's dtype) and their global norm;
- **the loss**: the log-softmax over the vocabulary and the cross entropy are computed in fp32 from bf16 logits
  (losses.py upcasts each chunk of logits; the running sums of the streaming head are fp32), and per-token log-probs
  are summed in fp32, because a sum of thousands of terms in bf16 loses 2-3 significant digits;
- **normalisation statistics** (RMSNorm computes its variance in fp32 in transformers' models).
Frozen weights (a LoRA base, a reference or reward model) are *stored* in bf16 to halve their memory; nothing is
trained through them, so no update is lost.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

AUTO_ENV = "INSTRUCTKIT_AUTO_DTYPE"
_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
# bf16 must beat fp32 by this factor in the probe: the step also runs element-wise work that gains less
MIN_SPEEDUP = 1.25


@dataclass(frozen=True)
class Precision:
    """The resolved number format of a run: ``dtype`` is the compute format of matrix products, ``reason`` says why."""

    device: torch.device
    dtype: torch.dtype
    setting: str
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def mixed(self) -> bool:
        """True when matmuls run in a 16-bit format under autocast while trainable weights stay fp32."""
        return self.dtype in (torch.bfloat16, torch.float16)

    def weight_dtype(self, trainable: bool) -> torch.dtype:
        """The dtype weights are loaded in: trainable weights fp32 under mixed precision (master weights), frozen
        ones in the compute dtype (a LoRA base, a reference model)."""
        if self.mixed and trainable:
            return torch.float32
        return self.dtype

    def autocast(self):
        """The context a forward (and its loss) runs in: autocast to bf16 under mixed precision, else nothing."""
        if not self.mixed:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def as_dict(self) -> dict:
        """For summary.json."""
        return {"dtype": self.name, "setting": self.setting, "device": str(self.device), "reason": self.reason,
                "mixed": self.mixed}


def default_device() -> torch.device:
    """cuda:<LOCAL_RANK> when CUDA is available (one GPU per process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


@functools.cache
def cpu_has_amx() -> bool:
    """True when the CPU has AMX tiles with bf16 (torch's own check, else /proc/cpuinfo's amx_bf16 flag)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if check is not None:
        try:
            return bool(check())
        except RuntimeError:
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags and "amx_tile" in flags


@functools.cache
def bf16_matmul_probe(n: int = 768, repeats: int = 5) -> tuple[float, float]:
    """(bf16, fp32) GFLOP/s of an n x n x n matmul on the CPU, best of ``repeats`` after a warm-up. Cached per process;
    about 50 ms on an AMX CPU (fp32 dominates), and only run there."""
    flops = 2.0 * n ** 3
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        torch.mm(a, b)  # warm-up: oneDNN picks and builds its kernel
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        out.append(flops / best / 1e9)
    return out[0], out[1]


def resolve_precision(setting: str = "auto", device: torch.device | str | None = None) -> Precision:
    """Resolve ``model.dtype`` (auto, float32, bfloat16, float16) for ``device`` (default: ``default_device()``)."""
    device = torch.device(device) if device is not None else default_device()
    setting = str(setting or "auto")
    key = setting.lower()
    if key != "auto":
        if key not in _NAMES:
            from instructkit.config import ConfigError

            raise ConfigError(f"model.dtype={setting!r}: use auto, float32, bfloat16 or float16")
        dtype = _NAMES[key]
        reason = f"model.dtype={setting} set in the config"
        if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_amx():
            reason += (f"; note: {cpu_name()} has no AMX tiles, where a bf16 matmul ran about 100x slower than fp32 "
                       "(auto would pick float32)")
        if dtype == torch.float16:
            reason += "; note: fp16 runs without loss scaling here (gradients below 6e-8 flush to zero)"
        return Precision(device, dtype, setting, reason)
    pinned = os.environ.get(AUTO_ENV)
    if pinned:
        if pinned.lower() not in _NAMES:
            from instructkit.config import ConfigError

            raise ConfigError(f"{AUTO_ENV}={pinned!r}: use float32, bfloat16 or float16")
        return Precision(device, _NAMES[pinned.lower()], setting, f"auto pinned by {AUTO_ENV}={pinned}")
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return Precision(device, torch.bfloat16, setting, f"auto: CUDA GPU {gpu} supports bf16")
        return Precision(device, torch.float32, setting,
                         f"auto: CUDA GPU {gpu} has no bf16 support (fp16 would need loss scaling): float32")
    if device.type != "cpu":
        return Precision(device, torch.float32, setting, f"auto: float32 on {device.type}")
    name = cpu_name()
    if not cpu_has_amx():
        return Precision(device, torch.float32, setting,
                         f"auto: {name} has no AMX tiles (bf16 matmuls have no hardware units there): float32")
    bf16, fp32 = bf16_matmul_probe()
    if bf16 >= MIN_SPEEDUP * fp32:
        return Precision(device, torch.bfloat16, setting,
                         f"auto: {name} has AMX and a bf16 matmul ran at {bf16:.0f} GFLOP/s against {fp32:.0f} "
                         "for fp32: bfloat16")
    return Precision(device, torch.float32, setting,
                     f"auto: {name} has AMX but a bf16 matmul ran at {bf16:.0f} GFLOP/s against {fp32:.0f} for fp32 "
                     f"(less than {MIN_SPEEDUP}x): float32")


def log_precision(p: Precision) -> None:
    log.warning("precision: %s on %s (%s)", p.name, p.device, p.reason)
