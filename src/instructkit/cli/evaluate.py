"""`instructkit evaluate <metric> ...`: one subcommand per evaluation.

Each subcommand is an ``_add_<name>(sub)`` function that registers its parser and a handler; results print as text (or
one JSON object with ``--json``) and, when a model folder was evaluated, are saved next to it as
``<model>/eval/<name>.json`` (eval/report.py reads them). Heavy imports happen inside handlers.
"""

from __future__ import annotations

import argparse
import json
import sys


def _print_result(args, metrics: dict, title: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(metrics, ensure_ascii=False))
        return
    print(title)
    for k, v in metrics.items():
        if isinstance(v, (int, float, str)):
            print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")


def _load(args):
    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model_and_tokenizer

    return load_model_and_tokenizer(ModelConfig(path=args.model, template=getattr(args, "template", "auto")))


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="model folder (or zoo name) to evaluate")
    p.add_argument("--template", default="auto", help="chat template: auto (the tokenizer's own) or a built-in name")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--no-save", action="store_true", help="do not write <model>/eval/<name>.json")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _save(args, name: str, metrics: dict, samples=None, details=None) -> None:
    if getattr(args, "no_save", False) or not getattr(args, "model", None):
        return
    from instructkit.eval.report import save_eval
    from instructkit.models.load import resolve_path

    path = save_eval(resolve_path(args.model), name, metrics, samples=samples, details=details,
                     model=str(args.model))
    print(f"saved {path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
def _add_ifeval(sub) -> None:
    p = sub.add_parser("ifeval", help="IFEval verifiable instruction following (4 accuracies)")
    _model_args(p, required=False)
    p.add_argument("--responses", help="score an existing JSONL of {prompt, response} instead of generating")
    p.add_argument("--prompts", help="IFEval input file (ifeval_input_data.jsonl: key, prompt, instruction_id_list, "
                                     "kwargs); default $INSTRUCTKIT_IFEVAL_PROMPTS")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (generation mode)")
    p.add_argument("--out", help="also write per-prompt verdicts as JSONL here")
    p.set_defaults(func=_ifeval)


def _ifeval(args) -> int:
    import os

    from instructkit.data.io import write_jsonl
    from instructkit.eval import instruction_following as ife
    from instructkit.eval.metrics import generate_responses

    if bool(args.model) == bool(args.responses):
        print("error: give exactly one of --model (generate, then score) or --responses (score a file)", file=sys.stderr)
        return 2
    prompts_path = args.prompts or os.environ.get("INSTRUCTKIT_IFEVAL_PROMPTS")
    prompts = ife.load_prompts(prompts_path) if prompts_path else None
    if args.responses:
        results = ife.score_responses(ife.load_responses(args.responses), prompts)
    else:
        if prompts is None:
            print("error: --model needs the IFEval prompt file: --prompts ifeval_input_data.jsonl", file=sys.stderr)
            return 2
        prompts = prompts[: args.limit] if args.limit else prompts
        model, tokenizer = _load(args)
        settings = ife.GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        responses = generate_responses(model, tokenizer, prompts, settings)
        results = [ife.score_response(p, r) for p, r in zip(prompts, responses)]
    metrics = ife.ifeval_metrics(results)
    rows = ife.results_to_rows(results)
    if args.out:
        write_jsonl(args.out, rows)
    flat = {k: v for k, v in metrics.items() if k != "per_instruction"}
    _save(args, "ifeval", flat, samples=[{"prompt": r["prompt"], "response": r["response"]} for r in rows],
          details={"per_instruction": metrics["per_instruction"]})
    _print_result(args, metrics if args.json else flat, "IFEval")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
def _run_one(args, name: str, **cfg_fields) -> int:
    """Run recipes/evaluate.py's evaluation ``name`` on --model with the given config fields; print and save."""
    from instructkit.config import EvaluateConfig, ModelConfig
    from instructkit.recipes.evaluate import EVALS, SAVED_AS

    cfg = EvaluateConfig(model=ModelConfig(path=args.model, template=args.template), evals=[name],
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, **cfg_fields)
    model, tokenizer = _load(args)
    metrics, samples, details = EVALS[name](cfg, model, tokenizer)
    _save(args, SAVED_AS[name], metrics, samples=samples, details=details)
    _print_result(args, metrics, name)
    return 0


def _add_perplexity(sub) -> None:
    p = sub.add_parser("perplexity", help="held-out loss and perplexity over supervised (assistant) tokens")
    _model_args(p)
    p.add_argument("--data", required=True, help="conversations: any file data/io.py reads, or builtin:NAME")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=lambda a: _run_one(a, "perplexity", heldout_data=a.data, heldout_limit=a.limit,
                                           max_length=a.max_length))


def _add_stop_rate(sub) -> None:
    p = sub.add_parser("stop-rate", help="fraction of responses ending with end-of-turn; response length statistics")
    _model_args(p)
    p.add_argument("--data", default="", help="conversations whose user turns are the prompts "
                                              "(default: the built-in benign prompts)")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=lambda a: _run_one(a, "stop_rate", stop_rate_data=a.data, stop_rate_limit=a.limit))


