"""Hub ids as model paths: resolved from a Hugging Face cache built here (the real layout), offline; the documented
error when the id is not cached."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from instructkit.models.hub import HubModelNotCached, looks_like_hub_id, resolve_hub_model, split_revision

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_cache_entry(cache: Path, repo_id: str, commit: str = COMMIT, files: dict | None = None) -> Path:
    """models--org--name/{refs/main, snapshots/<commit>/...}, as huggingface_hub writes it (blobs linked from the
    snapshot; plain files work the same for reading)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for name, text in (files or {"config.json": json.dumps({"model_type": "llama"})}).items():
        blob = repo / "blobs" / f"{abs(hash(name)):x}"
        blob.write_text(text)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_resolves_from_the_cache_offline(offline_cache):
    snap = make_cache_entry(offline_cache, "acme/tiny-chat", files={
        "config.json": json.dumps({"model_type": "llama"}), "tokenizer_config.json": "{}"})
    assert resolve_hub_model("acme/tiny-chat") == snap
    assert resolve_hub_model("acme/tiny-chat", revision=COMMIT) == snap  # a commit hash
    assert resolve_hub_model(f"acme/tiny-chat@{COMMIT}") == snap
    assert (snap / "tokenizer_config.json").read_text() == "{}"


def test_resolve_path_routes_hub_ids(offline_cache):
    from instructkit.models.load import resolve_path

    snap = make_cache_entry(offline_cache, "acme/tiny-chat")
    assert resolve_path("acme/tiny-chat") == snap
    assert resolve_path(str(snap)) == snap  # a local folder stays itself


def test_missing_hub_id_offline_says_how_to_fix_it(offline_cache):
    with pytest.raises(HubModelNotCached) as e:
        resolve_hub_model("acme/not-downloaded")
    msg = str(e.value)
    assert "'acme/not-downloaded'" in msg and "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert "huggingface-cli download acme/not-downloaded" in msg and "HF_HOME" in msg
    assert str(offline_cache) in msg


def test_unknown_revision_offline_is_not_cached(offline_cache):
    make_cache_entry(offline_cache, "acme/tiny-chat")
    with pytest.raises(HubModelNotCached, match="revision 'v2'"):
        resolve_hub_model("acme/tiny-chat@v2")


def test_hub_id_recognition():
    assert looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and looks_like_hub_id("gpt2")
    assert looks_like_hub_id("meta-llama/Llama-3.1-8B-Instruct@main")
    assert not looks_like_hub_id("./runs/x") and not looks_like_hub_id("/abs/path") and not looks_like_hub_id("a/b/c")
    assert split_revision("org/m@v1.0") == ("org/m", "v1.0") and split_revision("org/m") == ("org/m", None)


def test_cli_documented_failure(tmp_path, monkeypatch, capsys):
    """Through the CLI, with the variables a user sets (HF_HOME, HF_HUB_OFFLINE): exit code 2 and the fix."""
    from instructkit.cli import main

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "hello"}]}) + "\n")
    (tmp_path / "c.yaml").write_text("model:\n  path: acme/never-downloaded\ndata:\n  sources:\n    - path: x.jsonl\n"
                                     "train:\n  output_dir: runs\n")
    assert main(["sft", "--config", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert "acme/never-downloaded" in err and "HF_HUB_OFFLINE" in err and str(tmp_path / "hf" / "hub") in err
