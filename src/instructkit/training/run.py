"""The run runtime every training recipe uses: the mechanics around a recipe's own loop, in one place.

A recipe reads top to bottom and owns only its algorithm::

    run = Run.start(cfg, "dpo")                     # seed, threads, process group, run folder, config.yaml
    data = ...read and check the data...            # before any model is loaded
    model, tok = load_model_and_tokenizer(run.model_config(), cfg.lora, precision=run.precision)
    items = ...render / encode...
    run.setup(model, n_items=len(items), fingerprint=data_fingerprint(items))   # plan, optimizer, schedule, resume
    for step in range(run.start_step, run.total_steps):
        mbs = [make_batch(rows) for rows in run.micro_batches(step)]
        res = run.optimizer_step(mbs, loss_fn, count_fn, token_fn=...)
        rec = run.step_record(step + 1, res)        # counters + the common metrics.jsonl fields
        if run.due("eval", step + 1): rec.update(evaluate(...))
        run.after_step(step + 1, rec)               # log / progress bar / checkpoint cadence
    summary = run.finish(model, tok, {...recipe's own numbers...}, template=renderer.template)

What each call does:
- ``Run.start(cfg, recipe)``: joins the process group (``torchrun`` / ``accelerate launch``: gloo on CPU), makes
  ``<train.output_dir>/<train.run_name>/``, sets torch's threads and seed (``train.seed``), writes ``config.yaml``.
  ``run.resolve_model(path)`` is the ONE place a model path is resolved: ``tiny:`` (a tiny random Llama written into
  the run folder by rank 0, models/tiny.py), a local folder, a zoo name or a Hub id (models/load.resolve_path).
- ``run.check_data(read=..., examples=..., kept=..., dropped=...)``: the data summary printed before the first step
  (records read and rejected, kept, truncated, dropped by reason) and the ``data.max_dropped_fraction`` ceiling.
- ``run.cached(what, key_parts, compute)``: a result (e.g. tokenised samples) kept under ``<output_dir>/.cache`` by a
  key of the data, template, tokenizer and settings, so a rerun starts at once.
- ``run.setup(model, ...)``: the step plan (``training/loop.StepPlan``: rows per step over all ranks, this rank's
  micro-batches), AdamW and the schedule, the metrics logger, and resume (``train.resume``: auto, never or a folder).
  Resume refuses a drifted config (naming each changed field, ``training/checkpoint.check_drift``), changed data
  (``fingerprint``: a hash of the encoded training data; the refusal names ``data``) and a data position that does not
  match the step. **A fresh start (no checkpoint, or ``train.resume: never``) starts a fresh ``metrics.jsonl`` and
  ``samples.jsonl``**: the records of an earlier run in the same folder are removed (the folder's checkpoints stay
  until overwritten or pruned).
- ``run.after_step(done, record, state=...)``: logs ``record`` every ``train.log_every`` steps and at the last step,
  moves the progress bar (loss, throughput, ETA), and writes an atomic checkpoint every ``train.save_every`` steps and
  at the last step (``state``: the recipe's own resume fields, e.g. PPO's KL coefficient).
- ``run.finish(model, tokenizer, summary, template=..., kind=...)`` writes the one output layout of every recipe:

      runs/<name>/final/        the model: a plain transformers folder (AutoModelForCausalLM), a peft adapter folder
                                (LoRA), or for kind="reward" an AutoModelForSequenceClassification folder (LoRA
                                merged); with the tokenizer and the chat template used (chat_template.jinja)
      runs/<name>/summary.json  common keys (recipe, run_dir, final, steps, resumed_from_step, first_loss, last_loss,
                                seconds, adapter, world_size, precision) plus the recipe's own
      runs/<name>/metrics.jsonl, config.yaml, checkpoints/, data_stats.json

models/load.resolve_path maps a run folder (of any recipe) to its ``final/``, so chat, serve, generate, export,
evaluate and report accept a run folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from instructkit.training import loop

log = logging.getLogger(__name__)

FINAL = "final"


def data_fingerprint(items: list) -> str:
    """A short hash of the encoded training data (token ids, masks, margins...): resume refuses data that changed."""
    h = hashlib.sha256()

    def plain(o):
        if dataclasses.is_dataclass(o):
            return dataclasses.astuple(o)
        if isinstance(o, torch.Tensor):
            return o.tolist()
        return str(o)

    for it in items:
        h.update(json.dumps(it, default=plain).encode())
    return h.hexdigest()[:16]


class Run:
    """One training run: its folder, processes, model path, optimizer, schedule, metrics, checkpoints and outputs."""

    def __init__(self, cfg: Any, recipe: str, run_dir: Path, dist: loop.DistContext, precision) -> None:
        self.cfg, self.recipe, self.train = cfg, recipe, cfg.train
        self.run_dir, self.dist, self.precision = run_dir, dist, precision
        self.config = json.loads(json.dumps(_to_dict(cfg), default=str))
        self.plan: loop.StepPlan | None = None
        self.total_steps = 0
        self.start_step = 0
        self.state: dict[str, Any] = {}
        self.resumed_from: Path | None = None
        self.counters = loop.LoopCounters()
        self.model = self.optimizer = self.scheduler = self.metrics = self.bar = None
        self.fingerprint = ""
        self._t0 = time.perf_counter()

    # -- start ----------------------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, cfg: Any, recipe: str, *, shardable: bool = False, device: str | None = "cpu",
              tokenize_workers: bool = False) -> "Run":
        """Processes, run folder, threads, seed, config.yaml. ``shardable``: the recipe applies ``train.sharding`` and
        ``train.gradient_checkpointing`` (through ``run.prepare``); otherwise they are refused. ``tokenize_workers``:
        the recipe applies ``data.num_workers``; otherwise a value above 1 is refused. ``device``: where the recipe
        computes (None: the precision setting picks, e.g. a GPU)."""
        from instructkit.config import ConfigError
        from instructkit.models.precision import resolve_precision
        from instructkit.training import sharding

        if not shardable:
            sharding.refuse_unwired(cfg.train, recipe)
        workers = getattr(getattr(cfg, "data", None), "num_workers", 0)  # >= 0: DataConfig checks it
        if workers > 1 and not tokenize_workers:
            raise ConfigError(f"data.num_workers={workers} is not available in `{recipe}`: it tokenises in the "
                              "training process (sft has it); remove the setting")
        precision = resolve_precision(getattr(cfg.model, "dtype", "auto"), device)
        dist = loop.DistContext.from_accelerate(cpu=precision.device.type == "cpu")
        run_dir = loop.start_run(cfg, cfg.train, dist.is_main)
        torch.manual_seed(cfg.train.seed)  # model-side randomness (heads, LoRA init); data order has its own seed
        return cls(cfg, recipe, run_dir, dist, precision)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def resolve_model(self, path: str) -> str:
        """A local model folder for ``path``: ``tiny:`` (written into the run folder by rank 0, the others wait), a
        local folder, a zoo name or a Hugging Face Hub id."""
        from instructkit.models.load import resolve_path
        from instructkit.models.tiny import resolve_tiny_path

        if str(path).startswith("tiny:"):
            path = resolve_tiny_path(path, self.run_dir, seed=self.train.seed, create=self.is_main)
            self.dist.barrier()
        m = self.cfg.model
        same = str(path) == str(m.path)
        return str(resolve_path(str(path), m.revision if same else None, bool(m.trust_remote_code) and same))

    def model_config(self):
        """``cfg.model`` with its path resolved (resolve_model); then torch is seeded with ``train.seed``, so the
        model-side randomness that follows (a new head, LoRA init, dropout) does not depend on how the path resolved."""
        model_cfg = dataclasses.replace(self.cfg.model, path=self.resolve_model(self.cfg.model.path))
        torch.manual_seed(self.train.seed)
        return model_cfg

    def check_data(self, *, read: dict[str, Any], examples: int, kept: int, dropped: dict[str, int],
                   truncated: int = 0, unit: str = "examples") -> dict[str, Any]:
        """Print what the run will train on before its first step (main process, on stderr): records read and
        rejected (``read``: read_sources' stats by source), training ``unit`` before encoding, kept, truncated, dropped
        by reason; then stop (DataError) if the dropped fraction is above ``data.max_dropped_fraction``. Returns the
        numbers (they also go to summary.json)."""
        import sys

        from instructkit.data.schema import DataError

        train_read = [v for k, v in read.items() if not str(k).startswith("validation:") and isinstance(v, dict)]
        records = sum(int(v.get("total", 0)) for v in train_read)
        rejected = sum(int(v.get("rejected", 0)) for v in train_read)
        n_drop = sum(dropped.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]) if v)
        frac = n_drop / max(examples, 1)
        out = {"records_read": records, "records_rejected": rejected, unit: examples, "kept": kept,
               "truncated": truncated, "dropped": {k: v for k, v in dropped.items() if v}, "dropped_fraction": frac}
        if self.is_main:
            print(f"data: {records} records read, {rejected} rejected; {examples} training {unit}: {kept} kept, "
                  f"{truncated} truncated, {n_drop} dropped ({frac:.0%}{': ' + reasons if reasons else ''})",
                  file=sys.stderr, flush=True)
        limit = float(getattr(self.cfg.data, "max_dropped_fraction", 1.0))
        if frac > limit:
            raise DataError(f"{n_drop} of {examples} training {unit} ({frac:.0%}) would be dropped ({reasons}), more "
                            f"than data.max_dropped_fraction={limit}: raise data.max_length, fix the data, or raise "
                            "the ceiling")
        self.data_counts = out
        return out

    data_counts: dict[str, Any] = {}

    def cached(self, what: str, key_parts: list[Any], compute: Callable[[], list]) -> list:
        """``compute()`` (a list of JSON-able rows, e.g. token ids and masks), or its result from an earlier run with
        the same ``key_parts`` (the data, the template, the tokenizer, the settings that change the result): kept in
        ``<train.output_dir>/.cache/<what>-<key>.json``, so a rerun skips tokenisation. Says which on the console."""
        import sys

        h = hashlib.sha256()
        for part in key_parts:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
            h.update(b"\0")
        key = h.hexdigest()[:20]
        path = Path(self.train.output_dir) / ".cache" / f"{what.replace(' ', '_')}-{key}.json"
        if path.exists():
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
                if self.is_main:
                    print(f"{what}: {len(rows)} rows from the cache ({path})", file=sys.stderr, flush=True)
                return rows
            except (OSError, ValueError):  # a partial or corrupt cache file: compute again
                pass
        rows = compute()
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(rows), encoding="utf-8")
            os.replace(tmp, path)
            print(f"{what}: {len(rows)} rows computed, cached in {path}", file=sys.stderr, flush=True)
        return rows

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Activation checkpointing and FSDP2 sharding (training/sharding.py) when the config asks for them; returns
        the model to train (route its loss functions through ``sharding.route``)."""
        from instructkit.training import sharding

        model, self.dist = sharding.prepare_training(model, self.train, self.dist)
        return model

    # -- setup ----------------------------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, *, n_items: int | None = None, fingerprint: str = "",
              total_steps: int | None = None, micro_batch_size: int | None = None) -> int:
        """Step plan over ``n_items`` rows (or ``total_steps`` for a recipe without one, e.g. PPO's iterations),
        optimizer, schedule, metrics logger and resume. Returns the first step to run (``run.start_step``)."""
        from instructkit.training import checkpoint as ckpt
        from instructkit.training import sharding

        t = self.train
        self.model, self.fingerprint = model, fingerprint
        if n_items is not None:
            self.plan = loop.StepPlan(n_items, micro_batch_size or t.micro_batch_size, t.grad_accum,
                                      self.dist.world_size, self.cfg.data.seed)
            total_steps = total_steps or loop.total_steps_for(t, self.plan)
        if not total_steps:
            raise ValueError("Run.setup needs n_items or total_steps")
        self.total_steps = int(total_steps)
        self.optimizer = loop.build_optimizer(model, t)
        self.scheduler = loop.build_scheduler(self.optimizer, t, self.scheduler_steps or self.total_steps)
        self.metrics = loop.MetricsLogger(self.run_dir, enabled=self.is_main, tensorboard=t.tensorboard)

        def same_data(path, state) -> None:
            if state.get("data_fingerprint", "") != fingerprint:
                raise ckpt.CheckpointError(
                    f"resume refused: data changed since {path} (the training data read from data.sources encodes "
                    f"differently: fingerprint {state.get('data_fingerprint')} != {fingerprint}); start a new run, "
                    "or set train.resume=never")
            step = int(state["step"])
            if self.plan is not None and state.get("epoch") is not None \
                    and [state["epoch"], state["index"]] != list(self.plan.position(step)):
                raise ckpt.CheckpointError(f"resume refused: data position {state['epoch'], state['index']} does not "
                                           f"match step {step} ({self.plan.position(step)})")

        self.resumed_from, self.state = ckpt.resume_run(
            self.run_dir / "checkpoints", t.resume, model, self.optimizer, self.scheduler, self.metrics,
            rank=self.dist.rank, config=self.config, check=same_data,
            load_state=sharding.state_loader(model, self.optimizer))
        if self.resumed_from is not None:
            self.start_step = int(self.state["step"])
            self.counters = loop.LoopCounters(**self.state.get("counters", {}))
            log.warning("resumed from %s at step %d", self.resumed_from, self.start_step)
        elif self.is_main:  # a fresh run: earlier records in this folder belong to another run
            for name in ("metrics.jsonl", "samples.jsonl"):
                (self.run_dir / name).unlink(missing_ok=True)
        self.bar = loop.progress_bar(self.total_steps, self.start_step, self.is_main)
        self._t0 = time.perf_counter()
        return self.start_step

    scheduler_steps: int | None = None
    """Optimizer steps the schedule spans when they differ from ``total_steps`` (PPO: several per iteration)."""

    # -- the loop -------------------------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[list[int]]:
        """Row indices of this rank's micro-batches of ``step`` (0-based)."""
        return self.plan.micro_batches(step, self.dist.rank)

    def optimizer_step(self, micro_batches: list, loss_fn: loop.LossFn, count_fn: loop.CountFn, *, step: int,
                       token_fn: loop.CountFn | None = None) -> loop.StepResult:
        """training/loop.optimizer_step with this run's model, optimizer, schedule, clipping and processes."""
        return loop.optimizer_step(self.model, self.optimizer, self.scheduler, micro_batches, loss_fn, count_fn,
                                   max_grad_norm=self.train.max_grad_norm, dist=self.dist, token_fn=token_fn,
                                   step=step)

    def step_record(self, done: int, res: loop.StepResult) -> dict[str, Any]:
        """The common metrics.jsonl fields of step ``done`` (1-based), and the run's counters updated."""
        c = self.counters
        c.units += res.units
        c.tokens += res.tokens
        c.empty_micro_batches += res.empty_micro_batches
        c.empty_steps += res.loss is None
        epoch = self.plan.position(done - 1)[0] if self.plan is not None else 0
        return loop.step_record(done, res, epoch)

    def due(self, what: str, done: int) -> bool:
        """Whether ``train.<what>_every`` (log, eval, sample, save) falls on step ``done``."""
        every = getattr(self.train, f"{what}_every", 0)
        return bool(every) and every > 0 and done % every == 0

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.log(record)

    def after_step(self, done: int, record: dict[str, Any] | None, *, state: dict[str, Any] | None = None,
                   throughput: str = "tokens_per_s") -> None:
        """Log ``record`` on the ``log_every`` cadence and at the last step, move the progress bar, checkpoint on
        the ``save_every`` cadence and at the last step (``state``: the recipe's own resume fields)."""
        last = done == self.total_steps
        if record is not None and (done % max(1, self.train.log_every) == 0 or last):
            self.metrics.log(record)
        if self.bar is not None:
            rec = record or {}
            loss = rec.get("loss")
            post = {"loss": "-" if loss is None else f"{loss:.4f}"}
            if rec.get(throughput) is not None:
                post[throughput.replace("_per_s", "/s")] = f"{rec[throughput]:.0f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        if self.due("save", done) or last:
            self.save_checkpoint(done, state)

    def save_checkpoint(self, done: int, state: dict[str, Any] | None = None) -> Path:
        from instructkit.training import checkpoint as ckpt
        from instructkit.training import sharding

        full = {"counters": self.counters.as_dict(), "data_fingerprint": self.fingerprint,
                "total_steps": self.total_steps, **(state or {})}
        if self.plan is not None:
            full["epoch"], full["index"] = self.plan.position(done)
        return ckpt.save_checkpoint(self.run_dir / "checkpoints", done, self.model, self.optimizer, self.scheduler,
                                    full, self.config, keep=self.train.keep_checkpoints, dist=self.dist,
                                    **sharding.checkpoint_states(self.model, self.optimizer))

    def write_json(self, name: str, obj: Any) -> None:
        """``<run folder>/<name>`` (e.g. data_stats.json: what was read, kept and dropped), from the main process."""
        if self.is_main:
            (self.run_dir / name).write_text(json.dumps(obj, indent=1, default=str))

    def write_samples(self, done: int, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` (prompt, response, score...) to samples.jsonl, each with ``"step": done`` (main process)."""
        if self.is_main:
            with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({"step": done, **row}, ensure_ascii=False) + "\n")

    # -- finish ---------------------------------------------------------------------------------------------------------
    def finish(self, model: torch.nn.Module, tokenizer, summary: dict[str, Any], *, template: str | None = None,
               kind: str = "causal", reward_norm: tuple[float, float] = (0.0, 1.0), part: str | None = None
               ) -> dict[str, Any]:
        """Write ``final/`` (``kind``: "causal" or "reward"), then ``summary.json`` (common keys, then the recipe's
        ``summary``). ``part``: the submodule of ``model`` that is the model to save (PPO trains an actor-critic and
        saves its ``policy``). Every rank must call it; returns the summary."""
        from instructkit.config import save_config
        from instructkit.training import sharding

        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self._t0
        out = self.run_dir / FINAL
        if kind == "reward":
            full = sharding.full_model_copy(model, self.is_main) if sharding.is_sharded(model) else model
            if self.is_main:
                from instructkit.models.value_head import save_reward_model

                save_reward_model(full, tokenizer, out, *reward_norm)
        elif sharding.is_sharded(model):
            sharding.save_full_model(model, tokenizer, out, self.is_main, part=part)
        elif self.is_main:
            from instructkit.models.load import save_model

            save_model(model.get_submodule(part) if part else model, tokenizer, out)
        if self.is_main:
            if template:
                (out / "chat_template.jinja").write_text(template)
            save_config(self.cfg, out / "instructkit_config.yaml")
        if self.metrics is not None:
            self.metrics.close()
        history = loop.read_metrics(self.run_dir) if self.is_main and (self.run_dir / "metrics.jsonl").exists() else []
        losses = [r["loss"] for r in history if r.get("loss") is not None]
        lora = getattr(self.cfg, "lora", None)
        common = {
            "recipe": self.recipe, "run_dir": str(self.run_dir), "final": str(out), "kind": kind,
            "steps": self.total_steps, "resumed_from_step": self.start_step or None,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "seconds": round(seconds, 2), "adapter": bool(lora is not None and lora.enabled and kind != "reward"),
            "world_size": self.dist.world_size, "counters": self.counters.as_dict(), "data_counts": self.data_counts,
            "precision": self.precision.as_dict(),
            "sharding": getattr(self.train, "sharding", "none"),
            "gradient_checkpointing": getattr(self.train, "gradient_checkpointing", False),
        }
        clash = set(common) & set(summary)
        if clash:
            raise ValueError(f"summary keys {sorted(clash)} are the runtime's common keys")
        summary = {**common, **summary}
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        self.dist.barrier()
        return summary


def _to_dict(cfg: Any) -> dict[str, Any]:
    from instructkit.config import to_dict

    return to_dict(cfg)
