"""The OpenAI-compatible server, driven by the official `openai` client on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")

from instructkit.generation.engine import Engine, SamplingParams  # noqa: E402
from instructkit.generation.server import OpenAIServer, ServerLimits  # noqa: E402

KEY = "sk-server-test-key"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return Engine(model, tok)


@pytest.fixture(scope="module")
def server(engine):
    s = OpenAIServer(engine, "tiny", port=0, limits=ServerLimits(max_request_bytes=20_000, max_tokens_limit=64)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def _post_raw(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_binds_loopback_by_default(engine):
    s = OpenAIServer(engine, "tiny", port=0)
    try:
        assert s.address[0] == "127.0.0.1"
    finally:
        s.httpd.server_close()
    from instructkit.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "x"])
    assert args.host == "127.0.0.1"


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_completion_equals_engine_chat(client, engine):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Give three tips."}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    ref = engine.chat([msgs], SamplingParams(max_new_tokens=12))[0]
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == len(engine.chat_prompt_ids(msgs))


def test_chat_streaming_concatenates_to_the_same_text(client, engine):
    msgs = [{"role": "user", "content": "Hello"}]
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                reasons.append(c.finish_reason)
    ref = engine.chat([msgs], SamplingParams(max_new_tokens=20))[0]
    assert "".join(pieces) == ref.text and len(pieces) > 1
    assert reasons == [ref.finish_reason]
    assert usage.completion_tokens == len(ref.token_ids)


def test_completions_plain_prompt_and_seeded_sampling(client, engine):
    r = client.completions.create(model="tiny", prompt="What is the capital", max_tokens=10, temperature=0)
    ids = engine.tokenizer("What is the capital")["input_ids"]
    assert r.choices[0].text == engine.generate([ids], SamplingParams(max_new_tokens=10))[0].text
    a = client.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=1.0, seed=5)
    b = client.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=1.0, seed=5)
    assert a.choices[0].text == b.choices[0].text
    ref = engine.generate([engine.tokenizer("Hello")["input_ids"]],
                          SamplingParams(max_new_tokens=10, temperature=1.0, seed=5))[0]
    assert a.choices[0].text == ref.text


def test_bad_json_and_bad_fields_are_400_with_a_message(server, client):
    url = server.base_url + "/chat/completions"
    status, body = _post_raw(url, b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post_raw(url, json.dumps({"model": "tiny", "messages": "hi"}).encode())
    assert status == 400 and "messages" in body["error"]["message"]
    status, body = _post_raw(url, json.dumps([1, 2]).encode())
    assert status == 400
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=9)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_request_size_limit(server):
    big = json.dumps({"model": "tiny", "prompt": "a" * 50_000}).encode()
    status, body = _post_raw(server.base_url + "/completions", big)
    assert status == 413 and "limit" in body["error"]["message"]


def test_template_in_request_is_refused_and_never_rendered(client):
    evil = "{{ cycler.__init__.__globals__.os.popen('touch /tmp/ik_pwned').read() }}"
    for extra in ({"chat_template": evil}, {"chat_template_kwargs": {"enable_thinking": True}}):
        with pytest.raises(openai.BadRequestError, match="chat template"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], extra_body=extra)
    assert not os.path.exists("/tmp/ik_pwned")


def test_api_key_required_when_configured(engine):
    s = OpenAIServer(engine, "tiny", port=0, api_key=KEY).start()
    try:
        bad = openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as ei:
            bad.models.list()
        assert KEY not in str(ei.value)
        good = openai.OpenAI(base_url=s.base_url, api_key=KEY, max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        r = good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3)
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        s.stop()


def test_serve_cli_subprocess(tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IK_SERVE_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "serve", "--model", str(tiny_model_dir), "--port", "0",
                             "--name", "tiny", "--api-key-env", "IK_SERVE_KEY"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["serving"] == "tiny" and first["url"].startswith("http://127.0.0.1:") and first["auth"] is True
        c = openai.OpenAI(base_url=first["url"], api_key=KEY, max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.usage.completion_tokens <= 4
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert KEY not in err


def test_client_leaving_mid_stream_releases_the_engine(server, client):
    import socket

    host, port = server.address
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 64, "temperature": 0, "stream": True})
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first
    sock.close()  # go away mid-stream
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
