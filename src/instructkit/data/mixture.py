"""Mixing several sources into one training list: weighted, or T5/FLAN example-proportional with a cap and a
temperature.

Rates (the share of the mixture each source gets):
- ``weighted``: rate_i = w_i / sum_j w_j.
- ``proportional`` (Raffel et al. 2020, T5 section 3.5.2; FLAN's mixing): rate_i = min(n_i, cap)^(1/T) / sum_j
  min(n_j, cap)^(1/T). The cap K stops one huge source from drowning the rest; T > 1 flattens the rates toward equal.

Counts: ``total * rate_i`` rounded by largest remainder (Hamilton), so the counts sum exactly to ``total`` and are the
same on every run. A source asked for more examples than it has is repeated whole (every example the same number of
times, +1 for a seeded random subset), never sampled with replacement at random, so a small source's examples are
seen evenly. Sources are sampled with their own seeded RNG (seed and name) and the final list is shuffled with the seed:
the same seed, sources and config give the same list, bit for bit.

The core, ``mix(sources_by_name, ...)``, takes in-memory lists so the task bank can mix rendered tasks;
``MixtureConfig`` and ``mix_from_config`` add the YAML file form:

    strategy: proportional     # or weighted
    cap: 3000
    temperature: 1.0
    total: 10000
    seed: 0
    sources:
      - {path: data/alpaca.json, format: alpaca, weight: 1.0, max_examples: 5000}
      - {path: data/dolly.jsonl, format: auto}
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

from instructkit.config import ConfigError, DataSource, load_config

T = TypeVar("T")

STRATEGIES = ("weighted", "proportional")


@dataclass
class MixtureConfig:
    sources: list[DataSource] = field(default_factory=list)
    """The sources: path, format, weight (used by "weighted"), max_examples (only the first N examples of the file are
    read; the mixture then samples from those), skip (examples passed over before max_examples counts)."""
    strategy: str = "weighted"
    """"weighted" (rates proportional to weight) or "proportional" (T5/FLAN: rates proportional to
    min(size, cap)^(1/temperature))."""
    cap: int | None = None
    """Proportional mixing: the size above which a source gets no larger a rate (None: no cap)."""
    temperature: float = 1.0
    """Proportional mixing: 1 keeps rates proportional to (capped) size; larger values flatten them toward equal."""
    total: int | None = None
    """Examples in the mixture (None: the sum of the source sizes)."""
    seed: int = 0
    """Seed for sampling within sources and for the final order."""


@dataclass
class Mixture:
    """The mixed list plus how it was made: per-source counts, rates and source sizes."""

    examples: list
    counts: dict[str, int]
    rates: dict[str, float]
    sizes: dict[str, int]

    def summary(self) -> dict[str, Any]:
        return {
            "total": len(self.examples),
            "sources": {
                name: {"size": self.sizes[name], "rate": self.rates[name], "count": self.counts[name]}
                for name in self.counts
            },
        }


def mixing_rates(
    sizes: dict[str, int],
    strategy: str = "weighted",
    *,
    weights: dict[str, float] | None = None,
    cap: int | None = None,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Normalised rates per source (see the module docstring). Empty sources get rate 0."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"mixture strategy must be one of {', '.join(STRATEGIES)}, got '{strategy}'")
    if not sizes:
        raise ConfigError("mixture has no sources")
    if strategy == "weighted":
        weights = weights or {}
        raw = {}
        for name, n in sizes.items():
            w = float(weights.get(name, 1.0))
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"mixture source '{name}': weight must be a finite number >= 0, got {w}")
            raw[name] = w if n > 0 else 0.0
    else:
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ConfigError(f"mixture temperature must be > 0, got {temperature}")
        if cap is not None and cap <= 0:
            raise ConfigError(f"mixture cap must be > 0, got {cap}")
        raw = {
            name: float(min(n, cap) if cap is not None else n) ** (1.0 / temperature) if n > 0 else 0.0
            for name, n in sizes.items()
        }
    z = sum(raw.values())
    if z <= 0:
        raise ConfigError("mixture: every source is empty or has weight 0")
    return {name: r / z for name, r in raw.items()}


def allocate(total: int, rates: dict[str, float]) -> dict[str, int]:
    """Integer counts summing to ``total``, each floor(total * rate) plus one for the largest remainders (ties go to
    the source listed first)."""
    if total < 0:
        raise ConfigError(f"mixture total must be >= 0, got {total}")
    exact = {name: total * r for name, r in rates.items()}
    counts = {name: int(math.floor(x)) for name, x in exact.items()}
    left = total - sum(counts.values())
    order = sorted(rates, key=lambda name: (-(exact[name] - counts[name]), list(rates).index(name)))
    for name in order[:left]:
        counts[name] += 1
    return counts


def take(items: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """``count`` items: whole copies of ``items`` while they fit, then a random subset of the remainder."""
    n = len(items)
    if count == 0:
        return []
    if n == 0:
        raise ConfigError("cannot take examples from an empty source")
    full, rest = divmod(count, n)
    return list(items) * full + rng.sample(list(items), rest)


def mix(
    sources: dict[str, Sequence[T]],
    *,
    strategy: str = "weighted",
    weights: dict[str, float] | None = None,
    total: int | None = None,
    cap: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> Mixture:
    """Mix in-memory sources (name -> list of examples) into one deterministic, shuffled list of ``total``."""
    sizes = {name: len(items) for name, items in sources.items()}
    rates = mixing_rates(sizes, strategy, weights=weights, cap=cap, temperature=temperature)
    if total is None:
        total = sum(sizes.values())
    counts = allocate(total, rates)
    out: list[T] = []
    for name, items in sources.items():
        # Seeded per source by name (string seeds are hashed with SHA-512: stable across processes), so adding a
        # source does not change what the others contribute.
        out += take(items, counts[name], random.Random(f"{seed}/source/{name}"))
    random.Random(f"{seed}/order").shuffle(out)
    return Mixture(out, counts, rates, sizes)


def source_names(sources: Sequence[DataSource]) -> list[str]:
    """A readable unique name per source: the file name without data suffixes, numbered if two collide."""
    names: list[str] = []
    for s in sources:
        base = Path(s.path).name
        for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".parquet"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        name, k = base or "source", 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def load_mixture_config(path: str | Path | None, overrides: list[str] | None = None) -> MixtureConfig:
    cfg = load_config(MixtureConfig, path, overrides)
    if not cfg.sources:
        raise ConfigError("mixture config has no sources")
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got '{cfg.strategy}'")
    return cfg


def mix_from_config(cfg: MixtureConfig, base_dir: str | Path | None = None, **read_kwargs: Any) -> Mixture:
    """Read every source (relative paths are taken from ``base_dir``, e.g. the config file's folder) and mix them.
    ``read_kwargs`` go to io.read_examples (skip_invalid, max_invalid_fraction, ...; a ``rejects_path`` would be
    rewritten by each source, so give per-source reads their own if you need every reject)."""
    from instructkit.data.io import read_examples

    loaded: dict[str, list] = {}
    weights: dict[str, float] = {}
    for name, src in zip(source_names(cfg.sources), cfg.sources):
        p = Path(src.path)
        if base_dir is not None and not p.is_absolute() and not p.exists():
            p = Path(base_dir) / p
        loaded[name] = read_examples(p, src.format, max_examples=src.max_examples, skip=src.skip, **read_kwargs)
        weights[name] = src.weight
    return mix(
        loaded,
        strategy=cfg.strategy,
        weights=weights,
        total=cfg.total,
        cap=cfg.cap,
        temperature=cfg.temperature,
        seed=cfg.seed,
    )
