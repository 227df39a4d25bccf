"""Evaluate one model: IFEval, held-out loss, stop rate and lengths, refusal rates. Results go next to the model.

Phases: config -> model (loaded once) -> each evaluation in ``cfg.evals`` order -> ``<model>/eval/<name>.json`` per
evaluation (eval/report.py's contract) -> a summary dict returned (and printed by the CLI). Each evaluation's maths is in
eval/; this file only wires them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from instructkit.config import EvaluateConfig

log = logging.getLogger(__name__)


def _save(cfg: EvaluateConfig, model_dir: Path, name: str, metrics: dict, samples=None, details=None) -> Path:
    from instructkit.eval.report import save_eval

    return save_eval(Path(cfg.save_dir) if cfg.save_dir else model_dir, name, metrics, samples=samples,
                     details=details, model=cfg.model.path)


def read_conversations(path: str) -> list:
    """A data file data/io.py reads, or ``builtin:NAME`` (data/builtin.py)."""
    if path.startswith("builtin:"):
        from instructkit.data.builtin import load_builtin

        return load_builtin(path)
    from instructkit.data.io import read_conversations as read

    return read(path)


def read_prompts(path: str) -> list[list[dict[str, str]]]:
    """Prompts for generation: each conversation without its trailing assistant turn(s). Besides what
    ``read_conversations`` reads, a JSONL of ``{"prompt": str}`` or of prompt-only ``{"messages": [...]}`` works."""
    from instructkit.chat.render import as_message_dicts
    from instructkit.data.schema import DataError, parse_messages

    try:
        convs = [as_message_dicts(c) for c in read_conversations(path)]
    except DataError as first_error:
        convs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                        convs.append([{"role": "user", "content": row["prompt"]}])
                    elif isinstance(row, dict) and "messages" in row:
                        convs.append(as_message_dicts(parse_messages(row["messages"])))
                    else:
                        raise first_error
                except (json.JSONDecodeError, DataError):
                    raise first_error from None
    out = []
    for msgs in convs:
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if msgs:
            out.append(msgs)
    return out


def fewshot_prefix(cfg: EvaluateConfig) -> list[dict[str, str]]:
    """The first ``fewshot_k`` conversations of ``fewshot_data``, concatenated as earlier turns (user / assistant
    only: a system turn in the middle of a conversation is not something chat templates render)."""
    if not cfg.fewshot_k:
        return []
    from instructkit.chat.render import as_message_dicts
    from instructkit.config import ConfigError

    convs = read_conversations(cfg.fewshot_data)
    if len(convs) < cfg.fewshot_k:
        raise ConfigError(f"{cfg.fewshot_data}: {len(convs)} conversations, fewer than fewshot_k={cfg.fewshot_k}")
    out = []
    for i, c in enumerate(convs[: cfg.fewshot_k]):
        msgs = as_message_dicts(c)
        if [m["role"] for m in msgs] != ["user", "assistant"] * (len(msgs) // 2) or not msgs:
            raise ConfigError(f"{cfg.fewshot_data}: few-shot conversation {i} must alternate user and assistant "
                              f"turns, starting with user; got roles {[m['role'] for m in msgs]}")
        out += [{"role": m["role"], "content": m["content"]} for m in msgs]
    return out


def run_ifeval(cfg: EvaluateConfig, model, tokenizer) -> tuple[dict, list, dict]:
    from instructkit.eval import instruction_following as ife
    from instructkit.eval.metrics import generate_responses

    prompts = ife.load_prompts(cfg.ifeval_prompts)
    prompts = prompts[: cfg.ifeval_limit] if cfg.ifeval_limit else prompts
    settings = ife.GenerationSettings(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    responses = generate_responses(model, tokenizer, prompts, settings, prefix=fewshot_prefix(cfg))
    results = [ife.score_response(p, r) for p, r in zip(prompts, responses)]
    m = ife.ifeval_metrics(results)
    per_instruction = m.pop("per_instruction")
    samples = [{"prompt": r.prompt, "response": r.response, "strict": r.strict, "loose": r.loose} for r in results]
    return m, samples, {"per_instruction": per_instruction}


def run_perplexity(cfg: EvaluateConfig, model, tokenizer) -> tuple[dict, list, dict]:
    from instructkit.eval.metrics import heldout_loss

    convs = read_conversations(cfg.heldout_data)
    convs = convs[: cfg.heldout_limit] if cfg.heldout_limit else convs
    prefix = fewshot_prefix(cfg)
    if prefix:  # the exemplars' answers are context, not scored
        from instructkit.chat.render import as_message_dicts

        convs = [[{**m, "weight": 0} for m in prefix] + as_message_dicts(c) for c in convs]
    m = heldout_loss(model, tokenizer, convs, template=cfg.model.template, max_length=cfg.max_length,
                     batch_size=cfg.batch_size)
    return {"heldout_loss": m.pop("loss"), **m}, [], {"data": cfg.heldout_data}


def run_stop_rate(cfg: EvaluateConfig, model, tokenizer) -> tuple[dict, list, dict]:
    from instructkit.eval.metrics import generate_chat, load_builtin_prompts, response_stats

    if cfg.stop_rate_data:
        convs = read_prompts(cfg.stop_rate_data)
    else:
        convs = [[{"role": "user", "content": r["prompt"]}] for r in load_builtin_prompts("benign")]
    convs = convs[: cfg.stop_rate_limit] if cfg.stop_rate_limit else convs
    prefix = fewshot_prefix(cfg)
    outs = generate_chat(model, tokenizer, [prefix + list(c) for c in convs], max_new_tokens=cfg.max_new_tokens,
                         batch_size=cfg.batch_size, template=cfg.model.template)
    stats = response_stats(outs)
    flat = {"stop_rate": stats["stop_rate"], "responses": stats["responses"],
            "mean_response_tokens": stats["length_tokens"]["mean"],
            "median_response_tokens": stats["length_tokens"]["median"], "empty_rate": stats["empty_rate"]}
    samples = [{"prompt": c[-1]["content"], "response": o.text, "finish_reason": o.finish_reason}
               for c, o in zip(convs, outs)]
    return flat, samples, stats


def run_refusal(cfg: EvaluateConfig, model, tokenizer) -> tuple[dict, list, dict]:
    from instructkit.eval.metrics import refusal_eval

    res = refusal_eval(model, tokenizer, max_new_tokens=cfg.refusal_max_new_tokens, batch_size=cfg.batch_size,
                       template=cfg.model.template, system=cfg.system, prefix=fewshot_prefix(cfg))
    samples = [{"set": name, **s} for name, rows in res.pop("samples").items() for s in rows]
    return res, samples, {}


def run_knowledge(cfg: EvaluateConfig, model, tokenizer) -> tuple[dict, list, dict]:
    """Does the model know what the base knows? Fixed classification and short-answer items (eval/t0.py scoring:
    rank classification over an item's options, else exact match of a greedy answer), with the few-shot prefix when
    one is set. Per-item predictions are saved, so a report can compare two models item by item."""
    from instructkit.data.schema import Message
    from instructkit.eval.t0 import evaluate_t0, read_items

    items, options = read_items(cfg.knowledge_data)
    prefix = [Message(m["role"], m["content"]) for m in fewshot_prefix(cfg)]
    res = evaluate_t0(model, tokenizer, items, options, template=cfg.model.template,
                      max_new_tokens=cfg.knowledge_max_new_tokens, batch_size=cfg.batch_size, prefix=prefix)
    recs = res.pop("records")
    flat = {"accuracy": sum(r["score"] for r in recs) / len(recs), "macro_accuracy": res["overall"],
            "items": len(items), "ranked": sum(1 for r in items if (r.dataset, r.template) in options)}
    for name, c in res["clusters"].items():
        flat[f"accuracy_{name}"] = c["mean"]
    return flat, recs, {"data": cfg.knowledge_data, "clusters": res["clusters"], "tasks": res["tasks"]}


EVALS = {"ifeval": run_ifeval, "perplexity": run_perplexity, "stop_rate": run_stop_rate, "refusal": run_refusal,
         "knowledge": run_knowledge}
SAVED_AS = {"ifeval": "ifeval", "perplexity": "perplexity", "stop_rate": "responses", "refusal": "refusal",
            "knowledge": "knowledge"}


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    from instructkit.models.load import load_model_and_tokenizer, resolve_path

    model_dir = resolve_path(cfg.model.path)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    summary: dict[str, Any] = {}
    for name in cfg.evals:
        log.info("evaluating %s", name)
        metrics, samples, details = EVALS[name](cfg, model, tokenizer)
        if cfg.fewshot_k:
            details = {**details, "fewshot": {"data": cfg.fewshot_data, "k": cfg.fewshot_k}}
        path = _save(cfg, model_dir, SAVED_AS[name], metrics, samples, details)
        summary[name] = {"metrics": metrics, "file": str(path)}
    return summary
