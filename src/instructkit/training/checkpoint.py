"""Atomic checkpoints and exact resume.

A checkpoint folder ``<run>/checkpoints/step-N/`` holds
- ``trainable.safetensors``: every trainable parameter (all weights for full fine-tuning, the adapter for LoRA, plus any
  head a recipe trains), by name;
- ``optimizer.pt``, ``scheduler.pt``, ``rng_rank{R}.pt`` (torch RNG state): tensors only, loaded with
  ``torch.load(weights_only=True)`` (a pickle that runs code is refused);
- ``rng_rank{R}.json`` (Python and NumPy RNG states), ``state.json`` (step, data position, counters),
  ``config.yaml`` and ``config.json`` (the resolved config).

Atomicity: everything is written into ``.tmp-step-N-*``, each file fsynced, the folder renamed to ``step-N`` and
the parent fsynced; only then is ``latest`` (a small text file naming the folder) replaced by an atomic rename. A kill at
any moment leaves ``latest`` naming a complete checkpoint.

Resume refuses drift: ``check_drift`` compares the saved resolved config with the current one and names every
changed field that changes the run, with both values.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from instructkit.config import ConfigError

LATEST = "latest"
log = logging.getLogger(__name__)

# Config fields that may change between a run and its resume: they do not change what is computed.
RESUME_SAFE_FIELDS = frozenset({
    "train.output_dir", "train.run_name", "train.log_every", "train.eval_every", "train.save_every",
    "train.keep_checkpoints", "train.resume", "train.sample_every", "train.sample_prompts", "train.tensorboard",
    "train.threads", "data.rejects_path", "data.num_workers", "eval", "sample",
    # the reward model's normalisation is measured after the last step: it does not change the training it resumes
    "normalize", "normalize_sample",
})


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete, unsafe, or does not match the current run."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint's files cannot be read back (truncated, corrupt or missing): ``resume: auto`` falls back to the
    newest checkpoint that can."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (shared tensors appear once: named_parameters de-duplicates tied weights)."""
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = want - set(state), set(state) - want
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for n, t in state.items():
            if params[n].shape != t.shape:
                raise CheckpointError(f"checkpoint tensor {n} has shape {tuple(t.shape)}, model {tuple(params[n].shape)}")
            params[n].copy_(t)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor states for torch.save, JSON-able states) of every RNG we use."""
    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    js = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, js


def set_rng_state(tensors: dict[str, torch.Tensor], js: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(tensors["torch"])
    v, s, g = js["python"]
    random.setstate((v, tuple(s), g))
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only; anything else is a CheckpointError (loading
    a pickle could run code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a pickle with code in it
        raise CheckpointError(f"{path}: refused to load (not a plain tensor file): {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e


def save_checkpoint(ckpt_root: str | Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    state: dict[str, Any], config: dict[str, Any], *, keep: int = 2, dist=None,
                    extra_files: dict[str, str] | None = None, model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Atomically write checkpoint ``step-<step>`` and point ``latest`` at it; keep the newest ``keep`` checkpoints.

    With several processes every rank must call this (each writes its own RNG state); rank 0 writes the rest.
    ``model_state`` / ``optimizer_state``: the trainable weights and optimizer state to write instead of reading
    them from ``model`` / ``optimizer`` (a sharded run gathers them first: training/sharding.py)."""
    from safetensors.torch import save_file
    import yaml

    rank = dist.rank if dist is not None else 0
    world = dist.world_size if dist is not None else 1
    root = Path(ckpt_root)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if dist is not None:
        dist.barrier()
    written: list[Path] = []
    tensors, js = rng_state()
    torch.save(tensors, tmp / f"rng_rank{rank}.pt")
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(js))
    written += [tmp / f"rng_rank{rank}.pt", tmp / f"rng_rank{rank}.json"]
    if rank == 0:
        weights = trainable_state_dict(model) if model_state is None else model_state
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "world_size": world}, indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        written += [tmp / n for n in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json",
                                      "config.json", "config.yaml", *(extra_files or {}))]
    for p in written:
        _fsync_file(p)
    if dist is not None:
        dist.barrier()
    if rank == 0:
        (tmp / "COMPLETE").write_text("ok\n")
        _fsync_file(tmp / "COMPLETE")
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        fd, tmp_latest = tempfile.mkstemp(dir=root, prefix=".latest-")
        with os.fdopen(fd, "w") as f:
            f.write(final.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_latest, root / LATEST)
        _fsync_dir(root)
        _prune(root, keep, final.name)
    if dist is not None:
        dist.barrier()
    return final


def _prune(root: Path, keep: int, current: str) -> None:
    steps = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for p in steps[:-keep] if keep > 0 else []:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):  # partial saves of killed runs
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None if there is none yet."""
    root = Path(ckpt_root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "COMPLETE").exists():
        raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def complete_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Every complete ``step-N`` checkpoint under ``ckpt_root``, newest first."""
    steps = [p for p in Path(ckpt_root).glob("step-*") if (p / "COMPLETE").exists() and p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]), reverse=True)


