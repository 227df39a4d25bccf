"""Built-in task families, one module per category. ``all_tasks()`` builds them fresh on each call (no module state)."""

from __future__ import annotations

from instructkit.tasks.bank import Task

FAMILY_MODULES = ("classification", "nli", "extraction", "summarization", "paraphrase", "qa", "generation",
                  "format_control", "reasoning", "code", "dialogue", "safety")


def all_tasks() -> list[Task]:
    import importlib

    out: list[Task] = []
    for name in FAMILY_MODULES:
        out.extend(importlib.import_module(f"instructkit.tasks.families.{name}").tasks())
    return out
