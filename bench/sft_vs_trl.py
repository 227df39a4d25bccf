"""SFT throughput: instructkit vs TRL's SFTTrainer, same model, same data, same hyperparameters, same work.

    HF_HUB_OFFLINE=1 python bench/sft_vs_trl.py            # full run: both configurations, 3 interleaved
                                                           # repetitions per side (13.5 min on the loaded machine)
    HF_HUB_OFFLINE=1 python bench/sft_vs_trl.py --quick    # smoke run (1 x 256-token rows, 1 repetition, no file)
    ... --configs llama30m-full                             # one configuration; its object in the JSON is replaced
    ... --sides instructkit,trl,instructkit_unfused         # also instructkit with its pre-2026-11-24 output layer
                                                           # (losses.sft_loss, chunks recomputed in backward)
    ... --threads 1 --steps 2                               # 1 thread: CPU seconds measure the work even when the
                                                           # machine is shared (JSON objects are kept per threads)

TRL 1.16 is a bench-only dependency (``pip install trl==1.16.0``), not a dependency of instructkit.

How "the same work" is ensured (and checked: the first-step losses must agree within 1e-4):
- same initial weights: the ~30M Llama is built from a config under ``torch.manual_seed(0)`` and saved ONCE as
  safetensors; both sides load that folder (Gemma: both load the zoo folder; LoRA B starts at zero, so the first step's
  loss does not depend on the random LoRA A init; both sides seed torch before wrapping anyway);
- same supervised tokens: the conversations are rendered ONCE by instructkit's chat renderer (assistant content plus
  end-of-turn token supervised), and TRL gets them pre-tokenized with ``labels = input_ids`` where the mask is 1, else
  -100 (TRL's "processed dataset" path; its ``assistant_only_loss`` would need {% generation %} markers in the template,
  which is a different mask source: pre-tokenized labels give TRL exactly instructkit's supervised tokens);
- same batch composition: instructkit packs first-fit rows (training/packing.py) and orders them with its StepPlan; TRL
  gets those very rows, in that very order (``train_sampling_strategy="sequential"``), as pre-packed rows with
  ``seq_lengths`` and ``padding_free=True``: that is exactly the data layout TRL's own ``packing=True`` produces
  (``pack_dataset`` -> input_ids/labels/seq_lengths -> padding-free collator), minus TRL's BFD row assignment;
- same hyperparameters: AdamW (torch), lr constant, no warm-up, weight decay 0, grad clip 1.0, fp32, same threads.
  TRL gets its best CPU settings: bf16 off, gradient checkpointing off, padding-free packing, TRL's fused LM head
  (its default: only supervised positions are projected), no tqdm, no logging/saving during the timed steps.

Each (side, repetition) runs in its own subprocess, so the peak RSS (``ru_maxrss`` in the child) is attributable. The
sides are interleaved (ik, trl, trl, ik, ik, trl, ...), each child does warm-up steps first (the first one is step 0,
whose loss is the "first-step loss"), then timed steps; a step's time is end-of-step to end-of-step, data collation
and optimizer included on both sides. The median over repetitions is reported. The model FLOPs utilisation is
6 x parameters x tokens/s over an fp32 matmul ceiling measured in the same run (before and after the children).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "lf_alpaca_en_demo.json"  # ../shared beside the repository
WORK = Path(tempfile.gettempdir()) / "instructkit_bench_sft_vs_trl"

# Configurations: model, LoRA, batch layout. `steps` are timed steps after `warmup` steps, per child.
CONFIGS = {
    "llama30m-full": dict(model="llama30m", lora=None, micro_batch_size=2, grad_accum=1, pack_length=512,
                          max_length=512, warmup=1, steps=2, reps=3, lr=1e-4),
    "gemma3-270m-lora": dict(model="gemma-3-270m", lora=dict(r=16, alpha=32, dropout=0.0), micro_batch_size=1,
                             grad_accum=1, pack_length=256, max_length=256, warmup=1, steps=1, reps=3, lr=1e-4),
}
QUICK = {"micro_batch_size": 1, "pack_length": 256, "max_length": 256, "warmup": 1, "steps": 1, "reps": 1}

# ~30M-parameter Llama on SmolLM2's 49,152-token byte-level BPE vocabulary (tied embeddings, like SmolLM2):
# 49152*384 = 18.87M embedding + 6 layers * (4*384^2 + 3*384*1024 + 2*384) = 10.62M, + 384 final norm = 29.5M.
LLAMA30M = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                num_key_value_heads=6, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ---------------------------------------------------------------------------------------------------------------------
# matmul ceiling
# ---------------------------------------------------------------------------------------------------------------------
def matmul_gflops(threads: int, n: int = 1024, reps: int = 8) -> float:
    """Median fp32 GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        rates.append(2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


# ---------------------------------------------------------------------------------------------------------------------
# preparation (driver): model folder, rendered samples, packed rows, step order
# ---------------------------------------------------------------------------------------------------------------------
def prepare(name: str, cfg: dict, threads: int, seed: int) -> dict:
    import torch

    from instructkit.config import DataConfig, ModelConfig, SFTConfig, TrainConfig
    from instructkit.data.io import read_conversations
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.models.zoo import cache_dir, is_prepared
    from instructkit.recipes.sft import render_samples
    from instructkit.training.loop import StepPlan
    from instructkit.training.packing import build_rows, prepare_samples

    torch.set_num_threads(threads)
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    if cfg["model"] == "llama30m":
        if not is_prepared("smollm2-135m-instruct"):
            raise SystemExit("the SmolLM2 tokenizer is needed: run `instructkit models prepare smollm2-135m-instruct`")
        model_dir = work / "model"
        tokenizer_note = f"SmolLM2 tokenizer (49,152-token byte-level BPE) from {cache_dir('smollm2-135m-instruct')}"
        from _common import random_llama_with_smollm2_tokenizer

        random_llama_with_smollm2_tokenizer(work, LLAMA30M, seed)
    else:
        if not is_prepared(cfg["model"]):
            raise SystemExit(f"run `instructkit models prepare {cfg['model']}` first")
        model_dir = cache_dir(cfg["model"])
        tokenizer_note = f"{cfg['model']}'s own tokenizer (262,144 tokens) from {model_dir}"
    model, tok = load_model_and_tokenizer(ModelConfig(path=str(model_dir)))
    if len(tok) > model.get_input_embeddings().weight.shape[0] or model.config.pad_token_id != tok.pad_token_id:
        raise SystemExit(f"{model_dir}: instructkit's loading changes this model (pad/template tokens); "
                         "both sides must load identical weights")
    n_params = sum(p.numel() for p in model.parameters())
    del model

    sft_cfg = SFTConfig(model=ModelConfig(path=str(model_dir)), data=DataConfig(max_length=cfg["max_length"]),
                        train=TrainConfig(pack_length=cfg["pack_length"], micro_batch_size=cfg["micro_batch_size"],
                                          grad_accum=cfg["grad_accum"], seed=seed))
    convs = read_conversations(DATA)
    samples, stats = prepare_samples(render_samples(convs, tok, sft_cfg), cfg["max_length"])
    rows = build_rows(samples, pack=True, pack_length=cfg["pack_length"], seed=seed)
    plan = StepPlan(len(rows), cfg["micro_batch_size"], cfg["grad_accum"], 1, seed)
    total_steps = cfg["warmup"] + cfg["steps"]
    if total_steps > plan.steps_per_epoch:
        raise SystemExit(f"{name}: {total_steps} steps need more than one epoch ({plan.steps_per_epoch} steps)")
    step_rows = [[i for group in plan.micro_batches(s) for i in group] for s in range(total_steps)]
    spec = {
        "name": name, "model_dir": str(model_dir), "lora": cfg["lora"], "threads": threads, "seed": seed,
        "micro_batch_size": cfg["micro_batch_size"], "grad_accum": cfg["grad_accum"], "pack_length": cfg["pack_length"],
        "max_length": cfg["max_length"], "warmup": cfg["warmup"], "steps": cfg["steps"], "lr": cfg["lr"],
        "pad_token_id": tok.pad_token_id, "n_params": n_params, "tokenizer": tokenizer_note,
        "rows": [[[s.input_ids, s.loss_mask] for s in row] for row in rows],
        "step_rows": step_rows,  # row indices of each optimizer step, in instructkit's order (what TRL is fed)
        "data_stats": stats.as_dict(),
    }
    # what each step contains (identical on both sides by construction)
    spec["step_tokens"] = [sum(len(s[0]) for i in idx for s in spec["rows"][i]) for idx in step_rows]
    spec["step_supervised"] = [sum(sum(s[1][1:]) for i in idx for s in spec["rows"][i]) for idx in step_rows]
    path = work / f"spec_{os.getpid()}.json"  # per driver: two runs at once must not read each other's spec
    path.write_text(json.dumps(spec))
    return {"spec_path": str(path), "n_params": n_params, "n_rows": len(rows), "tokenizer": tokenizer_note,
            "data_stats": stats.as_dict(), "step_tokens": spec["step_tokens"],
            "step_supervised": spec["step_supervised"]}


# ---------------------------------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed_summary(spec: dict, ends: list[float], t_start: float, first_loss: float, extra: dict,
                  cpu_ends: list[float]) -> dict:
    """Throughput over the timed steps (after the warm-up), from end-of-step timestamps (wall clock and this process's
    CPU time: on a shared machine the CPU time is the steadier measure of the work a side needs)."""
    w, n = spec["warmup"], spec["steps"]
    assert len(ends) == w + n == len(cpu_ends), (len(ends), w, n)
    secs = ends[-1] - ends[w - 1]
    cpu = cpu_ends[-1] - cpu_ends[w - 1]
    tokens = sum(spec["step_tokens"][w:])
    sup = sum(spec["step_supervised"][w:])
    step_secs = [b - a for a, b in zip([t_start] + ends[:-1], ends)]
    return {"first_step_loss": first_loss, "timed_seconds": secs, "tokens_per_s": tokens / secs,
            "supervised_tokens_per_s": sup / secs, "step_seconds": step_secs, "peak_rss_mib": peak_rss_mib(),
            "timed_cpu_seconds": cpu, "tokens_per_cpu_s": tokens / cpu, **extra}


