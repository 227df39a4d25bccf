"""Generation throughput: instructkit's Engine vs transformers' `model.generate`, same model, prompts and settings.

    HF_HUB_OFFLINE=1 python bench/generate_vs_hf.py --models smollm2-135m-instruct gemma-3-270m --batch-sizes 1 16

Both sides: fp32, greedy, the same chat-formatted prompts (built-in seed instructions), the same stop tokens, the same
max_new_tokens, the same torch thread count; one warm-up each, then repetitions interleaved (ours, theirs, ours, ...)
so machine noise hits both; the median is reported. Work done is checked, not assumed: the generated token ids must be
identical row by row. Throughput counts the useful generated tokens (up to and including each row's stop token), the
same number for both sides. Each row also records whether the engine's lean decode step (generation/fast_decode.py)
was on, which weights it MKL-packed, the load average before and after, and the per-repetition paired ratios;
``--generic`` adds a third interleaved side, the engine with ``fast=False`` (the model's forward every step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _hf_generate(model, tok, prompts, max_new_tokens, stop_ids):
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_ids, pad_token_id=pad)
    rows = []
    for r in out[:, width:].tolist():
        cut = next((j + 1 for j, t in enumerate(r) if t in stop_ids), None)
        rows.append(r[:cut] if cut is not None else r)
    return rows


def bench_model(name: str, batch_sizes: list[int], max_new_tokens: int, reps: int, generic: bool = False) -> list[dict]:
    from instructkit.config import ModelConfig
    from instructkit.data.seed_tasks import load_seed_tasks
    from instructkit.generation.engine import Engine, SamplingParams
    from instructkit.models.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(path=name))
    model.eval()
    eng = Engine(model, tok, max_batch_size=max(batch_sizes))
    eng_generic = Engine(model, tok, max_batch_size=max(batch_sizes), fast=False)  # the model's forward every step
    from instructkit.generation.fast_decode import FastDecoder, unsupported_reason

    fast_reason = unsupported_reason(model)
    stop_ids = eng.chat_stop_token_ids()
    seeds = load_seed_tasks("builtin")
    rows = []
    for bs in batch_sizes:
        prompts = [eng.chat_prompt_ids([{"role": "user", "content": s.instruction}]) for s in seeds[:bs]]
        # no log-probs: generate computes none either (and greedy then needs only each argmax)
        params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=stop_ids, logprobs=False)

        def ours():
            return [o.token_ids for o in eng.generate(prompts, params)]

        def theirs():
            with torch.inference_mode():
                return _hf_generate(model, tok, prompts, max_new_tokens, stop_ids)

        def ours_generic():
            return [o.token_ids for o in eng_generic.generate(prompts, params)]

        load_before = os.getloadavg()[0]
        a, b = ours(), theirs()  # warm-up, and the same-work check
        identical = sum(x == y for x, y in zip(a, b))
        tokens = sum(len(x) for x in a)
        sides = [(ours, []), (theirs, [])]
        if generic:
            c = ours_generic()
            identical_generic = sum(x == y for x, y in zip(c, b))
            sides.append((ours_generic, []))
        for _ in range(reps):
            for fn, acc in sides:
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
        t_ours, t_hf = sides[0][1], sides[1][1]
        dec = FastDecoder.build(model)
        row = {
            "model": name, "batch_size": bs, "max_new_tokens": max_new_tokens,
            "prompt_tokens": sum(len(p) for p in prompts), "padded_prompt_tokens": bs * max(len(p) for p in prompts),
            "generated_tokens": tokens, "identical_rows": identical, "rows": bs,
            "fast_decode": fast_reason or "on",
            "mkl_packed_weights": sorted({n for (n, _), (kind, _) in dec._pack.items() if kind == "packed"})
            if dec is not None and bs > 1 else [],
            "transposed_weights": sorted({n for (n, _), (kind, _) in dec._pack.items() if kind == "transposed"})
            if dec is not None and bs > 1 else [],
            "instructkit_tok_s": tokens / statistics.median(t_ours),
            "hf_generate_tok_s": tokens / statistics.median(t_hf),
            "instructkit_s": t_ours, "hf_generate_s": t_hf,
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        row["speedup"] = row["instructkit_tok_s"] / row["hf_generate_tok_s"]
        # each repetition runs both sides back to back: the median of those paired ratios is the least noisy figure
        row["speedup_paired"] = [h / o for o, h in zip(t_ours, t_hf)]
        row["speedup_paired_median"] = statistics.median(row["speedup_paired"])
        if generic:
            t_gen = sides[2][1]
            row.update({"identical_rows_generic": identical_generic, "instructkit_generic_s": t_gen,
                        "instructkit_generic_tok_s": tokens / statistics.median(t_gen),
                        "generic_speedup_paired_median": statistics.median(h / g for g, h in zip(t_gen, t_hf))})
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if not k.endswith("_s") or k.endswith("tok_s")}, default=str), flush=True)
        rows.append(row)
    del model
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--generic", action="store_true",
                    help="also time the engine with fast=False (the model's own forward each step), interleaved")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate_vs_hf.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from instructkit.models import zoo

    results, skipped = [], {}
    for name in args.models:
        if name in zoo.ZOO and not zoo.is_prepared(name):
            skipped[name] = "not prepared (instructkit models prepare NAME)"
            print(f"skipping {name}: {skipped[name]}", file=sys.stderr)
            continue
        results += bench_model(name, args.batch_sizes, args.max_new_tokens, args.reps, args.generic)
    import transformers

    out = {"command": "python " + " ".join(sys.argv), "threads": args.threads, "torch": torch.__version__,
           "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "skipped": skipped,
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
