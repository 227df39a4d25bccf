"""Peak CPU memory (RSS) of an SFT step with and without activation checkpointing and FSDP2 sharding.

A random-weight Llama built from a config (no download), packed 2,048-token rows (samples of 64-512 tokens, each
attending only to itself), fp32, the SFT loss with the streaming output layer, AdamW; one micro-batch of one row per
process per step. Each variant runs in fresh processes (peak RSS is per process: ``ru_maxrss``); sharded variants run
2 processes under torchrun (gloo) and report each process's peak. Not a speed benchmark: step times are printed for
orientation only (the machine is shared).

    python bench/memory_cpu.py                   # all variants, writes bench/results/memory_cpu.json
    python bench/memory_cpu.py --shape tiny      # seconds, for a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    # ~57M parameters: 32k vocabulary (Llama 2 / Mistral tokenizers), 8 layers of width 512
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096),
}
VARIANTS = [  # name, processes, extra child flags
    ("plain", 1, []),
    ("checkpointing", 1, ["--checkpointing"]),
    ("fsdp2", 2, ["--sharding"]),
    ("fsdp2+checkpointing", 2, ["--sharding", "--checkpointing"]),
    ("lora", 1, ["--lora"]),
    ("lora+checkpointing", 1, ["--lora", "--checkpointing"]),
]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from instructkit.config import LoRAConfig, TrainConfig
    from instructkit.losses import sft_loss_fused
    from instructkit.models.load import apply_lora, causal_lm_parts, enable_activation_checkpointing, \
        packed_hidden_states
    from instructkit.training import loop, sharding
    from instructkit.training.packing import Sample, collate_rows, pack_first_fit

    torch.set_num_threads(1)
    if args.sharding:
        torch.distributed.init_process_group("gloo")
        dist = sharding.ShardedContext(torch.distributed.get_rank(), torch.distributed.get_world_size())
    else:
        dist = loop.DistContext()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape], attn_implementation="sdpa")).float()
    if args.lora:
        model = apply_lora(model, LoRAConfig(enabled=True, r=16, alpha=32, dropout=0.0))
    if args.checkpointing:
        enable_activation_checkpointing(model)
    if args.sharding:
        model = sharding.shard_model(model, dist)
    after_model = _rss_mib()

    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    lengths = [int(x) for x in torch.randint(64, 513, (64,), generator=g)]
    samples = [Sample(torch.randint(3, vocab, (n,), generator=g).tolist(), [0] * (n // 3) + [1] * (n - n // 3))
               for n in lengths]
    rows = [[samples[i] for i in r] for r in pack_first_fit(lengths, args.pack_length)]

    def loss_fn(m, batch):
        hidden = packed_hidden_states(m, batch)
        _, head, softcap = causal_lm_parts(m)
        return sft_loss_fused(hidden, batch["labels"], head, softcap)

    cfg = TrainConfig(lr=1e-4, max_grad_norm=1.0)
    opt = loop.build_optimizer(model, cfg)
    sched = loop.build_scheduler(opt, cfg, args.steps)
    losses, seconds = [], []
    for step in range(args.steps):
        row = rows[(step * dist.world_size + dist.rank) % len(rows)]
        res = loop.optimizer_step(model, opt, sched, [collate_rows([row], 0)], sharding.route(loss_fn),
                                  lambda b: int(b["n_supervised"]), max_grad_norm=1.0, dist=dist, step=step)
        losses.append(res.loss)
        seconds.append(res.seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in sharding.unwrap(model).parameters())
    out = {"rank": dist.rank, "world_size": dist.world_size, "peak_rss_mib": round(peak, 1),
           "rss_after_model_mib": round(after_model, 1), "losses": losses,
           "step_seconds": [round(s, 2) for s in seconds],
           "parameters": params}
    Path(args.result_dir, f"rank{dist.rank}.json").write_text(json.dumps(out))
    if args.sharding:
        torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pack-length", type=int, default=2048)
    ap.add_argument("--only", nargs="*", help="variant names")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_cpu.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sharding", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src") + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    base = [__file__, "--child", "--shape", args.shape, "--steps", str(args.steps), "--pack-length",
            str(args.pack_length)]
    results = {}
    for name, procs, flags in VARIANTS:
        if args.only and name not in args.only:
            continue
        if procs > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
                   "127.0.0.1", "--master_port", "29517"] + base + flags
        else:
            cmd = [sys.executable] + base + flags
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(cmd + ["--result-dir", tmp], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
            ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(procs)]
        results[name] = {"processes": procs, "per_process_peak_rss_mib": [r["peak_rss_mib"] for r in ranks],
                         "per_process_rss_after_model_mib": [r["rss_after_model_mib"] for r in ranks],
                         "losses_rank0": ranks[0]["losses"], "step_seconds_rank0": ranks[0]["step_seconds"],
                         "parameters": ranks[0]["parameters"], "wall_s": round(time.time() - t0, 1)}
        print(name, json.dumps(results[name]), flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    record = {"shape": args.shape, "config": SHAPES[args.shape], "pack_length": args.pack_length, "steps": args.steps,
              "cpu": cpu, "threads_per_process": 1, "machine": "shared (other jobs running)",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "variants": results,
              "command": "python bench/memory_cpu.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
