"""The OpenAI-compatible server on loopback, driven by the official `openai` client and by raw sockets (HTTP edge cases
the client never sends)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from instructkit.generation.engine import Engine, SamplingParams  # noqa: E402
from instructkit.generation.server import OpenAIServer, ServerLimits  # noqa: E402

KEY = "sk-server-test-key"
USER = [{"role": "user", "content": "Give three tips."}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return Engine(model, tok)


@pytest.fixture(scope="module")
def server(engine):
    s = OpenAIServer(engine, "tiny", port=0, limits=ServerLimits(max_request_bytes=20_000, max_tokens_limit=64,
                                                                 idle_timeout_s=2)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def raw(server, data: bytes, *, read_timeout: float = 30) -> tuple[int, dict, bytes]:
    """Send bytes on a fresh connection; return (status, headers, body) of the first response (body read to its
    Content-Length, or to the end of a chunked body, or to the close)."""
    host, port = server.address
    with socket.create_connection((host, port), timeout=read_timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        if data.startswith(b"HEAD "):
            pass  # no body, whatever Content-Length says
        elif "content-length" in headers:
            n = int(headers["content-length"])
            while len(body) < n:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
        elif headers.get("transfer-encoding") == "chunked":
            while not body.endswith(b"0\r\n\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
    return status, headers, body


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        n = int(size_line, 16)
        if n == 0:
            break
        out, rest = out + rest[:n], rest[n + 2:]
    return out


# ---------------------------------------------------------------------------------------------------------------------
def test_binds_loopback_by_default(engine):
    s = OpenAIServer(engine, "tiny", port=0)
    try:
        assert s.address[0] == "127.0.0.1"
    finally:
        s.close()
    from instructkit.cli import build_parser

    assert build_parser().parse_args(["serve", "--model", "x"]).host == "127.0.0.1"


def test_models_health_and_model_by_id(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    status, _, body = raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_http_methods_paths_and_query_strings(server):
    status, headers, body = raw(server, b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and "POST" in headers.get("allow", "") and "error" in json.loads(body)
    status, _, body = raw(server, b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and body == b""
    status, _, _ = raw(server, b"HEAD /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405
    status, _, _ = raw(server, b"OPTIONS /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405
    status, _, body = raw(server, b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    req = json.dumps({"prompt": "Hi", "max_tokens": 2, "temperature": 0}).encode()
    status, _, body = raw(server, post("/v1/completions?api-version=2024-01-01", req))
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length")


def test_request_bodies_over_the_limit_are_413_however_framed(server):
    big = json.dumps({"prompt": "a" * 50_000}).encode()
    status, _, body = raw(server, post("/v1/completions", big))  # an honest Content-Length above the limit
    assert status == 413 and "limit" in json.loads(body)["error"]["message"]
    # a chunked body is counted as it arrives
    chunks = b"".join(b"%x\r\n" % 4000 + big[i:i + 4000] + b"\r\n" for i in range(0, 24_000, 4000))
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, _, _ = raw(server, head + chunks + b"0\r\n\r\n")
    assert status == 413
    # a negative Content-Length is malformed framing: refused by the HTTP layer before any byte reaches the app
    status, _, _ = raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + big)
    assert status in (400, 413)
    # a small chunked body is fine
    ok = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    status, _, body = raw(server, head + b"%x\r\n" % len(ok) + ok + b"\r\n0\r\n\r\n")
    assert status == 200 and "choices" in json.loads(body)


def test_bad_json_and_bad_fields_are_400_naming_the_field(server, client):
    status, _, body = raw(server, post("/v1/chat/completions", b"{not json"))
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    status, _, body = raw(server, post("/v1/chat/completions", b"[1, 2]"))
    assert status == 400
    msgs = [{"role": "user", "content": "x"}]
    cases = [({"temperature": 9}, "temperature"), ({"max_tokens": 10_000}, "max_tokens"),
             ({"response_format": {"type": "json_object"}}, "response_format"),
             ({"logit_bias": {"5": 10}}, "logit_bias"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
             ({"extra_body": None, "top_logprobs": 3}, "top_logprobs")]
    for kwargs, name in cases:
        with pytest.raises(openai.BadRequestError, match=name):
            client.chat.completions.create(model="tiny", messages=msgs, **kwargs)
    with pytest.raises(openai.BadRequestError, match="mirostat"):
        client.chat.completions.create(model="tiny", messages=msgs, extra_body={"mirostat": 2})
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="tiny", prompt="x", suffix="y")
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-9", messages=msgs)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, response_format={"type": "text"},
                                       user="someone")
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_completion_equals_engine_chat_with_n_and_logprobs(client, engine):
    msgs = [{"role": "system", "content": "Be brief."}] + USER
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, n=2, logprobs=True,
                                       top_logprobs=3)
    ref = engine.chat([msgs], SamplingParams(max_new_tokens=12, top_logprobs=3))[0]
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.message.content == ref.text and c.finish_reason == ref.finish_reason
        lp = c.logprobs.content
        assert [e.logprob for e in lp] == pytest.approx(ref.logprobs, abs=1e-6)
        assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in lp)
    assert r.usage.completion_tokens == 2 * len(ref.token_ids)
    assert r.usage.prompt_tokens == len(engine.chat_prompt_ids(msgs))


def test_sampled_choices_are_seeded_per_choice(client, engine):
    kw = dict(model="tiny", prompt="Hello", max_tokens=10, temperature=1.0, seed=5)
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    ids = engine.tokenizer("Hello")["input_ids"]
    ref = engine.generate([ids] * 3, SamplingParams(max_new_tokens=10, temperature=1.0, seed=5))
    assert [c.text for c in a.choices] == [o.text for o in ref]


def test_stop_strings(client, engine):
    free = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0).choices[0].text
    stop = free[5:8]
    cut = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free[:free.find(stop)]


def test_chat_stream_is_chunked_ends_with_done_and_concatenates_to_the_same_text(client, engine, server):
    stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, logprobs=True)
    pieces, reasons, usage, lps = [], [], None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            if c.logprobs:
                lps += [e.logprob for e in c.logprobs.content]
            if c.finish_reason:
                reasons.append(c.finish_reason)
    ref = engine.chat([USER], SamplingParams(max_new_tokens=20))[0]
    assert "".join(pieces) == ref.text and len([p for p in pieces if p]) > 1
    assert reasons == [ref.finish_reason] and usage.completion_tokens == len(ref.token_ids)
    assert lps == pytest.approx(ref.logprobs, abs=1e-6)
    body = json.dumps({"messages": USER, "max_tokens": 5, "stream": True}).encode()
    status, headers, raw_body = raw(server, post("/v1/chat/completions", body))
    assert status == 200 and headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert dechunk(raw_body).endswith(b"data: [DONE]\n\n") and raw_body.endswith(b"0\r\n\r\n")


def test_completions_token_prompts_echo_and_prompt_logprobs(client, engine):
    tok = engine.tokenizer
    ids = tok("The quick brown fox jumps")["input_ids"]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    c = r.choices[0]
    assert c.text == tok.decode(ids) and c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), -1)
    ref = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert c.logprobs.token_logprobs[1:] == pytest.approx(ref, abs=1e-5)
    assert all(max(t.values()) == pytest.approx(logp[k].max().item(), abs=1e-5)
               for k, t in enumerate(c.logprobs.top_logprobs[1:]))
    # echo + one generated token (what lm-eval's local-completions sends): prompt entries, then the token
    r = client.completions.create(model="tiny", prompt=["Hello there", "Hi"], max_tokens=1, echo=True, logprobs=1,
                                  temperature=0)
    for c, p in zip(r.choices, ["Hello there", "Hi"]):
        n = len(tok(p)["input_ids"])
        assert c.text.startswith(p) and len(c.logprobs.tokens) == n + 1 and len(c.logprobs.token_logprobs) == n + 1
    r = client.completions.create(model="tiny", prompt=[[1, 2, 3], [4, 5]], max_tokens=3, temperature=0)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="tiny", prompt=[10**9], max_tokens=1)


def test_tokenize_detokenize_and_tokenizer_info(server, engine):
    ids = engine.tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    status, _, body = raw(server, post("/tokenize", json.dumps({"prompt": "Hello world",
                                                                "add_special_tokens": False}).encode()))
    assert status == 200 and json.loads(body)["tokens"] == ids
    status, _, body = raw(server, post("/detokenize", json.dumps({"tokens": ids}).encode()))
    assert status == 200 and json.loads(body)["prompt"] == "Hello world"
    status, _, body = raw(server, b"GET /tokenizer_info HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and json.loads(body)["eos_token"] == engine.tokenizer.eos_token


def test_concurrent_requests_are_batched_and_equal_their_solo_results(engine):
    """8 clients at once: each reply equals the one served alone (greedy), and they share decoding: the scheduler ran
    fewer engine batches than requests and saw several rows at once. (Counted, not timed: a wall-clock comparison
    fails on a loaded machine; bench/serve.py measures the speed.)"""
    s = OpenAIServer(engine, "tiny", port=0, limits=ServerLimits(batch_wait_s=0.05)).start()
    try:
        c = openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0)
        prompts = [f"Request number {i}: tell me about {w}" for i, w in
                   enumerate(["cats", "the sea", "bread", "rain", "trains", "music", "stars", "tea"])]

        def one(p):
            return c.completions.create(model="tiny", prompt=p, max_tokens=32, temperature=0).choices[0].text

        before = s.scheduler.batches
        solo = [one(p) for p in prompts]
        assert s.scheduler.batches - before == len(prompts)  # one at a time: one batch each
        results: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, one(prompts[i])))
                   for i in range(len(prompts))]
        before = s.scheduler.batches
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [results[i] for i in range(len(prompts))] == solo
        assert s.scheduler.max_rows_seen >= 4
        assert s.scheduler.batches - before < len(prompts)
    finally:
        s.stop()


def test_template_in_request_is_refused_and_never_rendered(client):
    evil = "{{ cycler.__init__.__globals__.os.popen('touch /tmp/ik_pwned').read() }}"
    for extra in ({"chat_template": evil}, {"chat_template_kwargs": {"enable_thinking": True}}):
        with pytest.raises(openai.BadRequestError, match="chat template"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], extra_body=extra)
    assert not os.path.exists("/tmp/ik_pwned")


def test_api_key_required_when_configured(engine, caplog):
    s = OpenAIServer(engine, "tiny", port=0, api_key=KEY).start()
    try:
        bad = openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as ei:
            bad.models.list()
        assert KEY not in str(ei.value)
        status, _, _ = raw(s, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200  # health needs no key and tells nothing
        good = openai.OpenAI(base_url=s.base_url, api_key=KEY, max_retries=0)
        r = good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3)
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        s.stop()
    assert KEY not in caplog.text


def test_keep_alive_has_no_nagle_stall_and_idle_connections_close(server):
    """Ten small requests on one keep-alive connection, all answered on it; the server's side of the connection has
    TCP_NODELAY set (with Nagle's algorithm and delayed ACKs each response would stall about 40 ms); then the idle
    connection is closed by the server after idle_timeout_s (2 s here)."""
    host, port = server.address
    with socket.create_connection((host, port), timeout=10) as sock:
        for _ in range(10):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            buf = b""
            while not buf.endswith(b"}"):
                chunk = sock.recv(4096)
                assert chunk, "the server closed a keep-alive connection"
                buf += chunk
            assert buf.startswith(b"HTTP/1.1 200") and buf.count(b"HTTP/1.1") == 1
        mine = sock.getsockname()
        conns = [c.transport.get_extra_info("socket") for c in server._uv.server_state.connections]
        theirs = [c for c in conns if c is not None and c.getpeername()[:2] == mine[:2]]
        assert len(theirs) == 1  # the same connection served all ten
        assert theirs[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        sock.settimeout(10)
        assert sock.recv(1) == b""  # closed by the server once idle


def test_client_leaving_mid_stream_releases_its_rows(server, client):
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 64, "temperature": 0, "stream": True,
                       "stop": ["\u2603\u2603\u2603"]}).encode()
    host, port = server.address
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(post("/v1/completions", body))
    first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first
    sock.close()  # go away mid-stream
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def _serve(model_dir, *extra, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "serve", "--model", str(model_dir), "--port", "0",
                             "--name", "tiny", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    first = json.loads(proc.stdout.readline())
    return proc, first


def test_serve_cli_subprocess_and_a_server_killed_mid_stream(tiny_model_dir):
    """The CLI prints its URL first; the key never reaches its logs; a server killed while streaming leaves the client
    with an error, never with what looks like a complete answer."""
    proc, first = _serve(tiny_model_dir, "--api-key-env", "IK_SERVE_KEY", env={"IK_SERVE_KEY": KEY})
    try:
        assert first["serving"] == "tiny" and first["url"].startswith("http://127.0.0.1:") and first["auth"] is True
        c = openai.OpenAI(base_url=first["url"], api_key=KEY, max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.usage.completion_tokens <= 4
        stream = c.completions.create(model="tiny", prompt="Hello", max_tokens=2000, temperature=0, stream=True,
                                      stop=["\u2603\u2603\u2603"])
        got = 0
        with pytest.raises((openai.APIError, Exception)) as ei:
            for _ in stream:
                got += 1
                if got == 3:
                    os.kill(proc.pid, signal.SIGKILL)
        assert got >= 3 and not isinstance(ei.value, StopIteration)
        assert "incomplete" in str(ei.value).lower() or "closed" in str(ei.value).lower() or \
            isinstance(ei.value, (openai.APIConnectionError,)), repr(ei.value)
    finally:
        if proc.poll() is None:
            proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert KEY not in err