def child_instructkit(spec: dict, fused_head: bool = True) -> dict:
    """instructkit's SFT step; ``fused_head=False`` swaps in the loss before losses.sft_loss_fused (sft_loss: chunks
    recomputed in backward), to measure that change in the same run (side "instructkit_unfused")."""
    import torch

    from instructkit.config import LoRAConfig, ModelConfig, TrainConfig
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.recipes.sft import count_supervised, count_tokens, sft_batch_loss
    from instructkit.training import loop
    from instructkit.training.packing import Sample, collate_rows

    torch.set_num_threads(spec["threads"])
    lora = None
    if spec["lora"]:
        lora = LoRAConfig(enabled=True, r=spec["lora"]["r"], alpha=spec["lora"]["alpha"],
                          dropout=spec["lora"]["dropout"])
    torch.manual_seed(spec["seed"])  # as recipes/sft.py: model-side randomness (LoRA init)
    model, _ = load_model_and_tokenizer(ModelConfig(path=spec["model_dir"]), lora)
    model.train()
    rows = [[Sample(ids, mask) for ids, mask in row] for row in spec["rows"]]
    plan = loop.StepPlan(len(rows), spec["micro_batch_size"], spec["grad_accum"], 1, spec["seed"])
    tcfg = TrainConfig(lr=spec["lr"], schedule="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                       micro_batch_size=spec["micro_batch_size"], grad_accum=spec["grad_accum"], seed=spec["seed"])
    total = spec["warmup"] + spec["steps"]
    optimizer = loop.build_optimizer(model, tcfg)
    scheduler = loop.build_scheduler(optimizer, tcfg, total)
    pad_id = spec["pad_token_id"]
    loss_fn = sft_batch_loss
    if not fused_head:
        from instructkit.losses import sft_loss
        from instructkit.models.load import causal_lm_parts, packed_hidden_states

        def loss_fn(m, b):
            _, head, cap = causal_lm_parts(m)
            return sft_loss(packed_hidden_states(m, b), b["labels"], head, cap)
    ends, cpu_ends, losses, units, tokens = [], [], [], [], []
    t_start = time.perf_counter()
    for step in range(total):  # the body of recipes/sft.py's loop, minus metrics/checkpoint I/O
        groups = plan.micro_batches(step)
        assert [i for g in groups for i in g] == spec["step_rows"][step]
        mbs = [collate_rows([rows[i] for i in g], pad_id) for g in groups]
        res = loop.optimizer_step(model, optimizer, scheduler, mbs, loss_fn, count_supervised,
                                  max_grad_norm=tcfg.max_grad_norm, token_fn=count_tokens, step=step)
        ends.append(time.perf_counter())
        cpu_ends.append(cpu_seconds())
        losses.append(res.loss)
        units.append(res.units)
        tokens.append(res.tokens)
    if units != spec["step_supervised"] or tokens != spec["step_tokens"]:
        raise RuntimeError(f"instructkit trained other tokens than planned: {units} vs {spec['step_supervised']}")
    return timed_summary(spec, ends, t_start, losses[0], {"losses": losses}, cpu_ends)


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(spec["threads"])
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    total = spec["warmup"] + spec["steps"]
    records = []
    for idx in spec["step_rows"]:  # pre-packed rows in instructkit's step order
        for i in idx:
            row = spec["rows"][i]
            ids = [t for s in row for t in s[0]]
            labels = [t if m else -100 for s in row for t, m in zip(s[0], s[1])]
            records.append({"input_ids": ids, "labels": labels, "seq_lengths": [len(s[0]) for s in row]})
    dataset = Dataset.from_list(records)
    out_dir = Path(tempfile.mkdtemp(prefix="trl_", dir=WORK))
    args = SFTConfig(
        output_dir=str(out_dir), max_steps=total, per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["grad_accum"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=spec["seed"],
        packing=False, padding_free=True, max_length=None, train_sampling_strategy="sequential",  # rows are pre-packed
        shuffle_dataset=False, dataloader_num_workers=0, logging_steps=10 ** 6, save_strategy="no", report_to=[],
        disable_tqdm=True, dataset_num_proc=None,
    )
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora"]["r"], lora_alpha=spec["lora"]["alpha"],
                                 lora_dropout=spec["lora"]["dropout"], target_modules="all-linear",
                                 task_type="CAUSAL_LM", bias="none")

    ends: list[float] = []
    cpu_ends: list[float] = []
    first = {"loss": 0.0}

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            cpu_ends.append(cpu_seconds())

    class Trainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.state.global_step == 0:  # summed over the micro-batches of step 0 = its mean loss
                loss = out[0] if isinstance(out, tuple) else out
                first["loss"] += float(loss.detach())
            return out

    torch.manual_seed(spec["seed"])
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=peft_config,
                      callbacks=[StepEnd()])
    t_start = time.perf_counter()
    trainer.train()
    return timed_summary(spec, ends, t_start, first["loss"], {}, cpu_ends)


