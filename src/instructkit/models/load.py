"""Load a causal LM and its tokenizer for training (dtype and device from models/precision.py), pad token checked,
LoRA / QLoRA through peft; activation checkpointing that keeps the packed attention; merge.

QLoRA on CPU: we measured (2026-11-23, bitsandbytes 0.50.2, peft 0.21, transformers 5.23) that bitsandbytes' CPU
backend quantises the linear layers of a Llama to 4-bit NF4 (``Linear4bit``) and runs forward *and* backward on CPU with
a peft LoRA adapter on top, fp32 compute. So ``lora.quantize: int4`` uses ``BitsAndBytesConfig(load_in_4bit=True)``
(``int8``: ``load_in_8bit``). bitsandbytes is an optional extra (``pip install instructkit[qlora]``). On a GPU the same
config runs the CUDA kernels unchanged; on CPU the 4-bit matmuls dequantise on the fly and are slower than fp32, the
gain is memory only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from instructkit.config import ConfigError, LoRAConfig, ModelConfig

log = logging.getLogger(__name__)

# Existing tokens that are safe to use as padding when a tokenizer has none (in this order); never the eos token.
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "[PAD]", "<|padding|>")


def resolve_path(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """A local folder as is; a zoo name (models/zoo.py) converted to a safetensors cache; else a Hugging Face Hub id
    (``org/name``, optionally ``@revision``) resolved through the Hub cache like from_pretrained (models/hub.py).
    A training run folder (``runs/<name>``, any recipe) resolves to its ``final/`` model folder."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if (p / "final").is_dir() and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            return p / "final"
        return p
    from instructkit.models.hub import looks_like_hub_id, resolve_hub_model

    try:
        from instructkit.models.zoo import ZOO, resolve_model
    except ImportError:  # zoo not available: local folders and Hub ids
        ZOO, resolve_model = {}, None
    if name_or_path in ZOO or resolve_model is not None and not looks_like_hub_id(str(name_or_path)):
        return Path(resolve_model(name_or_path))
    if looks_like_hub_id(str(name_or_path)):
        return resolve_hub_model(str(name_or_path), revision, trust_remote_code=trust_remote_code)
    raise FileNotFoundError(f"model folder not found: {name_or_path}")


def ensure_pad_token(tokenizer, model=None) -> str:
    """Make sure ``tokenizer.pad_token`` exists and differs from eos (pad == eos masks the end-of-turn token away).

    Uses a distinct existing token if there is one, else adds ``<pad>`` (and resizes the model's embeddings).
    Returns a sentence saying what was done ("" when nothing was needed)."""
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return ""
    vocab = tokenizer.get_vocab()
    for cand in _PAD_CANDIDATES + ((tokenizer.unk_token,) if tokenizer.unk_token else ()):
        if cand and cand in vocab and cand != eos:
            tokenizer.pad_token = cand
            msg = f"pad token set to the existing token {cand!r} (was {'eos' if eos else 'missing'})"
            break
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        msg = "pad token '<pad>' added to the vocabulary"
        if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
            msg += f"; embeddings resized to {len(tokenizer)}"
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    log.warning(msg)
    return msg


def _prepare_template(tokenizer, model_cfg: ModelConfig, model) -> list[str]:
    """Install the chat template (chat/templates.py) and resize embeddings if it added tokens; returns those tokens."""
    from instructkit.chat.templates import prepare_tokenizer

    before = set(tokenizer.get_vocab())
    result = prepare_tokenizer(tokenizer, model_cfg.template)
    if result is not None and result is not tokenizer and hasattr(result, "apply_chat_template"):
        tokenizer.__dict__.update(result.__dict__)
    added = [t for t in tokenizer.get_vocab() if t not in before]
    if added and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return added


