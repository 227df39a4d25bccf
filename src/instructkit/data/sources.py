"""Examples for a recipe from its config's data sources: read with the config's strict/skip settings, a validation
split, and the prompt of an example (what generation starts from).

Used by the DPO, reward-model and PPO recipes and the InstructGPT pipeline.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from instructkit.data.io import ReadStats, iter_examples
from instructkit.data.schema import DataError


def prompt_messages_of(example) -> list:
    """The prompt of a Conversation (every turn before the last assistant turn), a PreferencePair or an
    UnpairedExample; plain text has none (a DataError naming its source)."""
    if not hasattr(example, "prompt") and not hasattr(example, "messages"):
        meta = getattr(example, "meta", {}) or {}
        where = f"{meta.get('source', '')}:{meta.get('line', meta.get('record', ''))}: " if meta.get("source") else ""
        raise DataError(f"{where}a plain-text example has no prompt to generate from: prompts need conversations "
                        "(messages ending with a user turn) or preference / unpaired examples")
    if hasattr(example, "prompt"):
        return list(example.prompt)
    msgs = list(example.messages)
    last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=len(msgs))
    return msgs[:last]


def read_sources(data_cfg, sources, run_dir, expect: str | None = None) -> tuple[list, dict[str, Any]]:
    """Examples from DataSource entries with the DataConfig's strict/skip settings; and read stats per source."""
    examples: list = []
    stats: dict[str, Any] = {}
    for i, src in enumerate(sources):
        st = ReadStats()
        rejects = data_cfg.rejects_path or str(Path(run_dir) / f"rejects_{i}.jsonl")
        examples += list(iter_examples(src.path, src.format, skip_invalid=data_cfg.skip_invalid,
                                       rejects_path=rejects if data_cfg.skip_invalid else None,
                                       max_invalid_fraction=data_cfg.max_invalid_fraction, stats=st,
                                       expect=expect, max_examples=src.max_examples,
                                       tool_call_format=data_cfg.tool_call_format, split_think=data_cfg.split_think))
        stats[src.path] = st.to_dict()
    return examples, stats


def split_validation(examples: list, data_cfg, run_dir) -> tuple[list, list, dict[str, Any]]:
    """(train, validation, read stats): `data.validation` sources if given, else a seeded `validation_fraction` split
    of ``examples``."""
    train, stats = examples, {}
    if data_cfg.validation:
        val, vstats = read_sources(data_cfg, data_cfg.validation, run_dir)
        stats.update({f"validation:{k}": v for k, v in vstats.items()})
        return train, val, stats
    order = list(range(len(train)))
    random.Random(data_cfg.seed).shuffle(order)
    n_val = int(round(len(train) * data_cfg.validation_fraction))
    val_idx = set(order[:n_val])
    return [e for i, e in enumerate(train) if i not in val_idx], [train[i] for i in sorted(val_idx)], stats
