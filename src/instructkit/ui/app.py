"""`instructkit ui`: a local web UI on the server's own stack (Starlette on uvicorn, one static page, no CDN).

Pages (``static/index.html``), each backed by a JSON endpoint here that calls the same library functions as the CLI:
- Runs: every run folder under ``--runs`` with its metrics.jsonl curves (loss, reward, KL, learning rate, any numeric
  key; polled, so a running run's curves grow), config.yaml and summary.json; several runs overlaid to compare.
- Data: any data file under ``--root`` read by data/io.py (format detection, rejects with their reasons) and rendered
  by chat/render.py with any template and tokenizer: every token shown, supervised tokens highlighted, truncation
  marked, per-format statistics (``instructkit data inspect``'s reader and renderer).
- Playground: one prompt sent to two models side by side (a run's model and its base model by default), through
  generation/engine.py's ``Engine.chat``.
- Evaluation: the JSON results a run folder holds (IFEval per instruction type, win rates, ...) as tables.
- Launch: a recipe from a config file with overrides, run as ``python -m instructkit <recipe> --config ...`` (the CLI
  itself), with its live log, its run's curves and a stop button.

Promises: binds 127.0.0.1 by default; a path from a request is resolved and must stay inside ``--root`` (data and
configs) or ``--runs`` (runs): ``..``, absolute paths elsewhere and symlinks out are refused (a request must not reach
outside the folders it was given); recipes are a fixed list; no template or code is taken from a request (templates are
names, or the tokenizer's own).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

RECIPES = ("sft", "reward-model", "ppo", "dpo", "quickstart")
STATIC = Path(__file__).parent / "static"


class UIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def inside(root: Path, rel: str) -> Path:
    """``rel`` resolved under ``root``; a UIError if it leaves root (``..``, an absolute path elsewhere, a symlink)."""
    root = root.resolve()
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise UIError(403, f"{rel!r} is outside {root}")
    return p


# ---------------------------------------------------------------------------------------------------------------------
# Library calls (what the endpoints return)
# ---------------------------------------------------------------------------------------------------------------------
def list_runs(runs_dir: Path) -> list[dict]:
    out = []
    if not runs_dir.is_dir():
        return out
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        m = d / "metrics.jsonl"
        if not (m.exists() or (d / "config.yaml").exists()):
            continue
        out.append({"name": d.name, "has_metrics": m.exists(), "finished": (d / "summary.json").exists(),
                    "mtime": max((f.stat().st_mtime for f in (m, d / "config.yaml") if f.exists()), default=0)})
    return out


def run_details(run_dir: Path) -> dict:
    from instructkit.training.loop import read_metrics

    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else None
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    keys = sorted({k for r in metrics for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"})
    return {"name": run_dir.name, "metrics": metrics, "keys": keys, "summary": summary, "config": config,
            "evals": eval_results(run_dir)}


def eval_results(run_dir: Path) -> list[dict]:
    """JSON results of evaluations kept in a run folder: IFEval (per instruction type), win rates, ... as tables."""
    out = []
    for f in sorted(run_dir.rglob("*.json")):
        if any(part in ("checkpoints", "final", "tiny_model") for part in f.relative_to(run_dir).parts[:-1]):
            continue
        if f.name in ("summary.json", "config.json", "data_stats.json") or f.stat().st_size > 2_000_000:
            continue
        try:
            obj = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        tables = _tables(obj)
        if tables:
            out.append({"file": str(f.relative_to(run_dir)), "tables": tables})
    return out


def _tables(obj: Any, prefix: str = "") -> list[dict]:
    """Numeric leaves of a JSON object grouped into tables: a dict of dicts of numbers (e.g. per instruction type)
    becomes rows x columns; a flat dict of numbers one two-column table."""
    tables: list[dict] = []
    if not isinstance(obj, dict):
        return tables
    flat = {k: v for k, v in obj.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if flat:
        tables.append({"title": prefix or "metrics", "columns": ["value"], "rows": [[k, v] for k, v in flat.items()]})
    nested = {k: v for k, v in obj.items() if isinstance(v, dict)}
    rowlike = {k: v for k, v in nested.items()
               if v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values())}
    if len(rowlike) >= 2:
        cols = sorted({c for v in rowlike.values() for c in v})
        tables.append({"title": prefix or "table", "columns": cols,
                       "rows": [[k] + [v.get(c) for c in cols] for k, v in rowlike.items()]})
        nested = {k: v for k, v in nested.items() if k not in rowlike}
    for k, v in nested.items():
        tables += _tables(v, f"{prefix}.{k}" if prefix else k)
    return tables


def view_data(path: Path, *, tokenizer: str | None, template: str = "auto", fmt: str = "auto",
              max_length: int | None = None, limit: int = 20, mask: str = "all_assistant") -> dict:
    """What `instructkit data inspect` reads and renders, per example: tokens with their loss mask."""
    from instructkit.data.io import ReadStats, iter_examples
    from instructkit.data.schema import Conversation

    stats = ReadStats()
    with tempfile.TemporaryDirectory() as tmp:
        rejects_path = Path(tmp) / "rejects.jsonl"
        examples = list(iter_examples(path, fmt, skip_invalid=True, rejects_path=rejects_path,
                                      max_invalid_fraction=1.0, stats=stats))
        rejects = []
        if rejects_path.exists():
            for line in rejects_path.read_text(encoding="utf-8").splitlines()[:limit]:
                try:
                    rejects.append(json.loads(line))
                except json.JSONDecodeError:
                    rejects.append({"raw": line})
    out: dict[str, Any] = {"stats": stats.to_dict(), "rejects": rejects, "examples": []}
    renderer = tok = None
    if tokenizer:
        from instructkit.cli.data import load_tokenizer, make_renderer

        tok = load_tokenizer(tokenizer)
        renderer = make_renderer(tok, template)
    lengths, supervised, truncated, turns = [], [], 0, []
    for ex in examples:
        if isinstance(ex, Conversation):
            turns.append(sum(m.role == "assistant" for m in ex.messages))
        if renderer is None or not isinstance(ex, Conversation):
            if len(out["examples"]) < limit:
                out["examples"].append({"kind": type(ex).__name__, "record": ex.to_dict() if hasattr(ex, "to_dict")
                                        else str(ex)})
            continue
        r = renderer.render(ex, mask=mask, max_length=max_length)
        lengths.append(len(r.input_ids))
        supervised.append(r.n_supervised)
        truncated += bool(r.truncated)
        if len(out["examples"]) < limit:
            pieces = [tok.decode([t]) for t in r.input_ids]
            out["examples"].append({"kind": "Conversation", "truncated": bool(r.truncated),
                                    "n_tokens": len(r.input_ids), "n_supervised": r.n_supervised,
                                    "tokens": [[p, m] for p, m in zip(pieces, r.loss_mask)]})
    from instructkit.cli.data import describe

    out["format_stats"] = {"format": stats.format, "examples": len(examples), "assistant_turns": describe(turns),
                           "tokens": describe(lengths), "supervised_tokens": describe(supervised),
                           "truncated": truncated, "template": renderer.chat_template.name if renderer else None}
    return out


class ModelPool:
    """Models for the playground, loaded once each (the engine's own loading: models/load.py)."""

    def __init__(self):
        self._engines: dict[str, Any] = {}
        self._lock = threading.Lock()

    def engine(self, ref: str):
        with self._lock:
            if ref not in self._engines:
                from instructkit.config import ModelConfig
                from instructkit.generation.engine import Engine
                from instructkit.models.load import load_model_and_tokenizer

                model, tok = load_model_and_tokenizer(ModelConfig(path=ref))
                self._engines[ref] = Engine(model.eval(), tok)
            return self._engines[ref]

    def chat(self, ref: str, messages: list[dict], max_tokens: int, temperature: float) -> dict:
        from instructkit.generation.engine import SamplingParams

        eng = self.engine(ref)
        t0 = time.perf_counter()
        with self._lock:
            o = eng.chat([messages], SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=0,
                                                    logprobs=False))[0]
        return {"model": ref, "text": o.text, "finish_reason": o.finish_reason, "tokens": len(o.token_ids),
                "seconds": round(time.perf_counter() - t0, 3)}


