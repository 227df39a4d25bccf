"""Sharded data parallelism through FSDP2 (``torch.distributed.fsdp.fully_shard``): ``train.sharding: fsdp2``.

Each process keeps 1/world of every parameter, of its gradient and of its AdamW state (ZeRO-3); a decoder layer's
full weights exist only while that layer runs (all-gathered just before its forward, and again before its backward,
freed after). The data-parallel path (training/loop.py) replicates all of it in every process instead.

How instructkit applies it (``shard_model``):
- **Units**: every decoder layer is one FSDP unit; the root unit holds the rest (embeddings, final norm, output layer,
  a value or score head), tied weights included (they stay in one unit).
- **The root is ``ShardedModel``**, a thin module whose ``forward(fn, batch)`` runs a recipe's loss function on the
  inner model. Why: recipes call the model *body* and apply the output layer only at supervised positions (the SFT
  streaming loss, DPO's response-only log-probs), so the root's hooks, which gather the embeddings and the output
  layer, must wrap the whole loss computation, not ``model.forward``. Inside it every parameter is a plain tensor, so
  the per-sample packed attention and the fused/streaming output-layer losses run unchanged (tested: per-step losses
  equal the unsharded run within 1e-5).
- **Gradients are summed, not averaged**, across ranks (``set_gradient_divide_factor(1.0)``): each local loss is
  already divided by the global unit count of the step (loop.optimizer_step), exactly as in the data-parallel path.
  gloo has no PREMUL_SUM, so the reduction is forced to a plain SUM (``set_force_sum_reduction_for_comms``).
- **Lockstep**: FSDP runs collectives inside forward and backward, so every rank must run the same number of passes.
  A rank with fewer micro-batches in a step (the last step of an epoch, an empty micro-batch) runs a filler pass with
  its loss scaled by 0, and a non-finite loss does not stop a rank early (the step is refused on every rank after).
- **Generation** (samples, rollouts) runs inside ``gathered(root)``: all units are all-gathered once and stay
  gathered, so a rank can generate alone, with no collective per token.
- **Checkpoints and ``final/``** are written from full state dicts gathered to rank 0 (``full_state_dict``): the same
  files as the unsharded path (``final/`` is a plain, unsharded model folder); on resume every rank reads them and
  keeps its shards (``load_full_state`` broadcasts from rank 0 instead, for files only rank 0 can read). For very large models torch.distributed.checkpoint's sharded files scale better (each rank writes its
  shard); that works on CPU too (measured with torch 2.13, gloo) but is not wired in.

On CPU (torch 2.13, gloo, 2 processes) all of the above works: forward, backward, fused AdamW on the DTensor shards,
gradient clipping, full and sharded state dicts, generation on one rank. Mixed precision: matmuls follow the run's
autocast (models/precision.py); parameters are all-gathered in their stored dtype (fp32 master weights, a bf16 frozen
base), so the numbers equal the unsharded path's.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable

import torch

from instructkit.training.loop import DistContext

log = logging.getLogger(__name__)

SHARDING_CHOICES = ("none", "fsdp2")


class ShardedModel(torch.nn.Module):
    """The FSDP root: ``root(fn, *args)`` runs ``fn(inner_model, *args)`` inside the root unit's forward hooks."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[..., Any], *args, **kwargs):
        return fn(self.module, *args, **kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The inner model of a ShardedModel (anything else unchanged)."""
    return model.module if isinstance(model, ShardedModel) else model


def route(fn: Callable) -> Callable:
    """A ``loss_fn(model, batch)`` that goes through the root when ``model`` is sharded (unchanged otherwise)."""

    def routed(model, *args, **kwargs):
        if isinstance(model, ShardedModel):
            return model(fn, *args, **kwargs)
        return fn(model, *args, **kwargs)

    routed.__wrapped__ = fn
    return routed


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: transformers' decoder layers (GradientCheckpointingLayer), else the
    modules of the body's ``layers`` list."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    except ImportError:
        layers = []
    if not layers:
        for m in model.modules():
            if isinstance(getattr(m, "layers", None), torch.nn.ModuleList):
                layers = list(m.layers)
                break
    return layers


class ShardedContext(DistContext):
    """DistContext for FSDP2: gradients are reduced by FSDP (no all-reduce here), passes run in lockstep, and the
    gradient norm is taken over the DTensor shards."""

    lockstep = True

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__(rank=rank, world_size=world_size)
        self._filler: Any = None

    def all_reduce_grads(self, params) -> None:  # FSDP reduce-scattered them in backward
        return None

    def all_reduce_max(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        if self.world_size > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def lockstep_passes(self, passes: list[tuple[Any, int, bool]]) -> list[tuple[Any, int, bool]]:
        """Pad this rank's ``(batch, units, real)`` passes with fillers ``(batch, 0, False)`` up to the busiest rank's
        count. A filler repeats one of this rank's batches (or the last one it saw) with its loss scaled by 0."""
        if passes:
            self._filler = passes[0][0]
        n_max = self.all_reduce_max(len(passes))
        if len(passes) < n_max:
            if self._filler is None:
                raise RuntimeError("sharded training: this rank has no micro-batch to keep in step with the others; "
                                   "give each rank at least one micro-batch (rows >= processes x micro_batch_size)")
            passes = passes + [(self._filler, 0, False)] * (n_max - len(passes))
        return passes

    def grad_norm(self, params, max_norm: float) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if max_norm and max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        else:
            norm = torch.nn.utils.get_total_norm(grads, foreach=False) if grads else torch.tensor(0.0)
        full = getattr(norm, "full_tensor", None)
        return full() if full is not None else norm


def shard_model(model: torch.nn.Module, dist: DistContext, *, reshard_after_forward: bool = True) -> ShardedModel:
    """Apply FSDP2 to ``model`` (already on its device): one unit per decoder layer, the rest in the root
    ``ShardedModel``; gradients summed across ranks. Raises if the model has no decoder layers to shard."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not torch.distributed.is_initialized():
        raise RuntimeError("train.sharding=fsdp2 needs a process group (torchrun / accelerate launch, or "
                           "sharding.init_single_process_group() for a world of one)")
    layers = decoder_layers(model)
    if not layers:
        raise RuntimeError(f"train.sharding=fsdp2: found no decoder layers to shard in {type(model).__name__}")
    from torch.distributed.device_mesh import init_device_mesh

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    root = ShardedModel(model)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            # older torch (the GPU image's 2.11 may be one) names it set_reduce_scatter_divide_factor
            (getattr(m, "set_gradient_divide_factor", None) or m.set_reduce_scatter_divide_factor)(1.0)
            if hasattr(m, "set_force_sum_reduction_for_comms"):  # gloo has no PREMUL_SUM; nccl has
                m.set_force_sum_reduction_for_comms(True)
    log.info("FSDP2: %d decoder layers sharded over %d processes", len(layers), dist.world_size)
    return root


def init_single_process_group() -> None:
    """A gloo process group of one (no launcher): the sharded code path with one process, as the tests use it."""
    if not torch.distributed.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)


@contextmanager
def gathered(root: torch.nn.Module):
    """All FSDP units all-gathered and kept so while inside (every rank must enter): a rank can then run forwards
    alone (generation) with no collective. A non-sharded model passes through unchanged."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield unwrap(root)
        return
    # FSDP takes the first unit to run a forward as its root: before the root has run one (an RL recipe generates
    # before it trains), a decoder layer called directly would claim that role and break every later forward. An empty
    # pass through the root settles it (it all-gathers the root unit, which is gathered next anyway).
    with torch.no_grad():
        root(lambda inner: None)
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
        u.unshard()
    try:
        yield unwrap(root)
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)


