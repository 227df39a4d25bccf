"""Configs are dataclasses, loaded from YAML with dotted ``key.sub=value`` overrides.

The machinery here is shared; each recipe's dataclass (one per recipe, a docstring or comment per field) lives beside it
in this module or is imported into it. Unknown keys are errors that name the key and the known ones, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise ConfigError naming them."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(sorted(path + k for k in unknown))}; "
            f"known keys under '{path or '<top>'}': {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = _unwrap_optional(hints[name])
        if _is_dataclass_type(tp) and isinstance(value, dict):
            kwargs[name] = from_dict(tp, value, path + name + ".")
        elif typing.get_origin(tp) is list and typing.get_args(tp) and _is_dataclass_type(typing.get_args(tp)[0]):
            item_tp = typing.get_args(tp)[0]
            if not isinstance(value, list):
                raise ConfigError(f"config key '{path + name}' must be a list")
            kwargs[name] = [
                v if isinstance(v, item_tp) else from_dict(item_tp, v, f"{path}{name}[{i}].")
                for i, v in enumerate(value)
            ]
        else:
            kwargs[name] = _coerce(value, tp, path + name)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if value is None:
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        if tp is str and isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    if typing.get_origin(tp) is list and isinstance(value, (str, int, float)):
        # `key=a,b` on the command line
        return [v for v in str(value).split(",") if v]
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "lora.r=8"]`` -> nested dict updated in place. Values parse as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) + dotted overrides -> dataclass, with ``__post_init__`` checks run once."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        data = loaded or {}
    apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except TypeError as e:  # a dataclass without a default for a required field
        raise ConfigError(str(e)) from e


def save_config(cfg: Any, path: str | Path) -> None:
    """The resolved config, as YAML (and never with secrets: backends read keys from the environment)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def config_digest(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True, default=str)


def exact_div(a: int, b: int, what: str) -> int:
    """Derived sizes are checked once: ``a`` must be a multiple of ``b``."""
    if b <= 0 or a % b:
        raise ConfigError(f"{what}: {a} is not divisible by {b}")
    return a // b


# ---------------------------------------------------------------------------------------------------------------------
# Sections shared by the recipes. A recipe's config composes them; each field says what it does.
# ---------------------------------------------------------------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402


@dataclass
class ModelConfig:
    path: str = ""
    """A local Hugging Face model folder, or a zoo name (`instructkit models list`)."""
    template: str = "auto"
    """Chat template: "auto" (the tokenizer's own Jinja template) or a built-in name (llama3, chatml, gemma, mistral,
    zephyr, alpaca). The template used is saved with the trained model."""
    trust_remote_code: bool = False
    """Never on unless you set it (S4)."""
    dtype: str = "float32"
    """float32 on CPU (no bf16 units on these CPUs); bfloat16 only on a GPU."""


@dataclass
class LoRAConfig:
    enabled: bool = False
    """Train a LoRA adapter (peft) instead of all weights."""
    r: int = 16
    """Adapter rank; 8-64 is the usual range for instruction tuning."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt, or ["all-linear"] for every linear layer except the output layer."""
    quantize: str | None = None
    """QLoRA: quantise the frozen base ("int4" or "int8") before adding the adapter; None keeps fp32."""


@dataclass
class DataSource:
    path: str = ""
    """A data file (JSON, JSONL, .jsonl.gz, Parquet) or a local Hugging Face datasets folder; "builtin:NAME" for
    built-in data."""
    format: str = "auto"
    """Source format (alpaca, dolly, sharegpt, messages, oasst, ultrachat, prompt_completion, flan, self_instruct,
    preference, hh_rlhf, ...) or "auto" to detect it."""
    weight: float = 1.0
    """Mixing weight (relative)."""
    max_examples: int | None = None
    """Cap on examples taken from this source (None: all)."""


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    """Training data sources, mixed by weight."""
    validation: list[DataSource] = field(default_factory=list)
    """Held-out data; if empty, `validation_fraction` of the training data is held out."""
    validation_fraction: float = 0.05
    """Fraction of the training examples held out for validation loss when `validation` is empty."""
    max_length: int = 1024
    """Maximum tokens per example; longer examples are truncated (and dropped with a count if no supervised token
    survives)."""
    mask: str = "all_assistant"
    """What is supervised: all_assistant (default), last_assistant, or all."""
    skip_invalid: bool = False
    """Skip bad records (written with reasons to `rejects_path`) instead of stopping at the first one."""
    max_invalid_fraction: float = 0.0
    """With skip_invalid: fail if more than this fraction of the records is rejected."""
    rejects_path: str | None = None
    """Where rejected records go (default: <run dir>/rejects.jsonl)."""
    dedup: bool = False
    """Remove exact duplicates before training."""
    seed: int = 0
    """Seed for shuffling and mixing (data order never depends on model initialisation)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs"
    """Runs are written to <output_dir>/<run_name>/."""
    run_name: str = "run"
    """Name of this run's folder."""
    seed: int = 0
    """Seed for model-side randomness (dropout, LoRA init)."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps; 0 derives them from epochs."""
    micro_batch_size: int = 4
    """Examples (or packed rows) per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalised by the supervised tokens of the whole step (R4)."""
    pack: bool = True
    """Padding-free packing: samples share a row but attend only to themselves, positions restart per sample."""
    pack_length: int = 1024
    """Tokens per packed row."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    schedule: str = "cosine"
    """cosine, linear or constant, after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables it)."""
    log_every: int = 1
    """Steps between metric lines in metrics.jsonl."""
    eval_every: int = 0
    """Steps between validation-loss evaluations (0: only at the end)."""
    save_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep."""
    resume: str = "auto"
    """"auto" resumes from <run>/checkpoints/latest if present, "never" starts fresh, or a checkpoint path."""
    sample_every: int = 0
    """Steps between sample generations written to the run folder (0: never)."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts for the sample generations."""
    tensorboard: bool = False
    """Also write TensorBoard event files."""
    threads: int = 0
    """torch intra-op threads (0: leave torch's default)."""
