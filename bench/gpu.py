"""GPU benchmark: instructkit against TRL 1.16 on the same random-weight model, data and settings, in one run.

    python bench/gpu.py                                  # on a CUDA GPU: everything below (about 5 minutes on an H100)
    python bench/gpu.py --device cpu --tiny              # dry run of every code path on the CPU (tiny shapes)
    python bench/gpu.py --shapes 1b --modes full --no-dpo

What is measured, per model shape (a Llama 3.2 1B-shaped and a 3B-shaped config, random weights: nothing is
downloaded) and mode (full fine-tuning, LoRA r=16 on all linear layers):
- SFT on packed 2,048-token rows (samples of 128-1,024 tokens, the first third of each unsupervised; each sample
  attends only to itself on both sides), bf16 mixed precision on both sides: fp32 master weights, fp32 AdamW state,
  bf16 autocast (TRL: ``bf16=True``); for LoRA both sides store the frozen base in bf16 and the adapter in fp32.
  Both sides: fused AdamW, lr constant 1e-5, clip 1.0, the same rows in the same order (TRL gets them pre-packed with
  ``seq_lengths`` and ``padding_free=True``, the layout its own packing produces), sdpa attention, the same activation
  checkpointing setting (on for the 3B shape, whose full fine-tuning state alone is 51 GB, off for 1B).
  Reported: tokens/s (all tokens of the rows) and supervised tokens/s over the timed steps (after warm-up steps), peak
  GPU memory (``torch.cuda.max_memory_allocated``, each side in its own process), the first-step loss of each side (the
  same work: they must agree within bf16 noise), and MFU = 6 N tokens/s (full; 4 N for LoRA, whose frozen weights need
  no weight gradient) over a bf16 matmul peak measured in the same run (8192^3 products); N counts every parameter
  once (the tied output layer's matmul included; the attention score FLOPs are reported apart).
- DPO pairs/s (1B shape, full fine-tuning, 8 pairs per step, 256-token prompts, 128-256-token responses, reference
  log-probs precomputed on both sides, sigmoid loss, beta 0.1) against TRL's DPOTrainer on the same text pairs.

Each (shape, mode, side) runs in its own subprocess. Results: ``--out`` (JSON) and ``--md`` (a RESULTS.md fragment).
Goals (issue 17): SFT tokens/s >= 1.3x TRL's with no more memory; MFU >= 0.45 for full fine-tuning of the 1B shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

LLAMA_COMMON = dict(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
SHAPES = {
    # Llama 3.2 1B: 1.236B parameters (262M of them the tied embedding / output layer)
    "1b": dict(LLAMA_COMMON, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
    # Llama 3.2 3B: 3.213B parameters
    "3b": dict(LLAMA_COMMON, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128),
    # dry runs on the CPU
    "tiny": dict(LLAMA_COMMON, vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
# per shape: micro-batch rows, activation checkpointing (both sides), steps
SFT_PLAN = {"1b": dict(micro_batch_size=4, checkpointing=False, warmup=3, steps=10),
            "3b": dict(micro_batch_size=2, checkpointing=True, warmup=2, steps=6),
            "tiny": dict(micro_batch_size=2, checkpointing=False, warmup=1, steps=2)}
LORA = dict(r=16, alpha=32, dropout=0.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------------------
def bf16_peak_tflops(device: str, n: int = 8192, reps: int = 10) -> float:
    """Achieved bf16 matmul TFLOP/s (n^3 products, random data, mean of ``reps`` after 3 warm-ups)."""
    import torch

    if device == "cpu":
        n, reps = 512, 3
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(shape: str, device: str, seed: int, *, lora: bool, checkpointing: bool, attn: str = "sdpa"):
    """The random-weight Llama of ``shape`` on ``device``, identical on both sides (same seed, same device RNG): fp32
    weights; for LoRA the frozen base is cast to bf16 (on a GPU) before the adapter is added."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], attn_implementation=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(torch.float32)
    if lora and device.startswith("cuda"):
        model.to(torch.bfloat16)
    model.config.use_cache = False
    return model