# ---------------------------------------------------------------------------------------------------------------------
# Full state dicts (checkpoints, final/)
# ---------------------------------------------------------------------------------------------------------------------
_PREFIX = "module."


def full_state_dict(root: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The inner model's full (unsharded) state dict on CPU, on rank 0 (other ranks get {}); every rank must call it.
    Keys are the inner model's own (as ``model.state_dict()``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {n for n, p in unwrap(root).named_parameters() if p.requires_grad} if trainable_only else None
    out = {}
    for k, v in sd.items():
        k = k[len(_PREFIX):] if k.startswith(_PREFIX) else k
        if names is None or k in names:
            out[k] = v
    return out


def full_optimizer_state_dict(root: torch.nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer's full state dict (keyed by parameter name) on rank 0; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(root, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(root: torch.nn.Module, optimizer, model_state: dict[str, torch.Tensor] | None,
                    optimizer_state: dict[str, Any] | None) -> None:
    """Load full state dicts read on rank 0 into the shards of every rank (broadcast from rank 0; other ranks pass
    anything, e.g. {}). ``model_state`` may hold the trainable parameters only (keys of the inner model)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True, strict=False)
    if model_state is not None:
        set_model_state_dict(root, {_PREFIX + k: v for k, v in model_state.items()}, options=opts)
    if optimizer_state is not None:
        set_optimizer_state_dict(root, optimizer, optimizer_state, options=opts)


def save_full_model(root: torch.nn.Module, tokenizer, out_dir, is_main: bool, part: str | None = None):
    """``final/`` of a sharded run: the full weights gathered on rank 0 and written as a plain Hugging Face folder (or a
    peft adapter folder), exactly what the unsharded path writes. ``part``: the submodule to save when the trained
    module holds more than the model (PPO's actor-critic: its ``policy``). Every rank must call it."""
    from pathlib import Path

    state = full_state_dict(root)
    model = unwrap(root)
    if part:
        model = model.get_submodule(part)
        state = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
    out = Path(out_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out


def full_model_copy(root: torch.nn.Module, is_main: bool) -> torch.nn.Module | None:
    """On rank 0, a plain (unsharded) copy of the inner model with the gathered full weights, e.g. to merge a LoRA
    adapter and save a reward model; None on the other ranks. Every rank must call it. The copy is built from the
    model's config (and its peft config, for an adapter) and loaded strictly, so every weight comes from the run."""
    state = full_state_dict(root)
    if not is_main:
        return None
    inner = unwrap(root)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    dtype = next(iter(state.values())).dtype if state else torch.float32
    plain = type(base)._from_config(base.config, torch_dtype=dtype)
    if hasattr(inner, "peft_config"):
        from peft import get_peft_model

        plain = get_peft_model(plain, inner.peft_config["default"])
    plain.load_state_dict(state, strict=True)
    return plain


# ---------------------------------------------------------------------------------------------------------------------
# What a recipe calls
# ---------------------------------------------------------------------------------------------------------------------
def prepare_training(model: torch.nn.Module, train_cfg, dist: DistContext) -> tuple[torch.nn.Module, DistContext]:
    """Apply ``train.gradient_checkpointing`` and ``train.sharding`` to a loaded model: returns the model to train
    (a ShardedModel under fsdp2; route the loss through it with ``route``) and the context for loop.optimizer_step.
    One process with fsdp2 runs FSDP2 over a world of one (the sharded code path, no communication)."""
    from instructkit.config import ConfigError

    if getattr(train_cfg, "gradient_checkpointing", False):
        from instructkit.models.load import enable_activation_checkpointing

        # a module of several models (PPO's actor-critic with a separate critic) names them in pretrained_parts()
        parts = model.pretrained_parts() if hasattr(model, "pretrained_parts") else [model]
        n = sum(enable_activation_checkpointing(part) for part in parts)
        log.info("activation checkpointing: %d layers", n)
    mode = getattr(train_cfg, "sharding", "none") or "none"
    if mode not in SHARDING_CHOICES:
        raise ConfigError(f"train.sharding={mode!r}: use one of {', '.join(SHARDING_CHOICES)}")
    if mode == "none":
        return model, dist
    if dist.world_size == 1:
        init_single_process_group()
    ctx = ShardedContext(dist.rank, dist.world_size)
    root = shard_model(model, ctx)
    log.warning("sharding: FSDP2 over %d process(es), %d decoder layers", ctx.world_size, len(decoder_layers(model)))
    return root, ctx


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, ShardedModel)


def lockstep_map(model: torch.nn.Module, dist: DistContext, fn: Callable, chunks: list, filler: Any) -> list:
    """``[fn(model, chunk) for chunk in chunks]``, each call through the FSDP root (``route``). Under sharding every
    rank makes as many calls as the busiest rank (a rank's share may be shorter): the extra calls run on ``filler``
    and their results are dropped."""
    f = route(fn)
    out = [f(model, c) for c in chunks]
    if is_sharded(model):
        for _ in range(dist.all_reduce_max(len(chunks)) - len(chunks)):
            f(model, filler)
    return out


def checkpoint_states(model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """``save_checkpoint`` keyword arguments: under sharding the trainable weights and the optimizer state gathered
    on rank 0 (every rank must call this); nothing for an unsharded model."""
    if not is_sharded(model):
        return {}
    return {"model_state": full_state_dict(model, trainable_only=True),
            "optimizer_state": full_optimizer_state_dict(model, optimizer)}


def state_loader(model: torch.nn.Module, optimizer):
    """``resume_run(load_state=...)``: under sharding, each rank takes its shards of the saved full state (every
    rank reads the files); None for an unsharded model (the default loading)."""
    if not is_sharded(model):
        return None

    def load(weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, {_PREFIX + k: v for k, v in weights.items()}, options=opts)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)

    return load


def refuse_unwired(train_cfg, recipe: str) -> None:
    """For a recipe that does not apply ``train.sharding`` / ``train.gradient_checkpointing`` yet: refuse them rather
    than ignore them."""
    from instructkit.config import ConfigError

    if (getattr(train_cfg, "sharding", "none") or "none") != "none":
        raise ConfigError(f"train.sharding={train_cfg.sharding!r} is not available in `{recipe}` yet (SFT has it); "
                          "use train.sharding=none")
    if getattr(train_cfg, "gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing is not available in `{recipe}` yet (SFT has it)")