def refuse_untrained_new_tokens(model, added: list[str], model_cfg: ModelConfig) -> None:
    """A chat template that needs control tokens the model's vocabulary lacks gets them as new embedding rows with
    random values. Training must then update those rows in both the input embedding and the output layer (full
    fine-tuning, or LoRA with ``modules_to_save``), else the model can never read or write the template's turn markers
    and the run would save a template its model was never taught. ConfigError, naming the tokens and the fixes."""
    if not added:
        return
    parts = {"input embedding": model.get_input_embeddings(), "output layer": model.get_output_embeddings()}
    frozen = [what for what, mod in parts.items() if mod is None or not any(p.requires_grad for p in mod.parameters())]
    if not frozen:
        return
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = [n.rsplit(".", 1)[-1] for want in (inner.get_input_embeddings(), inner.get_output_embeddings())
             for n, mod in inner.named_modules() if mod is want]
    raise ConfigError(
        f"model.template={model_cfg.template!r} does not belong to {model_cfg.path!r}: its tokenizer lacks the "
        f"template's control token(s) {', '.join(sorted(added))}. They would get new embedding rows with random "
        f"values that this run never trains ({' and '.join(frozen)} frozen), so the model could never read or write "
        f"them, and the run would save this template with a model that was never taught it. Use the model's own "
        f"template (model.template=auto), or train the new rows: lora.modules_to_save=[{','.join(dict.fromkeys(names))}]"
        f" or full fine-tuning (lora.enabled=false).")


def _quantization_config(kind: str):
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"lora.quantize={kind!r} needs bitsandbytes: pip install 'instructkit[qlora]' ({e})") from e
    if kind == "int4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"lora.quantize must be int4, int8 or null, got {kind!r}")


