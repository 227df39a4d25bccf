"""Shared fixtures: paths to ../shared/data and a tiny random model with a real tokenizer and chat template."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run in fp32 on every CPU: `model.dtype: auto` would pick bf16 on a CPU with AMX (models/precision.py).
# Subprocesses (the CLI tests) inherit it.
os.environ.setdefault("INSTRUCTKIT_AUTO_DTYPE", "float32")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"../shared/data not found at {SHARED_DATA}: CI runs with shared/ beside the project")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, hidden 64) + byte-level BPE tokenizer with ChatML tokens, written once per session.

    Tests must not modify it; copy it if a test needs to write into a model folder.
    """
    from instructkit.models.tiny import create_tiny

    return create_tiny(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
