"""Self-Instruct (Wang et al. 2022, arXiv:2212.10560): grow an instruction data set from seed tasks with an LLM.

Phases, in order (each appends to its own journal in the run folder, so a killed run continues where it stopped with
no duplicates and no gaps; a journal line is one whole unit of work, written and fsynced at once):

1. instructions  (instructions.jsonl, one line per round): each round sends ``prompts_per_round`` prompts showing
   8 instructions (6 seed + 2 already generated, shuffled) in the original style "Come up with a series of tasks:\\n
   1. ...\\n8. ...\\n9."; the numbered continuation is parsed and every candidate goes through the filters: length
   (3-150 words), blacklisted words, starting with punctuation or a non-ASCII character, then ROUGE-L >= 0.7 against
   any instruction in the pool (data/rouge.py). Every candidate's fate is recorded with its reason.
2. classification (classification.jsonl, one line per batch): a few-shot prompt asks "Can the following task be
   regarded as a classification task with finite output labels?"; the answer's first word is parsed as yes/no.
3. instances (instances.jsonl, one line per batch): output-first prompts for classification tasks (a class label,
   then an input for it: avoids every example getting the majority label), input-first for the rest.
4. export: data.jsonl in the internal format (one conversation per instance; every record's meta names the model, the
   prompt-template version and the seed) and report.md / report.json with counts per filter and the instruction verbs.

What is simplified against the reference scripts: one prompt style for all tasks (no classification-only prompts), the
first word of an instruction stands for its verb (the paper used a constituency parser), and a completion cut by the
token limit keeps its complete items rather than being discarded whole.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

from instructkit.config import ConfigError, SelfInstructConfig, to_dict
from instructkit.data.rouge import RougeLIndex
from instructkit.data.seed_tasks import SeedTask, load_seed_tasks
from instructkit.generation.engine import SamplingParams

PROMPT_VERSION = "self-instruct-v1"
"""Version of the prompt templates below; recorded in every output record. Change it when a template changes."""

INSTRUCTION_STOPS = ("\n\n", "\n16", "16.", "16 .")
FILTER_ORDER = ("empty", "too_short", "too_long", "blacklist", "punctuation_start", "non_ascii_start",
                "duplicate", "rouge", "target_reached")

CLF_QUESTION = "Can the following task be regarded as a classification task with finite output labels?"
# Few-shot examples written for this project (not the paper's list).
CLF_EXAMPLES = [
    ("Tell me whether the following movie review is positive or negative.", "Yes"),
    ("Write a short story about a lighthouse keeper who finds a message in a bottle.", "No"),
    ("Decide if the given number is prime.", "Yes"),
    ("Suggest three names for a coffee shop near a university.", "No"),
    ("Identify which of the two sentences is grammatically correct.", "Yes"),
    ("Explain why leaves change colour in autumn.", "No"),
    ("Given an email, label it as spam or not spam.", "Yes"),
    ("Translate the sentence into Spanish.", "No"),
]

INPUT_FIRST_HEADER = ("Come up with examples for the following tasks. Try to generate multiple examples when possible. "
                      "If the task doesn't require additional input, you can generate the output directly.\n\n")
INPUT_FIRST_EXAMPLES = [
    ("Convert the temperature from Celsius to Fahrenheit.",
     [("25 degrees Celsius", "77 degrees Fahrenheit"), ("-10 degrees Celsius", "14 degrees Fahrenheit")]),
    ("Give me a motivational quote for the start of the week.",
     [("", "\"Small steps every day add up to big results.\"")]),
    ("Rewrite the sentence so that it uses the passive voice.",
     [("The committee approved the new budget.", "The new budget was approved by the committee.")]),
]
OUTPUT_FIRST_HEADER = ("Given the classification task definition and the class labels, generate an input that "
                       "corresponds to each of the class labels. If the task doesn't require input, just generate the "
                       "correct class label.\n\n")
OUTPUT_FIRST_EXAMPLES = [
    ("Classify the sentiment of the product review as positive or negative.",
     [("Positive", "The blender is powerful, quiet and easy to clean. Worth every penny."),
      ("Negative", "It stopped working after two days and the seller never replied.")]),
    ("Is the number even or odd?", [("Even", "42"), ("Odd", "17")]),
]


# ---------------------------------------------------------------------------------------------------------------------
# prompts and parsing
def encode_instruction_prompt(instructions: list[str]) -> str:
    prompt = "Come up with a series of tasks:\n"
    for i, inst in enumerate(instructions, start=1):
        inst = re.sub(r"\s+", " ", inst).strip().rstrip(":")
        prompt += f"{i}. {inst}\n"
    return prompt + f"{len(instructions) + 1}."


_NUMBERED = re.compile(r"(?:^|\n)\s*\d+\s?[.)]\s*")


def parse_instructions(text: str, chat: bool = False) -> list[str]:
    """Numbered list -> instructions. A plain continuation starts right after "9." (its first item has no number);
    a chat reply may start with a preamble before "1.", which is dropped."""
    if chat:
        m = _NUMBERED.search(text)
        text = text[m.start():] if m else text
    text = re.sub(r"\n\s*\d+\s*\.?\s*$", "", text)  # the next number, left when a stop string cut after it
    parts = _NUMBERED.split(text)
    if chat and parts and not parts[0].strip():
        parts = parts[1:]  # the text before "1."
    return [re.sub(r"\s+", " ", p).strip() for p in parts]


def candidate_filter(inst: str, cfg: SelfInstructConfig, blacklist_re: re.Pattern | None) -> str | None:
    """The first filter ``inst`` fails (a FILTER_ORDER name), or None when it passes the cheap filters."""
    if not inst:
        return "empty"
    n = len(inst.split())
    if n < cfg.min_words:
        return "too_short"
    if n > cfg.max_words:
        return "too_long"
    if blacklist_re is not None and blacklist_re.search(inst):
        return "blacklist"
    if inst[0] in string.punctuation:
        return "punctuation_start"
    if not (inst[0].isascii() and inst[0].isalnum()):
        return "non_ascii_start"
    return None


def classification_prompt(instruction: str) -> str:
    shots = "".join(f"Task: {t}\nIs it classification? {a}\n\n" for t, a in CLF_EXAMPLES)
    return f"{CLF_QUESTION}\n\n{shots}Task: {instruction}\nIs it classification?"


def parse_yes_no(text: str) -> bool | None:
    m = re.match(r"\W*(yes|no)\b", text.strip(), flags=re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"


def instance_prompt(instruction: str, output_first: bool) -> str:
    if output_first:
        body = OUTPUT_FIRST_HEADER
        for task, pairs in OUTPUT_FIRST_EXAMPLES:
            body += f"Task: {task}\n" + "".join(f"Class label: {lab}\nInput: {x}\n" for lab, x in pairs) + "\n"
        return body + f"Task: {instruction}\n"
    body = INPUT_FIRST_HEADER
    for task, pairs in INPUT_FIRST_EXAMPLES:
        body += f"Task: {task}\n"
        for k, (x, y) in enumerate(pairs, start=1):
            body += f"Example {k}\n" + (f"Input: {x}\n" if x else "") + f"Output: {y}\n"
        body += "\n"
    return body + f"Task: {instruction}\n"


def parse_instances(text: str, output_first: bool) -> list[dict[str, str]]:
    """Completion -> [{"input", "output"}]. Output-first: "Class label: L\\nInput: x" blocks; input-first:
    "Example k\\nInput: x\\nOutput: y" blocks (a block without "Input:" has an empty input)."""
    text = text.split("\nTask:")[0]
    out = []
    if output_first:
        for block in re.split(r"(?:^|\n)\s*Class label\s*:", text)[1:]:
            label, _, rest = block.partition("\n")
            x = re.sub(r"^\s*Input\s*\d*\s*:", "", rest.strip()).strip()
            out.append({"input": x, "output": label.strip()})
        return out
    blocks = re.split(r"(?:^|\n)\s*Example\s*\d+\s*:?", text)
    if not any(re.search(r"Output\s*\d*\s*:", b) for b in blocks):
        # no "Output:" marker: the whole completion is the output of an input-less task (as the reference parser does)
        whole = re.sub(r"^\s*Example\s*\d+\s*:?", "", text).strip()
        return [{"input": "", "output": whole}] if whole else []
    for block in blocks:
        if not re.search(r"Output\s*\d*\s*:", block):
            continue
        before, after = re.split(r"Output\s*\d*\s*:", block, maxsplit=1)
        x = re.sub(r"^\s*Input\s*\d*\s*:", "", before.strip()).strip()
        y = re.split(r"\n\s*Input\s*\d*\s*:", after)[0].strip()
        out.append({"input": x, "output": y})
    return out


def filter_instances(instances: list[dict[str, str]], max_instances: int) -> tuple[list[dict[str, str]], Counter]:
    kept, dropped, seen = [], Counter(), set()
    for x in instances:
        if not x["output"].strip():
            dropped["empty_output"] += 1
        elif x["input"].strip() and x["input"].strip() == x["output"].strip():
            dropped["input_equals_output"] += 1
        elif (x["input"], x["output"]) in seen:
            dropped["duplicate"] += 1
        elif len(kept) >= max_instances:
            dropped["over_max_instances"] += 1
        else:
            seen.add((x["input"], x["output"]))
            kept.append(x)
    return kept, dropped


def first_verb(instruction: str) -> str:
    """The instruction's first word, lowercased (imperatives start with their verb); "please" is skipped."""
    words = re.findall(r"[A-Za-z']+", instruction)
    while words and words[0].lower() in ("please", "now", "then", "also"):
        words = words[1:]
    return words[0].lower() if words else ""


