"""One interface for every stage that calls an LLM: ``backend.complete(requests, params) -> list[str]``.

A request is either a plain text prompt (continued as is: the Self-Instruct prompts are written for that) or a list of
chat messages (``{"role", "content"}``; the model's chat template is applied by whoever serves the model). Two backends:

- ``LocalBackend``: the in-process Engine (batched, KV cache) on a model folder or zoo name;
- ``OpenAIBackend``: any OpenAI-compatible HTTP endpoint (``instructkit serve``, vLLM, llama.cpp, a hosted API): a
  thread pool for concurrency, retries with exponential back-off on 429 / 5xx / connection errors / timeouts, and the
  API key read from the environment variable *named* in the config.

The key lives only in this object's private attribute and the Authorization header. It is never in a config file,
a log line, an exception message or a repr; any text from the server that echoes it is redacted before it is logged or
raised. The HTTP client is the standard library's urllib (no extra dependency).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from instructkit.generation.engine import SamplingParams

log = logging.getLogger(__name__)

Request = "str | list[dict[str, str]]"


class BackendError(RuntimeError):
    """A request failed for good (non-retryable status, or retries exhausted)."""


class Backend(Protocol):
    name: str
    """The model's name as recorded in generated data's metadata."""

    def complete(self, requests: Sequence[Any], params: SamplingParams) -> list[str]: ...


def _is_chat(request: Any) -> bool:
    return not isinstance(request, str)


# ---------------------------------------------------------------------------------------------------------------------
class LocalBackend:
    """The in-process Engine. Plain prompts are tokenised as is; message lists through the chat template."""

    def __init__(self, engine, name: str = "local"):
        self.engine = engine
        self.name = name

    @classmethod
    def from_path(cls, path: str, template: str = "auto", max_batch_size: int = 16) -> "LocalBackend":
        from instructkit.config import ModelConfig
        from instructkit.generation.engine import Engine
        from instructkit.models.load import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(ModelConfig(path=path, template=template))
        model.eval()
        return cls(Engine(model, tok, max_batch_size=max_batch_size, template=template), name=str(path))

    def complete(self, requests: Sequence[Any], params: SamplingParams) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        plain = [i for i, r in enumerate(requests) if not _is_chat(r)]
        chat = [i for i, r in enumerate(requests) if _is_chat(r)]
        tok = self.engine.tokenizer
        if plain:
            ids = [tok(requests[i], add_special_tokens=True)["input_ids"] for i in plain]
            for i, o in zip(plain, self.engine.generate(ids, params)):
                out[i] = o.text
        if chat:
            for i, o in zip(chat, self.engine.chat([requests[i] for i in chat], params)):
                out[i] = o.text
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------------
class OpenAIBackend:
    """An OpenAI-compatible endpoint: ``/chat/completions`` for message lists, ``/completions`` for plain prompts."""

    RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30.0, concurrency: int = 4,
                 seed: int | None = None):
        if not base_url:
            raise ValueError("backend base_url is empty")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = max(1, concurrency)
        self.api_key_env = api_key_env
        self._key = ""
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"environment variable {api_key_env} (named by api_key_env) is not set or empty")
            self._key = key
        self._jitter = random.Random(seed)
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return (f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"concurrency={self.concurrency})")

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _body(self, request: Any, params: SamplingParams) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p}
        if params.stop_strings:
            body["stop"] = list(params.stop_strings)[:4]  # the OpenAI API accepts up to 4
        if _is_chat(request):
            body["messages"] = [{"role": m["role"], "content": m["content"]} if isinstance(m, dict)
                                else {"role": m.role, "content": m.content} for m in request]
            return "/chat/completions", body
        body["prompt"] = request
        return "/completions", body

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        url = self.base_url + path
        last = ""
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = self._redact(e.read().decode("utf-8", "replace")[:300])
                last = f"HTTP {e.code} from {url}: {detail}"
                if e.code not in self.RETRY_STATUS:
                    raise BackendError(last) from None
                ra = e.headers.get("Retry-After") if e.headers else None
                if ra and ra.replace(".", "", 1).isdigit():
                    retry_after = float(ra)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(e).__name__} calling {url}: {self._redact(str(reason))}"
            except json.JSONDecodeError:
                raise BackendError(f"{url} answered with invalid JSON") from None
            if attempt == self.max_retries:
                break
            with self._lock:
                jitter = self._jitter.uniform(0.5, 1.0)
            delay = min(self.max_backoff, self.backoff * 2**attempt) * jitter
            if retry_after is not None:
                delay = min(self.max_backoff, max(delay, retry_after))
            log.warning("request failed (%s); retry %d/%d in %.2fs", last, attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        raise BackendError(f"giving up after {self.max_retries + 1} attempts: {last}")

    def _one(self, request: Any, params: SamplingParams, index: int = 0) -> str:
        path, body = self._body(request, params)
        if params.seed is not None:
            body["seed"] = params.seed + index  # request i of a call samples as row i of a local batch would
        resp = self._post(path, body)
        try:
            choice = resp["choices"][0]
            if path == "/chat/completions":
                return choice["message"]["content"] or ""
            return choice["text"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{self.base_url}{path}: unexpected response shape (no choices[0] text)") from None

    def complete(self, requests: Sequence[Any], params: SamplingParams) -> list[str]:
        if not requests:
            return []
        if self.concurrency == 1 or len(requests) == 1:
            return [self._one(r, params, i) for i, r in enumerate(requests)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(lambda ir: self._one(ir[1], params, ir[0]), enumerate(requests)))


def make_backend(cfg) -> Backend:
    """A backend from a ``BackendConfig`` (config.py)."""
    if cfg.kind == "local":
        return LocalBackend.from_path(cfg.model, template=cfg.template, max_batch_size=cfg.max_batch_size)
    if cfg.kind == "openai":
        return OpenAIBackend(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env or None, timeout=cfg.timeout,
                             max_retries=cfg.max_retries, backoff=cfg.backoff, concurrency=cfg.concurrency)
    from instructkit.config import ConfigError

    raise ConfigError(f"backend.kind must be 'local' or 'openai', got {cfg.kind!r}")
