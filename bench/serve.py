"""Serving throughput: `instructkit serve` (batched, Starlette on uvicorn) vs the previous stdlib server (commit 6c9aa01:
ThreadingHTTPServer, one lock around one-row generation) vs llama.cpp (llama-cpp-python's ``Llama`` on the same model
exported to GGUF), side by side in one run.

    HF_HUB_OFFLINE=1 python bench/serve.py --model smollm2-135m-instruct --clients 1 4 16 64 --requests 64 \\
        --max-tokens 64 --reps 3

For each side and each number of concurrent clients C: C client threads send chat completions (built-in seed
instructions, greedy, ``max_tokens`` tokens, stops as the model's template says) over keep-alive HTTP connections
until ``--requests`` requests are done; requests/s and generated tokens/s (from each response's usage) over the wall
time, median latency. Repetitions interleave the sides (ours, previous, llama.cpp, ours, ...) so machine noise hits
all of them; the median of the repetitions is reported.

- The previous server and its engine are loaded from git (``git show 6c9aa01:...``) into private modules, so the
  baseline is the code that shipped, not a reconstruction. Its engine shares today's fast decode step.
- llama.cpp: ``Llama`` is one sequence at a time (no batching in the Python binding), so its clients are served behind
  a lock through a small threaded HTTP front (the same client code measures it); the GGUF is ``--gguf-type`` (f32 by
  default: the same arithmetic as the other sides; q8_0 / q4_K_M to show what quantisation buys). Skipped with a
  reason when llama-cpp-python is not available (models/export.py ``llama_cpp_module``).
- Work done is checked: greedy replies of our server must equal the previous server's for the same prompt.
- Each side is its own server process, as a deployment runs it (ours is the ``instructkit serve`` command itself),
  and the clients are threads of this process. Servers and clients in one process would share one interpreter lock:
  every client thread and every other server's threads then stall the engine thread between its tensor operations
  (the lock is handed over at most every 5 ms), which is a property of the benchmark, not of a server.

Appends the run to bench/results/serve.json (or ``--out``; ``{"runs": [...]}``, earlier runs kept) and prints a
markdown table. Needs an idle machine: do not run it next to other jobs (``--smoke`` runs a tiny model in seconds to
check the script itself).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "6c9aa01"


def _module_from_git(name: str, path: str, replace: dict[str, str]):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:{path}"], check=True,
                         capture_output=True, text=True).stdout
    for a, b in replace.items():
        src = src.replace(a, b)
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    exec(compile(src, f"{BASELINE_COMMIT}:{path}", "exec"), mod.__dict__)
    return mod


def baseline_modules():
    """(engine module, server module) as they were at BASELINE_COMMIT."""
    eng = _module_from_git("ik_baseline_engine", "src/instructkit/generation/engine.py", {})
    srv = _module_from_git("ik_baseline_server", "src/instructkit/generation/server.py",
                           {"from instructkit.generation.engine import": "from ik_baseline_engine import"})
    return eng, srv


class LlamaCppFront:
    """llama-cpp-python's Llama behind a threaded stdlib HTTP front speaking /v1/chat/completions (non-streamed),
    one generation at a time (the binding serves one sequence)."""

    def __init__(self, gguf: Path, threads: int, tokenizer, stop_ids: list[int]):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from instructkit.models.export import llama_cpp_module

        lc = llama_cpp_module()
        self.llm = lc.Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
        lock = threading.Lock()
        llm = self.llm
        stops = set(stop_ids)

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                # the prompt rendered by the model's own template (as our engine does), greedy, the same stop
                # tokens; counted token by token (llama-cpp-python's own usage re-tokenises the reply text)
                text = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
                ids = llm.tokenize(text.encode(), add_bos=False, special=True)
                out: list[int] = []
                with lock:
                    for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
                        out.append(t)
                        if t in stops or len(out) >= body["max_tokens"]:
                            break
                content = llm.detokenize([t for t in out if t not in stops]).decode("utf-8", "replace")
                r = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out)}}
                data = json.dumps(r).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default listen backlog (5) resets connections when 16+ clients connect

        self.httpd = Server(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class SideProcess:
    """One server side in its own process: it prints one JSON line ``{"url": ...}`` when it listens; stopped by
    closing its stdin (the side modes of this script) or by a signal (``instructkit serve``)."""

    def __init__(self, name: str, cmd: list[str], log: Path):
        self.name = name
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     cwd=str(ROOT))
        line = ""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self._log.flush()
                raise SystemExit(f"side {name!r} exited before serving (exit code {self.proc.wait()}); its log: {log}"
                                 f"\n{log.read_text()[-3000:]}")
            try:
                self.base_url = json.loads(line)["url"]
                break
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line of something else on stdout
        # keep draining stdout, so that a side that prints more never blocks on a full pipe
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def serve_side(args) -> int:
    """``--serve-side previous|llama.cpp``: run that side's server in this process until stdin closes."""
    import torch

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    model, tok = load_side_model(args.model)
    if args.serve_side == "previous":
        beng, bsrv = baseline_modules()
        srv = bsrv.OpenAIServer(beng.Engine(model, tok), "m", port=0,
                                limits=bsrv.ServerLimits(max_tokens_limit=4096)).start()
        url, stop = srv.base_url, srv.stop
    else:
        from instructkit.generation.engine import Engine

        stop_ids = Engine(model, tok).chat_stop_token_ids()
        front = LlamaCppFront(Path(args.gguf), args.threads or len(os.sched_getaffinity(0)), tok, stop_ids)
        del model
        url, stop = front.base_url, front.stop
    print(json.dumps({"url": url}), flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin (or exits)
    stop()
    return 0


def load_side_model(path: str):
    import torch  # noqa: F401

    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(path=path))
    return model.eval(), tok