# ---------------------------------------------------------------------------------------------------------------------
# journals: append whole lines, fsync; on reading, a torn last line (a kill mid-write) is cut off
def read_journal(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good < len(data):
        with path.open("r+b") as f:
            f.truncate(good)
    return records


def append_journal(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# Fields that may change between a run and its resumption (they do not change what is generated).
_RESUME_FREE = {"output_dir", "run_name", "num_instructions", "max_rounds", "threads", "backend.timeout",
                "backend.max_retries", "backend.backoff", "backend.concurrency", "backend.api_key_env",
                "backend.base_url"}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _check_resume(run_dir: Path, cfg: SelfInstructConfig) -> None:
    saved_path = run_dir / "config.json"
    now = _flatten(to_dict(cfg))
    if saved_path.exists():
        saved = _flatten(json.loads(saved_path.read_text(encoding="utf-8")))
        for key in sorted(set(saved) | set(now)):
            if key not in _RESUME_FREE and saved.get(key) != now.get(key):
                raise ConfigError(f"{run_dir} was started with {key}={saved.get(key)!r}, now {key}={now.get(key)!r}: "
                                  "use a new run_name, or the original value to resume")
    tmp = saved_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2), encoding="utf-8")  # names of env vars only, never keys
    os.replace(tmp, saved_path)


