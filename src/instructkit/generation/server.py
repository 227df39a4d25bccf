"""An OpenAI-compatible HTTP server for a (tuned) model: `instructkit serve --model PATH`.

HTTP is Starlette on uvicorn (HTTP/1.1 through h11: chunked request and response bodies, keep-alive with an idle
timeout, TCP_NODELAY on every connection as asyncio sets it). What is ours is the OpenAI surface and the batching:

- ``BatchScheduler``: one worker thread owns the Engine. Requests queue their rows (one per prompt and choice, each
  with its own sampling parameters and seed). With continuous batching (generation/continuous.py, for the models the
  lean decode step supports) the worker runs one decode step at a time over every running row; between two steps,
  queued requests join the running batch (as many rows as ``max_batch_rows`` leaves room for: prefilled, then decoded
  with the others) and a request is answered as soon as its own rows finish, its rows leaving the batch. Nobody waits
  for a batch to drain and no step runs for rows that are done. Other models run whole batches (``Engine.run`` over
  everything pending; requests that arrive meanwhile join the next batch). Greedy rows compute the same float
  operations whatever else is in the batch, up to the last bits batched matmuls may round differently in
  (tests/test_server.py and tests/test_server_continuous.py check that each concurrent reply equals the one served
  alone).
- Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``n``, ``logprobs`` / ``top_logprobs``,
  ``echo`` with the prompt's log-probabilities and ``max_tokens: 0``, ``stop``, ``seed``, streaming as server-sent
  events ending with ``data: [DONE]`` in a chunked body, so a cut stream is detectable), ``GET /v1/models``,
  ``GET /v1/models/{id}``, ``GET /health``, ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (the
  vLLM-style endpoints lm-evaluation-harness uses for a remote tokenizer).
- Every request field is either implemented or refused with a 400 naming it (``response_format`` other than text,
  ``logit_bias``, ``tools``, ``suffix``, non-zero presence/frequency penalties, unknown keys): never accepted and ignored.
  ``user`` is accepted: it identifies the caller and changes no output.

What it guarantees:
- Bounded: binds 127.0.0.1 unless told otherwise. A body longer than ``max_request_bytes`` gets 413 however it is framed
  (a Content-Length above the limit is refused before reading; a chunked body is counted as it arrives); a malformed
  Content-Length (negative, not a number) is a 400 from the HTTP layer before any byte reaches the application.
  ``max_tokens`` above ``max_tokens_limit`` and prompts above ``max_prompt_tokens`` get 400; bad JSON gets 400; a wrong
  method 405; an unknown path 404; all in the OpenAI error shape. Timeouts: ``body_timeout_s`` for reading a body
  (408), ``request_timeout_s`` for a whole generation (504, or an error event in a stream), ``idle_timeout_s`` for
  keep-alive connections.
- No foreign templates: the chat template is the model's own (through chat/render.py); a request carrying a template
  or template kwargs is refused, so a client can never make the server render attacker-supplied Jinja.
- No paths from requests: no request field is ever used as a path (the model is fixed at start-up; ``model`` is
  only compared with the served name).
- Secret key: with ``api_key``, every endpoint but ``/health`` needs ``Authorization: Bearer <key>``
  (``hmac.compare_digest``); the key is never logged or echoed (the access log is ours: method, path, status, time;
  no headers).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from instructkit.generation.engine import Engine, GenerationOutput, Row, SamplingParams

log = logging.getLogger(__name__)

TEMPLATE_FIELDS = ("chat_template", "chat_template_kwargs", "template", "template_kwargs", "add_generation_prompt")
# Request fields per endpoint; anything else is a 400 naming the field.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed",
           "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "user", "logit_bias",
           "response_format"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                         "function_call", "parallel_tool_calls"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"}


def _is_tool_call(c: Any) -> bool:
    f = c.get("function") if isinstance(c, dict) else None
    return (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), str)
            and c.get("type", "function") == "function")


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass
class ServerLimits:
    max_request_bytes: int = 1_000_000
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    max_prompt_tokens: int = 8192
    max_batch: int = 16
    """Prompts per completions request."""
    max_n: int = 16
    max_batch_rows: int = 64
    """Rows (prompts x choices) the engine decodes together; requests beyond it wait for the next batch."""
    max_pending_rows: int = 1024
    """Rows queued before new requests get 503."""
    request_timeout_s: float = 600.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 5.0
    batch_wait_s: float = 0.005
    """How long the worker waits, after the first request of an idle spell, for concurrent ones to join its batch."""


def _num(body: dict, key: str, default, kind, lo=None, hi=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise RequestError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'}", key)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(400, f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return v


# ---------------------------------------------------------------------------------------------------------------------
# The batching worker
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Ticket:
    """One request's work: rows to generate (and, for ``echo``, prompts to score), and how to tell its handler."""
    rows: list[Row]
    score: list[list[int]] = field(default_factory=list)
    score_top: int = 0
    stream: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None
    prompt_scores: list = field(default_factory=list)
    read: dict | None = None  # chat: how to read replies back (tools offered, think tags)
    outputs: list[GenerationOutput] | None = None
    error: str | None = None
    _sent_chars: list[int] = field(default_factory=list)
    _sent_tokens: list[int] = field(default_factory=list)

    def cancel(self) -> None:
        for r in self.rows:
            r.cancelled = True

    def _put(self, item) -> None:
        if self.loop is not None and self.queue is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class BatchScheduler:
    """Runs every generation on one worker thread, batching the rows of concurrent requests (see module docstring)."""

    def __init__(self, engine: Engine, limits: ServerLimits):
        from instructkit.generation.continuous import ContinuousBatch

        self.engine = engine
        self.limits = limits
        self._pending: list[Ticket] = []
        self._inflight: list[Ticket] = []  # continuous batching: admitted tickets not finished yet
        self._cv = threading.Condition()
        self._closed = False
        self.continuous = ContinuousBatch.supported(engine)
        self._batch = ContinuousBatch(engine) if self.continuous else None
        # counters for tests and logs: admissions (groups of requests that started together: one prefill round, or
        # one Engine.run without continuous batching), decode steps, most rows decoded in one step
        self.batches = 0
        self._steps = 0
        self.max_rows_seen = 0
        self._thread = threading.Thread(target=self._work, name="instructkit-engine", daemon=True)
        self._thread.start()

    @property
    def steps(self) -> int:
        """Decode steps run (continuous batching; whole batches count theirs as they run)."""
        return self._batch.steps if self._batch is not None else self._steps

    def submit(self, ticket: Ticket) -> None:
        with self._cv:
            if sum(len(t.rows) for t in self._pending) + len(ticket.rows) > self.limits.max_pending_rows:
                raise RequestError(503, "the server is overloaded (too many queued requests); retry later")
            self._pending.append(ticket)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _take(self, free_rows: int) -> list[Ticket]:
        """Pending tickets, in order, whose rows fit in ``free_rows`` (at least one when nothing else runs)."""
        taken, rows = [], 0
        while self._pending and (rows + len(self._pending[0].rows) <= free_rows
                                 or (not taken and free_rows >= self.limits.max_batch_rows)):
            t = self._pending.pop(0)
            taken.append(t)
            rows += len(t.rows)
        return taken

    def _work(self) -> None:
        if self.continuous:
            return self._work_continuous()
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
            if self.limits.batch_wait_s > 0:  # let requests sent at the same moment arrive and join this batch
                time.sleep(self.limits.batch_wait_s)
            with self._cv:
                tickets = self._take(self.limits.max_batch_rows)
            try:
                self._run(tickets)
            except Exception as e:  # never let one bad batch kill the worker
                self._fail(tickets, e)

    def _fail(self, tickets: list[Ticket], e: Exception, shutdown: bool = False) -> None:
        if not shutdown:
            log.exception("generation failed")
        for t in tickets:
            if t.outputs is None:
                t.error = f"generation failed: {type(e).__name__}: {e}"
                t._put(("error", t.error))

    def _work_continuous(self) -> None:
        """Continuous batching (generation/continuous.py): between two decode steps, pending requests join the running
        batch (as many rows as ``max_batch_rows`` leaves room for) and finished requests are answered at once."""
        while True:
            batch = self._batch
            with self._cv:
                while not self._pending and not self._inflight and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for t in self._pending + self._inflight:
                        t.cancel()
                    self._fail(self._pending + self._inflight, RuntimeError("the server is shutting down"), True)
                    return
                idle = not self._inflight
            if idle and self._pending and self.limits.batch_wait_s > 0:
                time.sleep(self.limits.batch_wait_s)  # requests sent at the same moment start together
            with self._cv:
                taken = self._take(self.limits.max_batch_rows - len(batch))
            try:
                if taken:
                    self._admit(taken)
                batch.step()
                self.max_rows_seen = max(self.max_rows_seen, batch.max_rows)
                self._deliver()
            except Exception as e:  # never let one bad step kill the worker: its requests fail, the batch restarts
                self._fail(self._inflight, e)
                self._inflight = []
                batch.clear()
            if not self._inflight:
                batch.clear()

    def _admit(self, tickets: list[Ticket]) -> None:
        self.batches += 1
        self._inflight += tickets
        for t in tickets:
            t._sent_chars = [0] * len(t.rows)
            t._sent_tokens = [0] * len(t.rows)
            if t.score:
                t.prompt_scores = self.engine.prompt_logprobs(t.score, top_k=t.score_top)
        self._batch.add([r for t in tickets for r in t.rows])

    def _deliver(self) -> None:
        still = []
        for t in self._inflight:
            if t.stream:
                self._push_deltas(t)
            if all(r.finish_reason is not None for r in t.rows):
                self._finish(t)
            else:
                still.append(t)
        self._inflight = still

    def _run(self, tickets: list[Ticket]) -> None:
        eng = self.engine
        scoring = [t for t in tickets if t.score]
        for t in scoring:
            t.prompt_scores = eng.prompt_logprobs(t.score, top_k=t.score_top)
        rows = [r for t in tickets for r in t.rows]
        self.batches += 1
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        for t in tickets:
            t._sent_chars = [0] * len(t.rows)
            t._sent_tokens = [0] * len(t.rows)
        live = [t for t in tickets if any(not r.cancelled for r in t.rows)]
        done: set[int] = set()
        steps = eng.run(rows)
        for _ in steps:
            self._steps += 1
            for t in live:
                if id(t) in done:
                    continue
                if t.stream:
                    self._push_deltas(t)
                if all(r.finish_reason is not None for r in t.rows):
                    self._finish(t)
                    done.add(id(t))
        for t in tickets:  # rows that never decoded (max_tokens 0, or all cancelled) and the last step's rows
            if id(t) not in done:
                if t.stream:
                    self._push_deltas(t)
                self._finish(t)

    def _push_deltas(self, t: Ticket) -> None:
        out = []
        for j, r in enumerate(t.rows):
            text = self.engine.settled_text(r)
            n_tok = len(r.tokens)
            if len(text) > t._sent_chars[j] or n_tok > t._sent_tokens[j]:
                out.append((j, text[t._sent_chars[j]:], t._sent_tokens[j], n_tok))
                t._sent_chars[j] = max(t._sent_chars[j], len(text))
                t._sent_tokens[j] = n_tok
        if out:
            t._put(("delta", out))

    def _finish(self, t: Ticket) -> None:
        t.outputs = [self.engine.output(r) for r in t.rows]
        t._put(("done", None))


