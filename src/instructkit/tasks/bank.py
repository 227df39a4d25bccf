"""The FLAN-style task bank: tasks, templates, zero-/few-shot rendering with or without options, held-out clusters.

A ``Task`` is a source of ``TaskExample``s (input fields, a target, optional answer options) -- a fixed list or a
seeded generator -- plus several ``Template``s that phrase it as an instruction. Rendering one example with one template
in one variant gives a ``Conversation`` whose ``meta`` records everything needed to reproduce and to score it: task,
cluster, template name and version, variant, seed, index, target and options.

Variants, as in FLAN (Wei et al. 2021; Longpre et al. 2023):
- ``zero_shot``: the instruction alone; ``few_shot``: ``k`` exemplars of the same task and template first, joined by a
  separator (inline in one user turn) or as earlier user/assistant turns (``fewshot_format="turns"``).
- with options: ``OPTIONS:\\n- yes\\n- no`` is shown (at the template's ``{options_}`` slot, else appended); without
  options the slot renders empty, which turns a classification task into a generation task.

Determinism: example ``i`` of a task for seed ``s`` and split ``sp`` comes from ``random.Random("name|sp|s|i")`` (string
seeds are hashed with SHA-512 by CPython, stable across runs and platforms), so adding tasks or changing how many
examples are drawn never changes the others. Template and variant choices in a mixture use their own seeded stream.

This module is the project's own idea (no library offers templated task banks that feed a trainer), so it is written
here; it imports only the standard library, config.py (RenderSpec) and data/schema.py. The bank of built-in
tasks and mixtures of tasks are in tasks/mixture.py.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from instructkit.config import RenderSpec
from instructkit.data.schema import Conversation, DataError, Message, validate_conversation

METRICS = ("accuracy", "exact_match", "rouge_l")
VARIANTS = ("zero_shot", "few_shot")
OPTIONS_HEADER = "OPTIONS:"

CLUSTER_DESCRIPTIONS = {
    "sentiment": "sentiment and emotion classification",
    "classification": "topic, spam, formality and other text classification",
    "nli": "natural language inference and entailment",
    "extraction": "named entities and information extraction",
    "summarization": "summaries and headlines",
    "paraphrase": "paraphrase identification and rewriting",
    "closed_qa": "question answering from a context or closed knowledge",
    "open_generation": "open-ended writing",
    "format_control": "output format and length control",
    "arithmetic": "arithmetic and numeric reasoning",
    "logic": "logic, ordering, counting and dates",
    "code": "reading, tracing and writing short code",
    "dialogue": "multi-turn dialogue and role-play",
    "safety": "refusing harmful requests and answering benign look-alikes",
}


@dataclass(frozen=True)
class TaskExample:
    """One instance of a task: named input fields, the target text, optional answer options, optional earlier turns."""

    inputs: dict[str, Any]
    target: str
    options: tuple[str, ...] | None = None
    history: tuple[Message, ...] = ()
    """Earlier turns (user/assistant alternating) before the templated user turn: multi-turn dialogue tasks."""


@dataclass(frozen=True)
class Template:
    """One phrasing of a task. ``instruction``/``response`` are ``str.format`` strings over the example's input fields
    plus ``{target}`` (response only) and ``{options_}`` (the OPTIONS block, or empty), or callables of the same dict."""

    name: str
    instruction: str | Callable[[dict[str, Any]], str]
    response: str | Callable[[dict[str, Any]], str] = "{target}"
    version: int = 1
    system: str | Callable[[dict[str, Any]], str] | None = None
    """An optional system message, a format string over the input fields too (role-play personas)."""


@dataclass
class Task:
    name: str
    cluster: str
    templates: list[Template]
    metric: str = "accuracy"
    examples: list[TaskExample] | None = None
    generator: Callable[[random.Random], TaskExample] | None = None
    options: tuple[str, ...] | None = None
    """Options shared by every example (classification labels); an example's own options take precedence."""
    description: str = ""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name}: metric must be one of {METRICS}, got {self.metric!r}")
        if (self.examples is None) == (self.generator is None):
            raise ValueError(f"task {self.name}: give exactly one of examples or generator")
        if self.examples is not None and not self.examples:
            raise ValueError(f"task {self.name}: empty example list")
        if not self.templates:
            raise ValueError(f"task {self.name}: no templates")
        names = [t.name for t in self.templates]
        if len(set(names)) != len(names):
            raise ValueError(f"task {self.name}: duplicate template names")
        if self.options is not None:
            self.options = tuple(self.options)

    @property
    def has_options(self) -> bool:
        if self.options is not None:
            return True
        if self.examples is not None:
            return any(e.options for e in self.examples)
        return bool(self.example(0).options)  # generators: options are per example or absent

    def template(self, name: str) -> Template:
        for t in self.templates:
            if t.name == name:
                return t
        raise KeyError(f"task {self.name} has no template {name!r} (has: {', '.join(t.name for t in self.templates)})")

    def example(self, index: int, seed: int = 0, split: str = "train") -> TaskExample:
        """Example ``index`` for ``seed`` and ``split``. Fixed lists are permuted by (seed, split) and cycled."""
        if self.generator is not None:
            ex = self.generator(random.Random(f"{self.name}|{split}|{seed}|{index}"))
        else:
            assert self.examples is not None
            order = list(range(len(self.examples)))
            random.Random(f"{self.name}|{split}|{seed}|perm").shuffle(order)
            ex = self.examples[order[index % len(order)]]
        return with_task_options(self, ex)

    def get_examples(self, n: int, seed: int = 0, split: str = "train") -> list[TaskExample]:
        return [self.example(i, seed, split) for i in range(n)]

    def num_distinct(self) -> int | None:
        """Size of a fixed example list (None for generators: effectively unbounded)."""
        return len(self.examples) if self.examples is not None else None