def _request(prompt: str, chat: bool) -> Any:
    return [{"role": "user", "content": prompt}] if chat else prompt


def _seed(cfg: SelfInstructConfig, stage: int, unit: int) -> int:
    return (cfg.seed * 1_000_003 + stage * 100_003 + unit * 1009) % (2**31 - 1)


# ---------------------------------------------------------------------------------------------------------------------
def generate_instructions(cfg: SelfInstructConfig, backend, seeds: list[SeedTask], run_dir: Path, log) -> list[dict]:
    """Phase 1: rounds of instruction generation until num_instructions are kept or max_rounds have run."""
    journal = run_dir / "instructions.jsonl"
    rounds = read_journal(journal)
    seed_texts = [s.instruction for s in seeds]
    index = RougeLIndex(seed_texts)
    machine: list[dict] = []
    for rec in rounds:
        for c in rec["candidates"]:
            if c["kept"]:
                machine.append({"id": c["id"], "instruction": c["instruction"]})
                index.add(c["instruction"])
    if rounds:
        log(f"resuming: {len(rounds)} rounds done, {len(machine)} instructions kept")
    blacklist_re = (re.compile(r"\b(" + "|".join(re.escape(w) for w in cfg.blacklist) + r")\b", re.IGNORECASE)
                    if cfg.blacklist else None)
    n_shown = cfg.num_seed_in_prompt + cfg.num_generated_in_prompt
    r = len(rounds)
    while len(machine) < cfg.num_instructions and r < cfg.max_rounds:
        rng = random.Random(_seed(cfg, 1, r))
        prompts = []
        for _ in range(cfg.prompts_per_round):
            shown = rng.sample([m["instruction"] for m in machine], min(cfg.num_generated_in_prompt, len(machine)))
            shown += rng.sample(seed_texts, min(n_shown - len(shown), len(seed_texts)))
            rng.shuffle(shown)
            prompts.append(encode_instruction_prompt(shown))
        stops = INSTRUCTION_STOPS[1:] if cfg.chat else INSTRUCTION_STOPS  # a chat reply may have blank lines
        params = SamplingParams(max_new_tokens=cfg.instruction_max_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p, stop_strings=stops, seed=_seed(cfg, 1, r), logprobs=False)
        texts = backend.complete([_request(p, cfg.chat) for p in prompts], params)
        candidates = []
        round_texts: set[str] = set()
        for text in texts:
            for raw in parse_instructions(text, chat=cfg.chat):
                inst = raw[:1].upper() + raw[1:]
                reason = candidate_filter(inst, cfg, blacklist_re)
                score, similar = None, None
                if reason is None and inst in round_texts:
                    reason = "duplicate"
                if reason is None:
                    score, j = index.max_score(inst)
                    similar = index.texts[j] if j >= 0 else None
                    if score >= cfg.rouge_threshold:
                        reason = "rouge"
                    elif len(machine) >= cfg.num_instructions:
                        reason = "target_reached"
                c = {"instruction": inst, "kept": reason is None, "reason": reason,
                     "rouge": None if score is None else round(score, 6), "most_similar": similar}
                if reason is None:
                    c["id"] = f"si-{r:04d}-{len(candidates):03d}"
                    machine.append({"id": c["id"], "instruction": inst})
                    index.add(inst)
                round_texts.add(inst)
                candidates.append(c)
        append_journal(journal, {"round": r, "prompts": len(prompts), "seed": _seed(cfg, 1, r),
                                 "candidates": candidates})
        kept = sum(c["kept"] for c in candidates)
        log(f"round {r}: {len(candidates)} candidates, {kept} kept, pool {len(machine)}/{cfg.num_instructions}")
        r += 1
    return machine