def make_sft_rows(shape: str, n_rows: int, pack_length: int, seed: int) -> list[list[tuple[list[int], list[int]]]]:
    """``n_rows`` packed rows of (ids, loss mask) samples: lengths 128-1,024, first third unsupervised."""
    from instructkit.training.packing import pack_first_fit

    rng = random.Random(seed)
    vocab = SHAPES[shape]["vocab_size"]
    lo, hi = (128, 1024) if shape != "tiny" else (16, 96)
    samples = []
    full: list[list[int]] = []  # rows filled to over 90% (the partly filled last rows of the packing are left out)
    while len(full) < n_rows:
        n = rng.randint(lo, hi)
        ids = [rng.randrange(10, vocab) for _ in range(n)]
        samples.append((ids, [0] * (n // 3) + [1] * (n - n // 3)))
        rows = pack_first_fit([len(s[0]) for s in samples], pack_length)
        full = [r for r in rows if sum(len(samples[i][0]) for i in r) > pack_length * 0.9]
    return [[samples[i] for i in r] for r in full[:n_rows]]


# ---------------------------------------------------------------------------------------------------------------------
# SFT children
# ---------------------------------------------------------------------------------------------------------------------
def child_sft_instructkit(spec: dict) -> dict:
    import torch

    from instructkit.config import LoRAConfig, TrainConfig
    from instructkit.losses import sft_loss_fused
    from instructkit.models.load import apply_lora, causal_lm_parts, enable_activation_checkpointing, \
        packed_hidden_states
    from instructkit.models.precision import resolve_precision
    from instructkit.training import loop
    from instructkit.training.packing import Sample, collate_rows

    device = spec["device"]
    precision = resolve_precision(spec["dtype"], device)
    model = build_model(spec["shape"], device, spec["seed"], lora=spec["lora"], checkpointing=spec["checkpointing"])
    if spec["lora"]:
        torch.manual_seed(spec["seed"])
        model = apply_lora(model, LoRAConfig(enabled=True, **LORA))
    if spec["checkpointing"]:
        enable_activation_checkpointing(model)
    model.train()
    rows = [[Sample(ids, mask) for ids, mask in row] for row in spec["rows"]]
    mbs = spec["micro_batch_size"]
    total = spec["warmup"] + spec["steps"]
    tcfg = TrainConfig(lr=1e-5, schedule="constant", max_grad_norm=1.0, micro_batch_size=mbs)
    optimizer = loop.build_optimizer(model, tcfg)
    scheduler = loop.build_scheduler(optimizer, tcfg, total)
    dev = torch.device(device)

    def loss_fn(m, batch):
        batch = {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with precision.autocast():
            hidden = packed_hidden_states(m, batch)
            _, head, softcap = causal_lm_parts(m)
            return sft_loss_fused(hidden, batch["labels"], head, softcap)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ends, losses, tokens, units = [], [], [], []
    t0 = time.perf_counter()
    for step in range(total):
        batch = collate_rows(rows[step * mbs:(step + 1) * mbs], 0)
        res = loop.optimizer_step(model, optimizer, scheduler, [batch], loss_fn, lambda b: int(b["n_supervised"]),
                                  max_grad_norm=1.0, token_fn=lambda b: int(b["n_tokens"]), step=step)
        _sync(device)
        ends.append(time.perf_counter())
        losses.append(res.loss)
        tokens.append(res.tokens)
        units.append(res.units)
    return _summary(spec, ends, t0, losses, tokens, units, precision=precision.as_dict())


def child_sft_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from instructkit.models.tiny import build_tokenizer

    device = spec["device"]
    model = build_model(spec["shape"], device, spec["seed"], lora=spec["lora"], checkpointing=spec["checkpointing"])
    tok = build_tokenizer(512)  # only its pad id is used: the rows are pre-tokenized
    mbs = spec["micro_batch_size"]
    total = spec["warmup"] + spec["steps"]
    records = []
    for row in spec["rows"][:total * mbs]:
        records.append({"input_ids": [t for ids, _ in row for t in ids],
                        "labels": [t if m else -100 for ids, mask in row for t, m in zip(ids, mask)],
                        "seq_lengths": [len(ids) for ids, _ in row]})
    # the shifted labels of a pre-tokenized row: TRL shifts inside the model's loss, like plain transformers
    dataset = Dataset.from_list(records)
    bf16 = spec["dtype"] in ("auto", "bfloat16") and device.startswith("cuda") or spec["dtype"] == "bfloat16"
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_sft_"), max_steps=total, per_device_train_batch_size=mbs,
        gradient_accumulation_steps=1, learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused" if device.startswith("cuda") else "adamw_torch",
        bf16=bf16, fp16=False, gradient_checkpointing=spec["checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False}, use_cpu=device == "cpu", seed=spec["seed"],
        packing=False, padding_free=True, max_length=None, train_sampling_strategy="sequential",
        shuffle_dataset=False, dataloader_num_workers=0, logging_steps=10 ** 6, save_strategy="no", report_to=[],
        disable_tqdm=True, dataset_num_proc=None, model_init_kwargs=None,
    )
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM", bias="none")
    ends: list[float] = []
    seen = {"loss": []}

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            ends.append(time.perf_counter())

    class Trainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if isinstance(out, tuple) else out
            seen["loss"].append(float(loss.detach()))
            return out

    torch.manual_seed(spec["seed"])
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=peft_config,
                      callbacks=[StepEnd()])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    rows = spec["rows"]
    tokens = [sum(len(ids) for row in rows[s * mbs:(s + 1) * mbs] for ids, _ in row) for s in range(total)]
    units = [sum(sum(mask[1:]) for row in rows[s * mbs:(s + 1) * mbs] for _, mask in row) for s in range(total)]
    return _summary(spec, ends, t0, seen["loss"][:total], tokens, units)


def _summary(spec: dict, ends: list[float], t0: float, losses, tokens, units, **extra) -> dict:
    import torch

    w = spec["warmup"]
    timed = ends[-1] - ends[w - 1] if w > 0 else ends[-1] - t0
    tok = sum(tokens[w:])
    out = {"side": spec["side"], "shape": spec["shape"], "mode": spec["mode"], "steps_timed": len(ends) - w,
           "seconds_timed": round(timed, 4), "tokens_per_s": tok / timed,
           "supervised_tokens_per_s": sum(units[w:]) / timed,
           "first_loss": losses[0] if losses else None, "losses": losses, **extra}
    if spec["device"].startswith("cuda"):
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    else:
        import resource

        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# DPO children
# ---------------------------------------------------------------------------------------------------------------------
_WORDS = ("the model answers every question with care and then it stops when the task is done a short list of "
          "facts about rivers mountains cities numbers colours animals plants stars and planets follows here").split()


def make_pairs(n: int, seed: int, tiny: bool) -> list[dict]:
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    scale = 8 if tiny else 1
    return [{"prompt": text(200 // scale) + "\n", "chosen": text(rng.randint(100, 200) // scale),
             "rejected": text(rng.randint(100, 200) // scale)} for _ in range(n)]


def tokenize_pairs_like_trl(pairs: list[dict], tok) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids as TRL's DPOTrainer tokenizes text pairs: eos appended to both completions,
    ``prompt + completion`` tokenized together and split at the common prefix with the tokenized prompt."""
    out = []
    for p in pairs:
        prompt = tok(p["prompt"])["input_ids"]
        pc = tok(p["prompt"] + p["chosen"] + tok.eos_token)["input_ids"]
        pr = tok(p["prompt"] + p["rejected"] + tok.eos_token)["input_ids"]
        k = min(_prefix(prompt, pc), _prefix(prompt, pr))
        out.append((prompt[:k], pc[k:], pr[k:]))
    return out


def _prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def child_dpo_instructkit(spec: dict) -> dict:
    import torch

    from instructkit.config import TrainConfig
    from instructkit.losses import dpo_loss
    from instructkit.models.precision import resolve_precision
    from instructkit.models.value_head import response_logprobs
    from instructkit.rl.rollout import prompt_response_batch
    from instructkit.training import loop

    device = spec["device"]
    dev = torch.device(device)
    precision = resolve_precision(spec["dtype"], device)
    model = build_model(spec["shape"], device, spec["seed"], lora=False, checkpointing=False)
    model.train()
    items = spec["encoded"]
    bs = spec["pairs_per_step"]
    total = spec["warmup"] + spec["steps"]

    def batch_of(chunk):
        b = prompt_response_batch([c[0] for c in chunk] * 2, [c[1] for c in chunk] + [c[2] for c in chunk], 0)
        b["n"] = len(chunk)
        return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}

    def logps(m, b):
        with precision.autocast():
            lp = response_logprobs(m, b["input_ids"], b["attention_mask"], b["prompt_width"], b["response_width"])
        s = (lp.float() * b["response_mask"]).sum(-1)
        return s[:b["n"]], s[b["n"]:]

    batches = [batch_of(items[s * bs:(s + 1) * bs]) for s in range(total)]
    with torch.no_grad():  # reference log-probs, precomputed once (TRL: precompute_ref_log_probs=True)
        model.eval()
        for b in batches:
            b["ref_c"], b["ref_r"] = logps(model, b)
        model.train()

    def loss_fn(m, b):
        c, r = logps(m, b)
        loss, _ = dpo_loss(c, r, b["ref_c"], b["ref_r"], beta=0.1)
        return loss * b["n"], b["n"]

    tcfg = TrainConfig(lr=1e-6, schedule="constant", max_grad_norm=1.0)
    optimizer = loop.build_optimizer(model, tcfg)
    scheduler = loop.build_scheduler(optimizer, tcfg, total)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ends, losses = [], []
    t0 = time.perf_counter()
    for step in range(total):
        res = loop.optimizer_step(model, optimizer, scheduler, [batches[step]], loss_fn, lambda b: b["n"],
                                  max_grad_norm=1.0, step=step)
        _sync(device)
        ends.append(time.perf_counter())
        losses.append(res.loss)
    return _dpo_summary(spec, ends, t0, losses)


def child_dpo_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from instructkit.models.tiny import build_tokenizer

    device = spec["device"]
    tok = build_tokenizer(512)
    model = build_model(spec["shape"], device, spec["seed"], lora=False, checkpointing=False)
    total = spec["warmup"] + spec["steps"]
    bf16 = spec["dtype"] in ("auto", "bfloat16") and device.startswith("cuda") or spec["dtype"] == "bfloat16"
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl_dpo_"), max_steps=total,
                     per_device_train_batch_size=spec["pairs_per_step"], gradient_accumulation_steps=1,
                     learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                     optim="adamw_torch_fused" if device.startswith("cuda") else "adamw_torch", bf16=bf16,
                     use_cpu=device == "cpu", beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                     max_length=None, logging_steps=10 ** 6, save_strategy="no", report_to=[], disable_tqdm=True,
                     seed=spec["seed"], dataloader_num_workers=0,
                     gradient_checkpointing=False)  # TRL 1.16's DPOConfig turns it on by default; ours is off
    ends: list[float] = []
    seen = {"loss": []}

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            ends.append(time.perf_counter())

    class Trainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if isinstance(out, tuple) else out
            seen["loss"].append(float(loss.detach()))
            return out

    dataset = Dataset.from_list(spec["pairs"][:total * spec["pairs_per_step"]])
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[StepEnd()])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    return _dpo_summary(spec, ends, t0, seen["loss"][:total])


def _dpo_summary(spec: dict, ends, t0, losses) -> dict:
    import torch

    w = spec["warmup"]
    timed = ends[-1] - ends[w - 1]
    out = {"side": spec["side"], "shape": spec["shape"],
           "pairs_per_s": spec["pairs_per_step"] * (len(ends) - w) / timed,
           "seconds_timed": round(timed, 4), "first_loss": losses[0] if losses else None, "losses": losses}
    if spec["device"].startswith("cuda"):
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


CHILDREN = {"sft_instructkit": child_sft_instructkit, "sft_trl": child_sft_trl,
            "dpo_instructkit": child_dpo_instructkit, "dpo_trl": child_dpo_trl}


# ---------------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------------
def run_child(kind: str, spec: dict, work: Path, timeout: float) -> dict:
    spec_path = work / f"{kind}_{spec['shape']}_{spec.get('mode', 'dpo')}.json"
    spec_path.write_text(json.dumps(spec))
    out_path = spec_path.with_suffix(".out.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--spec", str(spec_path), "--result",
                           str(out_path)], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out_path.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        log(f"{kind} {spec['shape']} {spec.get('mode', '')} FAILED (rc {proc.returncode}):\n{tail}")
        return {"side": spec["side"], "error": tail[-1500:], "wall_s": round(time.time() - t0, 1)}
    res = json.loads(out_path.read_text())
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def param_count(shape: str) -> int:
    c = SHAPES[shape]
    h, f, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h
    return V * h * (1 if c["tie_word_embeddings"] else 2) + L * per_layer + h


def attention_flops_per_token(shape: str, rows) -> float:
    """Causal attention score/value FLOPs (forward + backward) per token of ``rows``: 6 x 2 x n^2/2 x heads x head_dim
    per sample of n tokens and layer, averaged over the tokens."""
    c = SHAPES[shape]
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    width = c["num_attention_heads"] * hd
    n2 = sum(len(ids) ** 2 for row in rows for ids, _ in row)
    n = sum(len(ids) for row in rows for ids, _ in row)
    return 6 * n2 * width * c["num_hidden_layers"] / max(1, n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a dry run of every code path)")
    ap.add_argument("--shapes", default="1b,3b")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--sides", default="instructkit,trl")
    ap.add_argument("--dtype", default="auto", help="model.dtype for both sides (auto: bf16 on a GPU)")
    ap.add_argument("--no-dpo", action="store_true")
    ap.add_argument("--pack-length", type=int, default=2048)
    ap.add_argument("--child-timeout", type=float, default=240)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    ap.add_argument("--md", default=str(ROOT / "bench" / "results" / "gpu_RESULTS.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        res = CHILDREN[args.child](spec)
        Path(args.result).write_text(json.dumps(res))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    pack_length = 256 if args.tiny else args.pack_length
    work = Path(tempfile.mkdtemp(prefix="ik_gpu_bench_"))
    peak_before = bf16_peak_tflops(device)
    log(f"device {device}: bf16 matmul {peak_before:.1f} TFLOP/s")
    env = {"device": device, "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
           "cpu": platform.processor(), "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    command = "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {"env": env, "command": command,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sft": {}, "dpo": None}
    for shape in shapes:
        plan = SFT_PLAN[shape]
        total = plan["warmup"] + plan["steps"]
        rows = make_sft_rows(shape, total * plan["micro_batch_size"], pack_length, seed=0)
        n_params = param_count(shape)
        attn_fpt = attention_flops_per_token(shape, rows)
        for mode in args.modes.split(","):
            key = f"{shape}-{mode}"
            entry = {"parameters": n_params, "micro_batch_size": plan["micro_batch_size"], "pack_length": pack_length,
                     "checkpointing": plan["checkpointing"], "sides": {}}
            for side in args.sides.split(","):
                spec = dict(plan, side=side, shape=shape, mode=mode, lora=mode == "lora", device=device,
                            dtype=args.dtype, seed=0, rows=rows)
                log(f"SFT {key} {side} ...")
                res = run_child(f"sft_{side}", spec, work, args.child_timeout)
                if "tokens_per_s" in res:
                    flops_tok = (4 if mode == "lora" else 6) * n_params
                    res["mfu"] = flops_tok * res["tokens_per_s"] / (peak_before * 1e12)
                    res["mfu_with_attention"] = (flops_tok + attn_fpt) * res["tokens_per_s"] / (peak_before * 1e12)
                    log(f"  {res['tokens_per_s']:.0f} tok/s, MFU {res['mfu']:.3f}, peak "
                        f"{res.get('peak_gpu_mib', res.get('peak_rss_mib'))} MiB, first loss {res['first_loss']:.5f}")
                entry["sides"][side] = res
            ik, trl = entry["sides"].get("instructkit", {}), entry["sides"].get("trl", {})
            if "tokens_per_s" in ik and "tokens_per_s" in trl:
                entry["speedup"] = ik["tokens_per_s"] / trl["tokens_per_s"]
                mem = "peak_gpu_mib" if "peak_gpu_mib" in ik else "peak_rss_mib"
                entry["memory_ratio"] = ik[mem] / trl[mem]
                entry["first_loss_diff"] = abs(ik["first_loss"] - trl["first_loss"])
                log(f"  {key}: {entry['speedup']:.2f}x TRL's tokens/s, memory {entry['memory_ratio']:.2f}x")
            results["sft"][key] = entry
    if not args.no_dpo:
        from instructkit.models.tiny import build_tokenizer

        shape = "tiny" if args.tiny else "1b"
        warmup, steps, bs = (1, 2, 2) if args.tiny else (2, 8, 8)
        pairs = make_pairs((warmup + steps) * bs, seed=0, tiny=args.tiny)
        encoded = tokenize_pairs_like_trl(pairs, build_tokenizer(512))
        entry = {"shape": shape, "pairs_per_step": bs, "sides": {}}
        for side in args.sides.split(","):
            spec = dict(side=side, shape=shape, device=device, dtype=args.dtype, seed=0, warmup=warmup, steps=steps,
                        pairs_per_step=bs, pairs=pairs, encoded=encoded)
            log(f"DPO {shape} {side} ...")
            res = run_child(f"dpo_{side}", spec, work, args.child_timeout)
            if "pairs_per_s" in res:
                log(f"  {res['pairs_per_s']:.2f} pairs/s, first loss {res['first_loss']:.5f}")
            entry["sides"][side] = res
        ik, trl = entry["sides"].get("instructkit", {}), entry["sides"].get("trl", {})
        if "pairs_per_s" in ik and "pairs_per_s" in trl:
            entry["speedup"] = ik["pairs_per_s"] / trl["pairs_per_s"]
        results["dpo"] = entry
    results["bf16_peak_tflops"] = {"before": peak_before, "after": bf16_peak_tflops(device)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    Path(args.md).write_text(markdown(results))
    log(f"wrote {args.out} and {args.md}")
    failed = [k for k, e in results["sft"].items() for s in e["sides"].values() if "error" in s]
    return 1 if failed else 0


def markdown(r: dict) -> str:
    env = r["env"]
    lines = [f"### GPU run {r['date']}: {env.get('gpu') or env['device']}", "",
             f"`{r['command']}` (torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"TRL {env['trl']}); bf16 matmul peak measured in the run: "
             f"{r['bf16_peak_tflops']['before']:.0f} / {r['bf16_peak_tflops']['after']:.0f} TFLOP/s (before / after).",
             "", "| SFT | side | tokens/s | supervised tok/s | MFU (6N or 4N) | peak memory MiB | first loss |",
             "|---|---|---|---|---|---|---|"]
    for key, e in r["sft"].items():
        for side, s in e["sides"].items():
            if "error" in s:
                lines.append(f"| {key} | {side} | failed | | | | |")
                continue
            mem = s.get("peak_gpu_mib", s.get("peak_rss_mib"))
            lines.append(f"| {key} | {side} | {s['tokens_per_s']:.0f} | {s['supervised_tokens_per_s']:.0f} | "
                         f"{s['mfu']:.3f} | {mem} | {s['first_loss']:.4f} |")
        if "speedup" in e:
            lines.append(f"| {key} | **ratio** | **{e['speedup']:.2f}x** | | | **{e['memory_ratio']:.2f}x** | |")
    if r.get("dpo"):
        d = r["dpo"]
        lines += ["", "| DPO | side | pairs/s | peak memory MiB | first loss |", "|---|---|---|---|---|"]
        for side, s in d["sides"].items():
            if "error" in s:
                lines.append(f"| {d['shape']} full | {side} | failed | | |")
                continue
            lines.append(f"| {d['shape']} full | {side} | {s['pairs_per_s']:.2f} | {s.get('peak_gpu_mib', '-')} | "
                         f"{s['first_loss']:.4f} |")
        if "speedup" in d:
            lines.append(f"| {d['shape']} full | **ratio** | **{d['speedup']:.2f}x** | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