def _add_refusal(sub) -> None:
    p = sub.add_parser("refusal", help="refusal rate on built-in harmful prompts and on benign look-alikes")
    _model_args(p)
    p.add_argument("--system", default=None, help="system prompt to use")
    p.set_defaults(func=lambda a: _run_one(a, "refusal", system=a.system, refusal_max_new_tokens=a.max_new_tokens),
                   max_new_tokens=64)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="every evaluation in a config (configs/evaluate.yaml); results next to the model")
    p.add_argument("--config", help="YAML file (EvaluateConfig)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model.path=runs/sft/final")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_all)


def _run_all(args) -> int:
    from instructkit.config import EvaluateConfig, load_config
    from instructkit.recipes.evaluate import main as evaluate_main

    summary = evaluate_main(load_config(EvaluateConfig, args.config, args.overrides))
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        for name, res in summary.items():
            _print_result(args, res["metrics"], f"{name} ({res['file']})")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
def _add_gsm8k(sub) -> None:
    p = sub.add_parser("gsm8k", help="GSM8K accuracy: greedy answers, final-answer match (eval/gsm8k.py)")
    _model_args(p)
    p.add_argument("--data", required=True, help="GSM8K JSONL(.gz) of {question, answer ending in '#### N'}")
    p.add_argument("--limit", type=int, default=200, help="the first N problems: a fixed subset (default 200)")
    p.add_argument("--save-dir", default=None,
                   help="write <save-dir>/eval/gsm8k.json instead of next to the model")
    p.set_defaults(func=_gsm8k)


def _gsm8k(args) -> int:
    from instructkit.eval.gsm8k import gsm8k_accuracy, load_problems

    problems = load_problems(args.data, args.limit)
    model, tokenizer = _load(args)
    metrics, samples = gsm8k_accuracy(model, tokenizer, problems, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size, template=args.template)
    metrics["data"] = str(args.data)
    if args.save_dir and not args.no_save:
        from instructkit.eval.report import save_eval

        print(f"saved {save_eval(args.save_dir, 'gsm8k', metrics, samples=samples, model=str(args.model))}",
              file=sys.stderr)
    else:
        _save(args, "gsm8k", metrics, samples=samples)
    _print_result(args, metrics, "GSM8K")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
def _add_winrate(sub) -> None:
    p = sub.add_parser("winrate", help="win rate of model A over model B under a reward model or an LLM judge")
    p.add_argument("--responses-a", required=True,
                   help="model A: JSONL {prompt, response}, or a saved <model>/eval/responses.json")
    p.add_argument("--responses-b", required=True, help="JSONL {prompt, response} of model B (same prompts)")
    p.add_argument("--reward-model", help="sequence-classification reward model folder")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL of a judge LLM (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--judge-model", default="judge", help="model name sent to the judge endpoint")
    p.add_argument("--judge-api-key-env", default=None,
                   help="name of the environment variable holding the judge's API key (a local judge needs none; "
                        "never pass a key on the command line)")
    p.add_argument("--verdicts", help="where to save the judge's raw verdicts (JSONL)")
    p.add_argument("--save-to", help="model folder of A: write <it>/eval/winrate.json")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_winrate)


def _winrate(args) -> int:
    from instructkit.eval import reward as rw

    if bool(args.reward_model) == bool(args.judge_url):
        print("error: give exactly one of --reward-model or --judge-url", file=sys.stderr)
        return 2
    pairs = rw.paired_responses(args.responses_a, args.responses_b)
    if args.reward_model:
        res = rw.reward_model_winrate(args.reward_model, pairs, batch_size=args.batch_size)
        name = "winrate_rm"
    else:
        judge = rw.OpenAIJudge(args.judge_url, model=args.judge_model, api_key_env=args.judge_api_key_env)
        res = rw.judge_winrate(judge, pairs, verdicts_path=args.verdicts)
        name = "winrate_judge"
    flat = {k: v for k, v in res.items() if isinstance(v, (int, float))}
    if args.save_to:
        from instructkit.eval.report import save_eval

        save_eval(args.save_to, name, flat, details={k: v for k, v in res.items() if k not in flat})
    _print_result(args, flat, "win rate of A over B")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="evaluate a model: ifeval, perplexity, stop-rate, refusal, gsm8k, winrate, run (all), heldout")
    sub = parser.add_subparsers(dest="evaluation", metavar="EVALUATION")
    _add_ifeval(sub)
    _add_perplexity(sub)
    _add_stop_rate(sub)
    _add_refusal(sub)
    _add_gsm8k(sub)
    _add_winrate(sub)
    _add_run(sub)
    from instructkit.cli.tasks import add_heldout_parser  # the task bank's held-out evaluation (cli/tasks.py)

    add_heldout_parser(sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