def run_model_refs(run_dir: Path) -> dict:
    """The playground's two sides for a run: its final model and the base model its config names."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    base = ((cfg or {}).get("model") or {}).get("path")
    if base == "tiny:" and (run_dir / "tiny_model").is_dir():
        base = str(run_dir / "tiny_model")
    final = run_dir / "final"
    return {"tuned": str(final) if final.is_dir() else None, "base": base}


class Jobs:
    """Recipes launched from the UI: `python -m instructkit <recipe> --config FILE overrides...` subprocesses."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.jobs: dict[str, dict] = {}

    def launch(self, recipe: str, config: Path, overrides: list[str]) -> str:
        if recipe not in RECIPES:
            raise UIError(400, f"recipe must be one of {', '.join(RECIPES)}")
        for o in overrides:
            if "=" not in o or o.startswith("-"):
                raise UIError(400, f"override {o!r} is not key.sub=value")
        cmd = [sys.executable, "-m", "instructkit", recipe, "--config", str(config), *overrides]
        proc = subprocess.Popen(cmd, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        jid = uuid.uuid4().hex[:12]
        job = {"id": jid, "recipe": recipe, "config": str(config), "overrides": overrides, "proc": proc,
               "log": deque(maxlen=400), "started": time.time(), "run_dir": None}
        self.jobs[jid] = job

        def pump():
            for line in proc.stdout:
                job["log"].append(line.rstrip("\n"))
                if job["run_dir"] is None and "run_dir" in line:
                    try:
                        job["run_dir"] = json.loads(line[line.index("{"):]).get("run_dir")
                    except (ValueError, AttributeError):
                        pass
            proc.wait()

        threading.Thread(target=pump, daemon=True).start()
        return jid

    def status(self, jid: str) -> dict:
        job = self.jobs.get(jid)
        if job is None:
            raise UIError(404, f"no job {jid}")
        rc = job["proc"].poll()
        return {"id": jid, "recipe": job["recipe"], "running": rc is None, "returncode": rc,
                "log": list(job["log"])[-60:], "run_dir": job["run_dir"], "seconds": round(time.time() - job["started"])}

    def stop(self, jid: str) -> dict:
        job = self.jobs.get(jid)
        if job is None:
            raise UIError(404, f"no job {jid}")
        if job["proc"].poll() is None:
            job["proc"].terminate()
            try:
                job["proc"].wait(timeout=20)
            except subprocess.TimeoutExpired:
                job["proc"].kill()
        return self.status(jid)

    def close(self) -> None:
        for job in self.jobs.values():
            if job["proc"].poll() is None:
                job["proc"].terminate()


# ---------------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------------
def build_app(root: str | Path = ".", runs: str | Path = "runs"):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    root = Path(root).resolve()
    runs_dir = (root / runs).resolve()  # the user's choice at start-up; only paths from requests are checked
    pool, jobs = ModelPool(), Jobs(root)

    def api(fn):
        async def wrapped(request: Request) -> Response:
            try:
                return JSONResponse(await fn(request))
            except UIError as e:
                return JSONResponse({"error": e.message}, status_code=e.status)
            except (ValueError, FileNotFoundError, OSError) as e:  # DataError, TemplateError, ConfigError, ...
                return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=400)
        return wrapped

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def runs_list(request: Request):
        return {"runs": list_runs(runs_dir)}

    def run_path(name: str) -> Path:
        p = inside(runs_dir, name)
        if not p.is_dir():
            raise UIError(404, f"no run {name!r}")
        return p

    async def run_get(request: Request):
        p = run_path(request.path_params["name"])
        return {**run_details(p), "models": run_model_refs(p)}

    async def data(request: Request):
        q = request.query_params
        path = inside(root, q.get("path", ""))
        if not path.exists():
            raise UIError(404, f"no data file {q.get('path')!r} under {root}")
        tokenizer = q.get("tokenizer") or None
        if tokenizer and Path(tokenizer).exists() is False and "/" in tokenizer:
            raise UIError(404, f"no tokenizer folder {tokenizer!r}")
        if tokenizer and (root / tokenizer).exists():
            tokenizer = str(inside(root, tokenizer))
        max_length = int(q["max_length"]) if q.get("max_length") else None
        return await run_in_threadpool(view_data, path, tokenizer=tokenizer, template=q.get("template", "auto"),
                                       fmt=q.get("format", "auto"), max_length=max_length,
                                       limit=min(int(q.get("limit", 20)), 200), mask=q.get("mask", "all_assistant"))

    def model_ref(ref: str) -> str:
        """A run name (its final/), a folder under root or runs, a zoo name or Hub id (resolved by models/load.py)."""
        if (runs_dir / ref).is_dir() and (runs_dir / ref / "final").is_dir():
            return str(inside(runs_dir, ref) / "final")
        for base in (root, runs_dir):
            if (base / ref).exists():
                return str(inside(base, ref))
        if ref.startswith("/") or ".." in ref:
            raise UIError(403, f"{ref!r} is outside the UI's folders")
        return ref

    async def chat(request: Request):
        body = await request.json()
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise UIError(400, "'messages' must be a non-empty list")
        max_tokens = min(int(body.get("max_tokens", 64)), 512)
        temperature = float(body.get("temperature", 0.0))
        models = body.get("models") or []
        if not models or len(models) > 2:
            raise UIError(400, "'models': one or two model references")
        replies = []
        for ref in models:
            replies.append(await run_in_threadpool(pool.chat, model_ref(ref), msgs, max_tokens, temperature))
        return {"replies": replies}

    async def launch(request: Request):
        body = await request.json()
        config = inside(root, body.get("config", ""))
        if not config.is_file():
            raise UIError(404, f"no config file {body.get('config')!r} under {root}")
        overrides = body.get("overrides") or []
        if isinstance(overrides, str):
            overrides = overrides.split()
        return {"id": jobs.launch(body.get("recipe", ""), config, list(overrides))}

    async def job(request: Request):
        return jobs.status(request.path_params["id"])

    async def job_stop(request: Request):
        return jobs.stop(request.path_params["id"])

    async def configs(request: Request):
        found = sorted(str(p.relative_to(root)) for p in (root / "configs").glob("*.yaml")) \
            if (root / "configs").is_dir() else []
        return {"configs": found, "recipes": list(RECIPES)}

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/runs", api(runs_list), methods=["GET"]),
        Route("/api/runs/{name:path}", api(run_get), methods=["GET"]),
        Route("/api/data", api(data), methods=["GET"]),
        Route("/api/chat", api(chat), methods=["POST"]),
        Route("/api/configs", api(configs), methods=["GET"]),
        Route("/api/launch", api(launch), methods=["POST"]),
        Route("/api/jobs/{id}", api(job), methods=["GET"]),
        Route("/api/jobs/{id}/stop", api(job_stop), methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.jobs = jobs  # serve_ui stops what is still running when the UI exits
    return app


def serve_ui(root: str = ".", runs: str = "runs", host: str = "127.0.0.1", port: int = 7860):
    """Build the app and serve it (blocking); returns when interrupted."""
    import uvicorn

    app = build_app(root, runs)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        app.state.jobs.close()