# ---------------------------------------------------------------------------------------------------------------------
# The OpenAI surface
# ---------------------------------------------------------------------------------------------------------------------
class OpenAIServer:
    """Wraps an Engine; ``serve_forever()``, or ``start()`` (background thread) / ``stop()``."""

    def __init__(self, engine: Engine, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, limits: ServerLimits | None = None):
        self.engine = engine
        self.model_name = model_name
        self.limits = limits or ServerLimits()
        self._api_key = api_key or None
        self.created = int(time.time())
        self.scheduler = BatchScheduler(engine, self.limits)
        self._token_cache: dict[int, str] = {}
        self.app = self._build_app()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when their proto says TCP (and
        # they inherit it from this one); without it every keep-alive response stalls ~40 ms (Nagle + delayed ACK)
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(2048)
        self._sock.set_inheritable(True)
        import uvicorn

        self._uv = uvicorn.Server(uvicorn.Config(
            self.app, log_level="warning", access_log=False, server_header=False, lifespan="off",
            timeout_keep_alive=max(1, int(round(self.limits.idle_timeout_s))), timeout_graceful_shutdown=2,
            h11_max_incomplete_event_size=64 * 1024))
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._sock.getsockname()[:2]

    @property
    def base_url(self) -> str:
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"

    def start(self) -> "OpenAIServer":
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._uv.started and time.time() < deadline:
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        self._uv.run(sockets=[self._sock])

    def stop(self) -> None:
        self._uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.close()

    def close(self) -> None:
        self.scheduler.close()
        try:
            self._sock.close()
        except OSError:
            pass

    # ---- request parsing --------------------------------------------------------------------------------------------
    def check_auth(self, header: str | None) -> None:
        if self._api_key is None:
            return
        header = header or ""
        given = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), self._api_key.encode()):
            raise RequestError(401, "missing or invalid API key (Authorization: Bearer ...)")

    def _common(self, body: Any, allowed: set[str], default_max_tokens: int) -> tuple[SamplingParams, int]:
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        for key in TEMPLATE_FIELDS:
            if key in body:
                raise RequestError(400, f"'{key}' is not accepted: this server applies the model's own chat template "
                                        "and never one sent in a request", key)
        unknown = sorted(k for k in body if k not in allowed)
        if unknown:
            raise RequestError(400, f"unsupported field(s): {', '.join(map(repr, unknown))}", unknown[0])
        for key in ("functions", "function_call"):
            if body.get(key) is not None:
                raise RequestError(400, f"'{key}' (the deprecated functions API) is not supported: use 'tools'", key)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(404, f"model '{model}' is not served here; this server serves '{self.model_name}'",
                               "model")
        rf = body.get("response_format")
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text" and len(rf) == 1):
            raise RequestError(400, "'response_format': only {\"type\": \"text\"} is supported (JSON mode needs "
                                    "constrained decoding, which this server does not do)", "response_format")
        if body.get("logit_bias"):
            raise RequestError(400, "'logit_bias' is not supported", "logit_bias")
        for k in ("presence_penalty", "frequency_penalty"):
            if _num(body, k, 0.0, float, -2.0, 2.0) != 0.0:
                raise RequestError(400, f"'{k}' is not supported (use repetition_penalty)", k)
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise RequestError(400, "'user' must be a string", "user")
        n = _num(body, "n", 1, int, 1, self.limits.max_n)
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _num({key: body.get(key)}, key, default_max_tokens, int, 0, self.limits.max_tokens_limit)
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
            raise RequestError(400, "'stop' must be a string or a list of at most 16 strings", "stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(400, "'seed' must be an integer", "seed")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise RequestError(400, "'stream' must be a boolean", "stream")
        opts = body.get("stream_options")
        if opts is not None:
            if not stream:
                raise RequestError(400, "'stream_options' needs 'stream': true", "stream_options")
            if not isinstance(opts, dict) or set(opts) - {"include_usage"} or \
                    not isinstance(opts.get("include_usage", False), bool):
                raise RequestError(400, "'stream_options' supports only {\"include_usage\": bool}", "stream_options")
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=_num(body, "temperature", 1.0, float, 0.0, 2.0),
            top_p=_num(body, "top_p", 1.0, float, 1e-6, 1.0),
            top_k=_num(body, "top_k", 0, int, 0, 1_000_000),
            repetition_penalty=_num(body, "repetition_penalty", 1.0, float, 0.01, 10.0),
            stop_strings=tuple(stop),
            seed=seed,
            logprobs=False,
        )
        return params, n

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise RequestError(400, "the prompt is empty")
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}")

    def _messages(self, msgs: Any) -> list[dict]:
        if not isinstance(msgs, list) or not msgs:
            raise RequestError(400, "'messages' must be a non-empty list", "messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
            if m["role"] not in ("system", "user", "assistant", "developer", "tool"):
                raise RequestError(400, f"messages[{i}].role {m['role']!r} is not supported", "messages")
            extra = sorted(k for k in m if k not in MESSAGE_FIELDS and m[k] is not None)
            if extra:
                raise RequestError(400, f"messages[{i}]: unsupported field(s) {', '.join(map(repr, extra))}",
                                   "messages")
            out: dict[str, Any] = {}
            calls = m.get("tool_calls")
            if calls is not None:
                if m["role"] != "assistant" or not isinstance(calls, list) or not all(_is_tool_call(c) for c in calls):
                    raise RequestError(400, f"messages[{i}].tool_calls must be a list of {{id, type: function, "
                                            "function: {name, arguments (JSON text)}} on an assistant message",
                                       "messages")
                out["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
                    "name": c["function"]["name"], "arguments": c["function"]["arguments"]}} for c in calls]
            for key, role in (("tool_call_id", "tool"), ("reasoning_content", "assistant"), ("name", None)):
                v = m.get(key)
                if v is None:
                    continue
                if not isinstance(v, str) or (role is not None and m["role"] != role):
                    raise RequestError(400, f"messages[{i}].{key} must be a string"
                                            + (f" on a {role} message" if role else ""), "messages")
                out[key] = v
            content = m.get("content")
            if content is None and (calls or m["role"] == "assistant"):
                content = ""
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                parts = []
                for p in content:
                    if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                        raise RequestError(400, f"messages[{i}].content parts must be text parts", "messages")
                    parts.append(p["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise RequestError(400, f"messages[{i}].content must be a string", "messages")
            role = "system" if m["role"] == "developer" else m["role"]
            clean.append({"role": role, "content": content, **out})
        return clean

    def chat_request(self, body: Any) -> tuple[list[int], SamplingParams, int, dict]:
        """(prompt ids, sampling parameters, n, how to read the reply back: offered tools and think tags)."""
        params, n = self._common(body, CHAT_FIELDS, self.limits.default_max_tokens)
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list) or not all(
                    isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
                    and isinstance(t["function"].get("name"), str) for t in tools):
                raise RequestError(400, "'tools' must be a list of {type: function, function: {name, description, "
                                        "parameters}}", "tools")
        choice = body.get("tool_choice")
        if choice not in (None, "auto", "none"):
            raise RequestError(400, "'tool_choice': only 'auto' and 'none' are supported (forcing a call needs "
                                    "constrained decoding, which this server does not do)", "tool_choice")
        if body.get("parallel_tool_calls") is False:
            raise RequestError(400, "'parallel_tool_calls': false is not supported (the model may emit several "
                                    "calls and nothing here stops it)", "parallel_tool_calls")
        if choice == "none":
            tools = None
        tools = tools or None
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise RequestError(400, "'logprobs' must be a boolean", "logprobs")
        top = _num(body, "top_logprobs", 0, int, 0, 20)
        if top and not logprobs:
            raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        params.logprobs, params.top_logprobs = bool(logprobs), top
        if params.max_new_tokens == 0:
            raise RequestError(400, "'max_tokens' must be at least 1 for chat completions", "max_tokens")
        clean = self._messages(body.get("messages"))
        try:
            ids = self.engine.chat_prompt_ids(clean, tools=tools)
        except Exception as e:  # the template rejected the conversation (e.g. roles out of order, tools unrendered)
            raise RequestError(400, f"the chat template could not render these messages: {e}",
                               "tools" if tools and "tools" in str(e) else "messages") from None
        self._check_prompt(ids)
        params.stop_token_ids = self.engine.chat_stop_token_ids()
        source = self.engine.chat_template_source or ""
        think = "</think>" in source
        tail = self.engine.tokenizer.decode(ids[-8:], skip_special_tokens=False) if think else ""
        read = {"tools": tools, "think": think, "opened": think and tail.rstrip().endswith("<think>"),
                "template": source}
        return ids, params, n, read

    @staticmethod
    def chat_message(text: str, finish_reason: str, read: dict) -> tuple[dict, str]:
        """The assistant message of a finished reply: reasoning split off, tool calls parsed (chat/parse.py)."""
        from instructkit.chat.parse import parse_tool_calls, split_reasoning

        reasoning, content = split_reasoning(text, read["opened"]) if read["think"] else (None, text)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if read["tools"]:
            rest, calls = parse_tool_calls(content, read.get("template"), read["tools"])
            if calls:
                msg["content"], msg["tool_calls"] = rest or None, calls  # null content when only calls were said
                if finish_reason == "stop":
                    finish_reason = "tool_calls"
        return msg, finish_reason

    def completion_request(self, body: Any) -> tuple[list[list[int]], list[str | None], SamplingParams, int, bool]:
        params, n = self._common(body, COMPLETION_FIELDS, 16)
        if body.get("suffix") is not None:
            raise RequestError(400, "'suffix' (insertion) is not supported", "suffix")
        best_of = _num(body, "best_of", n, int, 1, self.limits.max_n)
        if best_of != n:
            raise RequestError(400, "'best_of' other than n is not supported", "best_of")
        echo = body.get("echo", False)
        if echo is None:
            echo = False
        if not isinstance(echo, bool):
            raise RequestError(400, "'echo' must be a boolean", "echo")
        if echo and body.get("stream"):
            raise RequestError(400, "'echo' with 'stream' is not supported", "echo")
        top = _num(body, "logprobs", None, int, 0, 20)
        params.logprobs, params.top_logprobs = top is not None, top or 0
        if params.max_new_tokens == 0 and not echo:
            raise RequestError(400, "'max_tokens': 0 is only meaningful with 'echo': true", "max_tokens")
        prompt = body.get("prompt")
        vocab = len(self.engine.tokenizer)
        is_ids = lambda p: isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)  # noqa
                                                             for t in p)
        if isinstance(prompt, str) or is_ids(prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
            prompts = prompt
        else:
            raise RequestError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                                    "lists of token ids", "prompt")
        if len(prompts) * n > self.limits.max_batch_rows or len(prompts) > self.limits.max_batch:
            raise RequestError(400, f"at most {self.limits.max_batch} prompts and {self.limits.max_batch_rows} "
                                    "prompts x n per request", "prompt")
        tok = self.engine.tokenizer
        ids, texts = [], []
        for p in prompts:
            if isinstance(p, str):
                ids.append(list(tok(p, add_special_tokens=True)["input_ids"]))
                texts.append(p)
            else:
                if not all(0 <= t < vocab for t in p):
                    raise RequestError(400, f"token ids must be in [0, {vocab})", "prompt")
                ids.append(list(p))
                texts.append(None)
        for i in ids:
            self._check_prompt(i)
        return ids, texts, params, n, echo

    # ---- token strings ------------------------------------------------------------------------------------------
    def token_str(self, tid: int) -> str:
        s = self._token_cache.get(tid)
        if s is None:
            s = self.engine.tokenizer.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if len(self._token_cache) < 1_000_000:
                self._token_cache[tid] = s
        return s

    def _chat_logprobs(self, o: GenerationOutput, a: int, b: int) -> dict:
        content = []
        for k in range(a, b):
            t = self.token_str(o.token_ids[k])
            entry = {"token": t, "logprob": o.logprobs[k], "bytes": list(t.encode("utf-8")), "top_logprobs": []}
            if o.top_logprobs:
                entry["top_logprobs"] = [{"token": self.token_str(i), "logprob": lp,
                                          "bytes": list(self.token_str(i).encode("utf-8"))}
                                         for i, lp in o.top_logprobs[k]]
            content.append(entry)
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, ids: Sequence[int], lps: Sequence, tops: Sequence | None, start: int) -> dict:
        tokens = [self.token_str(i) for i in ids]
        offsets, pos = [], start
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        top_out = []
        for k in range(len(ids)):
            top = tops[k] if tops is not None and k < len(tops) else {}
            top_out.append(None if top is None else {self.token_str(i): lp for i, lp in top} if top else {})
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top_out, "text_offset": offsets}

    # ---- the app ----------------------------------------------------------------------------------------------------
    def _build_app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        server = self
        limits = self.limits

        def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> Response:
            kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                    500: "server_error", 503: "server_error", 504: "server_error"}.get(status, "invalid_request_error")
            return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                                status_code=status, headers=headers)

        async def read_json(request: Request) -> Any:
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
                raise RequestError(413, f"request body of {declared} bytes exceeds the limit of "
                                        f"{limits.max_request_bytes}")
            chunks, size = [], 0

            async def read() -> None:
                nonlocal size
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limits.max_request_bytes:
                        raise RequestError(413, f"request body exceeds the limit of {limits.max_request_bytes} bytes")
                    chunks.append(chunk)

            try:
                await asyncio.wait_for(read(), limits.body_timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(408, f"the request body did not arrive within {limits.body_timeout_s} s") from None
            try:
                return json.loads(b"".join(chunks).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RequestError(400, f"the request body is not valid JSON: {e}") from None

        def endpoint(fn, auth: bool = True):
            async def wrapped(request: Request) -> Response:
                t0 = time.perf_counter()
                try:
                    if auth:
                        server.check_auth(request.headers.get("authorization"))
                    resp = await fn(request)
                except RequestError as e:
                    resp = error(e.status, e.message, e.param,
                                 {"Connection": "close"} if e.status in (408, 413) else None)
                log.info("%s %s %d %.0f ms", request.method, request.url.path, resp.status_code,
                         1000 * (time.perf_counter() - t0))
                return resp
            return wrapped

        async def health(request: Request) -> Response:
            return JSONResponse({"status": "ok", "model": server.model_name})

        def model_card() -> dict:
            return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "instructkit"}

        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [model_card()]})

        async def model(request: Request) -> Response:
            if request.path_params["model_id"] != server.model_name:
                raise RequestError(404, f"model '{request.path_params['model_id']}' is not served here", "model")
            return JSONResponse(model_card())

        async def tokenize(request: Request) -> Response:
            body = await read_json(request)
            if not isinstance(body, dict) or set(body) - {"model", "prompt", "messages", "add_special_tokens"}:
                raise RequestError(400, "tokenize takes 'prompt' (or 'messages') and 'add_special_tokens'")
            if "messages" in body:
                ids = server.engine.chat_prompt_ids(server._messages(body["messages"]))
            else:
                if not isinstance(body.get("prompt"), str):
                    raise RequestError(400, "'prompt' must be a string", "prompt")
                add = body.get("add_special_tokens", True)
                if not isinstance(add, bool):
                    raise RequestError(400, "'add_special_tokens' must be a boolean", "add_special_tokens")
                ids = list(server.engine.tokenizer(body["prompt"], add_special_tokens=add)["input_ids"])
            return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": limits.max_prompt_tokens})

        async def detokenize(request: Request) -> Response:
            body = await read_json(request)
            toks = body.get("tokens") if isinstance(body, dict) else None
            vocab = len(server.engine.tokenizer)
            if not isinstance(toks, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in toks):
                raise RequestError(400, f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
            text = server.engine.tokenizer.decode(toks, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            return JSONResponse({"prompt": text})

        async def tokenizer_info(request: Request) -> Response:
            tok = server.engine.tokenizer
            return JSONResponse({"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token,
                                 "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                                 "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
                                 "model_max_length": limits.max_prompt_tokens})

        async def wait(request: Request, ticket: Ticket) -> None:
            """Until the ticket is done; cancels its rows when the client goes away or the request times out."""
            done = asyncio.ensure_future(_until_done(ticket))
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                finished, _ = await asyncio.wait({done, gone}, timeout=limits.request_timeout_s,
                                                 return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if done not in finished:
                ticket.cancel()
                done.cancel()
                if gone in finished:
                    raise RequestError(499, "client closed the request")
                raise RequestError(504, f"generation did not finish within {limits.request_timeout_s} s")
            if ticket.error:
                raise RequestError(500, ticket.error)

        async def chat(request: Request) -> Response:
            body = await read_json(request)
            ids, params, n, read = server.chat_request(body)
            seed = Engine._base_seed(params)
            ticket = Ticket(rows=[Row(index=j, prompt=ids, params=params, seed=seed + j) for j in range(n)],
                            stream=bool(body.get("stream")), read=read)
            return await run(request, ticket, body, chat=True, prompts=[ids])

        async def completions(request: Request) -> Response:
            body = await read_json(request)
            prompts, texts, params, n, echo = server.completion_request(body)
            seed = Engine._base_seed(params)
            rows = [Row(index=i * n + j, prompt=p, params=params, seed=seed + i * n + j)
                    for i, p in enumerate(prompts) for j in range(n)]
            ticket = Ticket(rows=rows, stream=bool(body.get("stream")))
            if echo and params.logprobs:  # the prompt's own log-probabilities
                ticket.score, ticket.score_top = prompts, params.top_logprobs
            return await run(request, ticket, body, chat=False, prompts=prompts, texts=texts, echo=echo)

        async def run(request: Request, ticket: Ticket, body: dict, *, chat: bool, prompts: list[list[int]],
                      texts: list | None = None, echo: bool = False) -> Response:
            ticket.loop = asyncio.get_running_loop()
            ticket.queue = asyncio.Queue()
            server.scheduler.submit(ticket)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            created = int(time.time())
            if ticket.stream:
                from starlette.responses import StreamingResponse

                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return StreamingResponse(
                    _sse(server, ticket, rid, created, chat, prompts, include_usage, limits.request_timeout_s),
                    media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            await wait(request, ticket)
            outs = ticket.outputs
            n_per = len(outs) // len(prompts)
            choices = []
            for k, o in enumerate(outs):
                if chat:
                    msg, reason = server.chat_message(o.text, o.finish_reason, ticket.read)
                    choices.append({"index": k, "message": msg, "finish_reason": reason,
                                    "logprobs": server._chat_logprobs(o, 0, len(o.logprobs))
                                    if ticket.rows[k].params.logprobs else None})
                    continue
                p = k // n_per
                text, lp = o.text, None
                gen_ids = o.token_ids[:len(o.logprobs)] if o.logprobs else o.token_ids
                if echo:
                    ptext = texts[p] if texts[p] is not None else server.engine.tokenizer.decode(
                        prompts[p], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                    text = ptext + text
                if ticket.rows[k].params.logprobs:
                    ids, lps = list(gen_ids), list(o.logprobs)
                    tops = [list(t) for t in o.top_logprobs] if o.top_logprobs else None
                    start = len(texts[p]) if texts[p] is not None else 0
                    if echo:
                        plps, ptops = ticket.prompt_scores[p]
                        ids, lps = prompts[p] + ids, plps + lps
                        tops = (ptops + (tops or [[] for _ in gen_ids])) if ticket.score_top else None
                        start = 0
                    lp = server._completion_logprobs(ids, lps, tops, start)
                choices.append({"index": k, "text": text, "finish_reason": o.finish_reason, "logprobs": lp})
            usage = {"prompt_tokens": sum(len(p) for p in prompts),
                     "completion_tokens": sum(len(o.token_ids) for o in outs)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": server.model_name, "system_fingerprint": None,
                                 "choices": choices, "usage": usage})

        routes = [
            Route("/health", endpoint(health, auth=False), methods=["GET"]),
            Route("/v1/models", endpoint(models), methods=["GET"]),
            Route("/v1/models/{model_id:path}", endpoint(model), methods=["GET"]),
            Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
            Route("/v1/completions", endpoint(completions), methods=["POST"]),
            Route("/tokenize", endpoint(tokenize), methods=["POST"]),
            Route("/detokenize", endpoint(detokenize), methods=["POST"]),
            Route("/tokenizer_info", endpoint(tokenizer_info), methods=["GET"]),
        ]

        async def http_error(request: Request, exc: HTTPException) -> Response:
            if exc.status_code == 405:
                return error(405, f"method {request.method} is not allowed on {request.url.path}",
                             headers=dict(exc.headers or {}))
            if exc.status_code == 404:
                return error(404, f"no such endpoint: {request.method} {request.url.path}")
            return error(exc.status_code, str(exc.detail))

        async def server_error(request: Request, exc: Exception) -> Response:
            log.exception("internal error")
            return error(500, f"internal error: {type(exc).__name__}")

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


async def _until_done(ticket: Ticket) -> None:
    while True:
        kind, _ = await ticket.queue.get()
        if kind in ("done", "error"):
            return


async def _disconnected(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _sse(server: OpenAIServer, ticket: Ticket, rid: str, created: int, chat: bool, prompts: list[list[int]],
               include_usage: bool, timeout: float) -> AsyncIterator[bytes]:
    """Server-sent events for a streamed request; cancels the ticket's rows if the client goes away (Starlette
    cancels this generator) or the request times out. Ends with ``data: [DONE]`` only after a complete answer."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list, usage: dict | None = None) -> bytes:
        payload = {"id": rid, "object": obj, "created": created, "model": server.model_name,
                   "system_fingerprint": None, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return b"data: " + json.dumps(payload).encode("utf-8") + b"\n\n"

    deadline = time.monotonic() + timeout
    read = ticket.read or {}
    shaper = _ChatDeltas(server, read, len(ticket.rows)) if chat and (read.get("think") or read.get("tools")) else None
    try:
        if chat:
            yield event([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for k in range(len(ticket.rows))])
        while True:
            try:
                kind, data = await asyncio.wait_for(ticket.queue.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                ticket.cancel()
                err = {"error": {"message": f"generation did not finish within {timeout} s", "type": "server_error",
                                 "param": None, "code": 504}}
                yield b"data: " + json.dumps(err).encode() + b"\n\n"
                return
            if kind == "error":
                err = {"error": {"message": data, "type": "server_error", "param": None, "code": 500}}
                yield b"data: " + json.dumps(err).encode() + b"\n\n"
                return
            if kind == "delta":
                choices = []
                for j, text, a, b in data:
                    r = ticket.rows[j]
                    if chat:
                        lp = None
                        if r.params.logprobs and b > a:
                            lp = server._chat_logprobs(_RowView(r), a, b)
                        delta = shaper.delta(j, text) if shaper else {"content": text}
                        if delta or lp:
                            choices.append({"index": j, "delta": delta, "logprobs": lp, "finish_reason": None})
                    else:
                        lp = None
                        if r.params.logprobs and b > a:
                            lp = server._completion_logprobs(r.tokens[a:b], r.logprobs[a:b],
                                                             r.top_logprobs[a:b] if r.params.top_logprobs else None,
                                                             0)
                        choices.append({"index": j, "text": text, "logprobs": lp, "finish_reason": None})
                if choices:
                    yield event(choices)
                continue
            # done: the finish reasons, the usage, then [DONE]
            outs = ticket.outputs
            final = []
            for j, o in enumerate(outs):
                if chat:
                    delta, reason = shaper.last(j, o) if shaper else ({}, o.finish_reason)
                    final.append({"index": j, "delta": delta, "logprobs": None, "finish_reason": reason})
                else:
                    final.append({"index": j, "text": "", "logprobs": None, "finish_reason": o.finish_reason})
            yield event(final)
            if include_usage:
                pt = sum(len(p) for p in prompts)
                ct = sum(len(o.token_ids) for o in outs)
                yield event([], {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct})
            yield b"data: [DONE]\n\n"
            return
    finally:
        if ticket.outputs is None:
            ticket.cancel()  # the client went away (or an error): its rows leave the batch at the next step


class _ChatDeltas:
    """Streamed chat deltas when replies are read back: reasoning as ``reasoning_content`` deltas as it comes, content
    as it comes when no tools were offered; with tools the content is held until the reply is complete (a tool call
    is only known once its closing tag or JSON is there), then sent with the ``tool_calls`` deltas."""

    def __init__(self, server: "OpenAIServer", read: dict, rows: int):
        self.server, self.read = server, read
        self.text = [""] * rows
        self.sent_reasoning = [0] * rows
        self.sent_content = [0] * rows

    def delta(self, j: int, piece: str) -> dict:
        from instructkit.chat.parse import split_reasoning

        self.text[j] += piece
        if self.read.get("think"):
            reasoning, content = split_reasoning(self.text[j], self.read["opened"], final=False)
            reasoning = reasoning.rstrip("\n") if reasoning is not None and not content else reasoning
        else:
            reasoning, content = None, self.text[j]
        out: dict = {}
        if reasoning and len(reasoning) > self.sent_reasoning[j]:
            out["reasoning_content"] = reasoning[self.sent_reasoning[j]:]
            self.sent_reasoning[j] = len(reasoning)
        if not self.read.get("tools") and len(content) > self.sent_content[j]:
            out["content"] = content[self.sent_content[j]:]
            self.sent_content[j] = len(content)
        return out

    def last(self, j: int, o: GenerationOutput) -> tuple[dict, str]:
        msg, reason = self.server.chat_message(o.text, o.finish_reason, self.read)
        out: dict = {}
        reasoning = msg.get("reasoning_content") or ""
        if len(reasoning) > self.sent_reasoning[j]:
            out["reasoning_content"] = reasoning[self.sent_reasoning[j]:]
        content = msg.get("content") or ""
        if len(content) > self.sent_content[j]:
            out["content"] = content[self.sent_content[j]:]
        if msg.get("tool_calls"):
            out["tool_calls"] = [{"index": k, **c} for k, c in enumerate(msg["tool_calls"])]
        return out, reason


@dataclass
class _RowView:
    """A live Row seen as a GenerationOutput for the log-probability formatter."""
    row: Row

    @property
    def token_ids(self):
        return self.row.tokens

    @property
    def logprobs(self):
        return self.row.logprobs

    @property
    def top_logprobs(self):
        return self.row.top_logprobs


def load_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                template: str = "auto", name: str | None = None, limits: ServerLimits | None = None) -> OpenAIServer:
    """Load a model folder, zoo name or Hub id and build the server around it."""
    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model_and_tokenizer

    limits = limits or ServerLimits()
    m, tok = load_model_and_tokenizer(ModelConfig(path=model, template=template))
    m.eval()
    engine = Engine(m, tok, template=template, max_batch_size=limits.max_batch_rows)
    return OpenAIServer(engine, name or model, host=host, port=port, api_key=api_key, limits=limits)
