"""RLHF side by side vs TRL 1.16: DPO and ORPO (pairs/s), KTO (examples/s) and the RL rollout-plus-update loop (rollout
tokens/s, iterations/min).

    pip install -e '.[bench]'            # TRL, for the peer side only
    HF_HUB_OFFLINE=1 python bench/rlhf.py [--only dpo|kto|orpo|rl|grpo|all] [--steps 12] [--reps 3]
    HF_HUB_OFFLINE=1 python bench/rlhf.py --only rl [--rl-configs tiny,smollm2-lora] [--reps 3]
    HF_HUB_OFFLINE=1 python bench/rlhf.py --only grpo [--rl-configs tiny,smollm2-lora] [--reps 3]   # or --tiny

Results go to bench/results/rlhf.json: {"dpo": {...}, "kto": {...}, "orpo": {...}, "rl": {...}, "grpo": {...}}; a run
of one part keeps the other parts' objects.

DPO. Both sides: the same Llama built from a config (hidden 256, 4 layers, the tiny ChatML BPE tokenizer, the output
layer widened to 32,768 rows so its cost is that of a real vocabulary, as in SmolLM2's 49k), full fine-tuning,
fp32, batch 8 pairs, beta 0.1, sigmoid loss, reference log-probs precomputed once, constant lr, no gradient
checkpointing, no bf16 (TRL's defaults turned off: on this CPU bf16 is ~37x slower), 2 threads. Pairs have long
prompts (~100 tokens) and short responses (~20 tokens), the usual shape of preference data, where scoring only the
response positions matters. Timed: the whole training call (reference precompute + steps), interleaved repetitions,
median. Same work: the first-step loss is log 2 on both sides and the first-step chosen/rejected log-probs are printed
side by side.

KTO and ORPO (`--only kto`, `--only orpo`): instructkit `kto` / `orpo` (recipes/kto.py, recipes/orpo.py, called
in-process as the DPO part calls `dpo`) vs TRL 1.16's KTOTrainer / ORPOTrainer (trl.experimental.orpo), on the DPO
part's model (hidden 256, 4 layers, output layer widened to 32,768 rows), full fine-tuning, fp32, 2 threads, no
gradient checkpointing, no bf16, lr 1e-4 constant, grad clip 1.0, the same steps and batch (8 examples for KTO, 8 pairs
for ORPO), KTO beta 0.1 with desirable and undesirable weights 1, ORPO lambda 0.1 (TRL's ORPOConfig.beta). Timed as
the DPO part: the whole training call, interleaved repetitions after a warm-up, median; KTO in examples/s, ORPO in
pairs/s. Same batches: instructkit visits the rows in its seeded epoch order (training/packing.epoch_order with
data.seed 0); TRL reads a copy of the file written in that order, sequentially (train_sampling_strategy=sequential),
so every step trains both sides on the same examples. Same work, checked on the first step (printed side by side
and kept under "agreement"):
- KTO data: unpaired examples, half desirable (a pair's chosen response), half undesirable (another pair's rejected
  one), each with its own long prompt; given to TRL as text rendered with the chat template (prompt up to the
  assistant header, completion up to its end-of-turn token), so both sides score the same token ids (TRL's
  conversational path would also score the template's newline after the end-of-turn token). Both sides compute reference log-probs once before training (TRL
  precompute_ref_log_probs=True), for the matched and the mismatched completions. First step: policy = reference, so
  the KL baseline z0 is 0 and the loss is (lambda_D + lambda_U) / 2 averaged = 0.5 on both sides; the desirable and
  undesirable mean summed log-probs of the first batch agree, so both scored the same tokens. What cannot be matched:
  which mismatched completion each example gets for z0 (instructkit: a seeded derangement over the whole data set, z0
  over the whole step; TRL: completions rotated by one within each batch), so from step 2 on z0 differs slightly; and
  TRL runs the mismatched forward with autograd on (its result is detached), ours without.
- ORPO data: the DPO part's pairs with every chosen response of the same token count, given to TRL as text rendered
  with the chat template (prompt up to the assistant header, response up to its end-of-turn token) and a tokenizer
  without a bos token, so that ORPOTrainer's tokenisation (which appends eos after the template's trailing newline
  and prepends bos to every prompt) yields the same token ids as ours. The odds-ratio term, the mean
  log odds ratio and the chosen / rejected per-token mean log-probs of the first step agree. The total first loss does
  not, by definition: TRL's SFT term is the token-mean NLL over the prompt AND the chosen response (ORPOTrainer's
  concatenated_forward labels every attended token), ours over the chosen response alone (the paper's L_SFT on y_w);
  both are recorded (first_nll).

RL. TRL 1.16 ships no PPO (PPOTrainer was removed; trl.experimental has none either), so the peer is TRL's
GRPOTrainer, the nearest rollout-plus-update loop. The algorithms differ (stated in bench/RESULTS.md): GRPO has no value
model, samples G completions per prompt and normalises rewards within each group; our `ppo` recipe has a value head,
GAE, whitened advantages and the KL penalty folded into per-token rewards. The work per iteration is made the same as
far as that allows:
- the same model folder, fp32, 2 threads; TRL with bf16 and gradient checkpointing off (its best CPU settings);
- the same prompts: 2 alpaca prompts; TRL samples each 4 times (num_generations=4), ours too (samples_per_prompt=4,
  rollout_batch_size=8): identical prompt token ids on both sides (checked, the run fails otherwise); HF `generate`
  on TRL's side (no vLLM here), instructkit's Engine on ours. Ours runs each prompt's forward once for its 4 rows
  (rollout prefill, scoring, updates); TRL runs it per row;
- the same sampling: temperature 1.0, no top-k/top-p, max 32 new tokens, stop at end-of-turn;
- the same reward: `instructkit.rl.rollout:token_fraction_reward` (fraction of completion tokens with an even id);
- the same updates: ours ppo_epochs=2 x 2 mini-batches of 4 = 4 AdamW steps per iteration; TRL
  per_device_train_batch_size=4, steps_per_generation=2, num_iterations=2, gradient_accumulation_steps=1 = the same 4
  steps on the same 8 completions; both compute old log-probs once per iteration (TRL does when num_iterations > 1)
  and reference log-probs (TRL beta = our kl_coef = 0.05, so its reference model runs too); lr 1e-5 constant, clip 1.0;
- LoRA (real config): r=16, alpha=32, dropout 0, all linear layers; reference = the adapter disabled on both sides.
Each (side, repetition) is its own subprocess (clean peak RSS), interleaved ik, trl, ik, trl, ... Iteration 0 is a
warm-up; the timed window runs from the start of iteration 1's generation to the end of the last optimizer step.
Rollout tokens/s = completion tokens (stop token included, padding not) / seconds inside the generate calls.

GRPO (`--only grpo`): instructkit `grpo` vs TRL's GRPOTrainer, the same algorithm, on the RL part's models, prompts,
reward and timing (same children, same timed window). Same work per iteration: 2 prompts x G=4 samples; 2 optimizer
steps on the whole rollout batch of 8 (ours updates_per_batch=2 over one micro-batch of 8; TRL
per_device_train_batch_size=8, steps_per_generation=1, num_iterations=2), old log-probs once per batch on both sides;
group advantages mean-centred and divided by the group std (ours advantage=grpo, scale_by_std; TRL
scale_rewards=group); the clipped surrogate with eps 0.2 on both sides (ours clip_low = clip_high = 0.2, TRL epsilon =
epsilon_high = 0.2); token-mean aggregation (ours aggregation=token, TRL loss_type=dapo); k3 KL to the reference with
beta 0.05 (the adapter disabled under LoRA, a frozen copy otherwise, on both sides); no dynamic sampling (TRL has
none). `--tiny` is a dry run that checks the script end to end in about a minute: the tiny random model
(models/tiny.py, its 512-token ChatML tokenizer), 2 iterations of 8 new tokens, 1 repetition, nothing written to
results/ (timings from it mean nothing).
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


def pref_model(work: Path, vocab: int) -> tuple[Path, int]:
    """The preference parts' model: the tiny Llama (hidden 256, 4 layers) with the output layer widened to ``vocab``
    rows (0: the tokenizer's 512); (folder, parameter count)."""
    from transformers import AutoModelForCausalLM

    from instructkit.models.tiny import create_tiny

    model_dir = create_tiny(work / "model", seed=0, hidden_size=256, num_layers=4)
    if vocab:  # a real model's output-layer cost: rows beyond the tokenizer are never targets, but cost FLOPs
        m = AutoModelForCausalLM.from_pretrained(model_dir)
        torch.manual_seed(0)
        m.resize_token_embeddings(vocab, mean_resizing=False)
        m.save_pretrained(model_dir, safe_serialization=True)
    return model_dir, sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def run_dpo(args) -> dict:
    """The DPO comparison (instructkit dpo vs TRL DPOTrainer); returns the summary."""
    torch.set_num_threads(2)

    work = Path(tempfile.mkdtemp(prefix="bench_rlhf_"))
    model_dir, n_params = pref_model(work, args.vocab)
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
                        "command": "HF_HUB_OFFLINE=1 python bench/rlhf.py --only dpo"}
    print(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return summary


# =====================================================================================================================
# KTO and ORPO: instructkit `kto` / `orpo` vs TRL 1.16 KTOTrainer / ORPOTrainer (experimental), the DPO part's model
# =====================================================================================================================
def make_unpaired(n: int, seed: int = 0) -> list[dict]:
    """``n`` unpaired examples in TRL's conversational prompt/completion/label form (which instructkit reads as the kto
    format): the DPO part's pairs, each giving its chosen response (desirable) or its rejected one (undesirable),
    alternately; every prompt is distinct."""
    return [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
            for i, p in enumerate(make_pairs(n, seed))]


def make_orpo_pairs(n: int, seed: int = 0) -> list[dict]:
    """The DPO part's pairs, but every chosen response is "Yes, " plus the same 10 words in a shuffled order: all
    chosen responses have the same token count (the tokenizer splits at spaces), so the SFT term's token mean over
    the batch (TRL) and mean over pairs of per-response token means (instructkit) weigh tokens alike."""
    rng = random.Random(seed + 1)
    words = [rng.choice(WORDS) for _ in range(10)]
    out = make_pairs(n, seed)
    for p in out:
        rng.shuffle(words)
        p["chosen"] = [{"role": "assistant", "content": "Yes, " + " ".join(words)}]
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def capture_first_call(module, name: str, record: dict, fn):
    """Wrap ``module.name`` (a loss the recipe calls); ``fn(args, result)`` fills ``record`` on the first call made
    with gradients (the first training micro-batch). Returns the function that restores the original."""
    orig = getattr(module, name)

    def wrapped(*a, **kw):
        res = orig(*a, **kw)
        if not record and torch.is_grad_enabled() and a[0].requires_grad:
            record.update(fn(a, res))
        return res

    setattr(module, name, wrapped)
    return lambda: setattr(module, name, orig)


def ik_pref_overrides(model_dir: Path, out: Path, steps: int, batch: int) -> list[str]:
    return [f"model.path={model_dir}", f"train.output_dir={out}", "train.run_name=ik", f"train.max_steps={steps}",
            f"train.micro_batch_size={batch}", "train.grad_accum=1", "train.lr=0.0001", "train.schedule=constant",
            "train.resume=never", "train.max_grad_norm=1.0", "train.save_every=0", "train.seed=0", "data.seed=0",
            "data.validation_fraction=0", "data.max_length=512"]


def ik_first_record(out: Path) -> dict:
    recs = [json.loads(x) for x in (out / "ik" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return next(r for r in recs if r.get("step") == 1 and "loss" in r)


def run_instructkit_kto(model_dir: Path, data: Path, out: Path, steps: int, batch: int, beta: float) -> dict:
    from instructkit.config import DataSource, KTOConfig, load_config
    from instructkit.recipes import kto

    cfg = load_config(KTOConfig, None, ik_pref_overrides(model_dir, out, steps, batch)
                      + [f"beta={beta}", "desirable_weight=1.0", "undesirable_weight=1.0"])
    cfg.data.sources = [DataSource(path=str(data))]

    def first(a, res):  # kto_loss(policy_logps, ref_logps, desirable, kl_baseline, ...)
        pol, d = a[0].detach(), a[2].to(torch.bool)
        return {"first_logps_desirable": float(pol[d].mean()), "first_logps_undesirable": float(pol[~d].mean()),
                "first_kl": float(a[3])}

    captured: dict = {}
    restore = capture_first_call(kto, "kto_loss", captured, first)
    try:
        t0 = time.perf_counter()
        kto.main(cfg)
        seconds = time.perf_counter() - t0
    finally:
        restore()
    return {"seconds": seconds, "first_loss": ik_first_record(out)["loss"], **captured}


def run_trl_kto(model_dir: Path, data: Path, out: Path, steps: int, batch: int, beta: float) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = load_dataset("json", data_files=str(data), split="train")
    # The same tokens as instructkit: the prompt rendered by the chat template up to the assistant header, the
    # completion up to its end-of-turn token (TRL's conversational path also scores the template's trailing newline)
    ds = ds.map(lambda r: {"prompt": tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
                           "completion": r["completion"][0]["content"] + tok.eos_token})
    args = KTOConfig(output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler_type="constant",
                     warmup_steps=0, beta=beta, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
                     precompute_ref_log_probs=True, train_sampling_strategy="sequential", bf16=False,
                     gradient_checkpointing=False, max_length=512, logging_steps=1, report_to=[],
                     save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, max_grad_norm=1.0,
                     disable_tqdm=True)
    trainer = KTOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    first = next(h for h in trainer.state.log_history if "loss" in h)
    return {"seconds": seconds, "first_loss": first["loss"], "first_logps_desirable": first.get("logps/chosen"),
            "first_logps_undesirable": first.get("logps/rejected"), "first_kl": first.get("kl")}


def run_instructkit_orpo(model_dir: Path, data: Path, out: Path, steps: int, batch: int, lam: float) -> dict:
    from instructkit.config import DataSource, ORPOConfig, load_config
    from instructkit.recipes import orpo

    cfg = load_config(ORPOConfig, None, ik_pref_overrides(model_dir, out, steps, batch) + [f"lam={lam}"])
    cfg.data.sources = [DataSource(path=str(data))]

    def first(a, res):  # orpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, lam)
        return {"first_avg_logps_chosen": float(a[0].detach().mean()),
                "first_avg_logps_rejected": float(a[1].detach().mean())}

    captured: dict = {}
    restore = capture_first_call(orpo, "orpo_loss", captured, first)
    try:
        t0 = time.perf_counter()
        orpo.main(cfg)
        seconds = time.perf_counter() - t0
    finally:
        restore()
    rec = ik_first_record(out)
    return {"seconds": seconds, "first_loss": rec["loss"], "first_nll": rec["nll"], "first_or_loss": rec["or_loss"],
            "first_log_odds": rec["log_odds_ratio"], **captured}


def run_trl_orpo(model_dir: Path, data: Path, out: Path, steps: int, batch: int, lam: float) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = load_dataset("json", data_files=str(data), split="train")
    # The same tokens as instructkit: the prompt rendered by the chat template up to the assistant header, each
    # response up to its end-of-turn token (TRL's conversational path would add the template's trailing newline and
    # then an eos after it); no bos (the template never renders it; ORPOTrainer prepends bos_token_id to every prompt)
    ds = ds.map(lambda r: {"prompt": tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
                           "chosen": r["chosen"][0]["content"] + tok.eos_token,
                           "rejected": r["rejected"][0]["content"] + tok.eos_token})
    tok.bos_token = None
    args = ORPOConfig(output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=batch,
                      gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler_type="constant",
                      warmup_steps=0, beta=lam, train_sampling_strategy="sequential", bf16=False,
                      gradient_checkpointing=False, max_length=512, logging_steps=1, report_to=[],
                      save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, max_grad_norm=1.0,
                      disable_tqdm=True, remove_unused_columns=False)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    first = next(h for h in trainer.state.log_history if "loss" in h)
    # TRL's "log_odds_ratio" is mean log sigmoid(log odds ratio) (minus the OR term), "log_odds_chosen" the mean ratio
    return {"seconds": seconds, "first_loss": first["loss"], "first_nll": first.get("nll_loss"),
            "first_or_loss": -first["log_odds_ratio"] if "log_odds_ratio" in first else None,
            "first_log_odds": first.get("log_odds_chosen"),
            "first_avg_logps_chosen": first.get("logps/chosen"), "first_avg_logps_rejected": first.get("logps/rejected")}


PREF_AGREE = {"kto": ("first_loss", "first_logps_desirable", "first_logps_undesirable", "first_kl"),
              "orpo": ("first_or_loss", "first_log_odds", "first_avg_logps_chosen", "first_avg_logps_rejected")}


def run_pref(args, algo: str) -> dict:
    """The KTO or ORPO comparison; returns the summary (the first-step numbers of both sides under "agreement")."""
    torch.set_num_threads(2)
    from instructkit.training.packing import epoch_order

    work = Path(tempfile.mkdtemp(prefix=f"bench_rlhf_{algo}_"))
    model_dir, n_params = pref_model(work, args.vocab)
    n = args.steps * args.batch
    records = make_unpaired(n) if algo == "kto" else make_orpo_pairs(n)
    # instructkit visits the rows in epoch_order(n, data.seed=0, epoch 0); TRL reads them sequentially from a file in
    # that order: both sides train on the same examples at every step, in the same batches.
    data_ik = write_jsonl(work / "data_ik.jsonl", records)
    data_trl = write_jsonl(work / "data_trl.jsonl", [records[i] for i in epoch_order(n, 0, 0)])
    coef = args.kto_beta if algo == "kto" else args.orpo_lambda
    sides = {"kto": (run_instructkit_kto, run_trl_kto), "orpo": (run_instructkit_orpo, run_trl_orpo)}[algo]
    results: dict[str, list[dict]] = {"instructkit": [], "trl": []}
    sides[0](model_dir, data_ik, work / "w", 1, args.batch, coef)  # warm-up
    for rep in range(args.reps):
        for name, fn, data in (("instructkit", sides[0], data_ik), ("trl", sides[1], data_trl)):
            d = work / f"{name}_{rep}"
            r = fn(model_dir, data, d, args.steps, args.batch, coef)
            results[name].append(r)
            print(algo, name, rep, json.dumps(r), flush=True)
            shutil.rmtree(d, ignore_errors=True)
    unit = "examples_per_s" if algo == "kto" else "pairs_per_s"
    summary: dict = {}
    for name, runs in results.items():
        med = statistics.median(r["seconds"] for r in runs)
        summary[name] = {"median_seconds": med, unit: n / med, **{k: v for k, v in runs[0].items() if k != "seconds"},
                         "all_seconds": [r["seconds"] for r in runs]}
    summary["speedup"] = summary["trl"]["median_seconds"] / summary["instructkit"]["median_seconds"]
    summary["agreement"] = {k: {"instructkit": summary["instructkit"].get(k), "trl": summary["trl"].get(k)}
                            for k in PREF_AGREE[algo]}
    for k, v in summary["agreement"].items():
        if v["instructkit"] is not None and v["trl"] is not None:
            v["abs_diff"] = abs(v["instructkit"] - v["trl"])
    coef_name = "beta" if algo == "kto" else "lambda"
    summary["setup"] = {"params": n_params, "steps": args.steps, "batch": args.batch, "unit": unit.split("_")[0],
                        coef_name: coef, "reps": args.reps, "threads": 2, "vocab_rows": args.vocab,
                        "torch": torch.__version__, "trl": __import__("trl").__version__,
                        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "command": f"HF_HUB_OFFLINE=1 python bench/rlhf.py --only {algo} --steps {args.steps}"
                                   f" --batch {args.batch} --reps {args.reps}",
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return summary



# =====================================================================================================================
# RL: instructkit `ppo` vs TRL 1.16 GRPOTrainer, the rollout-plus-update loop
# =====================================================================================================================
ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "lf_alpaca_en_demo.json"  # ../shared beside the repository
RL_WORK = Path(tempfile.gettempdir()) / "instructkit_bench_rlhf_rl"
# The DPO part's architecture (hidden 256, 4 layers) on SmolLM2's real 49,152-token tokenizer instead of the widened
# tiny one: rollouts sample from the whole output layer, and ids beyond the tiny tokenizer's 512 would decode to
# nothing.
# 49152*256 = 12.58M tied embedding + 4 * (4*256^2 + 3*256*768 + 2*256) = 3.41M, + 256 final norm = 15.99M.
SMALL_LLAMA = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)
RL_CONFIGS = {
    "tiny": dict(model="llama16m", lora=None, iterations=4),
    "smollm2-lora": dict(model="smollm2-135m-instruct", lora=dict(r=16, alpha=32, dropout=0.0), iterations=3),
}
RL_SHAPE = dict(n_prompts=2, num_generations=4, max_new_tokens=32, temperature=1.0, ppo_epochs=2, mini_batch=4,
                lr=1e-5, kl_coef=0.05)


def rl_log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rl_prompts(n: int) -> list[list[dict]]:
    """The first ``n`` alpaca records whose instruction + input is 300-400 characters, as user turns (~80-100 tokens
    with the chat template)."""
    recs = json.loads(ALPACA.read_text())
    out = []
    for r in recs:
        text = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        if 300 <= len(text) <= 400:
            out.append([{"role": "user", "content": text}])
        if len(out) == n:
            return out
    raise SystemExit("not enough alpaca prompts of 300-400 characters")


def rl_prepare(name: str, cfg: dict, threads: int, seed: int) -> dict:
    """Model folder both sides load, the prompts, the reward's token set; written to a spec file for the children."""
    from instructkit.models.zoo import cache_dir, is_prepared

    work = RL_WORK / name
    work.mkdir(parents=True, exist_ok=True)
    if not is_prepared("smollm2-135m-instruct"):
        raise SystemExit("run `instructkit models prepare smollm2-135m-instruct` first (model or tokenizer)")
    if cfg["model"] == "llama16m":
        from _common import random_llama_with_smollm2_tokenizer

        model_dir = random_llama_with_smollm2_tokenizer(work, SMALL_LLAMA, seed)
    else:
        model_dir = cache_dir(cfg["model"])
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    mc = AutoConfig.from_pretrained(model_dir)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise SystemExit(f"{model_dir}: needs a pad token distinct from eos (both sides load the folder as is)")
    prompts = rl_prompts(RL_SHAPE["n_prompts"])
    spec = {"name": name, "model_dir": str(model_dir), "lora": cfg["lora"], "iterations": cfg["iterations"],
            "threads": threads, "seed": seed, **RL_SHAPE, "prompts": prompts,
            "rollouts": RL_SHAPE["n_prompts"] * RL_SHAPE["num_generations"],
            "reward_token_ids": list(range(0, mc.vocab_size, 2)), "work": str(work)}
    spec["minibatches"] = spec["rollouts"] // spec["mini_batch"]
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    return {"spec_path": str(path), "model_dir": str(model_dir), "vocab": mc.vocab_size}


def _gen_summary(spec: dict, gens: list[dict], step_ends: list[float], n_steps: int, t0: float) -> dict:
    """Timed window: iteration 1's generation start .. the last optimizer step's end (iteration 0 is the warm-up)."""
    k = spec["iterations"]
    if len(gens) != k:
        raise RuntimeError(f"{len(gens)} generation calls for {k} iterations")
    steps_per_it = spec["ppo_epochs"] * spec["minibatches"]
    if n_steps != k * steps_per_it:
        raise RuntimeError(f"{n_steps} optimizer steps, expected {k} x {steps_per_it}")
    window = step_ends[-1] - gens[1]["t0"]
    timed = gens[1:]
    gen_s = sum(g["t1"] - g["t0"] for g in timed)
    tokens = sum(g["tokens"] for g in timed)
    return {"iterations_timed": k - 1, "window_s": window, "iterations_per_min": (k - 1) / window * 60.0,
            "seconds_per_iteration": window / (k - 1), "gen_seconds": gen_s, "completion_tokens": tokens,
            "rollout_tokens_per_s": tokens / gen_s, "loop_completion_tokens_per_s": tokens / window,
            "gen_share": gen_s / window, "completion_tokens_per_iteration": [g["tokens"] for g in gens],
            "optimizer_steps": n_steps, "optimizer_steps_per_iteration": steps_per_it,
            "prompt_ids_sorted": sorted(gens[0]["prompt_ids"]), "setup_s": gens[0]["t0"] - t0,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def rl_child_instructkit(spec: dict) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(spec["threads"])
    import instructkit.generation.engine as engine_mod
    import instructkit.training.loop as loop_mod
    from instructkit.config import DataSource, PPOConfig, load_config
    from instructkit.recipes import ppo

    gens: list[dict] = []
    step_ends: list[float] = []
    orig_generate, orig_step = engine_mod.Engine.generate, loop_mod.optimizer_step

    def timed_generate(self, prompts, params, *a, **kw):
        t0 = time.perf_counter()
        outs = orig_generate(self, prompts, params, *a, **kw)
        gens.append({"t0": t0, "t1": time.perf_counter(), "tokens": sum(len(o.token_ids) for o in outs),
                     "prompt_ids": [list(map(int, p)) for p in prompts]})
        return outs

    def timed_step(*a, **kw):
        res = orig_step(*a, **kw)
        step_ends.append(time.perf_counter())
        return res

    engine_mod.Engine.generate, loop_mod.optimizer_step = timed_generate, timed_step
    work = Path(spec["work"]) / "ik"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "prompts.jsonl"  # every prompt in each rollout batch, num_generations responses each
    data.write_text("".join(json.dumps({"messages": p + [{"role": "assistant", "content": "-"}]}) + "\n"
                            for p in spec["prompts"]))
    lora = spec["lora"]
    overrides = [f"model.path={spec['model_dir']}", f"train.output_dir={work}", "train.run_name=ik",
                 f"train.max_steps={spec['iterations']}", f"train.micro_batch_size={spec['mini_batch']}",
                 "train.grad_accum=1", f"train.lr={spec['lr']}", "train.schedule=constant", "train.resume=never",
                 "train.max_grad_norm=1.0", "train.save_every=0", f"train.seed={spec['seed']}",
                 f"train.threads={spec['threads']}", "data.max_length=512", "data.validation_fraction=0",
                 f"rollout_batch_size={spec['rollouts']}", f"samples_per_prompt={spec['num_generations']}",
                 f"ppo_epochs={spec['ppo_epochs']}",
                 f"max_new_tokens={spec['max_new_tokens']}", f"temperature={spec['temperature']}",
                 f"kl_coef={spec['kl_coef']}", "value_model=head",
                 "reward_function=instructkit.rl.rollout:token_fraction_reward"]
    if lora:
        overrides += ["lora.enabled=true", f"lora.r={lora['r']}", f"lora.alpha={lora['alpha']}",
                      f"lora.dropout={lora['dropout']}"]
    cfg = load_config(PPOConfig, None, overrides)
    cfg.data.sources = [DataSource(path=str(data))]
    cfg.reward_function_kwargs = {"token_ids": spec["reward_token_ids"]}
    result = ppo.main(cfg)
    out = _gen_summary(spec, gens, step_ends, len(step_ends), t_start)
    out["first_score"] = result["first"].get("score")
    return out


def rl_child_trl(spec: dict) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from instructkit.rl.rollout import token_fraction_reward

    wanted = spec["reward_token_ids"]

    def even_token_reward(prompts, completions, completion_ids, **kw):  # the same rule as our side, by name for TRL
        return token_fraction_reward(prompts, completions, completion_ids, token_ids=wanted)

    gens: list[dict] = []
    step_ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            step_ends.append(time.perf_counter())

    work = Path(spec["work"]) / "trl"
    shutil.rmtree(work, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        lo = spec["lora"]
        peft_config = LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    steps_per_it = spec["ppo_epochs"] * spec["minibatches"]
    args = GRPOConfig(output_dir=str(work), max_steps=spec["iterations"] * steps_per_it,
                      per_device_train_batch_size=spec["mini_batch"], gradient_accumulation_steps=1,
                      steps_per_generation=spec["minibatches"], num_iterations=spec["ppo_epochs"],
                      num_generations=spec["num_generations"], max_completion_length=spec["max_new_tokens"],
                      temperature=spec["temperature"], top_p=1.0, top_k=0, beta=spec["kl_coef"],
                      learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      max_grad_norm=1.0, bf16=False, gradient_checkpointing=False, use_cpu=True, report_to=[],
                      save_strategy="no", disable_tqdm=True, seed=spec["seed"], dataloader_num_workers=0,
                      logging_steps=steps_per_it, **spec.get("trl_extra", {}))
    ds = Dataset.from_list([{"prompt": p} for p in spec["prompts"]])
    trainer = GRPOTrainer(model=model, reward_funcs=even_token_reward, args=args, train_dataset=ds,
                          processing_class=tok, peft_config=peft_config, callbacks=[StepEnds()])
    orig = trainer._generate_single_turn

    def timed_single_turn(prompt_ids, *a, **kw):
        t0 = time.perf_counter()
        completion_ids, logprobs = orig(prompt_ids, *a, **kw)
        gens.append({"t0": t0, "t1": time.perf_counter(), "tokens": sum(len(c) for c in completion_ids),
                     "prompt_ids": [list(map(int, p)) for p in prompt_ids]})
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_single_turn
    trainer.train()
    out = _gen_summary(spec, gens, step_ends, trainer.state.global_step, t_start)
    first = next((h for h in trainer.state.log_history if "reward" in h), {})
    out["first_score"] = first.get("reward")
    shutil.rmtree(work, ignore_errors=True)
    return out


# =====================================================================================================================
# GRPO: instructkit `grpo` vs TRL 1.16 GRPOTrainer, the same algorithm
# =====================================================================================================================
GRPO_SHAPE = dict(n_prompts=2, num_generations=4, max_new_tokens=32, temperature=1.0, updates_per_batch=2, lr=1e-5,
                  kl_coef=0.05, clip=0.2)


def grpo_spec_fields(shape: dict) -> dict:
    """The spec keys both children read, in the RL part's names: one mini-batch of the whole rollout batch, updated
    ``updates_per_batch`` times (TRL: steps_per_generation=1, num_iterations=updates_per_batch)."""
    rollouts = shape["n_prompts"] * shape["num_generations"]
    return {**shape, "rollouts": rollouts, "mini_batch": rollouts, "minibatches": 1,
            "ppo_epochs": shape["updates_per_batch"],
            "trl_extra": {"loss_type": "dapo", "epsilon": shape["clip"], "epsilon_high": shape["clip"],
                          "scale_rewards": "group"}}


def grpo_prepare(name: str, cfg: dict, shape: dict, threads: int, seed: int) -> dict:
    """Spec file for the children: the RL part's model for ``name``, or (``tiny``) the tiny random model."""
    if name != "tiny-dry-run":
        prep = rl_prepare(name, cfg, threads, seed)
        spec = json.loads(Path(prep["spec_path"]).read_text())
    else:
        from transformers import AutoTokenizer

        from instructkit.models.tiny import create_tiny

        work = RL_WORK / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        model_dir = create_tiny(work / "model", seed=seed)
        tok = AutoTokenizer.from_pretrained(model_dir)
        if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
            raise SystemExit(f"{model_dir}: needs a pad token distinct from eos")
        spec = {"name": name, "model_dir": str(model_dir), "lora": cfg["lora"], "iterations": cfg["iterations"],
                "threads": threads, "seed": seed, "prompts": rl_prompts(shape["n_prompts"]),
                "reward_token_ids": list(range(0, len(tok), 2)), "work": str(work)}
        prep = {"model_dir": str(model_dir), "vocab": len(tok)}
    spec.update(grpo_spec_fields(shape), iterations=cfg["iterations"], name=f"grpo-{name}")
    path = Path(spec["work"]) / "grpo_spec.json"
    path.write_text(json.dumps(spec))
    return {**prep, "spec_path": str(path)}


def rl_child_instructkit_grpo(spec: dict) -> dict:
    """Our side of the GRPO comparison: recipes/grpo.py with the spec's shape; the same timing hooks as the PPO child
    (Engine.generate, training/loop.optimizer_step, which the run runtime calls)."""
    t_start = time.perf_counter()
    torch.set_num_threads(spec["threads"])
    import instructkit.generation.engine as engine_mod
    import instructkit.training.loop as loop_mod
    from instructkit.config import DataSource, GRPOConfig, load_config
    from instructkit.recipes import grpo

    gens: list[dict] = []
    step_ends: list[float] = []
    orig_generate, orig_step = engine_mod.Engine.generate, loop_mod.optimizer_step

    def timed_generate(self, prompts, params, *a, **kw):
        t0 = time.perf_counter()
        outs = orig_generate(self, prompts, params, *a, **kw)
        gens.append({"t0": t0, "t1": time.perf_counter(), "tokens": sum(len(o.token_ids) for o in outs),
                     "prompt_ids": [list(map(int, p)) for p in prompts]})
        return outs

    def timed_step(*a, **kw):
        res = orig_step(*a, **kw)
        step_ends.append(time.perf_counter())
        return res

    engine_mod.Engine.generate, loop_mod.optimizer_step = timed_generate, timed_step
    work = Path(spec["work"]) / "ik_grpo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "prompts.jsonl"  # the prompts of every rollout batch (prompts_per_step = all of them)
    data.write_text("".join(json.dumps({"messages": p + [{"role": "assistant", "content": "-"}]}) + "\n"
                            for p in spec["prompts"]))
    clip = spec["clip"]
    overrides = [f"model.path={spec['model_dir']}", f"train.output_dir={work}", "train.run_name=ik",
                 f"train.max_steps={spec['iterations']}", f"train.micro_batch_size={spec['mini_batch']}",
                 "train.grad_accum=1", f"train.lr={spec['lr']}", "train.schedule=constant", "train.resume=never",
                 "train.max_grad_norm=1.0", "train.save_every=0", f"train.seed={spec['seed']}",
                 f"train.threads={spec['threads']}", "data.max_length=512",
                 f"prompts_per_step={spec['n_prompts']}", f"num_generations={spec['num_generations']}",
                 f"updates_per_batch={spec['updates_per_batch']}", f"max_new_tokens={spec['max_new_tokens']}",
                 f"temperature={spec['temperature']}", f"kl_coef={spec['kl_coef']}", "advantage=grpo",
                 "scale_by_std=true", f"clip_low={clip}", f"clip_high={clip}", "aggregation=token",
                 "dynamic_sampling=false"]
    lora = spec["lora"]
    if lora:
        overrides += ["lora.enabled=true", f"lora.r={lora['r']}", f"lora.alpha={lora['alpha']}",
                      f"lora.dropout={lora['dropout']}"]
    cfg = load_config(GRPOConfig, None, overrides)
    cfg.data.sources = [DataSource(path=str(data))]
    cfg.rewards = [{"function": "instructkit.rl.rollout:token_fraction_reward", "weight": 1.0,
                    "token_ids": spec["reward_token_ids"]}]
    grpo.main(cfg)
    out = _gen_summary(spec, gens, step_ends, len(step_ends), t_start)
    recs = [json.loads(x) for x in (work / "ik" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    out["first_score"] = next((r["reward"] for r in recs if r.get("reward") is not None), None)
    return out


def run_grpo(args) -> dict:
    """The GRPO comparison over the requested configs (or the tiny dry run); returns {config: summary}."""
    out: dict = {}
    names = ["tiny-dry-run"] if args.tiny else [c for c in args.rl_configs.split(",") if c]
    shape = dict(GRPO_SHAPE, max_new_tokens=8) if args.tiny else dict(GRPO_SHAPE)
    reps = 1 if args.tiny else args.reps
    for name in names:
        cfg = dict(lora=None, iterations=2) if args.tiny else dict(RL_CONFIGS[name])
        if args.rl_iterations and not args.tiny:
            cfg["iterations"] = args.rl_iterations
        prep = grpo_prepare(name, cfg, shape, threads=2, seed=0)
        rl_log(f"grpo {name}: model {prep['model_dir']}, {cfg['iterations']} iterations per child, {reps} reps")
        runs: dict[str, list[dict]] = {"instructkit": [], "trl": []}
        for rep in range(reps):
            for side, child in (("instructkit", "instructkit-grpo"), ("trl", "trl")):
                r = rl_run_child(child, prep["spec_path"], args.nice)
                runs[side].append(r)
                rl_log(f"grpo {name} {side} rep {rep}: " + ", ".join(f"{k} {r[k]:.3g}" for k in RL_METRICS)
                       + f", first reward {r['first_score']}, tokens/it {r['completion_tokens_per_iteration']}")
        if runs["instructkit"][0]["prompt_ids_sorted"] != runs["trl"][0]["prompt_ids_sorted"]:
            raise SystemExit(f"grpo {name}: the two sides generated from different prompt token ids")
        if runs["instructkit"][0]["optimizer_steps"] != runs["trl"][0]["optimizer_steps"]:
            raise SystemExit(f"grpo {name}: different optimizer steps per run")
        summary: dict = {"setup": {**cfg, **shape, "model_dir": prep["model_dir"], "vocab": prep["vocab"],
                                   "optimizer_steps_per_iteration": shape["updates_per_batch"],
                                   "prompt_tokens": [len(p) for p in runs["trl"][0]["prompt_ids_sorted"]],
                                   "command": "HF_HUB_OFFLINE=1 python bench/rlhf.py --only grpo --rl-configs"
                                              f" {name} --rl-iterations {cfg['iterations']} --reps {reps}"
                                              f" --nice {args.nice}",
                                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
        for side, rs in runs.items():
            summary[side] = {k: statistics.median(r[k] for r in rs) for k in RL_METRICS}
            summary[side]["first_reward"] = rs[0]["first_score"]
            summary[side]["per_rep"] = [{k: v for k, v in r.items() if k != "prompt_ids_sorted"} for r in rs]
        ik, trl = summary["instructkit"], summary["trl"]
        summary["ratios"] = {
            "rollout_tokens_per_s": ik["rollout_tokens_per_s"] / trl["rollout_tokens_per_s"],
            "iterations_per_min": ik["iterations_per_min"] / trl["iterations_per_min"],
            "peak_rss": ik["peak_rss_mib"] / trl["peak_rss_mib"],
        }
        rl_log(f"grpo {name} ratios: {json.dumps(summary['ratios'])}")
        out[name] = summary
    return out


def rl_run_child(side: str, spec_path: str, nice: int) -> dict:
    import subprocess
    import sys

    out = Path(spec_path).with_name(f"result_{side}.json")
    out.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-rl", side, "--spec", spec_path, "--result", str(out)]
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    load0 = os.getloadavg()[0]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{side} child failed ({p.returncode}):\n{p.stderr[-4000:]}")
    res = json.loads(out.read_text())
    res["load_avg_1min"] = [load0, os.getloadavg()[0]]
    return res


RL_METRICS = ("rollout_tokens_per_s", "iterations_per_min", "seconds_per_iteration", "loop_completion_tokens_per_s",
              "peak_rss_mib", "gen_share")


def run_rl(args) -> dict:
    """The RL comparison over the requested configs; returns {config: summary}."""
    out: dict = {}
    for name in [c for c in args.rl_configs.split(",") if c]:
        cfg = dict(RL_CONFIGS[name])
        if args.rl_iterations:
            cfg["iterations"] = args.rl_iterations
        prep = rl_prepare(name, cfg, threads=2, seed=0)
        rl_log(f"{name}: model {prep['model_dir']}, {cfg['iterations']} iterations per child, {args.reps} reps")
        runs: dict[str, list[dict]] = {"instructkit": [], "trl": []}
        for rep in range(args.reps):
            for side in ("instructkit", "trl"):
                r = rl_run_child(side, prep["spec_path"], args.nice)
                runs[side].append(r)
                rl_log(f"{name} {side} rep {rep}: " + ", ".join(f"{k} {r[k]:.3g}" for k in RL_METRICS)
                       + f", tokens/it {r['completion_tokens_per_iteration']}, load {r['load_avg_1min']}")
        if runs["instructkit"][0]["prompt_ids_sorted"] != runs["trl"][0]["prompt_ids_sorted"]:
            raise SystemExit(f"{name}: the two sides generated from different prompt token ids")
        summary: dict = {"setup": {**cfg, **RL_SHAPE, "model_dir": prep["model_dir"], "vocab": prep["vocab"],
                                   "optimizer_steps_per_iteration": runs["trl"][0]["optimizer_steps_per_iteration"],
                                   "prompt_tokens": [len(p) for p in runs["trl"][0]["prompt_ids_sorted"]],
                                   "command": "HF_HUB_OFFLINE=1 python bench/rlhf.py --only rl --rl-configs"
                                              f" {name} --rl-iterations {cfg['iterations']} --reps {args.reps}"
                                              f" --nice {args.nice}",
                                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
        for side, rs in runs.items():
            summary[side] = {k: statistics.median(r[k] for r in rs) for k in RL_METRICS}
            summary[side]["per_rep"] = [{k: v for k, v in r.items() if k != "prompt_ids_sorted"} for r in rs]
        ik, trl = summary["instructkit"], summary["trl"]
        summary["ratios"] = {
            "rollout_tokens_per_s": ik["rollout_tokens_per_s"] / trl["rollout_tokens_per_s"],
            "iterations_per_min": ik["iterations_per_min"] / trl["iterations_per_min"],
            "peak_rss": ik["peak_rss_mib"] / trl["peak_rss_mib"],
            "per_rep_iterations_per_min": [a["iterations_per_min"] / b["iterations_per_min"]
                                           for a, b in zip(runs["instructkit"], runs["trl"])],
            "per_rep_rollout_tokens_per_s": [a["rollout_tokens_per_s"] / b["rollout_tokens_per_s"]
                                             for a, b in zip(runs["instructkit"], runs["trl"])],
        }
        rl_log(f"{name} ratios: {json.dumps(summary['ratios'])}")
        out[name] = summary
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["dpo", "kto", "orpo", "rl", "grpo", "all"], default="all")
    ap.add_argument("--tiny", action="store_true",
                    help="GRPO: a dry run on the tiny random model (checks the script; writes no results)")
    ap.add_argument("--steps", type=int, default=12, help="DPO, KTO, ORPO: optimizer steps per run")
    ap.add_argument("--batch", type=int, default=8, help="DPO, ORPO: pairs per step; KTO: examples per step")
    ap.add_argument("--kto-beta", type=float, default=0.1, help="KTO: beta (both sides)")
    ap.add_argument("--orpo-lambda", type=float, default=0.1, help="ORPO: lambda (TRL's ORPOConfig.beta)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32768, help="DPO, KTO, ORPO: output-layer rows (0: the tokenizer's 512)")
    ap.add_argument("--rl-configs", default=",".join(RL_CONFIGS), help="RL: comma-separated: " + ", ".join(RL_CONFIGS))
    ap.add_argument("--rl-iterations", type=int, default=0, help="RL: iterations per child (0: per config)")
    ap.add_argument("--nice", type=int, default=5, help="RL: niceness of the child processes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rlhf.json"))
    ap.add_argument("--child-rl", choices=["instructkit", "instructkit-grpo", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_rl:
        spec = json.loads(Path(args.spec).read_text())
        res = {"instructkit": rl_child_instructkit, "instructkit-grpo": rl_child_instructkit_grpo,
               "trl": rl_child_trl}[args.child_rl](spec)
        Path(args.result).write_text(json.dumps(res))
        return
    if args.tiny:
        if args.only != "grpo":
            raise SystemExit("--tiny is the GRPO dry run: use it with --only grpo")
        print(json.dumps(run_grpo(args), indent=1))
        return
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if results and "dpo" not in results and "speedup" in results:  # the file's old layout: DPO only, at the top
        results = {"dpo": results}
    def keep(key, sub=None):
        """Move the object a rerun replaces to ``results["history"]`` (newest last): no measured run is lost."""
        prev = results.get(key, {}) if sub is None else results.get(key, {}).get(sub)
        if prev:
            results.setdefault("history", []).append({"benchmark": key if sub is None else f"{key}/{sub}",
                                                      "replaced_utc": time.strftime("%Y-%m-%d %H:%M"),
                                                      "result": prev})

    if args.only in ("dpo", "all"):
        keep("dpo")
        results["dpo"] = run_dpo(args)
    for algo in ("kto", "orpo"):
        if args.only in (algo, "all"):
            keep(algo)
            results[algo] = run_pref(args, algo)
    if args.only in ("rl", "all"):
        rl = run_rl(args)
        for name in rl:
            keep("rl", name)
        import transformers

        results["rl"] = {**results.get("rl", {}), **rl,
                         "meta": {"torch": torch.__version__, "transformers": transformers.__version__,
                                  "trl": __import__("trl").__version__, "threads": 2}}
    if args.only in ("grpo", "all"):
        grpo = run_grpo(args)
        for name in grpo:
            keep("grpo", name)
        results["grpo"] = {**results.get("grpo", {}), **grpo}
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
