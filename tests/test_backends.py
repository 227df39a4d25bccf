"""Backends: the OpenAI-compatible client (retries, back-off, timeouts, concurrency, secrets) and the local engine."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from instructkit.config import BackendConfig, SelfInstructConfig, save_config
from instructkit.generation.backends import BackendError, LocalBackend, OpenAIBackend
from instructkit.generation.engine import SamplingParams

SENTINEL = "sk-SENTINEL-4c1d-never-print-me"


class FakeAPI:
    """A local OpenAI-like server whose replies are scripted: a list of (status, delay) consumed per request; after
    the script it answers 200. Error bodies echo the Authorization header, as a careless server might."""

    def __init__(self, script=(), hold: float = 0.0):
        self.script = list(script)
        self.hold = hold
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                    fake.auth.append(self.headers.get("Authorization"))
                    status, delay = fake.script.pop(0) if fake.script else (200, 0.0)
                    fake.active += 1
                    fake.max_active = max(fake.max_active, fake.active)
                try:
                    time.sleep(max(delay, fake.hold))
                    with fake.lock:  # done before the reply leaves, so the client's next request cannot overlap
                        fake.active -= 1
                    if status == 200:
                        if "messages" in body:
                            payload = {"choices": [{"message": {"role": "assistant",
                                                                "content": "chat:" + body["messages"][-1]["content"]}}]}
                        else:
                            payload = {"choices": [{"text": "echo:" + body["prompt"]}]}
                    else:
                        payload = {"error": {"message": f"failed; you sent {self.headers.get('Authorization')}"}}
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("IK_TEST_KEY", SENTINEL)
    return "IK_TEST_KEY"


def _backend(url, key_env, **kw):
    kw.setdefault("backoff", 0.01)
    return OpenAIBackend(url, "m", api_key_env=key_env, **kw)


def test_retries_500_and_429_then_succeeds_without_leaking_the_key(key_env, caplog):
    api = FakeAPI(script=[(500, 0), (429, 0), (503, 0)])
    try:
        caplog.set_level(logging.DEBUG)
        out = _backend(api.url, key_env, max_retries=5).complete(["hi"], SamplingParams(max_new_tokens=5))
        assert out == ["echo:hi"]
        assert len(api.requests) == 4  # 3 failures + 1 success
        assert api.auth == [f"Bearer {SENTINEL}"] * 4
        assert api.requests[0]["max_tokens"] == 5 and api.requests[0]["model"] == "m"
        assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 3
        assert SENTINEL not in caplog.text
        assert "***" in caplog.text  # the echoed key was redacted, not dropped silently
    finally:
        api.close()


def test_gives_up_after_max_retries_and_error_text_has_no_key(key_env, caplog):
    api = FakeAPI(script=[(500, 0)] * 10)
    try:
        caplog.set_level(logging.DEBUG)
        b = _backend(api.url, key_env, max_retries=2)
        with pytest.raises(BackendError) as ei:
            b.complete(["x"], SamplingParams())
        assert len(api.requests) == 3
        text = str(ei.value) + repr(ei.value) + repr(ei.value.__cause__) + repr(ei.value.__context__)
        assert "HTTP 500" in text and "3 attempts" in text
        assert SENTINEL not in text and SENTINEL not in caplog.text and SENTINEL not in repr(b)
    finally:
        api.close()


def test_non_retryable_status_fails_at_once(key_env):
    api = FakeAPI(script=[(400, 0), (400, 0)])
    try:
        with pytest.raises(BackendError, match="HTTP 400") as ei:
            _backend(api.url, key_env).complete(["x"], SamplingParams())
        assert len(api.requests) == 1
        assert SENTINEL not in str(ei.value)
    finally:
        api.close()


def test_timeout_is_retried(key_env):
    api = FakeAPI(script=[(200, 1.0)])  # the first answer comes after the 0.2 s timeout
    try:
        out = _backend(api.url, key_env, timeout=0.2, max_retries=2).complete(["t"], SamplingParams())
        assert out == ["echo:t"] and len(api.requests) == 2
    finally:
        api.close()


def test_connection_refused_is_an_error_naming_the_url_not_the_key(key_env):
    api = FakeAPI()
    url = api.url
    api.close()  # nothing listens there any more
    with pytest.raises(BackendError) as ei:
        _backend(url, key_env, max_retries=1).complete(["x"], SamplingParams())
    assert "127.0.0.1" in str(ei.value) and SENTINEL not in str(ei.value)


def test_concurrency_order_chat_and_per_request_seeds(key_env):
    api = FakeAPI(hold=0.15)
    try:
        b = _backend(api.url, key_env, concurrency=3)
        reqs = [f"p{i}" for i in range(7)] + [[{"role": "user", "content": "hello"}]]
        out = b.complete(reqs, SamplingParams(seed=100, stop_strings=["\n\n"]))
        assert out == [f"echo:p{i}" for i in range(7)] + ["chat:hello"]
        assert 1 < api.max_active <= 3
        seeds = sorted(r["seed"] for r in api.requests)
        assert seeds == list(range(100, 108))  # request i carries seed + i
        assert all(r["stop"] == ["\n\n"] for r in api.requests)
    finally:
        api.close()


def test_missing_key_variable_names_the_variable(monkeypatch):
    monkeypatch.delenv("IK_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="IK_MISSING_KEY"):
        OpenAIBackend("http://127.0.0.1:9/v1", "m", api_key_env="IK_MISSING_KEY")


def test_saved_config_holds_the_variable_name_never_the_key(key_env, tmp_path):
    cfg = SelfInstructConfig(backend=BackendConfig(kind="openai", base_url="http://x/v1", model="m",
                                                   api_key_env=key_env))
    save_config(cfg, tmp_path / "c.yaml")
    text = (tmp_path / "c.yaml").read_text()
    assert key_env in text and SENTINEL not in text


def test_local_backend_mixes_plain_and_chat_requests(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.generation.engine import Engine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    eng = Engine(model, tok)
    b = LocalBackend(eng, name="tiny")
    msgs = [{"role": "user", "content": "Hi"}]
    p = SamplingParams(max_new_tokens=6)
    out = b.complete(["Hello there", msgs, "What is"], p)
    assert out[0] == eng.generate([tok("Hello there")["input_ids"]], p)[0].text
    assert out[1] == eng.chat([msgs], p)[0].text
    assert out[2] == eng.generate([tok("What is")["input_ids"]], p)[0].text
