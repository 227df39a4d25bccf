"""The built-in task bank and mixtures of its tasks.

``default_bank`` gathers the built-in families (tasks/families/) and YAML-defined tasks (tasks/yaml_tasks.py) into one
``TaskBank``; ``build_task_mixture`` renders each task's examples and mixes them with data/mixture.py. The mixture's
settings (``TaskMixtureConfig``) live in config.py with the other configs, so config.py imports nothing of the package.
"""

from __future__ import annotations

from typing import Iterable

from instructkit.config import TaskMixtureConfig, TaskMixtureEntry
from instructkit.data.mixture import mix
from instructkit.data.schema import Conversation
from instructkit.tasks.bank import TaskBank, render_task
from instructkit.tasks.families import all_tasks
from instructkit.tasks.yaml_tasks import load_yaml_tasks


def default_bank(extra_yaml: Iterable[str] = ()) -> TaskBank:
    """All built-in task families (tasks/families/*), plus tasks from YAML definition files."""
    bank = TaskBank().extend(all_tasks())
    if extra_yaml:
        for path in extra_yaml:
            bank.extend(load_yaml_tasks(path))
    return bank


# ---------------------------------------------------------------------------------------------------------------------
# Mixtures of tasks: render each task's examples, then mix with data/mixture.py (weighted, or example-proportional with
# a cap and a temperature, as T5/FLAN do). The mixing itself is data/mixture.py's; only the rendering is here.
# ---------------------------------------------------------------------------------------------------------------------
def mixture_sources(cfg: TaskMixtureConfig, bank: TaskBank) -> tuple[dict[str, list[Conversation]], dict[str, float]]:
    """(task name -> rendered training conversations, task name -> weight) for data/mixture.py's ``mix``."""
    entries = cfg.tasks or [TaskMixtureEntry(f"cluster:{c}") for c in bank.clusters()]
    excluded = set(cfg.exclude_clusters)
    unknown = excluded - set(bank.clusters())
    if unknown:
        raise KeyError(f"unknown cluster(s) in exclude_clusters: {sorted(unknown)}; known: {bank.clusters()}")
    sources: dict[str, list[Conversation]] = {}
    weights: dict[str, float] = {}
    for entry in entries:
        tasks = [t for t in bank.resolve([entry.name]) if t.cluster not in excluded]
        for t in tasks:
            if t.name in sources:
                continue
            n = entry.examples if entry.examples is not None else cfg.examples_per_task
            distinct = t.num_distinct()
            if distinct is not None:  # no more renders than distinct (example, template) pairs
                n = min(n, distinct) if cfg.render.templates == "all" else min(n, distinct * len(t.templates))
            sources[t.name] = render_task(t, n, seed=cfg.seed, split="train", spec=cfg.render)
            weights[t.name] = entry.weight / max(1, len(tasks))
    if not sources:
        raise KeyError("the mixture has no tasks left after exclude_clusters")
    return sources, weights


def build_task_mixture(cfg: TaskMixtureConfig, bank: TaskBank | None = None):
    """Render and mix: returns data/mixture.py's ``Mixture`` (examples, counts, rates, sizes per task)."""
    bank = bank or default_bank(cfg.yaml_tasks)
    sources, weights = mixture_sources(cfg, bank)
    return mix(sources, strategy=cfg.strategy, weights=weights, total=cfg.total, cap=cfg.cap,
               temperature=cfg.temperature, seed=cfg.seed)


def count_by(examples: Iterable[Conversation], *keys: str) -> dict[tuple, int]:
    """How many examples per meta value tuple, e.g. count_by(xs, "task", "template")."""
    out: dict[tuple, int] = {}
    for c in examples:
        k = tuple(c.meta.get(key) for key in keys)
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: tuple(str(x) for x in kv[0])))
