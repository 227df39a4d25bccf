"""Zero-shot evaluation on held-out task clusters, as FLAN reports it.

- Tasks with answer options are scored by **rank classification**: each option is rendered as the assistant response
  (through the template's response string and the chat Renderer) and the option whose tokens have the highest total
  log-likelihood wins (Wei et al. 2021, section 2.3; Brown et al. 2020). The scored tokens are the assistant turn's
  supervised tokens -- its content and its end-of-turn token -- so an option that is a prefix of another ("no" vs "no
  way") is not favoured for free: "no" must also be followed by the end of the turn. All options of a batch of
  examples go through ONE padded forward pass; the output layer is applied only at the scored positions.
- Generative tasks are scored on greedy generations (generation/engine.py) by exact match (normalised: case, spaces,
  a final period) or ROUGE-L (data/rouge.py).

Results come per example, per (task, template), per task (mean over templates plus the spread across templates: min,
max, std, as FLAN reports template variance), per cluster (mean over its tasks) and overall (mean over clusters), as JSON
and a markdown table.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from instructkit.data.schema import Conversation, Message
from instructkit.tasks.bank import Task, TaskExample, render_example, render_response

log = logging.getLogger(__name__)


@dataclass
class HeldoutConfig:
    clusters: list[str] = field(default_factory=list)
    """Held-out clusters to evaluate (every task in them)."""
    tasks: list[str] = field(default_factory=list)
    """Or individual task names (added to the clusters' tasks)."""
    examples_per_task: int = 20
    """Examples per task; each is evaluated under every template (or one, see `templates`)."""
    templates: str = "all"
    """"all" (FLAN: every template, spread reported) or a template name."""
    seed: int = 0
    """Seed of the evaluation examples (split "eval", disjoint streams from the training split)."""
    with_options: bool = True
    """Show the OPTIONS block for tasks that have options (FLAN does for classification at evaluation)."""
    max_new_tokens: int = 48
    """Generation budget for generative tasks (greedy)."""
    batch_size: int = 16
    """Sequences per forward pass (option scoring) and per generation batch."""
    match: str = "exact"
    """exact_match tasks: "exact" (the normalised answer equals the target: FLAN's strict metric, which rewards a
    model that learned the answer format) or "contains" (the target occurs as whole words in the answer: "The capital
    of Chile is Santiago." counts for "Santiago"). Records carry both."""


# ---------------------------------------------------------------------------------------------------------------------
# Rank classification
# ---------------------------------------------------------------------------------------------------------------------
def response_token_spans(renderer, prompt: Sequence[Message], responses: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) of prompt + each response as the last assistant turn (mask: that turn only)."""
    out = []
    for r in responses:
        rendered = renderer.render(Conversation(list(prompt) + [Message("assistant", r)]), mask="last_assistant")
        out.append((list(rendered.input_ids), list(rendered.loss_mask)))
    return out


@torch.no_grad()
def sequence_logprobs(model, sequences: Sequence[tuple[list[int], list[int]]], pad_id: int,
                      batch_size: int = 16) -> list[float]:
    """Sum over masked positions t of log p(ids[t] | ids[:t]) for each (ids, mask); padded batches, one forward each.

    Shapes: input (B, T) right-padded; hidden (B, T, H); the output layer runs on the N scored positions only (N, V).
    """
    from instructkit.models.load import causal_lm_parts

    body, head, softcap = causal_lm_parts(model)
    was_training = model.training
    model.eval()
    out: list[float] = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))  # similar lengths together: less padding
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = max(len(sequences[i][0]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        attn = torch.zeros((len(idx), T), dtype=torch.long)
        target_mask = torch.zeros((len(idx), T), dtype=torch.bool)
        for row, i in enumerate(idx):
            s, m = sequences[i]
            ids[row, :len(s)] = torch.tensor(s)
            attn[row, :len(s)] = 1
            target_mask[row, 1:len(s)] = torch.tensor(m[1:], dtype=torch.bool)  # position 0 has no prediction
        hidden = body(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state  # (B, T, H)
        rows, cols = target_mask.nonzero(as_tuple=True)  # targets at (row, col) are predicted from col - 1
        logits = head(hidden[rows, cols - 1]).float()  # (N, V)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        lp = torch.log_softmax(logits, dim=-1).gather(1, ids[rows, cols].unsqueeze(1)).squeeze(1)  # (N,)
        sums = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, rows, lp.double())
        for row, i in enumerate(idx):
            out[i] = float(sums[row])
    if was_training:
        model.train()
    return out


def score_options(model, renderer, items: Sequence[tuple[Sequence[Message], Sequence[str]]], pad_id: int,
                  batch_size: int = 16, shared_prefix: bool = True) -> list[list[float]]:
    """For each (prompt messages, candidate responses): the total log-likelihood of each response.

    ``shared_prefix``: the prompt tokens common to all of an item's options are run once, followed by every option's
    own tokens in the same row; a mask lets each option attend to the prefix and to itself only, and positions restart
    after the prefix for each option, so every option sees exactly what it would see alone (the scores equal the
    unshared ones up to float summation order) while the prompt, most of the tokens, is computed once, not once per
    option."""
    per_item = [response_token_spans(renderer, prompt, responses) for prompt, responses in items]
    # The packed mask does not carry a sliding window, so an item with a sequence as long as the window (Gemma 3:
    # 512 tokens) takes unshared rows; the others still share their prompt (one long review must not make every
    # item of an evaluation pay for its prompt once per option).
    window = _sliding_window(model) if shared_prefix else None
    plain = [i for i, seqs in enumerate(per_item)
             if not shared_prefix or (window and any(len(s) >= window for s, _ in seqs))]
    plain_set = set(plain)
    shared = [i for i in range(len(per_item)) if i not in plain_set]
    out: list[list[float]] = [[] for _ in per_item]
    if plain:
        flat = [s for i in plain for s in per_item[i]]
        scores = sequence_logprobs(model, flat, pad_id, batch_size)
        k = 0
        for i in plain:
            out[i] = scores[k:k + len(per_item[i])]
            k += len(per_item[i])
    if shared:
        for i, sc in zip(shared, _shared_prefix_logprobs(model, [per_item[i] for i in shared], pad_id,
                                                         max(1, batch_size // 2))):
            out[i] = sc
    return out


def _prefix_length(seqs: list[tuple[list[int], list[int]]]) -> int:
    """Longest common prefix of the options' ids, ending before the first scored token of any option (>= 1)."""
    ids = [s for s, _ in seqs]
    p = min(len(s) for s in ids)
    for s in ids[1:]:
        p = next((i for i, (a, b) in enumerate(zip(ids[0], s)) if a != b), min(p, len(s)))
    first_scored = min(m.index(1) if 1 in m else len(m) for _, m in seqs)
    return max(1, min(p, first_scored))


def _sliding_window(model) -> int | None:
    """The sliding window of a model with sliding-window attention layers (Gemma 3), else None."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    window = getattr(cfg, "sliding_window", None)
    if not window or "sliding_attention" not in set(getattr(cfg, "layer_types", None) or []):
        return None
    return int(window)


@torch.no_grad()
def _shared_prefix_logprobs(model, per_item, pad_id: int, batch_size: int) -> list[list[float]]:
    from instructkit.models.load import causal_lm_parts

    body, head, softcap = causal_lm_parts(model)
    was_training = model.training
    model.eval()
    # one packed row per item: prefix, then each option's suffix; (row index, target index, source index) triples
    rows = []
    for seqs in per_item:
        P = _prefix_length(seqs)
        ids, seg, pos, targets = list(seqs[0][0][:P]), [0] * P, list(range(P)), []
        for j, (s, m) in enumerate(seqs):
            start = len(ids)
            ids += s[P:]
            seg += [j + 1] * (len(s) - P)
            pos += list(range(P, len(s)))
            for t in range(P, len(s)):
                if m[t]:  # token s[t] is predicted by the hidden state of token s[t - 1]
                    src = t - 1 if t - 1 < P else start + (t - 1 - P)
                    targets.append((j, start + (t - P), src))
        rows.append((ids, seg, pos, targets, len(seqs)))
    out: list[list[float]] = [[] for _ in per_item]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    dtype = body.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = max(len(rows[i][0]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        seg = torch.full((len(idx), T), -1, dtype=torch.long)
        pos = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(rows[i][0])
            ids[r, :n], seg[r, :n], pos[r, :n] = (torch.tensor(x) for x in rows[i][:3])
        # query i may attend key j when j <= i and (j is in the prefix or in i's own option); padding only itself
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = seg[:, :, None] == seg[:, None, :]
        prefix_key = (seg == 0)[:, None, :]
        real = (seg >= 0)
        allowed = causal & (same | prefix_key) & real[:, :, None] & real[:, None, :]
        allowed |= torch.eye(T, dtype=torch.bool)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        hidden = body(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).last_hidden_state
        for r, i in enumerate(idx):
            targets, n_opts = rows[i][3], rows[i][4]
            opt = torch.tensor([t[0] for t in targets])
            tgt = torch.tensor([t[1] for t in targets])
            src = torch.tensor([t[2] for t in targets])
            logits = head(hidden[r, src]).float()  # (N, V): the output layer at scored positions only
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            lp = torch.log_softmax(logits, -1).gather(1, ids[r, tgt].unsqueeze(1)).squeeze(1)
            sums = torch.zeros(n_opts, dtype=torch.float64).index_add_(0, opt, lp.double())
            out[i] = [float(x) for x in sums]
    if was_training:
        model.train()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Generative scoring
# ---------------------------------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    t = re.sub(r"\s+", " ", text.strip().lower())
    return t[:-1].rstrip() if t.endswith(".") else t


def exact_match(prediction: str, references: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in references))


def contains_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when a normalised reference occurs in the normalised prediction as whole words."""
    p = " " + " ".join(re.findall(r"\w+", prediction.lower())) + " "
    return float(any((" " + " ".join(re.findall(r"\w+", r.lower())) + " ") in p for r in references
                     if re.findall(r"\w+", r)))


def rouge_l_score(prediction: str, references: Sequence[str]) -> float:
    from instructkit.data.rouge import rouge_l

    return max(rouge_l(r, prediction) for r in references)


# ---------------------------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------------------------
def eval_items(tasks: Sequence[Task], cfg: HeldoutConfig) -> list[tuple[Task, TaskExample, Any, Conversation]]:
    """(task, example, template, prompt conversation) for every example x template, zero-shot."""
    items = []
    for task in tasks:
        templates = task.templates if cfg.templates == "all" else [task.template(cfg.templates)]
        for i in range(cfg.examples_per_task):
            ex = task.example(i, cfg.seed, "eval")
            for t in templates:
                conv = render_example(task, ex, t, with_options=cfg.with_options, include_response=False,
                                      meta={"seed": cfg.seed, "split": "eval", "index": i})
                items.append((task, ex, t, conv))
    return items


def evaluate_heldout(model, tokenizer, tasks: Sequence[Task], cfg: HeldoutConfig, template: str = "auto") -> dict:
    from instructkit.chat.render import Renderer
    from instructkit.generation.engine import Engine, SamplingParams

    renderer = Renderer(tokenizer, template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = eval_items(tasks, cfg)
    records: list[dict] = [{} for _ in items]

    ranked = [k for k, (task, ex, _, _) in enumerate(items) if ex.options]
    if ranked:
        payload = []
        for k in ranked:
            task, ex, t, conv = items[k]
            payload.append((conv.messages, [render_response(task, t, ex, target=o) for o in ex.options]))
        t0 = time.perf_counter()
        all_scores = score_options(model, renderer, payload, pad_id, cfg.batch_size)
        log.info("rank classification: %d prompts, %d options in %.1fs", len(payload),
                 sum(len(o) for _, o in payload), time.perf_counter() - t0)
        for k, scores in zip(ranked, all_scores):
            task, ex, t, conv = items[k]
            best = max(range(len(scores)), key=lambda j: scores[j])  # ties: the first listed option
            records[k] = {"prediction": ex.options[best], "score": float(ex.options[best] == ex.target),
                          "option_logprobs": [round(s, 4) for s in scores]}

    generative = [k for k, (_, ex, _, _) in enumerate(items) if not ex.options]
    if generative:
        engine = Engine(model, tokenizer, max_batch_size=cfg.batch_size, template=template)
        prompts = [renderer.render_prompt(items[k][3].messages) for k in generative]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                                stop_token_ids=sorted(set(renderer.stop_token_ids)), logprobs=False)
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        outputs = engine.generate(prompts, params)
        log.info("generation: %d prompts in %.1fs", len(prompts), time.perf_counter() - t0)
        if was_training:
            model.train()
        for k, o in zip(generative, outputs):
            task, ex, t, conv = items[k]
            refs = [ex.target, render_response(task, t, ex)]
            if task.metric == "rouge_l":
                records[k] = {"prediction": o.text, "score": rouge_l_score(o.text, refs)}
            else:
                em, cm = exact_match(o.text, refs), contains_match(o.text, refs)
                records[k] = {"prediction": o.text, "score": cm if cfg.match == "contains" else em, "exact": em,
                              "contains": cm}

    for k, (task, ex, t, conv) in enumerate(items):
        records[k].update({"task": task.name, "cluster": task.cluster, "template": t.name,
                           "template_version": t.version, "index": conv.meta["index"], "target": ex.target,
                           "metric": "accuracy" if ex.options else
                           ("contains" if task.metric == "exact_match" and cfg.match == "contains" else task.metric)})
    return summarize(records)


def summarize(records: list[dict]) -> dict:
    """Per (task, template) mean; per task mean over templates with min/max/std; per cluster; overall."""
    by_tt: dict[tuple[str, str], list[float]] = {}
    task_cluster: dict[str, str] = {}
    task_metric: dict[str, str] = {}
    for r in records:
        by_tt.setdefault((r["task"], r["template"]), []).append(r["score"])
        task_cluster[r["task"]] = r["cluster"]
        task_metric[r["task"]] = r["metric"]
    per_template = {f"{t}/{tpl}": statistics.fmean(v) for (t, tpl), v in by_tt.items()}
    per_task: dict[str, dict] = {}
    for task in task_cluster:
        vals = [statistics.fmean(v) for (t, _), v in by_tt.items() if t == task]
        per_task[task] = {
            "cluster": task_cluster[task], "metric": task_metric[task], "mean": statistics.fmean(vals),
            "min": min(vals), "max": max(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "templates": len(vals), "examples": sum(len(v) for (t, _), v in by_tt.items() if t == task),
        }
    per_cluster: dict[str, dict] = {}
    for c in sorted(set(task_cluster.values())):
        ts = [v["mean"] for v in per_task.values() if v["cluster"] == c]
        per_cluster[c] = {"mean": statistics.fmean(ts), "tasks": len(ts)}
    overall = statistics.fmean(v["mean"] for v in per_cluster.values()) if per_cluster else math.nan
    return {"overall": overall, "clusters": per_cluster, "tasks": per_task, "templates": per_template,
            "records": records}


def to_markdown(results: dict, title: str = "Held-out evaluation") -> str:
    lines = [f"# {title}", "", f"Overall (mean over clusters): **{results['overall']:.3f}**", "",
             "| cluster | task | metric | mean | min | max | std | templates | examples |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, t in sorted(results["tasks"].items(), key=lambda kv: (kv[1]["cluster"], kv[0])):
        lines.append(f"| {t['cluster']} | {name} | {t['metric']} | {t['mean']:.3f} | {t['min']:.3f} | "
                     f"{t['max']:.3f} | {t['std']:.3f} | {t['templates']} | {t['examples']} |")
    lines += ["", "| cluster | mean | tasks |", "|---|---|---|"]
    for c, v in results["clusters"].items():
        lines.append(f"| {c} | {v['mean']:.3f} | {v['tasks']} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: str | Path, title: str = "Held-out evaluation") -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "heldout.json", out / "heldout.md"
    j.write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    m.write_text(to_markdown(results, title), encoding="utf-8")
    return j, m


def load_for_eval(path: str | Path, template: str = "auto"):
    """(model, tokenizer) for evaluation from a full model folder, a zoo name, or a LoRA adapter folder (the adapter is
    applied on its base, named in adapter_config.json)."""
    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model_and_tokenizer

    p = Path(path)
    if (p / "adapter_config.json").exists():
        from peft import PeftModel
        from transformers import AutoTokenizer

        base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        model, _ = load_model_and_tokenizer(ModelConfig(path=base, template=template))
        tokenizer = AutoTokenizer.from_pretrained(p)
        if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, p)
        model.eval()
        return model, tokenizer
    model, tokenizer = load_model_and_tokenizer(ModelConfig(path=str(path), template=template))
    model.eval()
    return model, tokenizer
