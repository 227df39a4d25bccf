"""DPO side by side: instructkit's `dpo` recipe vs TRL 1.16 DPOTrainer, same model, data, hyperparameters, threads.

    pip install -e '.[bench]'            # TRL, for the peer side only
    HF_HUB_OFFLINE=1 python bench/rlhf.py [--steps 12] [--reps 3]

Both sides: the same Llama built from a config (hidden 256, 4 layers, the tiny ChatML BPE tokenizer, the output layer
widened to 32,768 rows so its cost is that of a real vocabulary, as in SmolLM2's 49k), full fine-tuning,
fp32, batch 8 pairs, beta 0.1, sigmoid loss, reference log-probs precomputed once, constant lr, no gradient
checkpointing, no bf16 (TRL's defaults turned off: on this CPU bf16 is ~37x slower), 2 threads. Pairs have long
prompts (~100 tokens) and short responses (~20 tokens), the usual shape of preference data, where scoring only the
response positions matters. Timed: the whole training call (reference precompute + steps), interleaved repetitions,
median. Same work: the first-step loss is log 2 on both sides and the first-step chosen/rejected log-probs are printed
side by side. Results go to bench/results/rlhf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

WORDS = ("the quick brown fox jumps over the lazy dog while a journey of a thousand miles begins with a single "
         "step and the assistant answers the user politely clearly and briefly").split()


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        context = " ".join(rng.choice(WORDS) for _ in range(60))
        out.append({
            "prompt": [{"role": "user", "content": f"Read this: {context}. Question {i}: is it good?"}],
            "chosen": [{"role": "assistant", "content": "Yes, " + " ".join(rng.choice(WORDS) for _ in range(10))}],
            "rejected": [{"role": "assistant", "content": "No, " + " ".join(rng.choice(WORDS) for _ in range(12))}],
        })
    return out


def run_instructkit(model_dir: Path, data: Path, out: Path, steps: int, batch: int) -> dict:
    from instructkit.config import DataSource, DPOConfig, load_config
    from instructkit.recipes import dpo

    cfg = load_config(DPOConfig, None, [f"model.path={model_dir}", f"train.output_dir={out}", "train.run_name=ik",
                                        f"train.max_steps={steps}", f"train.micro_batch_size={batch}",
                                        "train.lr=0.0001", "train.schedule=constant", "train.resume=never",
                                        "train.max_grad_norm=1.0", "data.validation_fraction=0", "data.max_length=512",
                                        "beta=0.1", "reference=precompute"])
    cfg.data.sources = [DataSource(path=str(data))]
    t0 = time.perf_counter()
    dpo.main(cfg)
    seconds = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "ik" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in recs if r.get("step") == 1 and "loss" in r)
    return {"seconds": seconds, "first_loss": first["loss"], "first_logps_chosen": first["logps_chosen"],
            "first_logps_rejected": first["logps_rejected"]}


def run_trl(model_dir: Path, data: Path, out: Path, steps: int, batch: int) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = load_dataset("json", data_files=str(data), split="train")
    args = DPOConfig(output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler_type="constant",
                     warmup_steps=0, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                     bf16=False, gradient_checkpointing=False, max_length=512, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
                     max_grad_norm=1.0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    first = next(h for h in trainer.state.log_history if "loss" in h)
    return {"seconds": seconds, "first_loss": first["loss"], "first_logps_chosen": first.get("logps/chosen"),
            "first_logps_rejected": first.get("logps/rejected")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32768, help="output-layer rows (0: the tokenizer's 512)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from instructkit.models.tiny import create_tiny

    work = Path(tempfile.mkdtemp(prefix="bench_rlhf_"))
    model_dir = create_tiny(work / "model", seed=0, hidden_size=256, num_layers=4)
    if args.vocab:  # a real model's output-layer cost: rows beyond the tokenizer are never targets, but cost FLOPs
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(model_dir)
        torch.manual_seed(0)
        m.resize_token_embeddings(args.vocab, mean_resizing=False)
        m.save_pretrained(model_dir, safe_serialization=True)
    n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir)
                   .parameters())
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(args.steps * args.batch)))
    results: dict[str, list[dict]] = {"instructkit": [], "trl": []}
    # warm-up, then interleaved repetitions
    run_instructkit(model_dir, data, work / "w", 1, args.batch)
    for rep in range(args.reps):
        for name, fn in (("instructkit", run_instructkit), ("trl", run_trl)):
            d = work / f"{name}_{rep}"
            r = fn(model_dir, data, d, args.steps, args.batch)
            results[name].append(r)
            print(name, rep, json.dumps(r))
            shutil.rmtree(d, ignore_errors=True)
    pairs = args.steps * args.batch
    summary = {}
    for name, runs in results.items():
        med = statistics.median(r["seconds"] for r in runs)
        summary[name] = {"median_seconds": med, "pairs_per_s": pairs / med, "first_loss": runs[0]["first_loss"],
                         "first_logps_chosen": runs[0]["first_logps_chosen"],
                         "first_logps_rejected": runs[0]["first_logps_rejected"],
                         "all_seconds": [r["seconds"] for r in runs]}
    summary["speedup"] = summary["trl"]["median_seconds"] / summary["instructkit"]["median_seconds"]
    summary["setup"] = {"params": n_params, "steps": args.steps, "batch_pairs": args.batch, "reps": args.reps,
                        "threads": 2, "vocab_rows": args.vocab, "torch": torch.__version__, "trl": __import__("trl").__version__,
                        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "command": "HF_HUB_OFFLINE=1 python bench/rlhf.py"}
    print(json.dumps(summary, indent=1))
    out = Path(__file__).parent / "results" / "rlhf.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