def _batched_stage(name: str, journal: Path, items: list[dict], batch: int, run_batch, log) -> list[dict]:
    """Run ``run_batch(k, items_k) -> results`` over fixed batches, skipping batches already in the journal."""
    done = {rec["batch"]: rec["results"] for rec in read_journal(journal)}
    results: list[dict] = []
    for k, start in enumerate(range(0, len(items), batch)):
        chunk = items[start:start + batch]
        if k in done:
            got = done[k]
            if [g["id"] for g in got] != [c["id"] for c in chunk]:
                raise ConfigError(f"{journal}: batch {k} holds different instructions than this run would make; "
                                  "the run folder belongs to another configuration")
        else:
            got = run_batch(k, chunk)
            append_journal(journal, {"batch": k, "results": got})
            log(f"{name}: batch {k} ({len(chunk)} instructions) done")
        results.extend(got)
    return results


def classify(cfg: SelfInstructConfig, backend, machine: list[dict], run_dir: Path, log) -> list[dict]:
    def run_batch(k: int, chunk: list[dict]) -> list[dict]:
        if not cfg.classify:
            return [{"id": c["id"], "is_classification": False, "answer": None} for c in chunk]
        params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_strings=("\n",), seed=_seed(cfg, 2, k),
                                logprobs=False)
        answers = backend.complete([_request(classification_prompt(c["instruction"]), cfg.chat) for c in chunk], params)
        return [{"id": c["id"], "is_classification": bool(parse_yes_no(a)), "answer": a,
                 "parsed": parse_yes_no(a) is not None} for c, a in zip(chunk, answers)]

    return _batched_stage("classification", run_dir / "classification.jsonl", machine, cfg.instance_batch_size,
                          run_batch, log)


def generate_instances(cfg: SelfInstructConfig, backend, machine: list[dict], clf: list[dict], run_dir: Path,
                       log) -> list[dict]:
    is_clf = {c["id"]: c["is_classification"] for c in clf}

    def run_batch(k: int, chunk: list[dict]) -> list[dict]:
        params = SamplingParams(max_new_tokens=cfg.instance_max_tokens, temperature=0.0,
                                stop_strings=("\nTask:", "Example 6"), seed=_seed(cfg, 3, k), logprobs=False)
        reqs = [_request(instance_prompt(c["instruction"], is_clf[c["id"]]), cfg.chat) for c in chunk]
        texts = backend.complete(reqs, params)
        out = []
        for c, text in zip(chunk, texts):
            parsed = parse_instances(text, is_clf[c["id"]])
            kept, dropped = filter_instances(parsed, cfg.max_instances)
            out.append({"id": c["id"], "instruction": c["instruction"], "is_classification": is_clf[c["id"]],
                        "instances": kept, "parsed": len(parsed), "dropped": dict(dropped)})
        return out

    return _batched_stage("instances", run_dir / "instances.jsonl", machine, cfg.instance_batch_size, run_batch, log)