# ---------------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------------
def run_child(side: str, spec_path: str) -> dict:
    out = Path(spec_path).with_name(f"result_{side}_{os.getpid()}.json")
    out.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--spec", spec_path, "--result", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{side} child failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny batches, 1 repetition")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--reps", type=int, default=0, help="repetitions per side, interleaved (default: per config)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads per side (1: CPU time is then a load-independent measure of the work)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per child (default: per config)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sft_vs_trl.json"))
    ap.add_argument("--sides", default="instructkit,trl",
                    help="comma-separated sides to run, interleaved: instructkit, trl, and optionally "
                         "instructkit_unfused (instructkit with the pre-fusion output-layer loss)")
    ap.add_argument("--child", choices=["instructkit", "trl", "instructkit_unfused"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.child:
        spec = json.loads(Path(a.spec).read_text())
        if a.child == "trl":
            res = child_trl(spec)
        else:
            res = child_instructkit(spec, fused_head=a.child == "instructkit")
        Path(a.result).write_text(json.dumps(res))
        return 0

    import torch
    import transformers
    import trl

    t0 = time.time()
    load_before = os.getloadavg()
    ceiling_before = matmul_gflops(a.threads)
    log(f"fp32 matmul ceiling {ceiling_before:.1f} GFLOP/s, load average {load_before}")
    results = []
    for name in a.configs.split(","):
        cfg = {**CONFIGS[name], **(QUICK if a.quick else {}), **({"steps": a.steps} if a.steps else {})}
        reps = a.reps or cfg["reps"]
        load_cfg = os.getloadavg()
        log(f"{name}: preparing")
        prep = prepare(name, cfg, a.threads, a.seed)
        side_names = a.sides.split(",")
        runs: dict[str, list[dict]] = {side: [] for side in side_names}
        for r in range(reps):
            order = side_names if r % 2 == 0 else side_names[::-1]
            for side in order:
                res = run_child(side, prep["spec_path"])
                runs[side].append(res)
                log(f"{name} rep {r} {side}: {res['tokens_per_s']:.1f} tok/s ({res['tokens_per_cpu_s']:.1f}/CPU-s), "
                    f"{res['supervised_tokens_per_s']:.1f} "
                    f"sup tok/s, peak {res['peak_rss_mib']:.0f} MiB, first loss {res['first_step_loss']:.6f}")
        sides = {}
        for side, rs in runs.items():
            sides[side] = {
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
                "supervised_tokens_per_s": statistics.median(x["supervised_tokens_per_s"] for x in rs),
                "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in rs),
                "tokens_per_cpu_s": statistics.median(x["tokens_per_cpu_s"] for x in rs),
                "first_step_loss": rs[0]["first_step_loss"],
                "first_step_losses_all_reps": [x["first_step_loss"] for x in rs],
                "tokens_per_s_all_reps": [round(x["tokens_per_s"], 2) for x in rs],
            }
        ik, tr = sides["instructkit"], sides["trl"]
        results.append({
            "config": name, "model": cfg["model"], "lora": cfg["lora"], "params": prep["n_params"],
            "tokenizer": prep["tokenizer"], "micro_batch_size": cfg["micro_batch_size"],
            "grad_accum": cfg["grad_accum"], "pack_length": cfg["pack_length"], "warmup_steps": cfg["warmup"],
            "timed_steps": cfg["steps"], "reps": reps, "packed_rows": prep["n_rows"],
            "tokens_per_step": prep["step_tokens"], "supervised_tokens_per_step": prep["step_supervised"],
            "instructkit": ik, "trl": tr,
            "ratio_tokens_per_s": ik["tokens_per_s"] / tr["tokens_per_s"],
            "ratio_supervised_tokens_per_s": ik["supervised_tokens_per_s"] / tr["supervised_tokens_per_s"],
            "ratio_peak_rss": ik["peak_rss_mib"] / tr["peak_rss_mib"],
            "ratio_tokens_per_cpu_s": ik["tokens_per_cpu_s"] / tr["tokens_per_cpu_s"],
            # per interleaved pair (repetition r of each side ran back to back): the steadiest view on a shared machine
            "ratio_tokens_per_s_per_rep": [round(x["tokens_per_s"] / y["tokens_per_s"], 3)
                                           for x, y in zip(runs["instructkit"], runs["trl"])],
            "first_step_loss_abs_diff": abs(ik["first_step_loss"] - tr["first_step_loss"]),
            "load_average_before": load_cfg, "load_average_after": os.getloadavg(),
        })
        if "instructkit_unfused" in sides:  # the fused output layer's own effect, same run, interleaved
            un = sides["instructkit_unfused"]
            results[-1].update({
                "instructkit_unfused": un,
                "ratio_fused_vs_unfused_tokens_per_s": ik["tokens_per_s"] / un["tokens_per_s"],
                "ratio_fused_vs_unfused_tokens_per_cpu_s": ik["tokens_per_cpu_s"] / un["tokens_per_cpu_s"],
                "ratio_fused_vs_unfused_per_rep": [round(x["tokens_per_s"] / y["tokens_per_s"], 3)
                                                   for x, y in zip(runs["instructkit"], runs["instructkit_unfused"])],
                "ratio_unfused_vs_trl_tokens_per_s": un["tokens_per_s"] / tr["tokens_per_s"],
                "first_step_loss_fused_vs_unfused_abs_diff": abs(ik["first_step_loss"] - un["first_step_loss"]),
            })
    ceiling_after = matmul_gflops(a.threads)
    ceiling = max(ceiling_before, ceiling_after)
    for res in results:
        for side in [k for k in ("instructkit", "trl", "instructkit_unfused") if k in res]:
            res[side]["mfu"] = 6 * res["params"] * res[side]["tokens_per_s"] / (ceiling * 1e9)
    summary = {
        "benchmark": "sft_vs_trl", "command": "HF_HUB_OFFLINE=1 python bench/sft_vs_trl.py" +
        (" --quick" if a.quick else "") + (f" --configs {a.configs}" if a.configs != ",".join(CONFIGS) else "") +
        (f" --sides {a.sides}" if a.sides != "instructkit,trl" else "") + (f" --reps {a.reps}" if a.reps else "") +
        (f" --threads {a.threads}" if a.threads != 2 else "") + (f" --steps {a.steps}" if a.steps else ""),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 1),
        "threads": a.threads, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "matmul_gflops_before": ceiling_before, "matmul_gflops_after": ceiling_after, "matmul_ceiling_gflops": ceiling,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "python": platform.python_version()},
        "data": str(DATA), "configs": results,
    }
    print(f"{'config':18} {'side':12} {'tok/s':>8} {'sup tok/s':>9} {'peak MiB':>9} {'MFU':>6} {'first loss':>11}")
    for res in results:
        for side in [k for k in ("instructkit", "trl", "instructkit_unfused") if k in res]:
            s = res[side]
            print(f"{res['config']:18} {side:12} {s['tokens_per_s']:8.1f} {s['supervised_tokens_per_s']:9.1f} "
                  f"{s['peak_rss_mib']:9.0f} {s['mfu']:6.3f} {s['first_step_loss']:11.6f}")
        print(f"{res['config']:18} {'ratio ik/trl':12} {res['ratio_tokens_per_s']:8.2f} "
              f"(per CPU-s {res['ratio_tokens_per_cpu_s']:.2f}) "
              f"{res['ratio_supervised_tokens_per_s']:9.2f} {res['ratio_peak_rss']:9.2f} {'':6} "
              f"|d|={res['first_step_loss_abs_diff']:.2e}")
        if "instructkit_unfused" in res:
            print(f"{res['config']:18} {'fused/unfused':12} {res['ratio_fused_vs_unfused_tokens_per_s']:8.2f} "
                  f"(per CPU-s {res['ratio_fused_vs_unfused_tokens_per_cpu_s']:.2f}; per rep "
                  f"{res['ratio_fused_vs_unfused_per_rep']}) "
                  f"|d|={res['first_step_loss_fused_vs_unfused_abs_diff']:.2e}")
    print(f"matmul ceiling {ceiling:.1f} GFLOP/s; load average {load_before} -> {summary['load_average_after']}")
    if not a.quick:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        # one object per (configuration, threads); a run of some configurations keeps the others' latest objects
        for res in results:
            for k in ("command", "date_utc", "seconds", "threads", "matmul_gflops_before", "matmul_gflops_after",
                      "matmul_ceiling_gflops", "versions", "data"):
                res[k] = summary[k]
        old = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
        done = {(r["config"], r["threads"]) for r in results}
        merged = [r for r in old.get("configs", []) if (r.get("config"), r.get("threads", 2)) not in done] + results
        # the objects a rerun replaces move to "history" (newest last), so that no measured run is lost
        history = old.get("history", []) + [r for r in old.get("configs", [])
                                            if (r.get("config"), r.get("threads", 2)) in done]
        Path(a.out).write_text(json.dumps({"benchmark": "sft_vs_trl", "configs": merged, "history": history},
                                          indent=1))
        log(f"wrote {a.out}")
    else:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
