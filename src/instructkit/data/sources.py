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
                                       expect=expect, max_examples=src.max_examples, skip=src.skip,
                                       tool_call_format=data_cfg.tool_call_format, split_think=data_cfg.split_think))
        stats[src.path] = st.to_dict()
    return examples, stats


def split_unit(example, by: str) -> Any:
    """What the validation split keeps on one side: ``by="record"`` every example (or group of pairs) alone;
    ``"first_user_turn"`` every example that opens with the same first user message together (the conversation it
    continues: HH-RLHF has pairs at several turns of one conversation, and a pair-level split would put the same
    conversation on both sides). An example without a user turn is a unit of its own."""
    if by == "record":
        return None
    item = example[0] if isinstance(example, list) and example else example
    msgs = getattr(item, "prompt", None)
    if msgs is None:
        msgs = getattr(item, "messages", None) or []
    first = next((m.content for m in msgs if m.role == "user"), None)
    return None if first is None else ("user", first)


def held_out_indices(examples: list, fraction: float, seed: int, by: str = "record", at_least: int = 0) -> set[int]:
    """Indices of a seeded ``fraction`` of ``examples`` for validation (at least ``at_least``). by="record": the first
    n of a seeded shuffle of the indices; otherwise whole units (``split_unit``) in seeded order until n examples are
    held out, so a unit is never on both sides."""
    n_val = max(at_least, int(round(len(examples) * fraction)))
    rng = random.Random(seed)
    if by == "record":
        order = list(range(len(examples)))
        rng.shuffle(order)
        return set(order[:n_val])
    units: dict[Any, list[int]] = {}
    for i, ex in enumerate(examples):
        key = split_unit(ex, by)
        units.setdefault(("alone", i) if key is None else key, []).append(i)
    keys = list(units)
    rng.shuffle(keys)
    held: set[int] = set()
    for key in keys:
        if len(held) >= n_val:
            break
        held.update(units[key])
    return held


def split_validation(examples: list, data_cfg, run_dir) -> tuple[list, list, dict[str, Any]]:
    """(train, validation, read stats): `data.validation` sources if given, else a seeded `validation_fraction` split
    of ``examples`` by `data.validation_split_by` (``held_out_indices``)."""
    train, stats = examples, {}
    if data_cfg.validation:
        val, vstats = read_sources(data_cfg, data_cfg.validation, run_dir)
        stats.update({f"validation:{k}": v for k, v in vstats.items()})
        return train, val, stats
    val_idx = held_out_indices(train, data_cfg.validation_fraction, data_cfg.seed, data_cfg.validation_split_by)
    return [e for i, e in enumerate(train) if i not in val_idx], [train[i] for i in sorted(val_idx)], stats
