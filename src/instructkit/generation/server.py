"""An OpenAI-compatible HTTP server for a (tuned) model: `instructkit serve --model PATH`.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (optionally streamed as server-sent events),
``POST /v1/completions``. Built on the standard library's ThreadingHTTPServer: one model, one generation at a time (a
lock around the engine; the CPU is the bottleneck anyway), no extra dependency.

The promises (RELIABILITY.md):
- S7: binds 127.0.0.1 unless told otherwise; request bodies above ``max_request_bytes`` get 413; ``max_tokens`` above
  ``max_tokens_limit`` and prompts longer than ``max_prompt_tokens`` get 400; bad JSON or bad fields get 400 with a
  message in the OpenAI error shape.
- S2: the chat template is the model's own (through chat/render.py); a request carrying a template or template kwargs is
  refused, so a client can never make the server render attacker-supplied Jinja.
- S6: no request field is ever used as a path (the model is fixed at start-up; ``model`` in a request is only compared
  with the served name).
- S5: with ``api_key``, every request needs ``Authorization: Bearer <key>`` (constant-time comparison); the key is never
  logged or echoed.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from instructkit.generation.engine import Engine, SamplingParams

log = logging.getLogger(__name__)

REFUSED_FIELDS = ("chat_template", "chat_template_kwargs", "template", "template_kwargs", "add_generation_prompt",
                  "tools", "functions")


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


def _num(body: dict, key: str, default, kind, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise RequestError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'}", key)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(400, f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return v


class OpenAIServer:
    """Wraps an Engine; ``serve_forever()`` or ``start()`` (background thread) / ``stop()``."""

    def __init__(self, engine: Engine, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, limits: ServerLimits | None = None):
        self.engine = engine
        self.model_name = model_name
        self.limits = limits or ServerLimits()
        self._api_key = api_key or None
        self._lock = threading.Lock()
        self.created = int(time.time())
        server = self

        class Handler(_Handler):
            app = server

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    @property
    def base_url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/v1"

    def start(self) -> "OpenAIServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- request handling -------------------------------------------------------------------------------------------
    def check_auth(self, header: str | None) -> None:
        if self._api_key is None:
            return
        given = (header or "").removeprefix("Bearer ").strip() if (header or "").startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), self._api_key.encode()):
            raise RequestError(401, "missing or invalid API key (Authorization: Bearer ...)")

    def _common(self, body: dict) -> SamplingParams:
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        for key in REFUSED_FIELDS:
            if key in body:
                raise RequestError(400, f"'{key}' is not accepted: this server applies the model's own chat template "
                                        "and never one sent in a request", key)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(404, f"model '{model}' is not served here; this server serves '{self.model_name}'",
                               "model")
        if _num(body, "n", 1, int, 1, 1) != 1:
            raise RequestError(400, "only n=1 is supported", "n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _num({"max_tokens": max_tokens}, "max_tokens", self.limits.default_max_tokens, int, 1,
                          self.limits.max_tokens_limit)
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 8:
            raise RequestError(400, "'stop' must be a string or a list of at most 8 strings", "stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(400, "'seed' must be an integer", "seed")
        for k in ("presence_penalty", "frequency_penalty"):
            if _num(body, k, 0.0, float, -2.0, 2.0) != 0.0:
                raise RequestError(400, f"'{k}' is not supported (use repetition_penalty)", k)
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=_num(body, "temperature", 1.0, float, 0.0, 2.0),
            top_p=_num(body, "top_p", 1.0, float, 1e-6, 1.0),
            top_k=_num(body, "top_k", 0, int, 0, 1_000_000),
            repetition_penalty=_num(body, "repetition_penalty", 1.0, float, 0.01, 10.0),
            stop_strings=tuple(stop),
            seed=seed,
            logprobs=False,  # the API answers "logprobs": null
        )

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise RequestError(400, "the prompt is empty")
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}")

    def chat_request(self, body: dict) -> tuple[list[int], SamplingParams]:
        params = self._common(body)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError(400, "'messages' must be a non-empty list", "messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
            if m["role"] not in ("system", "user", "assistant", "developer"):
                raise RequestError(400, f"messages[{i}].role {m['role']!r} is not supported", "messages")
            content = m.get("content")
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
            clean.append({"role": role, "content": content})
        try:
            ids = self.engine.chat_prompt_ids(clean)
        except Exception as e:  # the template rejected the conversation (e.g. roles out of order)
            raise RequestError(400, f"the chat template could not render these messages: {e}", "messages") from None
        self._check_prompt(ids)
        params.stop_token_ids = self.engine.chat_stop_token_ids()
        return ids, params

    def completion_request(self, body: dict) -> tuple[list[list[int]], SamplingParams]:
        params = self._common(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
        if len(prompts) > self.limits.max_batch:
            raise RequestError(400, f"at most {self.limits.max_batch} prompts per request", "prompt")
        tok = self.engine.tokenizer
        ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
        for i in ids:
            self._check_prompt(i)
        return ids, params

    def generate(self, prompts: list[list[int]], params: SamplingParams):
        with self._lock:
            return self.engine.generate(prompts, params)

    def stream(self, prompt: list[int], params: SamplingParams):
        with self._lock:
            for piece in self.engine.stream(prompt, params):
                yield piece
            yield self.engine.last_stream_output


class _Handler(BaseHTTPRequestHandler):
    app: OpenAIServer
    protocol_version = "HTTP/1.1"
    server_version = "instructkit"

    def log_message(self, fmt: str, *args: Any) -> None:  # request lines to the logger, never headers
        log.info("%s %s", self.address_string(), fmt % args)

    def _send_json(self, status: int, payload: dict, close: bool = False) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError) -> None:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
            e.status, "invalid_request_error")
        self.close_connection = True  # the body may be unread: never reuse this connection
        self._send_json(e.status, {"error": {"message": e.message, "type": kind, "param": e.param, "code": None}},
                        close=True)

    def do_GET(self) -> None:  # noqa: N802
        try:
            self.app.check_auth(self.headers.get("Authorization"))
            if self.path.rstrip("/") != "/v1/models":
                raise RequestError(404, f"no such endpoint: GET {self.path}")
            self._send_json(200, {"object": "list", "data": [
                {"id": self.app.model_name, "object": "model", "created": self.app.created, "owned_by": "instructkit"}]})
        except RequestError as e:
            self._error(e)

    def _read_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length is required")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, "bad Content-Length") from None
        if n > self.app.limits.max_request_bytes:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise RequestError(413, f"request body of {n} bytes exceeds the limit of {self.app.limits.max_request_bytes}")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None

    def do_POST(self) -> None:  # noqa: N802
        try:
            self.app.check_auth(self.headers.get("Authorization"))
            path = self.path.rstrip("/")
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise RequestError(404, f"no such endpoint: POST {self.path}")
            body = self._read_body()
            chat = path == "/v1/chat/completions"
            if chat:
                ids, params = self.app.chat_request(body)
                prompts = [ids]
            else:
                prompts, params = self.app.completion_request(body)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise RequestError(400, "'stream' must be a boolean", "stream")
            if stream and len(prompts) != 1:
                raise RequestError(400, "streaming supports one prompt per request", "stream")
        except RequestError as e:
            self._error(e)
            return
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            self._stream(rid, chat, prompts[0], params, body)
            return
        outs = self.app.generate(prompts, params)
        created = int(time.time())
        choices = []
        for i, o in enumerate(outs):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": o.text},
                                "finish_reason": o.finish_reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": o.text, "finish_reason": o.finish_reason, "logprobs": None})
        usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": sum(len(o.token_ids) for o in outs)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self._send_json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion",
                              "created": created, "model": self.app.model_name, "choices": choices, "usage": usage})

    def _stream(self, rid: str, chat: bool, prompt: list[int], params: SamplingParams, body: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def send(choice: dict, usage: dict | None = None) -> None:
            payload = {"id": rid, "object": obj, "created": created, "model": self.app.model_name,
                       "choices": [choice] if choice else []}
            if usage is not None:
                payload["usage"] = usage
            self.wfile.write(b"data: " + json.dumps(payload).encode("utf-8") + b"\n\n")
            self.wfile.flush()

        try:
            if chat:
                send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            final = None
            gen = self.app.stream(prompt, params)
            try:
                for item in gen:
                    if isinstance(item, str):
                        if chat:
                            send({"index": 0, "delta": {"content": item}, "finish_reason": None})
                        else:
                            send({"index": 0, "text": item, "finish_reason": None})
                    else:
                        final = item
            finally:
                gen.close()  # a client that went away must not keep the engine lock
            reason = final.finish_reason if final is not None else "length"
            send({"index": 0, "delta": {}, "finish_reason": reason} if chat
                 else {"index": 0, "text": "", "finish_reason": reason})
            opts = body.get("stream_options")
            if isinstance(opts, dict) and opts.get("include_usage") and final is not None:
                usage = {"prompt_tokens": len(prompt), "completion_tokens": len(final.token_ids),
                         "total_tokens": len(prompt) + len(final.token_ids)}
                send({}, usage)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away during a stream")


def load_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                template: str = "auto", name: str | None = None, limits: ServerLimits | None = None) -> OpenAIServer:
    """Load a model folder (or zoo name) and build the server around it."""
    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model_and_tokenizer

    m, tok = load_model_and_tokenizer(ModelConfig(path=model, template=template))
    m.eval()
    engine = Engine(m, tok, template=template)
    return OpenAIServer(engine, name or model, host=host, port=port, api_key=api_key, limits=limits)
