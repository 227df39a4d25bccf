"""Self-Instruct seed tasks: the human-written tasks a Self-Instruct run starts from.

Format (one JSON object per line, as in the Self-Instruct repository's ``seed_tasks.jsonl``)::

    {"id": "seed_task_0", "name": "breakfast_suggestion", "instruction": "...",
     "instances": [{"input": "", "output": "..."}], "is_classification": false}

``builtin`` is a set of 64 tasks written for this project (resources/seed_tasks.jsonl) across the categories of the
original set: open generation, brainstorming, rewriting, classification, extraction, question answering, reasoning,
code, summarisation. Each has at least one instance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from instructkit.data.schema import DataError


@dataclass
class SeedTask:
    id: str
    instruction: str
    instances: list[dict[str, str]] = field(default_factory=list)
    is_classification: bool = False
    name: str = ""


def _parse(obj, source: str, line: int) -> SeedTask:
    if not isinstance(obj, dict):
        raise DataError("a seed task must be a JSON object", source, line)
    inst = obj.get("instruction")
    if not isinstance(inst, str) or not inst.strip():
        raise DataError("missing or empty 'instruction'", source, line)
    instances = obj.get("instances", [])
    if not isinstance(instances, list):
        raise DataError("'instances' must be a list", source, line)
    clean = []
    for k, x in enumerate(instances):
        if not isinstance(x, dict) or not isinstance(x.get("output", ""), str) or not isinstance(x.get("input", ""), str):
            raise DataError(f"instances[{k}] must be an object with string 'input' and 'output'", source, line)
        clean.append({"input": x.get("input", ""), "output": x.get("output", "")})
    is_clf = obj.get("is_classification", False)
    if not isinstance(is_clf, bool):
        raise DataError("'is_classification' must be true or false", source, line)
    return SeedTask(id=str(obj.get("id", f"seed_{line}")), instruction=inst.strip(), instances=clean,
                    is_classification=is_clf, name=str(obj.get("name", "")))


def _read_lines(text: str, source: str) -> list[SeedTask]:
    tasks = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON ({e.msg})", source, n) from None
        tasks.append(_parse(obj, source, n))
    if not tasks:
        raise DataError("no seed tasks", source)
    return tasks


def load_seed_tasks(path: str | Path = "builtin") -> list[SeedTask]:
    """Seed tasks from a Self-Instruct-format JSONL file, or the built-in set (``"builtin"``)."""
    if str(path) == "builtin":
        text = resources.files("instructkit").joinpath("resources/seed_tasks.jsonl").read_text(encoding="utf-8")
        return _read_lines(text, "builtin:seed_tasks")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"seed task file not found: {p}")
    return _read_lines(p.read_text(encoding="utf-8"), str(p))