def find_resume(ckpt_root: str | Path, resume: str) -> Path | None:
    """``resume``: "auto" (latest if any), "never", or a checkpoint folder (must exist)."""
    if resume == "never":
        return None
    if resume in ("auto", "", None):
        return latest_checkpoint(ckpt_root)
    p = Path(resume)
    if p.is_dir() and (p / LATEST).exists():
        return latest_checkpoint(p)
    if not p.exists():
        raise CheckpointError(f"checkpoint to resume from not found: {p}")
    if not (p / "COMPLETE").exists():
        raise CheckpointError(f"not a complete checkpoint: {p}")
    return p


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_drift(saved: dict[str, Any], current: dict[str, Any], safe: frozenset[str] = RESUME_SAFE_FIELDS) -> None:
    """Raise CheckpointError naming each changed run-defining field with its saved and current values."""
    a, b = _flatten(saved), _flatten(current)
    changed = []
    for key in sorted(set(a) | set(b)):
        if any(key == s or key.startswith(s + ".") for s in safe):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            changed.append(f"{key}: checkpoint {a.get(key, '<absent>')!r} != now {b.get(key, '<absent>')!r}")
    if changed:
        raise CheckpointError("resume refused, the config changed since the checkpoint: " + "; ".join(changed)
                              + " (start a new run, or set train.resume=never)")


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer, scheduler, *, rank: int = 0,
                    config: dict[str, Any] | None = None,
                    load_state: Callable[[dict, dict], None] | None = None) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG states; return state.json. With ``config``, first
    refuse a drifted config. ``load_state(weights, optimizer_state)`` loads the saved trainable weights and optimizer
    state instead of ``model`` / ``optimizer`` doing it (a sharded run scatters them: training/sharding.py)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "COMPLETE").exists():
        raise CheckpointError(f"not a complete checkpoint: {p}")
    if config is not None:
        check_drift(json.loads((p / "config.json").read_text()), json.loads(json.dumps(config, default=str)))
    try:  # every file read before anything is applied: a truncated file leaves the model as it was
        state = json.loads((p / "state.json").read_text())
        opt_state = safe_torch_load(p / "optimizer.pt")
        sched_state = safe_torch_load(p / "scheduler.pt")
        weights = load_file(str(p / "trainable.safetensors"))
        rng_t = safe_torch_load(p / f"rng_rank{rank}.pt") if (p / f"rng_rank{rank}.pt").exists() else None
        rng_j = json.loads((p / f"rng_rank{rank}.json").read_text()) if rng_t is not None else None
    except Exception as e:  # SafetensorError, a truncated pickle or JSON, a missing file
        raise UnreadableCheckpoint(f"{p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if rng_t is None:
        raise CheckpointError(f"{p} has no RNG state for rank {rank} (saved with world size {state.get('world_size')})")
    if load_state is not None:
        load_state(weights, opt_state)
    else:
        load_trainable_state_dict(model, weights)
        optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(sched_state)
    set_rng_state(rng_t, rng_j)
    return state


def resume_run(ckpt_root: str | Path, resume: str, model: torch.nn.Module, optimizer, scheduler, logger, *,
               rank: int = 0, config: dict[str, Any] | None = None,
               check: Callable[[Path, dict[str, Any]], None] | None = None,
               load_state: Callable[[dict, dict], None] | None = None) -> tuple[Path | None, dict[str, Any]]:
    """The resume step every recipe shares: find the checkpoint ``resume`` names (find_resume), restore it
    (load_checkpoint, refusing a drifted config) and cut the metrics log after its step, so a resumed run's
    metrics.jsonl reads as one uninterrupted run. Returns (checkpoint folder, its state.json), or (None, {}) for a
    fresh start; the caller reads its own extra fields (data position, KL coefficient, counters) from the state.
    ``check(path, state)`` may refuse the resume (raise) before anything in the run folder is touched."""
    path = find_resume(ckpt_root, resume)
    if path is None:
        return None, {}
    candidates = [path]
    if resume in ("auto", "", None):  # the latest first, then older complete ones, newest first
        candidates += [c for c in complete_checkpoints(ckpt_root) if c != path]
    for i, path in enumerate(candidates):
        try:
            state = load_checkpoint(path, model, optimizer, scheduler, rank=rank, config=config,
                                    load_state=load_state)
            break
        except UnreadableCheckpoint as e:
            if i + 1 == len(candidates):
                raise CheckpointError(f"no checkpoint under {ckpt_root} can be read back; the newest failed with "
                                      f"{e} (start a new run with train.resume=never)") from e
            log.warning("skipped checkpoint %s: it cannot be read back (%s); trying %s", path.name, e,
                        candidates[i + 1].name)
    if check is not None:
        check(path, state)
    logger.truncate_after(int(state["step"]))
    return path, state

