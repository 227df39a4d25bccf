"""Experiment tracking: `train.report_to: [tensorboard, wandb, mlflow]` for every recipe, through each library's own
client, logging what metrics.jsonl holds plus the resolved config and the final summary.

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` in ``<run>/tensorboard`` (scalars per step, the config and
  the summary as text, the summary's numbers as ``summary/*`` scalars at the last step).
- ``wandb``: ``wandb.init(mode=...)`` with ``dir=<run>``; offline unless ``WANDB_MODE`` says otherwise, so nothing
  leaves the machine until ``wandb sync``; the config as the run config, the summary in ``run.summary``. Project from
  ``WANDB_PROJECT`` (default "instructkit").
- ``mlflow``: ``MlflowClient`` on ``MLFLOW_TRACKING_URI`` or a file store in ``<run>/mlruns`` (MLflow 3 wants
  ``MLFLOW_ALLOW_FILE_STORE=true`` for it, which is set for that case only); experiment from
  ``MLFLOW_EXPERIMENT_NAME`` (default "instructkit"); config flattened into params (and whole as config.yaml), metrics
  per step, the summary's numbers as metrics and whole as summary.json.

How it plugs in: training/loop.py's MetricsLogger (every recipe's logger) builds a ``Tracker`` from the run folder's
config.yaml, forwards each record it writes to metrics.jsonl, and calls ``Tracker.close_metrics`` when training
ends. The summary comes after that (recipes write summary.json once the model is saved), so each tracker stays open
until ``finish_run(run_dir, summary)`` (the CLI calls it with the summary it prints) or, failing that, until the process
exits, when summary.json is read from the run folder. Keys are logged as they are named in metrics.jsonl.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "wandb", "mlflow")
_open: dict[str, "Tracker"] = {}  # run folder -> its tracker still waiting for a summary
_lock = threading.Lock()


def check_report_to(report_to: list[str] | tuple[str, ...] | str | None) -> list[str]:
    """The list of backends, validated (a ConfigError naming the unknown one)."""
    from instructkit.config import ConfigError

    if not report_to:
        return []
    if isinstance(report_to, str):
        report_to = [report_to]
    out = []
    for b in report_to:
        b = str(b).lower()
        if b == "none":
            continue
        if b not in BACKENDS:
            raise ConfigError(f"train.report_to: unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
        if b not in out:
            out.append(b)
    return out


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = json.dumps(d) if isinstance(d, (list, tuple)) else str(d)
    return out


class Tracker:
    """The backends of one run. ``log(record)`` per metrics line; ``close_metrics()``; ``finish(summary)``."""

    def __init__(self, run_dir: str | Path, backends: list[str], config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.backends = check_report_to(backends)
        self.config = config or {}
        self.name = self.run_dir.name
        self.last_step = 0
        self.finished = False
        self._tb = self._wandb = self._mlflow = None
        for b in self.backends:
            getattr(self, f"_start_{b}")()

    # ---- start ------------------------------------------------------------------------------------------------------
    def _start_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._tb.add_text("config", "```\n" + json.dumps(self.config, indent=1, default=str) + "\n```", 0)

    def _start_wandb(self) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or "offline"
        self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "instructkit"), name=self.name,
                                 dir=str(self.run_dir), config=self.config, mode=mode, reinit="create_new")

    def _start_mlflow(self) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 keeps its file store only on request (it points to a database); it needs no server
            uri = (self.run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "instructkit")
        exp = client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
        run = client.create_run(exp_id, run_name=self.name)
        flat = _flatten(self.config)
        from mlflow.entities import Param

        params = [Param(k[:250], v[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[i:i + 100])
        client.log_text(run.info.run_id, _yaml(self.config), "config.yaml")
        self._mlflow = (client, run.info.run_id, uri)
        (self.run_dir / "mlflow_run.json").write_text(json.dumps({"tracking_uri": uri, "run_id": run.info.run_id,
                                                                  "experiment": exp_name}))

    # ---- per step ---------------------------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        step = int(record.get("step", self.last_step))
        self.last_step = max(self.last_step, step)
        nums = _numbers(record)
        if not nums:
            return
        if self._tb is not None:
            for k, v in nums.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(nums, step=step)
        if self._mlflow is not None:
            from mlflow.entities import Metric

            client, run_id, _ = self._mlflow
            import time

            ts = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in nums.items()])

    def close_metrics(self) -> None:
        """Training is over: flush; the run stays open for its summary (see the module docstring)."""
        if self._tb is not None:
            self._tb.flush()
        with _lock:
            _open[str(self.run_dir.resolve())] = self

    # ---- the end ----------------------------------------------------------------------------------------------------
    def finish(self, summary: dict | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        nums = _numbers(summary or {})
        if self._tb is not None:
            if summary:
                self._tb.add_text("summary", "```\n" + json.dumps(summary, indent=1, default=str) + "\n```",
                                  self.last_step)
                for k, v in nums.items():
                    self._tb.add_scalar(f"summary/{k}", v, self.last_step)
            self._tb.close()
        if self._wandb is not None:
            if summary:
                self._wandb.summary.update(json.loads(json.dumps(summary, default=str)))
            self._wandb.finish()
        if self._mlflow is not None:
            from mlflow.entities import Metric

            client, run_id, _ = self._mlflow
            if summary:
                import time

                ts = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(f"summary.{k}", v, ts, self.last_step)
                                                  for k, v in nums.items()])
                client.log_text(run_id, json.dumps(summary, indent=1, default=str), "summary.json")
            client.set_terminated(run_id, "FINISHED")
        with _lock:
            _open.pop(str(self.run_dir.resolve()), None)


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(obj, default=str)), sort_keys=False)


def tracker_for_run(run_dir: str | Path, report_to: list[str] | None = None, extra: list[str] = ()) -> Tracker | None:
    """The Tracker the run's own config asks for (``train.report_to`` in <run>/config.yaml, as start_run saved it,
    plus ``extra``), or None when it asks for none. ``report_to`` overrides the config."""
    run_dir = Path(run_dir)
    cfg: dict = {}
    if (run_dir / "config.yaml").exists():
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if report_to is None:
        report_to = ((cfg.get("train") or {}).get("report_to")) or []
    backends = check_report_to(list(check_report_to(report_to)) + list(extra))
    if not backends:
        return None
    return Tracker(run_dir, backends, cfg)


def finish_run(run_dir: str | Path, summary: dict | None = None) -> None:
    """Log the final summary to the run's trackers and close them (no-op when the run has none open)."""
    with _lock:
        t = _open.get(str(Path(run_dir).resolve()))
    if t is not None:
        t.finish(summary)


@atexit.register
def _finish_all() -> None:
    """At exit, trackers still open get the summary.json their run folder holds by then."""
    with _lock:
        pending = list(_open.values())
    for t in pending:
        summary = None
        p = t.run_dir / "summary.json"
        if p.exists():
            try:
                summary = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                summary = None
        try:
            t.finish(summary)
        except Exception:  # never fail the process at exit for a tracker
            log.exception("closing the %s tracker failed", t.run_dir)