def prompts_for(n: int) -> list[list[dict]]:
    from instructkit.data.seed_tasks import load_seed_tasks

    tasks = load_seed_tasks()
    out = []
    for i in range(n):
        t = tasks[i % len(tasks)]
        inp = (t.instances[0] or {}).get("input", "") if t.instances else ""
        text = t.instruction + ("\n\n" + inp if inp else "")
        out.append([{"role": "user", "content": text}])
    return out


def drive(base_url: str, model: str, prompts: list, clients: int, max_tokens: int) -> dict:
    """``clients`` threads, each with its own keep-alive connection, take prompts from a shared queue."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(base_url)
    todo = list(enumerate(prompts))
    lock = threading.Lock()
    latencies, tokens, replies, errors = [], [], {}, []

    def worker():
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
        while True:
            with lock:
                if not todo:
                    break
                i, msgs = todo.pop(0)
            body = json.dumps({"model": model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0})
            t0 = time.perf_counter()
            try:
                conn.request("POST", u.path + "/chat/completions", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = json.loads(r.read())
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {data}")
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
                continue
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                tokens.append(data["usage"]["completion_tokens"])
                replies[i] = data["choices"][0]["message"]["content"]
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": len(latencies), "errors": errors[:3], "n_errors": len(errors),
            "requests_per_s": len(latencies) / wall, "tokens_per_s": sum(tokens) / wall,
            "median_latency_s": statistics.median(latencies) if latencies else None, "replies": replies}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="zoo name or model folder")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=64, help="requests per measurement (at least the clients)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch / llama.cpp threads (0: the machine's cores)")
    ap.add_argument("--gguf-type", default="f32", choices=["f32", "q8_0", "q4_K_M"])
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 requests per client count, 4 tokens")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    ap.add_argument("--serve-side", choices=["previous", "llama.cpp"], help=argparse.SUPPRESS)  # a side's process
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_side:
        return serve_side(args)
    if not args.smoke:
        earlier_runs(Path(args.out))  # an unreadable results file stops here, before the measurement, not after

    threads = args.threads or len(os.sched_getaffinity(0))  # the cores this run may use (taskset is honoured)
    work = Path(tempfile.mkdtemp(prefix="ik_bench_serve_"))
    if args.smoke:
        from instructkit.models.tiny import create_tiny

        args.model = str(create_tiny(work / "tiny", seed=0, hidden_size=256))
        args.requests, args.max_tokens, args.reps = 4, 4, 1
        args.out = str(work / "serve.json")

    logs = Path(tempfile.mkdtemp(prefix="ik_bench_serve_logs_"))
    sides: dict[str, SideProcess] = {}

    def side(name: str, cmd: list[str]) -> None:
        sides[name] = SideProcess(name, cmd, logs / f"side{len(sides)}.log")

    try:
        # ours: the `instructkit serve` command as users run it (batching up to 64 rows)
        side("instructkit serve (batched)",
             [sys.executable, "-m", "instructkit", "serve", "--model", args.model, "--port", "0", "--name", "m",
              "--threads", str(threads), "--max-batch-rows", "64", "--max-tokens-limit", "4096",
              "--idle-timeout", "3600"])
        me = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--threads", str(threads)]
        if not args.no_baseline:
            side(f"previous server ({BASELINE_COMMIT}, stdlib, one lock)", me + ["--serve-side", "previous"])
        llama_note = None
        if not args.no_llama_cpp:
            from instructkit.models.export import export_gguf, llama_cpp_module, llama_cpp_unavailable_reason

            if llama_cpp_module() is None:
                llama_note = f"skipped: {llama_cpp_unavailable_reason()}"
                print(f"llama.cpp side {llama_note}", file=sys.stderr, flush=True)
            else:
                from instructkit.models.load import resolve_path

                gguf = export_gguf(resolve_path(args.model), work / f"model-{args.gguf_type}.gguf", args.gguf_type)
                side(f"llama.cpp (llama-cpp-python Llama, {args.gguf_type} GGUF, one sequence at a time)",
                     me + ["--serve-side", "llama.cpp", "--gguf", str(gguf)])
    except BaseException:
        for sp in sides.values():
            sp.stop()
        raise

    prompts_all = prompts_for(max(args.requests, max(args.clients)))
    results = []
    load_before = os.getloadavg()
    try:
        for name, sp in sides.items():  # warm-up
            drive(sp.base_url, "m", prompts_all[:2], 2, args.max_tokens)
        for c in args.clients:
            prompts = prompts_all[:max(args.requests, c)]
            runs: dict[str, list[dict]] = {n: [] for n in sides}
            for name, sp in sides.items():  # untimed: the decode step's per-batch-size set-up happens here
                drive(sp.base_url, "m", prompts[:c], c, args.max_tokens)
            for _ in range(args.reps):
                for name, sp in sides.items():
                    runs[name].append(drive(sp.base_url, "m", prompts, c, args.max_tokens))
            row = {"clients": c, "requests": len(prompts)}
            for name, rs in runs.items():
                row[name] = {k: statistics.median(r[k] for r in rs) for k in
                             ("requests_per_s", "tokens_per_s", "median_latency_s", "wall_s")}
                row[name]["errors"] = sum(r["n_errors"] for r in rs)
            names = list(sides)
            if len(names) > 1 and "previous" in names[1]:
                row["speedup_vs_previous"] = row[names[0]]["requests_per_s"] / row[names[1]]["requests_per_s"]
                a, b = runs[names[0]][-1]["replies"], runs[names[1]][-1]["replies"]
                row["same_replies_as_previous"] = sum(a.get(i) == b.get(i) for i in a) / max(1, len(a))
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for sp in sides.values():
            sp.stop()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the server processes (stopped and waited for above)
    record = {"command": " ".join([sys.executable, *sys.argv]), "model": args.model,
              "processes": "one per side; clients are threads of the benchmark process",
              "max_tokens": args.max_tokens,
              "threads": threads, "reps": args.reps, "llama_cpp": llama_note or args.gguf_type,
              "cpu": _cpu_model(), "load_before": load_before, "load_after": os.getloadavg(),
              "cpu_time_s_servers": usage.ru_utime + usage.ru_stime, "peak_rss_mb_largest_server": usage.ru_maxrss / 1024,
              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "results": results}
    out = Path(args.out)
    runs = earlier_runs(out) + [record]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    tmp.replace(out)  # all runs or the previous file, never half of one
    print(_table(record))
    print(f"appended to {out} ({len(runs)} runs)")
    return 0


def earlier_runs(path: Path) -> list[dict]:
    """The runs already in the results file (``{"runs": [...]}``; a single run written by an older version of this
    script counts as one): every run is kept, a new one is appended. A file that cannot be read as either is an error,
    never overwritten."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); move it away or pass --out, so that no earlier run is lost")
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        return data["runs"]
    if isinstance(data, dict) and "results" in data:
        return [data]
    raise SystemExit(f"{path}: neither {{\"runs\": [...]}} nor a single run; move it away or pass --out")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _table(record: dict) -> str:
    rows = record["results"]
    if not rows:
        return ""
    names = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    head = "| clients | " + " | ".join(f"{n}: req/s, tok/s" for n in names) + " | speed-up vs previous |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for r in rows:
        cells = [f"{r[n]['requests_per_s']:.2f}, {r[n]['tokens_per_s']:.1f}" for n in names]
        lines.append(f"| {r['clients']} | " + " | ".join(cells) + f" | {r.get('speedup_vs_previous', float('nan')):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
