"""The training mechanics every recipe shares: process setup, optimizer and schedule, exact gradient accumulation,
clipping, the non-finite guard, metrics and progress. Nothing here knows what the loss is.

A recipe provides
- ``loss_fn(model, micro_batch) -> (sum_loss, n_units)``: a loss SUMMED over its units (supervised tokens for SFT, pairs
  for a reward model or DPO) and how many units it summed;
- ``count_fn(micro_batch) -> int``: the same unit count, computed from the batch alone (before any forward pass).

Exact accumulation (also across ranks): before the first forward of an optimizer step, the units of all its
micro-batches on all ranks are counted and summed (one all-reduce); each micro-batch's summed loss is scaled by
1 / that global total, so the step's gradient is the gradient of the mean over all units of the step, whatever the
micro-batch split or the number of processes. (The 2024 accumulation bug, transformers PR 34191, averaged per
micro-batch instead.)

Data parallelism: processes are started by ``accelerate launch`` (gloo on CPU, nccl on GPU); ``DistContext`` reads the
process group from accelerate's ``PartialState``. The model is NOT wrapped in DistributedDataParallel: recipes call the
model body directly (so the output layer only sees supervised positions) which bypasses DDP's forward hooks; instead
gradients are summed across ranks once per optimizer step with bucketed all-reduces. Because every local loss is already
divided by the global unit count, the SUM of the ranks' gradients is the exact global gradient. (This is what DDP with
``no_sync`` on all but the last micro-batch does, minus the overlap of communication with backward, which does not
matter on CPU.) See docs/distributed.md for FSDP/DeepSpeed on GPUs.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from instructkit.config import TrainConfig

LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]
CountFn = Callable[[Any], int]


class NonFiniteError(RuntimeError):
    """A NaN or inf loss or gradient norm: the run stops, and no checkpoint is written after it (so a
    resume never starts from broken weights)."""


# ---------------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class DistContext:
    """Rank and world size of this process; sums across processes (a no-op for one process)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_accelerate(cls, cpu: bool = True) -> "DistContext":
        """Join the process group set up by ``accelerate launch`` (or a single process without it)."""
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        return cls(rank=state.process_index, world_size=state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def sum_metrics(self, records: list[dict[str, float]], n: float, keys: Sequence[str] | None = None
                    ) -> dict[str, float]:
        """Each key summed over this rank's ``records`` and over all ranks, divided by ``n`` (a global count): the
        weighted mean of per-micro-batch metric sums. ``keys``: the keys to reduce (default: this rank's, which must
        then be the same on every rank)."""
        keys = sorted(keys if keys is not None else {k for r in records for k in r})
        if not keys:
            return {}
        t = torch.tensor([sum(r.get(k, 0.0) for r in records) for k in keys], dtype=torch.float64)
        self.all_reduce_sum(t)
        return {k: v / max(n, 1) for k, v in zip(keys, t.tolist())}

    def grad_norm(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global gradient norm, after clipping to ``max_norm`` (0: no clipping)."""
        if max_norm and max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        grads = [p.grad for p in params if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
            else torch.tensor(0.0)

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter], bucket_numel: int = 1 << 24) -> None:
        """Sum gradients across ranks in flat buckets (a rank without a backward pass contributes zeros)."""
        if self.world_size <= 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p in list(params) + [None]:
            if p is not None:
                bucket.append(p)
                size += p.numel()
            if bucket and (p is None or size >= bucket_numel):
                flat = torch.cat([q.grad.reshape(-1) for q in bucket])
                torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
                offset = 0
                for q in bucket:
                    q.grad.copy_(flat[offset:offset + q.numel()].view_as(q.grad))
                    offset += q.numel()
                bucket, size = [], 0


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------------
def start_run(cfg: Any, train: TrainConfig, is_main: bool = True) -> Path:
    """Every recipe's first phase: make <output_dir>/<run_name>/, set torch's threads, save the resolved config
    (main process only). Returns the run folder."""
    from instructkit.config import save_config

    run_dir = Path(train.output_dir) / train.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    if train.threads > 0:
        torch.set_num_threads(train.threads)
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in trainable_parameters(model):
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    # fused: one kernel per tensor, the same per-element arithmetic whatever the grouping (resume and DDP compare bit
    # for bit), within an ulp of the single-tensor loop (tests/test_loop.py); gemma-3-270m's 252 LoRA tensors: 10.6 ->
    # 2.3 ms per step. The loop where a build or device has no fused kernel.
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_steps`` (step 0 gets 1/warmup), then cosine or linear decay to ``min_ratio`` at ``total_steps``, or
    constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1.0 - progress)
    raise ValueError(f"unknown schedule {schedule!r}: cosine, linear or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    lr_factor(0, cfg.schedule, cfg.warmup_steps, total_steps)  # validates the name early
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.schedule, cfg.warmup_steps, total_steps))


# ---------------------------------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """What one optimizer step did (global over ranks). ``loss`` is None for a step without any unit (never a
    made-up 0)."""

    loss: float | None
    grad_norm: float | None
    lr: float
    units: int
    tokens: int
    empty_micro_batches: int
    seconds: float


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, micro_batches: list[Any],
                   loss_fn: LossFn, count_fn: CountFn, *, max_grad_norm: float = 0.0, dist: DistContext | None = None,
                   token_fn: CountFn | None = None, step: int = 0) -> StepResult:
    """One optimizer step over this rank's ``micro_batches``, with the loss normalised by the global unit count.

    Raises NonFiniteError (on every rank) if a loss or the gradient norm is not finite; parameters are then unchanged.
    A step without any unit on any rank makes no update (the schedule still advances) and reports ``loss=None``."""
    dist = dist or DistContext()
    t0 = time.perf_counter()
    params = trainable_parameters(model)
    counts = [int(count_fn(mb)) for mb in micro_batches]
    tokens = sum(int(token_fn(mb)) for mb in micro_batches) if token_fn else 0
    glob = dist.all_reduce_sum(torch.tensor([float(sum(counts)), float(tokens)], dtype=torch.float64))
    total_units, total_tokens = int(glob[0].item()), int(glob[1].item())
    lr = optimizer.param_groups[0]["lr"]
    empty = sum(1 for c in counts if c == 0)
    if total_units == 0:
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended, no update this step
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
        e = dist.all_reduce_sum(torch.tensor([float(empty)], dtype=torch.float64))
        return StepResult(None, None, lr, 0, total_tokens, int(e.item()), time.perf_counter() - t0)
    model.train()
    loss_sum = 0.0
    bad = 0.0
    # (batch, units, real); a micro-batch with nothing supervised gets no forward and no gradient (counted in
    # `empty`), except under sharding (training/sharding.py), where every rank runs as many passes as the busiest one
    lockstep = getattr(dist, "lockstep", False)
    passes = [(mb, n, True) for mb, n in zip(micro_batches, counts) if n > 0 or lockstep]
    if lockstep:
        passes = dist.lockstep_passes(passes)
    for mb, n, real in passes:
        sum_loss, n_units = loss_fn(model, mb)
        if real and int(n_units) != n:
            raise RuntimeError(f"loss_fn summed {int(n_units)} units but count_fn counted {n}")
        if not torch.isfinite(sum_loss.detach()).all():
            bad = 1.0
            if not lockstep:  # sharded ranks finish their passes (collectives), the step is refused below
                break
        (sum_loss / total_units if real else sum_loss * 0.0).backward()
        if real:
            loss_sum += float(sum_loss.detach().double().item())
    red = dist.all_reduce_sum(torch.tensor([loss_sum, bad, float(empty)], dtype=torch.float64))
    if red[1].item() > 0:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"step {step}: non-finite loss")
    dist.all_reduce_grads(params)
    grad_norm = dist.grad_norm(params, max_grad_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"step {step}: non-finite gradient norm ({float(grad_norm)})")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(red[0].item() / total_units, float(grad_norm), lr, total_units, total_tokens,
                      int(red[2].item()), time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Any], loss_fn: LossFn, dist: DistContext | None = None
             ) -> tuple[float | None, int]:
    """(mean loss over all units, units) over ``batches`` (this rank's share), summed across ranks; None if no unit."""
    dist = dist or DistContext()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    passes = [(mb, 0, True) for mb in batches]
    if getattr(dist, "lockstep", False):  # sharded: as many forwards as the busiest rank (fillers not counted)
        passes = dist.lockstep_passes(passes)
    for mb, _, real in passes:
        sum_loss, n = loss_fn(model, mb)
        if real:
            total += torch.tensor([float(sum_loss), float(n)], dtype=torch.float64)
    model.train(was_training)
    dist.all_reduce_sum(total)
    if total[1] == 0:
        return None, 0
    return total[0].item() / total[1].item(), int(total[1].item())


# ---------------------------------------------------------------------------------------------------------------------
# Which rows go into which step, on which rank
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class StepPlan:
    """Maps a global optimizer step to the rows it trains on: rows are shuffled per epoch with a seeded permutation,
    each step takes the next ``micro_batch_size * grad_accum * world_size`` rows (the last step of an epoch may be
    short: no row is dropped), micro-batch ``k`` of the step goes to rank ``k % world_size``. The data position is a
    pure function of the step, so resume needs only the step (and checks it against the saved (epoch, index))."""

    n_rows: int
    micro_batch_size: int
    grad_accum: int
    world_size: int = 1
    seed: int = 0

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_rows / self.rows_per_step))

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index of the first row of ``step`` in that epoch's permutation)."""
        return step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.rows_per_step

    def micro_batches(self, step: int, rank: int = 0) -> list[list[int]]:
        """Row indices of this rank's micro-batches for ``step``."""
        from instructkit.training.packing import epoch_order

        epoch, start = self.position(step)
        order = epoch_order(self.n_rows, self.seed, epoch)
        rows = order[start:start + self.rows_per_step]
        groups = [rows[i:i + self.micro_batch_size] for i in range(0, len(rows), self.micro_batch_size)]
        return groups[rank::self.world_size]


def total_steps_for(cfg: TrainConfig, plan: StepPlan) -> int:
    if cfg.max_steps and cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))