def export(cfg: SelfInstructConfig, backend_name: str, tasks: list[dict], run_dir: Path) -> tuple[Path, int, Counter]:
    """data.jsonl in the internal format, written atomically. Returns (path, records, rejected per reason)."""
    from instructkit.data.schema import Conversation, DataError, Message, validate_conversation

    path = run_dir / "data.jsonl"
    tmp = path.with_suffix(".tmp")
    n, rejected = 0, Counter()
    with tmp.open("w", encoding="utf-8") as f:
        for t in tasks:
            for k, x in enumerate(t["instances"]):
                user = t["instruction"] + (f"\n\n{x['input']}" if x["input"].strip() else "")
                meta = {"source": "self_instruct", "model": backend_name, "prompt_template_version": PROMPT_VERSION,
                        "seed": cfg.seed, "instruction_id": t["id"], "instance": k,
                        "is_classification": t["is_classification"]}
                conv = Conversation([Message("user", user), Message("assistant", x["output"])], meta)
                try:
                    validate_conversation(conv)
                except DataError as e:
                    rejected[e.reason] += 1
                    continue
                f.write(json.dumps({"messages": [m.to_dict() for m in conv.messages], "meta": meta},
                                   ensure_ascii=False) + "\n")
                n += 1
    os.replace(tmp, path)
    return path, n, rejected


def build_report(cfg: SelfInstructConfig, backend_name: str, run_dir: Path, clf: list[dict], tasks: list[dict],
                 exported: int, export_rejects: Counter) -> dict:
    rounds = read_journal(run_dir / "instructions.jsonl")
    cands = [c for r in rounds for c in r["candidates"]]
    reasons = Counter(c["reason"] for c in cands if not c["kept"])
    kept = [c["instruction"] for c in cands if c["kept"]]
    verbs = Counter(first_verb(i) for i in kept)
    report = {
        "model": backend_name, "prompt_template_version": PROMPT_VERSION, "seed": cfg.seed,
        "rounds": len(rounds), "prompts": sum(r["prompts"] for r in rounds),
        "instructions": {"candidates": len(cands), "kept": len(kept),
                         "rejected": {k: reasons.get(k, 0) for k in FILTER_ORDER}},
        "classification": {"tasks": len(clf), "yes": sum(c["is_classification"] for c in clf),
                           "unparsed": sum(1 for c in clf if c.get("parsed") is False)},
        "instances": {"parsed": sum(t["parsed"] for t in tasks), "kept": sum(len(t["instances"]) for t in tasks),
                      "dropped": dict(sum((Counter(t["dropped"]) for t in tasks), Counter())),
                      "instructions_without_instances": sum(1 for t in tasks if not t["instances"])},
        "exported": exported, "export_rejected": dict(export_rejects),
        "verbs": dict(verbs.most_common()),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    ins = report["instructions"]
    lines = [f"# Self-Instruct run `{cfg.run_name}`", "",
             f"Model `{backend_name}`, prompt templates `{PROMPT_VERSION}`, seed {cfg.seed}; "
             f"{report['rounds']} rounds, {report['prompts']} prompts.", "",
             "## Instructions", "", "| outcome | count |", "|---|---|", f"| candidates | {ins['candidates']} |",
             f"| kept | {ins['kept']} |"]
    lines += [f"| rejected: {k} | {v} |" for k, v in ins["rejected"].items()]
    lines += ["", "## Classification and instances", "",
              f"- classification tasks: {report['classification']['yes']} of {report['classification']['tasks']} "
              f"({report['classification']['unparsed']} answers not yes/no, taken as no)",
              f"- instances parsed {report['instances']['parsed']}, kept {report['instances']['kept']}, dropped "
              f"{report['instances']['dropped']}",
              f"- exported conversations: {exported} (rejected by validation: {dict(export_rejects)})", "",
              "## Instruction verbs (first word)", "", "| verb | count |", "|---|---|"]
    lines += [f"| {v or '(none)'} | {n} |" for v, n in verbs.most_common(30)]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def main(cfg: SelfInstructConfig, backend=None, log=print) -> dict:
    run_dir = Path(cfg.output_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(run_dir, cfg)
    seeds = load_seed_tasks(cfg.seed_tasks)
    if backend is None:
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        from instructkit.generation.backends import make_backend

        backend = make_backend(cfg.backend)
    machine = generate_instructions(cfg, backend, seeds, run_dir, log)
    clf = classify(cfg, backend, machine, run_dir, log)
    tasks = generate_instances(cfg, backend, machine, clf, run_dir, log)
    path, n, rejects = export(cfg, backend.name, tasks, run_dir)
    report = build_report(cfg, backend.name, run_dir, clf, tasks, n, rejects)
    log(f"wrote {n} conversations to {path}; report in {run_dir / 'report.md'}")
    return {"run_dir": str(run_dir), "data": str(path), "exported": n, "report": report}