def with_task_options(task: Task, ex: TaskExample) -> TaskExample:
    """The example with the task's shared options when it has none of its own."""
    if ex.options is None and task.options is not None:
        return TaskExample(ex.inputs, ex.target, task.options, ex.history)
    return ex


class _Fields(dict):
    """format_map mapping that names the missing field and the task in its error."""

    def __init__(self, data: dict[str, Any], where: str):
        super().__init__(data)
        self.where = where

    def __missing__(self, key: str) -> Any:
        raise DataError(f"{self.where}: template uses {{{key}}} but the example has only {sorted(self)}")


def options_block(options: Sequence[str]) -> str:
    return OPTIONS_HEADER + "\n" + "\n".join(f"- {o}" for o in options)


def _fill(spec: str | Callable[[dict[str, Any]], str], fields: dict[str, Any], where: str) -> str:
    if callable(spec):
        return spec(dict(fields))
    # Templates may come from users' YAML: only plain {name} fields (with an optional format spec) are allowed, never
    # attribute or index access ({x.__class__}, {x[0]}), and malformed braces are a DataError naming the template.
    try:
        for _, name, _, conversion in string.Formatter().parse(spec):
            if name is not None and not name.isidentifier():
                raise DataError(f"{where}: template field {{{name}}} must be a plain name (no '.', '[' or position)")
            if conversion is not None:
                raise DataError(f"{where}: template field {{{name}!{conversion}}}: conversions are not allowed")
        return string.Formatter().vformat(spec, (), _Fields(fields, where))
    except (ValueError, IndexError, TypeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: bad template {spec[:80]!r}: {e}") from None


def render_instruction(task: Task, template: Template, ex: TaskExample, with_options: bool) -> str:
    """The user-turn text for one example: template filled, OPTIONS block placed or appended (or dropped)."""
    where = f"task {task.name} template {template.name}"
    show = with_options and bool(ex.options)
    block = options_block(ex.options) if show else ""
    fields = {**ex.inputs, "options_": block}
    text = _fill(template.instruction, fields, where)
    uses_slot = callable(template.instruction) or "{options_}" in template.instruction
    if show and not uses_slot:
        text = text.rstrip() + "\n\n" + block
    return text.strip()


def render_response(task: Task, template: Template, ex: TaskExample, target: str | None = None) -> str:
    """The assistant text for the example's target (or for ``target``, e.g. each option in rank classification)."""
    fields = {**ex.inputs, "target": ex.target if target is None else target, "options_": ""}
    return _fill(template.response, fields, f"task {task.name} template {template.name}").strip()


def render_example(
    task: Task,
    ex: TaskExample,
    template: Template,
    *,
    with_options: bool = True,
    exemplars: Sequence[TaskExample] = (),
    separator: str = "\n\n",
    fewshot_format: str = "inline",
    include_response: bool = True,
    meta: dict[str, Any] | None = None,
) -> Conversation:
    """One example -> Conversation. With ``include_response=False`` it ends with the user turn (a prompt to score)."""
    if fewshot_format not in ("inline", "turns"):
        raise ValueError(f"fewshot_format must be 'inline' or 'turns', got {fewshot_format!r}")
    ex = with_task_options(task, ex)
    exemplars = [with_task_options(task, e) for e in exemplars]
    messages: list[Message] = []
    if template.system:
        fields = {**ex.inputs, "options_": ""}
        messages.append(Message("system", _fill(template.system, fields, f"task {task.name} template {template.name}")))
    query = render_instruction(task, template, ex, with_options)
    if exemplars and ex.history:
        raise ValueError(f"task {task.name}: few-shot rendering of multi-turn examples is not supported")
    if fewshot_format == "turns":
        for e in exemplars:
            messages.append(Message("user", render_instruction(task, template, e, with_options)))
            messages.append(Message("assistant", render_response(task, template, e)))
    elif exemplars:
        shots = [render_instruction(task, template, e, with_options) + "\n" + render_response(task, template, e)
                 for e in exemplars]
        query = separator.join(shots + [query])
    messages.extend(ex.history)
    messages.append(Message("user", query))
    if include_response:
        messages.append(Message("assistant", render_response(task, template, ex)))
    m = {
        "task": task.name,
        "cluster": task.cluster,
        "template": template.name,
        "template_version": template.version,
        "variant": "few_shot" if exemplars else "zero_shot",
        "options_shown": bool(with_options and ex.options),
        "k": len(exemplars),
        "metric": task.metric,
        "target": ex.target,
        "response": render_response(task, template, ex),
        "options": list(ex.options) if ex.options else None,
        "inputs": {k: v if isinstance(v, (str, int, float, bool)) or v is None else str(v) for k, v in ex.inputs.items()},
    }
    m.update(meta or {})
    conv = Conversation(messages, m)
    validate_conversation(conv, final="assistant" if include_response else "user")
    return conv


def render_variants(task: Task, ex: TaskExample, exemplars: Sequence[TaskExample]) -> list[tuple[str, Conversation]]:
    """Every template x variant x options setting for one example (what `instructkit tasks show` prints)."""
    out = []
    ex = with_task_options(task, ex)
    option_settings = (True, False) if ex.options else (True,)
    for t in task.templates:
        for variant in VARIANTS:
            if variant == "few_shot" and ex.history:
                continue
            for opt in option_settings:
                shots = exemplars if variant == "few_shot" else ()
                label = f"{t.name} v{t.version} | {variant} | {'options' if opt and ex.options else 'no options'}"
                out.append((label, render_example(task, ex, t, with_options=opt, exemplars=shots)))
    return out


def pick_exemplars(task: Task, query: TaskExample, index: int, k: int, seed: int, split: str) -> tuple[TaskExample, ...]:
    """``k`` exemplars for few-shot example ``index``, from a separate stream (split + ":shots"), never equal to the
    query itself (a small fixed list may have fewer than k other examples: then fewer are returned)."""
    shots: list[TaskExample] = []
    j = 0
    while len(shots) < k and j < 4 * k + 8:
        e = task.example(index * (4 * k + 8) + j, seed, split + ":shots")
        if e != query and e not in shots:
            shots.append(e)
        j += 1
    return tuple(shots)


def render_task(task: Task, n: int, seed: int = 0, split: str = "train", spec: RenderSpec | None = None,
                include_response: bool = True) -> list[Conversation]:
    """``n`` examples of ``task`` (``n`` x templates when spec.templates == "all"), deterministic in (seed, split)."""
    spec = spec or RenderSpec()
    rng = random.Random(f"{task.name}|{split}|{seed}|render")
    out = []
    for i in range(n):
        ex = task.example(i, seed, split)
        if spec.templates == "all":
            chosen = list(task.templates)
        elif spec.templates == "random":
            chosen = [task.templates[rng.randrange(len(task.templates))]]
        else:
            chosen = [task.template(spec.templates)]
        fewshot = rng.random() < spec.fewshot_fraction and not ex.history
        with_opts = rng.random() < spec.options_fraction
        shots = pick_exemplars(task, ex, i, spec.k, seed, split) if fewshot and spec.k > 0 else ()
        for t in chosen:
            out.append(render_example(
                task, ex, t, with_options=with_opts, exemplars=shots, separator=spec.separator,
                fewshot_format=spec.fewshot_format, include_response=include_response,
                meta={"seed": seed, "split": split, "index": i},
            ))
    return out


@dataclass
class TaskBank:
    """A named collection of tasks; clusters are the tasks' ``cluster`` names."""

    tasks: dict[str, Task] = field(default_factory=dict)

    def add(self, task: Task) -> None:
        if task.name in self.tasks:
            raise ValueError(f"duplicate task name {task.name!r}")
        self.tasks[task.name] = task

    def extend(self, tasks: Iterable[Task]) -> "TaskBank":
        for t in tasks:
            self.add(t)
        return self

    def get(self, name: str) -> Task:
        if name not in self.tasks:
            raise KeyError(f"unknown task {name!r}; see `instructkit tasks list`")
        return self.tasks[name]

    def clusters(self) -> list[str]:
        return sorted({t.cluster for t in self.tasks.values()})

    def in_clusters(self, clusters: Iterable[str]) -> list[Task]:
        wanted = set(clusters)
        unknown = wanted - set(self.clusters())
        if unknown:
            raise KeyError(f"unknown cluster(s) {sorted(unknown)}; known: {self.clusters()}")
        return [t for t in self.tasks.values() if t.cluster in wanted]

    def split_by_cluster(self, heldout: Iterable[str]) -> tuple[list[Task], list[Task]]:
        """(training tasks, held-out tasks): every task of a held-out cluster is held out, as in FLAN."""
        held = self.in_clusters(heldout)
        held_names = {t.name for t in held}
        return [t for t in self.tasks.values() if t.name not in held_names], held

    def resolve(self, names: Iterable[str]) -> list[Task]:
        """Task names and ``cluster:NAME`` entries -> tasks (each once, in order)."""
        out: dict[str, Task] = {}
        for n in names:
            if n.startswith("cluster:"):
                for t in self.in_clusters([n.split(":", 1)[1]]):
                    out.setdefault(t.name, t)
            else:
                out.setdefault(n, self.get(n))
        return list(out.values())
