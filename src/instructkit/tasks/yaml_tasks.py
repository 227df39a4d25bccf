"""Tasks defined in YAML, so users add tasks and templates without code.

    tasks:
      - name: country_of_capital
        cluster: geography                 # a new cluster, or an existing one
        metric: exact_match                # accuracy (rank classification over options) | exact_match | rouge_l
        options: [yes, no]                 # optional: labels shared by every example
        templates:
          - {name: direct, version: 1, instruction: "Which country has {city} as its capital?", response: "{target}"}
          - "Name the country whose capital is {city}."          # short form: instruction only
        examples:                          # inline examples ...
          - {inputs: {city: Paris}, target: France}
          - {city: Oslo, target: Norway}   # short form: every key but target/options is an input field
        file: more.jsonl                   # ... and/or a data file, relative to this YAML
        format: records                    # "records": raw JSON/JSONL/Parquet rows with the fields below;
                                           # any other value: a format data/io.py reads (alpaca, sharegpt, ...), whose
                                           # conversations become inputs {prompt, system} and target = the answer
        fields: {target: label, options: choices}   # "records" only: which columns hold the target and the options

Errors are DataErrors naming the file, the task and what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from instructkit.data.schema import Conversation, DataError
from instructkit.tasks.bank import METRICS, Task, TaskExample, Template

_TASK_KEYS = {"name", "cluster", "metric", "options", "templates", "examples", "file", "format", "fields",
              "description"}


def _template(spec: Any, i: int, where: str) -> Template:
    if isinstance(spec, str):
        return Template(f"t{i + 1:02d}", spec)
    if not isinstance(spec, dict) or "instruction" not in spec:
        raise DataError(f"{where}: template {i} must be a string or a mapping with 'instruction'")
    unknown = set(spec) - {"name", "version", "instruction", "response", "system"}
    if unknown:
        raise DataError(f"{where}: template {i} has unknown key(s) {sorted(unknown)}")
    for k in ("instruction", "response", "system"):
        if k in spec and spec[k] is not None and not isinstance(spec[k], str):
            raise DataError(f"{where}: template {i} '{k}' must be a string")
    return Template(str(spec.get("name", f"t{i + 1:02d}")), spec["instruction"], spec.get("response", "{target}"),
                    int(spec.get("version", 1)), spec.get("system"))


def _options(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: options must be a non-empty list")
    return tuple(str(v) for v in value)


def _inline_example(d: Any, i: int, where: str) -> TaskExample:
    if not isinstance(d, dict) or "target" not in d:
        raise DataError(f"{where}: example {i} must be a mapping with a 'target'")
    if "inputs" in d:
        if not isinstance(d["inputs"], dict):
            raise DataError(f"{where}: example {i} 'inputs' must be a mapping")
        inputs = dict(d["inputs"])
    else:
        inputs = {k: v for k, v in d.items() if k not in ("target", "options")}
    return TaskExample(inputs, str(d["target"]), _options(d.get("options"), f"{where} example {i}"))


def _conversation_example(conv: Conversation) -> TaskExample:
    """A read conversation -> inputs {prompt, system}, target = final assistant turn, earlier turns as history."""
    msgs = list(conv.messages)
    system = msgs.pop(0).content if msgs and msgs[0].role == "system" else ""
    if len(msgs) < 2 or msgs[-1].role != "assistant" or msgs[-2].role != "user":
        raise DataError("conversation must end with a user turn and an assistant answer")
    return TaskExample({"prompt": msgs[-2].content, "system": system}, msgs[-1].content, None, tuple(msgs[:-2]))


def _file_examples(spec: dict, base: Path, where: str) -> list[TaskExample]:
    path = Path(spec["file"])
    if not path.is_absolute():
        path = base / path
    if not path.exists():
        raise FileNotFoundError(f"{where}: data file not found: {path}")
    fmt = spec.get("format", "records")
    out: list[TaskExample] = []
    if fmt == "records":
        from instructkit.data.io import iter_records

        fields = spec.get("fields") or {}
        tkey, okey = fields.get("target", "target"), fields.get("options", "options")
        for rec in iter_records(path):
            if rec.error is not None:
                raise rec.error
            row = rec.value
            if not isinstance(row, dict) or tkey not in row:
                raise rec.locate(DataError(f"record has no target field '{tkey}'"))
            inputs = {k: v for k, v in row.items() if k not in (tkey, okey)}
            out.append(TaskExample(inputs, str(row[tkey]), _options(row.get(okey), where)))
        return out
    from instructkit.data.io import read_examples

    for i, e in enumerate(read_examples(path, fmt)):
        if not isinstance(e, Conversation):
            raise DataError(f"{where}: {path} holds preference pairs; a task needs conversations")
        try:
            out.append(_conversation_example(e))
        except DataError as err:
            raise err.at(str(path), record=i) from None
    return out


def task_from_dict(spec: Any, base: Path, source: str = "<yaml>") -> Task:
    if not isinstance(spec, dict):
        raise DataError(f"{source}: each task must be a mapping")
    name = spec.get("name")
    where = f"{source}: task {name!r}"
    if not name or not isinstance(name, str):
        raise DataError(f"{source}: a task has no 'name'")
    unknown = set(spec) - _TASK_KEYS
    if unknown:
        raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_TASK_KEYS)}")
    metric = spec.get("metric", "accuracy" if spec.get("options") else "exact_match")
    if metric not in METRICS:
        raise DataError(f"{where}: metric must be one of {METRICS}, got {metric!r}")
    templates = spec.get("templates")
    if not isinstance(templates, list) or not templates:
        raise DataError(f"{where}: needs a non-empty 'templates' list")
    tpls = [_template(t, i, where) for i, t in enumerate(templates)]
    examples = [_inline_example(d, i, where) for i, d in enumerate(spec.get("examples") or [])]
    if spec.get("file"):
        examples += _file_examples(spec, base, where)
    if not examples:
        raise DataError(f"{where}: no examples (give 'examples' or 'file')")
    options = _options(spec.get("options"), where)
    if metric == "accuracy" and options is None and not all(e.options for e in examples):
        raise DataError(f"{where}: metric accuracy needs options (task-level or on every example)")
    task = Task(name, str(spec.get("cluster", "user")), tpls, metric, examples=examples, options=options,
                description=str(spec.get("description", "")))
    # fail at load time, not in the middle of training: every template must render the first example
    from instructkit.tasks.bank import render_example

    for t in tpls:
        render_example(task, task.example(0), t)
    return task


def load_yaml_tasks(path: str | Path) -> list[Task]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"task file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise DataError(f"{p}: expected a mapping with a 'tasks' list")
    return [task_from_dict(spec, p.parent, str(p)) for spec in data["tasks"]]
