"""Real multi-task data for the FLAN-scaling experiment: T0's per-template training file (Sanh et al. 2021).

The file (one JSON object a line, optionally gzipped) has, per record: ``cluster`` (one of 8 task clusters:
multiple_choice_qa, extractive_qa, closed_book_qa, sentiment, topic_classification, structure_to_text, summarization,
paraphrase_identification), ``dataset``, ``template`` (a promptsource template name), ``prompt`` (the rendered
prompt) and ``completion`` (the reference answer). It has no answer-choices field, so:

- **Option sets** (rank classification) are read off the data: the distinct non-empty completions of one template name
  within one cluster (imdb and rotten_tomatoes share template names, and each of their 200-record slices holds a single
  class, so only the union recovers both labels). A template whose set has 2..``max_options`` members is scored by
  rank classification over that set (eval/heldout.score_options: the option with the highest total log-likelihood as
  the assistant turn wins); any other template is generative.
- **Generative** templates are scored on greedy generations by ROUGE-L (data/rouge.py) in the ``rouge_clusters``
  (summarization, structure_to_text) and by exact match (normalised; "contains" is recorded too) elsewhere.
- Records with an empty completion (trec in this file) can be neither trained on nor scored: they are counted
  (``T0Data.empty``) and reported, not silently dropped.

The option sets are the labels OBSERVED in the file: where a slice misses a class (ag_news has 2 of its 4 topics,
dbpedia_14 one of 14) the ranking is over fewer options than the prompt lists. Reports say so.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from instructkit.data.schema import Conversation, DataError, Message

log = logging.getLogger(__name__)

T0_FIELDS = ("cluster", "dataset", "template", "prompt", "completion")
ROUGE_CLUSTERS = ("summarization", "structure_to_text")


@dataclass(frozen=True)
class T0Record:
    cluster: str
    dataset: str
    template: str
    prompt: str
    completion: str
    index: int
    """Position of the record within its (dataset, template) group, in file order."""
    line: int


@dataclass
class T0Data:
    path: str
    records: list[T0Record]
    empty: dict[str, int] = field(default_factory=dict)
    """dataset/template -> records skipped because their completion is empty."""

    def clusters(self) -> list[str]:
        return sorted({r.cluster for r in self.records})

    def datasets(self, clusters: Sequence[str] | None = None) -> list[str]:
        want = set(clusters) if clusters is not None else None
        return sorted({r.dataset for r in self.records if want is None or r.cluster in want})

    def templates(self, dataset: str) -> list[str]:
        return sorted({r.template for r in self.records if r.dataset == dataset})

    def options(self, max_options: int = 10) -> dict[tuple[str, str], list[str]]:
        """(dataset, template) -> the option set for rank classification (module docstring); absent = generative."""
        by_name: dict[tuple[str, str], set[str]] = defaultdict(set)
        for r in self.records:
            by_name[(r.cluster, r.template)].add(r.completion)
        out = {}
        for r in self.records:
            opts = by_name[(r.cluster, r.template)]
            if 2 <= len(opts) <= max_options:
                out[(r.dataset, r.template)] = sorted(opts)
        return out


def load_t0(path: str | Path, clusters: Sequence[str] | None = None) -> T0Data:
    """Read the T0 file; a bad line raises DataError naming the file, the line and the missing field."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    records: list[T0Record] = []
    empty: dict[str, int] = defaultdict(int)
    counters: dict[tuple[str, str], int] = defaultdict(int)
    want = set(clusters) if clusters is not None else None
    with opener(p, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not JSON: {e}", source=str(p), line=line_no) from None
            missing = [k for k in T0_FIELDS if not isinstance(obj.get(k), str)]
            if missing:
                raise DataError(f"T0 record needs string fields {list(T0_FIELDS)}; missing or not a string: {missing}",
                                source=str(p), line=line_no)
            if want is not None and obj["cluster"] not in want:
                continue
            key = (obj["dataset"], obj["template"])
            if not obj["completion"].strip():
                empty[f"{key[0]}/{key[1]}"] += 1
                continue
            records.append(T0Record(obj["cluster"], obj["dataset"], obj["template"], obj["prompt"],
                                    obj["completion"], counters[key], line_no))
            counters[key] += 1
    if not records:
        raise DataError("no usable T0 records (every record empty or outside the requested clusters)", source=str(p))
    return T0Data(str(p), records, dict(empty))


def shorten(text: str, max_chars: int) -> str:
    """``text`` if it fits in ``max_chars`` (0: no limit), else its first 40% and last 60% joined by " [...] ": T0
    prompts put the passage first and the instruction (and the answer options) last, so both ends are kept and the
    middle of the passage goes."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    head = int(max_chars * 0.4)
    return text[:head].rstrip() + " [...] " + text[len(text) - (max_chars - head):].lstrip()


def to_conversation(r: T0Record, with_response: bool = True, max_prompt_chars: int = 0) -> Conversation:
    """A T0 record as a conversation; ``max_prompt_chars`` shortens long prompts for TRAINING (so a length-capped SFT
    keeps the answer instead of dropping the example), see ``shorten``."""
    msgs = [Message("user", shorten(r.prompt.strip(), max_prompt_chars))]
    if with_response:
        msgs.append(Message("assistant", r.completion.strip()))
    return Conversation(msgs, meta={"task": r.dataset, "cluster": r.cluster, "template": r.template,
                                    "index": r.index, "source": "t0", "inputs": {"prompt": r.prompt},
                                    "target": r.completion})


# ---------------------------------------------------------------------------------------------------------------------
# Training mixtures and held-out items
# ---------------------------------------------------------------------------------------------------------------------
def training_mixture(data: T0Data, clusters: Sequence[str], total: int, seed: int,
                     templates_per_dataset: int = 0, exclude: set[tuple[str, int]] | None = None) -> list[T0Record]:
    """``total`` records from the datasets of ``clusters``, an equal share per dataset (the remainder to the first
    datasets of a seeded order), drawn without replacement within a dataset. ``templates_per_dataset`` > 0 keeps only
    that many (seeded) templates of each dataset, the template-diversity arm; 0 keeps all. ``exclude``: (dataset,
    index) pairs never drawn (the held-out examples, when a dataset is both trained and evaluated)."""
    rng = random.Random(f"t0-mixture/{seed}/{','.join(sorted(clusters))}/{templates_per_dataset}")
    datasets = data.datasets(clusters)
    if not datasets:
        raise DataError(f"no T0 records in clusters {list(clusters)}", source=data.path)
    pools: dict[str, list[T0Record]] = {}
    for d in datasets:
        tpls = data.templates(d)
        if templates_per_dataset > 0:
            tpls = sorted(rng.sample(tpls, min(templates_per_dataset, len(tpls))))
        keep = set(tpls)
        pool = [r for r in data.records if r.dataset == d and r.template in keep
                and not (exclude and (d, r.index) in exclude)]
        rng.shuffle(pool)
        pools[d] = pool
    order = list(datasets)
    rng.shuffle(order)
    share = {d: total // len(order) + (1 if i < total % len(order) else 0) for i, d in enumerate(order)}
    short = {d: (share[d], len(pools[d])) for d in order if share[d] > len(pools[d])}
    if short:
        raise DataError(f"T0 mixture of {total} examples needs more records than these datasets have "
                        f"(wanted, available): {short}; lower the total", source=data.path)
    out = [r for d in order for r in pools[d][:share[d]]]
    rng.shuffle(out)
    return out


def write_items(path: str | Path, items: Sequence[T0Record], options: dict[tuple[str, str], list[str]]) -> int:
    """Evaluation items as JSONL (one T0 record a line, with its option set or null for generative scoring), read back
    by ``read_items``: what an evaluation of several models scores must be fixed in a file, not re-drawn."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for r in items:
            f.write(json.dumps({"cluster": r.cluster, "dataset": r.dataset, "template": r.template, "prompt": r.prompt,
                                "completion": r.completion, "index": r.index, "line": r.line,
                                "options": options.get((r.dataset, r.template))}, ensure_ascii=False) + "\n")
    return len(items)


def read_items(path: str | Path) -> tuple[list[T0Record], dict[tuple[str, str], list[str]]]:
    """(items, option sets) from ``write_items``' file; a bad line raises DataError naming it."""
    items, options = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                o = json.loads(line)
                r = T0Record(o["cluster"], o["dataset"], o["template"], o["prompt"], o["completion"], int(o["index"]),
                             int(o.get("line", 0)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"not an evaluation item ({type(e).__name__}: {e}); need cluster, dataset, template, "
                                "prompt, completion, index, options", source=str(path), line=n) from None
            if o.get("options") is not None:
                if not (isinstance(o["options"], list) and len(o["options"]) >= 2
                        and r.completion in o["options"]):
                    raise DataError("options must be a list of >= 2 strings that contains the completion",
                                    source=str(path), line=n)
                options[(r.dataset, r.template)] = list(o["options"])
            items.append(r)
    if not items:
        raise DataError("no evaluation items", source=str(path))
    return items, options


def heldout_items(data: T0Data, clusters: Sequence[str], examples_per_dataset: int,
                  templates: str = "all") -> list[T0Record]:
    """Records of the held-out clusters: the first ``examples_per_dataset`` of each (dataset, template) group, under
    every template ("all") or the first template of each dataset in sorted order ("first")."""
    if templates not in ("all", "first"):
        raise DataError(f"eval templates must be 'all' or 'first', got {templates!r}")
    out = []
    for d in data.datasets(clusters):
        tpls = data.templates(d)
        keep = set(tpls if templates == "all" else tpls[:1])
        out += [r for r in data.records if r.dataset == d and r.template in keep and r.index < examples_per_dataset]
    if not out:
        raise DataError(f"no held-out T0 records in clusters {list(clusters)}", source=data.path)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------
def evaluate_t0(model, tokenizer, items: Sequence[T0Record], options: dict[tuple[str, str], list[str]],
                template: str = "auto", max_new_tokens: int = 32, batch_size: int = 16, match: str = "exact",
                rouge_clusters: Sequence[str] = ROUGE_CLUSTERS, prefix: Sequence[Message] = ()) -> dict:
    """Zero-shot scores of ``items`` in eval/heldout.summarize's shape (task = dataset): rank classification where the
    template has an option set, else ROUGE-L (``rouge_clusters``) or exact match on a greedy generation. ``prefix``:
    earlier turns put before every prompt (a few-shot prefix for a base model; empty: zero-shot)."""
    from instructkit.chat.render import Renderer
    from instructkit.eval.heldout import contains_match, exact_match, rouge_l_score, score_options, summarize
    from instructkit.generation.engine import Engine, SamplingParams

    renderer = Renderer(tokenizer, template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records: list[dict] = [{} for _ in items]
    ranked = [k for k, r in enumerate(items) if (r.dataset, r.template) in options]
    if ranked:
        payload = [([*prefix, Message("user", items[k].prompt.strip())], options[(items[k].dataset, items[k].template)])
                   for k in ranked]
        t0 = time.perf_counter()
        scores = score_options(model, renderer, payload, pad_id, batch_size)
        log.info("rank classification: %d prompts in %.1fs", len(payload), time.perf_counter() - t0)
        for k, (_, opts), sc in zip(ranked, payload, scores):
            best = max(range(len(sc)), key=lambda j: sc[j])
            records[k] = {"prediction": opts[best], "score": float(opts[best] == items[k].completion),
                          "metric": "accuracy", "options": len(opts)}
    generative = [k for k, r in enumerate(items) if (r.dataset, r.template) not in options]
    if generative:
        engine = Engine(model, tokenizer, max_batch_size=batch_size, template=template)
        prompts = [renderer.render_prompt([*prefix, Message("user", items[k].prompt.strip())]) for k in generative]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                stop_token_ids=sorted(set(renderer.stop_token_ids)), logprobs=False)
        was_training = model.training
        model.eval()
        outputs = engine.generate(prompts, params)
        if was_training:
            model.train()
        for k, o in zip(generative, outputs):
            r = items[k]
            if r.cluster in rouge_clusters:
                records[k] = {"prediction": o.text, "score": rouge_l_score(o.text, [r.completion]),
                              "metric": "rouge_l"}
            else:
                em, cm = exact_match(o.text, [r.completion]), contains_match(o.text, [r.completion])
                records[k] = {"prediction": o.text, "score": cm if match == "contains" else em, "exact": em,
                              "contains": cm, "metric": "contains" if match == "contains" else "exact_match"}
    for k, r in enumerate(items):
        records[k].update({"task": r.dataset, "cluster": r.cluster, "template": r.template, "index": r.index,
                           "target": r.completion})
    res = summarize(records)
    # a dataset mixes rank-classified and generative templates: say which, per dataset
    for name, t in res["tasks"].items():
        ms = sorted({rec["metric"] for rec in records if rec["task"] == name})
        t["metric"] = "+".join(ms)
    return res