# ---------------------------------------------------------------------------------------------------------------------
# Metrics and progress
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class MetricsLogger:
    """Appends one JSON line per record to ``<run_dir>/metrics.jsonl`` (main process only), and forwards it to the
    trackers ``train.report_to`` in the run's config.yaml names (training/tracking.py; ``tensorboard=True`` adds
    TensorBoard, the older flag)."""

    run_dir: Path
    enabled: bool = True
    tensorboard: bool = False
    _tb: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.run_dir) / "metrics.jsonl"
        if self.enabled:
            from instructkit.training.tracking import tracker_for_run

            self._tb = tracker_for_run(self.run_dir, extra=["tensorboard"] if self.tensorboard else [])

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (written by a run killed after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None:
            self._tb.log(record)

    def close(self) -> None:
        if self._tb is not None:  # the trackers wait for the run's summary (tracking.finish_run)
            self._tb.close_metrics()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


class LineProgress:
    """The progress bar of a console that is not a terminal (a log file, a pipe): plain lines, no carriage returns,
    about ten over a run (``step N/T loss=... tokens/s=... eta M:SS``)."""

    def __init__(self, total: int, initial: int, stream=None, desc: str = "step"):
        import sys

        self.desc = desc
        self.total, self.n, self.start_n = total, initial, initial
        self.every = max(1, total // 10)
        self.postfix: dict[str, Any] = {}
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def set_postfix(self, postfix: dict[str, Any] | None = None, refresh: bool = True, **kw: Any) -> None:
        self.postfix = {**(postfix or {}), **kw}

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            done = self.n - self.start_n
            rate = (time.perf_counter() - self.t0) / max(done, 1)
            eta = int(rate * (self.total - self.n))
            post = " ".join(f"{k}={v}" for k, v in self.postfix.items())
            print(f"{self.desc} {self.n}/{self.total} {post} eta {eta // 60}:{eta % 60:02d}".replace("  ", " "),
                  file=self.stream, flush=True)

    def close(self) -> None:
        pass


class _NoProgress(LineProgress):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "step", unit: str = "step"):
    """A tqdm bar (loss, throughput; tqdm shows the ETA) on a terminal, plain lines otherwise (no carriage returns
    in log files), silent on non-main ranks."""
    import sys

    if not enabled:
        return _NoProgress(total, initial)
    if not sys.stderr.isatty():
        return LineProgress(total, initial, desc=desc)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, desc=None if desc == "step" else desc)


@dataclass
class LoopCounters:
    """Run-level counters that are reported at the end and saved in checkpoints."""

    empty_steps: int = 0
    empty_micro_batches: int = 0
    units: int = 0
    tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def step_record(step: int, res: StepResult, epoch: int) -> dict[str, Any]:
    """The metrics.jsonl line of optimizer step ``step`` (1-based: the number of updates done)."""
    return {
        "step": step, "epoch": epoch, "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm,
        "tokens": res.tokens, "supervised_tokens": res.units,
        "tokens_per_s": res.tokens / res.seconds if res.seconds > 0 else None,
        "supervised_tokens_per_s": res.units / res.seconds if res.seconds > 0 else None,
        "empty_micro_batches": res.empty_micro_batches, "empty_step": res.loss is None,
    }