def apply_lora(model, lora_cfg: LoRAConfig, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` in a peft LoRA adapter (``lora.r``, ``alpha``, ``dropout``, ``target_modules``); only adapter
    weights are trainable. The one place every recipe wraps a model: ``task_type`` "SEQ_CLS" for a reward model or a
    critic (peft then also trains the score head)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: Any = lora_cfg.target_modules
    if list(targets) == ["all-linear"]:
        targets = "all-linear"  # peft: every linear layer except the output layer
    peft_cfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                              target_modules=targets, task_type=task_type, bias="none",
                              modules_to_save=list(lora_cfg.modules_to_save) or None)
    return get_peft_model(model, peft_cfg)


def load_model_and_tokenizer(model_cfg: ModelConfig, lora: LoRAConfig | None = None, precision=None):
    """(model, tokenizer) from a local folder or zoo name, pad token distinct from eos, chat template prepared,
    optional LoRA (and 4/8-bit frozen base for QLoRA).

    Weights follow ``precision`` (models/precision.py; default: ``model.dtype`` resolved for the CPU): under mixed
    precision the trainable weights load in fp32 (full fine-tuning: fp32 master weights, matmuls in bf16 under
    autocast) and a frozen LoRA base in bf16, while peft keeps the adapter in fp32 (``autocast_adapter_dtype``). The
    model is moved to ``precision.device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.models.precision import resolve_precision

    if not model_cfg.path:
        raise ConfigError("model.path is empty: give a local model folder or a zoo name")
    path = resolve_path(model_cfg.path, model_cfg.revision, model_cfg.trust_remote_code)
    if precision is None:
        precision = resolve_precision(model_cfg.dtype, "cpu")
    dtype = precision.weight_dtype(trainable=not (lora is not None and lora.enabled))
    trust = bool(model_cfg.trust_remote_code)  # only when the user set it: it runs code from the folder
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust}
    quantize = lora.quantize if (lora is not None and lora.enabled) else None
    if lora is not None and lora.quantize and not lora.enabled:
        raise ConfigError("lora.quantize is set but lora.enabled is false: QLoRA trains an adapter on a frozen base")
    if quantize:
        kwargs["quantization_config"] = _quantization_config(quantize)
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if precision.device.type != "cpu" and not quantize:
        model.to(precision.device)
    ensure_pad_token(tokenizer, model)
    added = _prepare_template(tokenizer, model_cfg, model)
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora)
    refuse_untrained_new_tokens(model, added, model_cfg)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Body and output layer, so losses apply the output layer only where needed.
# ---------------------------------------------------------------------------------------------------------------------
def causal_lm_parts(model) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], float | None]:
    """(body, output_layer, logit_softcap) of a causal LM, through peft and DDP wrappers.

    ``body(input_ids=..., ...)`` returns ``last_hidden_state``; ``output_layer`` is the lm_head module (tied to the
    input embedding when the model ties them, LoRA-wrapped if it was targeted)."""
    m = model
    if hasattr(m, "module") and isinstance(m, torch.nn.parallel.DistributedDataParallel):
        m = m.module
    if hasattr(m, "get_base_model"):  # peft
        m = m.get_base_model()
    body = getattr(m, m.base_model_prefix, None) if getattr(m, "base_model_prefix", None) else None
    if body is None or body is m:
        body = m.model
    head = m.get_output_embeddings()
    softcap = getattr(getattr(m.config, "get_text_config", lambda: m.config)(), "final_logit_softcapping", None)
    return body, head, softcap


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) additive mask: 0 where query i may attend key j (same sample, j <= i),
    the dtype's minimum elsewhere. Padding positions (segment -1) attend to themselves only, so no row is all-masked
    (which would give NaN in softmax); their outputs are never supervised."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    pad = segment_ids < 0
    allowed = causal & same & ~(pad[:, :, None] | pad[:, None, :])
    allowed |= torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def repeated_rows(keys: Sequence, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(distinct, source) when some of ``keys`` (one hashable per row) repeat: ``distinct`` the first row of each
    distinct key (the rows to compute), ``source[i]`` the position in ``distinct`` that row i's result comes from;
    None when every key is distinct. Used to run a repeated prompt once (generation/engine.py and ``value_head.response_hidden``)."""
    seen: dict = {}
    source = [seen.setdefault(k, len(seen)) for k in keys]
    if len(seen) == len(source):
        return None
    distinct = [source.index(j) for j in range(len(seen))]
    return (torch.tensor(distinct, dtype=torch.long, device=device),
            torch.tensor(source, dtype=torch.long, device=device))


def packed_attention_mask(model, segment_ids: torch.Tensor, dtype: torch.dtype):
    """The isolating mask for a packed batch; a per-layer-type dict for models with sliding-window layers (Gemma 3)."""
    mask = block_causal_mask(segment_ids, dtype)
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    layer_types = set(getattr(cfg, "layer_types", None) or [])
    window = getattr(cfg, "sliding_window", None)
    if "sliding_attention" in layer_types and window:
        T = segment_ids.shape[1]
        i = torch.arange(T)
        far = (i[:, None] - i[None, :]) >= window  # key more than `window - 1` positions back
        sliding = mask.masked_fill(far[None, None], torch.finfo(dtype).min)
        return {"full_attention": mask, "sliding_attention": sliding}
    return mask


def packed_hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, H) final hidden states of a packed batch (see training/packing.py): each sample attends only to itself.

    Models with standard sdpa attention run each sample's attention separately (``_segment_attention``); others get
    the dense block-causal mask."""
    body, _, _ = causal_lm_parts(model)
    if _segment_attention_ok(body):
        segments = _segments(batch["segment_ids"])
        impl = body.config._attn_implementation
        body.config._attn_implementation = _SEGMENT_ATTENTION
        try:
            out = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                       use_cache=False, instructkit_segments=segments)
        finally:
            body.config._attn_implementation = impl
        return out.last_hidden_state
    dtype = body.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    mask = packed_attention_mask(body, batch["segment_ids"], dtype)
    out = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, use_cache=False)
    return out.last_hidden_state


# Attention of a packed batch, one sample at a time. Why: with the dense block-causal mask every row's attention costs
# T^2 (the pack length squared) whatever the samples; per sample it costs the sum of their squared lengths, and each
# call is plain causal sdpa with no mask to build or read. Measured for one gemma-3-270m attention layer (4 query heads,
# 1 kv head, head_dim 256, forward + backward, 2 threads): a 256-token row of 4 samples 4.1 -> 2.7 ms, 1,024 tokens
# of 8 samples 50 -> 18 ms, 2,048 tokens of 16 samples 201 -> 45 ms (x 18 layers per step). Registered with
# transformers' attention interface under its own name and switched on only for the packed forward, so generation and
# everything else keep the model's own attention.
_SEGMENT_ATTENTION = "instructkit_segments"
_SEGMENT_MODEL_TYPES = {"llama", "gemma3_text", "qwen2", "qwen3", "mistral"}


def _segment_attention_ok(body) -> bool:
    cfg = body.config
    return (getattr(cfg, "model_type", None) in _SEGMENT_MODEL_TYPES and cfg._attn_implementation == "sdpa"
            and getattr(cfg, "attn_logit_softcapping", None) is None
            and not getattr(cfg, "use_bidirectional_attention", False) and _register_segment_attention())


def _segments(segment_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) column ranges of its samples, then its padding tail (segment -1) as one more range."""
    out = []
    for row in segment_ids:
        ends = torch.unique_consecutive(row, return_counts=True)[1].cumsum(0).tolist()
        out.append(list(zip([0] + ends[:-1], ends)))
    return out


def _segment_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                               sliding_window=None, instructkit_segments=None, **kwargs):
    """Causal sdpa within each segment. query (B, heads, T, d), key/value (B, kv_heads, T, d) -> (B, T, heads, d), as
    transformers' sdpa integration returns. A segment longer than a local layer's ``sliding_window`` gets the band
    mask (key at most window - 1 positions back); padding is its own segment (its outputs are never supervised)."""
    if instructkit_segments is None:
        raise RuntimeError("segment attention called without segments (only packed_hidden_states switches it on)")
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, bounds in enumerate(instructkit_segments):
        parts = []
        for s, e in bounds:
            q, k, v = query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e]
            n = e - s
            if dropout == 0.0 and q.shape[-1] >= 128 and n <= 512 and q.device.type == "cpu":
                parts.append(_matmul_attention(q, k, v, scaling, sliding_window))
                continue
            if sliding_window is not None and n > sliding_window:
                i = torch.arange(n, device=query.device)
                band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < sliding_window)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout, scale=scaling,
                                                   enable_gqa=gqa)
            else:
                o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True,
                                                   enable_gqa=gqa)
            parts.append(o)
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


# Short segments with wide heads: attention as two batched matmuls beats the flash kernel. Measured forward + backward
# for one gemma-3-270m layer (4 query heads, 1 kv head, head_dim 256, 2 threads): 64 tokens 0.59 -> 0.51 ms, 128
# 1.7 -> 1.1, 256 3.7 -> 3.0, 512 13.2 -> 10.7, but 1,024 34 -> 42 (and the scores it keeps for the backward grow with
# the square); with head_dim 64 (SmolLM2, Llama) the two are level up to 512 tokens. Same function, within rounding.
# Measured on CPU only, so GPUs keep their fused kernels.
_CAUSAL_MASKS: dict[tuple, torch.Tensor] = {}


def _matmul_attention(q, k, v, scaling, window):
    """softmax(q k^T * scaling + mask) v for one segment, causal (and at most ``window`` - 1 keys back): q (1, heads,
    n, d), k/v (1, kv_heads, n, d) -> (1, heads, n, d). The query heads that share a kv head are stacked into one
    (heads / kv_heads * n, d) matrix, so GQA needs no repeated keys; the scale and the additive mask go into one
    baddbmm."""
    _, heads, n, d = q.shape
    kv = k.shape[1]
    rep = heads // kv
    key = (n, rep, window, q.dtype, q.device)
    mask = _CAUSAL_MASKS.get(key)
    if mask is None:
        i = torch.arange(n, device=q.device)
        far = (i[None, :] > i[:, None]) | ((i[:, None] - i[None, :] >= window) if window else False)
        mask = torch.zeros((n, n), dtype=q.dtype, device=q.device).masked_fill_(far, float("-inf")).repeat(rep, 1)
        if len(_CAUSAL_MASKS) > 64:
            _CAUSAL_MASKS.clear()
        _CAUSAL_MASKS[key] = mask  # (rep * n, n)
    scale = scaling if scaling is not None else d ** -0.5
    scores = torch.baddbmm(mask, q[0].reshape(kv, rep * n, d), k[0].transpose(1, 2), alpha=scale)
    return torch.bmm(torch.softmax(scores, dim=-1), v[0]).view(1, heads, n, d)


_REGISTERED: list[bool] = []


def _register_segment_attention() -> bool:
    if not _REGISTERED:
        try:
            from transformers import AttentionInterface, AttentionMaskInterface

            AttentionInterface.register(_SEGMENT_ATTENTION, _segment_attention_forward)
            AttentionMaskInterface.register(_SEGMENT_ATTENTION, lambda *args, **kwargs: None)  # no mask to build
            _REGISTERED.append(True)
        except (ImportError, AttributeError, TypeError):
            _REGISTERED.append(False)
    return _REGISTERED[0]


# ---------------------------------------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------------------------------------
def enable_activation_checkpointing(model) -> int:
    """Recompute each decoder layer's activations in backward instead of keeping them
    (``train.gradient_checkpointing``): the saved activations drop from every intermediate of every layer to each layer's input, for one extra forward
    of the body per step. Returns how many layers are checkpointed (a model without checkpointable layers is an error,
    never a silent no-op).

    Uses transformers' per-layer checkpointing (non-reentrant ``torch.utils.checkpoint``) with our own checkpoint
    function, because the packed forward (``packed_hidden_states``) switches the attention implementation only while
    it runs: the recomputation in backward happens after the switch is undone and would run plain causal attention
    over the whole packed row (torch's checkpoint then fails on a different number of saved tensors, or worse, when
    the counts happen to agree, computes other gradients). Our function records the attention implementation at
    forward time and replays the recomputation under it, so per-sample attention, its segments and the dense masks
    are recomputed exactly; the RNG state is restored as well (dropout draws the same masks)."""
    from torch.utils.checkpoint import checkpoint

    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, _, _ = causal_lm_parts(m)
    config = body.config
    enable = getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable
    kwargs_name = ("activation_checkpointing_kwargs" if enable.__name__ == "activation_checkpointing_enable"
                   else "gradient_checkpointing_kwargs")
    import warnings

    with warnings.catch_warnings():  # the deprecated alias warns on newer transformers
        warnings.simplefilter("ignore", FutureWarning)
        enable(**{kwargs_name: {"use_reentrant": False}})

    def replaying_checkpoint(fn, *args, **kwargs):
        impl = config._attn_implementation

        def run(*a, **k):
            saved = config._attn_implementation
            config._attn_implementation = impl
            try:
                return fn(*a, **k)
            finally:
                config._attn_implementation = saved

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for module in m.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = replaying_checkpoint
            n += isinstance(module, GradientCheckpointingLayer)
    if n == 0:
        raise ConfigError(f"train.gradient_checkpointing: {type(m).__name__} has no checkpointable layers")
    return n


# ---------------------------------------------------------------------------------------------------------------------
# Saving and merging
# ---------------------------------------------------------------------------------------------------------------------
def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Full model (safetensors) or LoRA adapter (peft format), plus the tokenizer with its chat template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def merge_and_save(adapter_dir: str | Path, out_dir: str | Path, base_path: str | Path | None = None) -> Path:
    """Merge a LoRA adapter into its fp32 base and write a plain Hugging Face folder (safetensors + tokenizer).

    The base is ``base_path`` or the adapter's ``base_model_name_or_path``. A quantised (QLoRA) adapter is merged into
    the full-precision base, as is usual."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"not a LoRA adapter folder (no adapter_config.json): {adapter_dir}")
    base = Path(base_path) if base_path else resolve_path(json.loads(cfg_file.read_text())["base_model_name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return save_model(merged, tokenizer, out_dir)
