"""Hugging Face Hub ids as model paths, resolved through huggingface_hub's cache like ``from_pretrained``.

``model.path`` may be a local folder, a zoo name (models/zoo.py) or a Hub id such as ``Qwen/Qwen2.5-0.5B-Instruct``
(optionally ``@revision``: a branch, tag or commit; or ``model.revision``). A Hub id resolves to its snapshot folder in
the Hugging Face cache (``$HF_HUB_CACHE``, by default ``$HF_HOME/hub``), downloading what ``from_pretrained`` would
read when online: config, tokenizer and generation files, the chat template, safetensors weights (``*.bin`` only
when the repository has no safetensors). Python files are fetched only with ``trust_remote_code`` (off unless set).

Offline (``HF_HUB_OFFLINE=1``) only the cache is read; an id that is not there fails with ``HubModelNotCached``,
which says how to get it: download it where there is a network (``huggingface-cli download ID``) and copy the cache,
point ``HF_HOME`` / ``HF_HUB_CACHE`` at a cache that has it, or unset ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from instructkit.config import ConfigError

# What from_pretrained reads for a causal LM and its tokenizer (no ONNX/GGUF/TF/Flax copies, no remote code).
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
FILE_PATTERNS = ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*", *WEIGHT_PATTERNS)

# huggingface_hub's repo id rule: [namespace/]name, letters, digits, '-', '_', '.', no '--' or '..', <= 96 chars.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


class HubModelNotCached(ConfigError):
    """A Hub id that cannot be resolved without a network (offline, not in the cache)."""


def looks_like_hub_id(name: str) -> bool:
    """True for ``org/name`` or ``name`` (optionally ``@revision``) that is not a path on this machine."""
    repo_id, _ = split_revision(name)
    if not repo_id or repo_id.startswith((".", "/", "~")) or "--" in repo_id or ".." in repo_id:
        return False
    return bool(_REPO_ID.match(repo_id))


def split_revision(name: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; without ``@``, the revision is None."""
    if "@" in name:
        repo_id, rev = name.rsplit("@", 1)
        return repo_id, (rev or None)
    return name, None


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, read now (not at import)."""
    true = {"1", "true", "yes", "on"}
    return any(os.environ.get(k, "").strip().lower() in true for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_root() -> Path:
    """The hub cache folder, as huggingface_hub computes it, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def _not_cached(repo_id: str, revision: str | None, why: str) -> HubModelNotCached:
    rev = f" at revision {revision!r}" if revision else ""
    return HubModelNotCached(
        f"model {repo_id!r}{rev} is no local folder or zoo model, and it is not in the Hugging Face cache "
        f"({cache_root()}) while {why}. To fix it: download it on a machine with a network "
        f"(`huggingface-cli download {repo_id}{' --revision ' + revision if revision else ''}`), then copy that "
        "cache here or point HF_HOME (or HF_HUB_CACHE) at it; or, if this machine can reach the Hub, unset "
        "HF_HUB_OFFLINE so it is downloaded"
    )


def resolve_hub_model(name: str, revision: str | None = None, *, trust_remote_code: bool = False) -> Path:
    """The local snapshot folder of Hub id ``name`` (``@rev`` suffix or ``revision``), from the cache or downloaded.

    Offline, or when the download fails for want of a network, the cache alone is used; an id not found there raises
    ``HubModelNotCached`` with the fix. A snapshot without ``config.json`` is refused (not a model repository).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, rev_in_name = split_revision(name)
    if rev_in_name and revision and rev_in_name != revision:
        raise ConfigError(f"model {name!r} names revision {rev_in_name!r} but model.revision is {revision!r}")
    revision = rev_in_name or revision
    patterns = list(FILE_PATTERNS) + (["*.py"] if trust_remote_code else [])
    offline = is_offline()
    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=str(cache_root()), repo_type="model")
    try:
        folder = Path(snapshot_download(allow_patterns=patterns, local_files_only=offline, **kwargs))
        if not offline and not any(folder.glob("*.safetensors")):  # old repositories: PyTorch pickles only
            folder = Path(snapshot_download(allow_patterns=patterns + ["*.bin", "*.bin.index.json"], **kwargs))
    except LocalEntryNotFoundError as e:
        # offline, or online without a network (huggingface_hub then falls back to the cache and raises this)
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hub could not be reached ({e.__class__.__name__})"
        raise _not_cached(repo_id, revision, why) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"model {repo_id!r}: no such model on the Hugging Face Hub (or it is gated/private and no token is set), "
            "and no local folder or zoo model has that name") from None
    except RevisionNotFoundError:
        raise ConfigError(f"model {repo_id!r} has no revision {revision!r} on the Hub") from None
    if not (folder / "config.json").exists():
        raise ConfigError(f"model {repo_id!r} ({folder}) has no config.json: not a transformers model repository")
    return folder


__all__ = ["HubModelNotCached", "cache_root", "is_offline", "looks_like_hub_id", "resolve_hub_model", "split_revision"]
