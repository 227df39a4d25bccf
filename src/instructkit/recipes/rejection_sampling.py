"""Rejection sampling of constraint-following SFT data (the data side of Tülu 3's verifiable instruction following,
Lambert et al. 2024, and of rejection-sampling fine-tuning, Touvron et al. 2023 "Llama 2", section 3.2.3): a teacher
answers each constraint-carrying prompt ``samples_per_prompt`` times; a sample is kept only when it ends its turn and
satisfies EVERY constraint of its prompt under the strict IFEval checkers (eval/instruction_following.check_instruction,
the code IFEval scores with). The first passing sample of a prompt (in sampling order) becomes an SFT conversation;
a prompt with no passing sample goes to the rejects file with the reason of each sample, counted. Nothing is edited:
a kept response is the teacher's text as generated.

Input: prompt records from ``instructkit data add-constraints``
(``{"prompt": [...], "constraints": [{"id", "kwargs"}]}``).
Output: internal-format conversations (data/io.write_jsonl), meta = the prompt's meta plus ``teacher``, ``sample``
(which of the samples passed) and ``generated_by: rejection_sampling`` (readers set ``source`` to the file);
``<out>.rejects`` (JSONL) and ``<out>.report.json``
(counts; acceptance per constraint id and per sample).

Phases: read prompts -> load the teacher -> generate in chunks of ``chunk`` prompts (each prompt repeated
``samples_per_prompt`` times, row i sampled with seed + i) -> check -> write. The IFEval evaluation prompts must never
be among the inputs: ``add-constraints --eval`` refuses them before this step.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from instructkit.config import RejectionSamplingConfig

log = logging.getLogger(__name__)


def judge_sample(constraints: list[dict[str, Any]], text: str, finish_reason: str) -> list[str]:
    """Why a sample is rejected (empty list: kept): 'length' when it did not end its turn, else the ids of the
    constraints it fails under the strict checkers."""
    from instructkit.eval.instruction_following import check_instruction

    if finish_reason != "stop":
        return ["length"]
    return [c["id"] for c in constraints if not check_instruction(c["id"], c.get("kwargs") or {}, text)]


def read_prompt_records(path: str, limit: int | None = None) -> list[tuple[list[dict[str, str]], dict[str, Any]]]:
    """(prompt messages, meta) per record; a record without constraints is an error naming its line."""
    from instructkit.data.io import read_examples
    from instructkit.data.schema import DataError
    from instructkit.data.sources import prompt_messages_of

    out = []
    for i, ex in enumerate(read_examples(path, "auto"), 1):
        meta = dict(getattr(ex, "meta", None) or {})
        if not meta.get("constraints"):
            raise DataError("record carries no constraints (make the prompts with `instructkit data "
                            "add-constraints`)", source=path, line=i)
        if getattr(ex, "tools", None) or meta.get("tools"):
            raise DataError("record declares tools; rejection sampling renders plain conversations and would drop "
                            "them (the kept SFT example would not show what the teacher saw)", source=path, line=i)
        msgs = [m.to_dict() for m in prompt_messages_of(ex)]
        out.append((msgs, meta))
        if limit and len(out) >= limit:
            break
    return out


def main(cfg: RejectionSamplingConfig) -> dict[str, Any]:
    from instructkit.data.io import write_jsonl
    from instructkit.data.schema import Conversation, Message
    from instructkit.eval.heldout import load_for_eval
    from instructkit.generation.engine import Engine, SamplingParams

    records = read_prompt_records(cfg.input, cfg.limit)
    model, tokenizer = load_for_eval(cfg.teacher, cfg.template)
    engine = Engine(model, tokenizer, max_batch_size=cfg.batch_size, template=cfg.template)
    n = cfg.samples_per_prompt
    kept: list[Conversation] = []
    rejects: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    per_id = {}  # constraint id -> [samples checked, samples that satisfied it]
    passing_sample = Counter()
    t0 = time.perf_counter()
    for start in range(0, len(records), cfg.chunk):
        chunk = records[start:start + cfg.chunk]
        convs = [msgs for msgs, _ in chunk for _ in range(n)]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                seed=cfg.seed + start * n, logprobs=False)
        outs = engine.chat(convs, params)
        for j, (msgs, meta) in enumerate(chunk):
            why_all = []
            chosen = None
            for s in range(n):
                o = outs[j * n + s]
                why = judge_sample(meta["constraints"], o.text, o.finish_reason)
                if why != ["length"]:
                    for c in meta["constraints"]:
                        per_id.setdefault(c["id"], [0, 0])[0] += 1
                        per_id[c["id"]][1] += c["id"] not in why
                why_all.append(why)
                if not why and chosen is None:
                    chosen = (s, o.text)
            if chosen is None:
                reasons.update({r for why in why_all for r in why})
                rejects.append({"index": start + j, "prompt": msgs, "constraints": meta["constraints"],
                                "reasons": why_all})
                continue
            passing_sample[chosen[0]] += 1
            out_meta = {**meta, "generated_by": "rejection_sampling", "teacher": cfg.teacher, "sample": chosen[0]}
            kept.append(Conversation([Message(m["role"], m["content"]) for m in msgs]
                                     + [Message("assistant", chosen[1])], out_meta))
        log.info("rejection sampling: %d/%d prompts, %d kept (%.0f s)", start + len(chunk), len(records), len(kept),
                 time.perf_counter() - t0)
    write_jsonl(cfg.output, kept)
    rejects_path = Path(cfg.output + ".rejects")
    with open(rejects_path, "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    report = {"input": cfg.input, "output": cfg.output, "teacher": cfg.teacher, "prompts": len(records),
              "samples_per_prompt": n, "kept": len(kept), "rejected": len(rejects),
              "acceptance": len(kept) / max(1, len(records)), "rejects_file": str(rejects_path),
              "reasons_of_rejected_prompts": dict(reasons.most_common()),
              "per_constraint": {k: {"samples_checked": v[0], "satisfied": v[1],
                                     "rate": v[1] / v[0] if v[0] else None} for k, v in sorted(per_id.items())},
              "kept_by_sample": {str(k): v for k, v in sorted(passing_sample.items())},
              "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
              "seed": cfg.seed, "seconds": round(time.perf_counter() - t0, 1)}
    Path(cfg.output + ".report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report
