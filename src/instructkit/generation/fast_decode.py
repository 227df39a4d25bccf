"""A lean one-token decode step for Llama-family and Gemma 3 text models, token-identical to transformers' forward.

Why this exists: after the prefill, every generated token costs one forward pass of one token per row. In transformers
that pass is ~20 module calls, a mask builder, a cache object that ``torch.cat``s the whole key/value history every
step, and output dataclasses per layer; on the small models this project runs (SmolLM2-135M, Gemma-3-270M) on 2 CPU
cores that bookkeeping is a sizeable part of a step, and every extra parallel region hurts more when the cores are
shared.
This module runs the same arithmetic with the model's own weight tensors:

- the key/value cache is a preallocated buffer per layer, ``(batch, kv_heads, prompt + max_new_tokens, head_dim)``,
  written in place (no per-step ``torch.cat``, no O(n^2) copying), read through a slice;
- q/k/v are one matmul and gate/up one matmul, against fused weights built once from the model's tensors (bit-identical
  to the separate matmuls: each output element is the same dot product; checked by the tests; with one row, MKL's
  product rounds differently when a weight is not 64-byte aligned, as transformers 5 can leave loaded weights, so
  there the step's logits can differ from the forward's by ~1e-5 while the copies, always aligned, agree with an
  aligned model bit for bit). The fused copies cost
  memory (~2/3 of the transformer body) and are rebuilt when any source weight changes, so an optimiser step between
  two ``generate`` calls (PPO rollouts) is picked up without the trainer knowing this cache exists. Three checks, each
  for a way weights change: the tensor's address and version counter (a replaced tensor, any in-place op); a hook
  torch calls after every optimizer's step (``register_optimizer_step_post_hook``: torch's fused AdamW writes the
  parameters without bumping their version counters); and a sample of each tensor's values (writes through ``.data``,
  FSDP re-gathering into the same storage, which bypass both);
- the attention call is the one transformers' sdpa integration makes, with the same arguments (GQA via
  ``enable_gqa`` without a mask, the packed single-query layout with a boolean padding mask, the same sliding-window
  key range and the same "mask materialised from the window size on" rule for Gemma 3's local layers), so the float
  summation order is unchanged and greedy outputs stay token-identical to ``model.generate``;
- the rotary tables, embeddings (Gemma's scaled embedding included), final norm and output layer are the model's own
  modules, called once per step; the output layer runs on the last position only.

The prefill is not done here: the engine runs it through the model's ordinary forward (one call per batch, identical
by construction) and :meth:`FastDecoder.start` copies that cache into the buffers.

A peft model with plain LoRA adapters on the projections (PPO's policy) runs here too: the base matmuls as above, and
each adapter's ``lora_B(lora_A(x)) * scaling`` added to its projection's output as peft adds it.

Anything else falls back to the ordinary forward (``FastDecoder.build`` returns None and ``unsupported_reason`` says
why): other architectures, other peft methods and LoRA variants (DoRA, merged or disabled adapters, several active
ones, adapters on the embeddings or the output layer), quantised models, module hooks (accelerate offload), non-fp32
weights, biases, attention implementations other than sdpa, logit soft-capping inside attention, bidirectional
attention, dropout in training mode.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_SUPPORTED = ("LlamaForCausalLM", "Gemma3ForCausalLM")
_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, FastDecoder]" = weakref.WeakKeyDictionary()
_OPTIMIZER_HOOK = None  # the handle of _after_optimizer_step, registered when the first decoder is built
_SAMPLES_PER_TENSOR = 16  # values of each source tensor kept as part of its fingerprint


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """Called by torch after any optimizer's ``step``: decoders whose source weights that optimizer holds drop their
    copies (the next ``FastDecoder.build`` rebuilds them). Fused optimizers write parameters without bumping their
    version counters, so the counters alone would miss the update."""
    if not _DECODERS:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for dec in list(_DECODERS.values()):
        if dec._source_ids & stepped:
            dec._fingerprint = None


def _fingerprint(tensors: list[torch.Tensor]) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """What copies of ``tensors`` are valid for: each tensor's (address, version counter), and a strided sample of its
    values (``_SAMPLES_PER_TENSOR`` each, a few microseconds in all) that catches a rewrite the counters miss."""
    with torch.no_grad():
        flat = [t.detach().reshape(-1) for t in tensors]
        values = torch.cat([f[:: max(1, f.numel() // _SAMPLES_PER_TENSOR)].float() for f in flat])
    return [(t.data_ptr(), t._version) for t in tensors], values


def _same_fingerprint(a, b) -> bool:
    return a is not None and b is not None and a[0] == b[0] and torch.equal(a[1], b[1])


def _peft_inner(model):
    """The transformers model inside a peft LoRA wrapper (None when ``model`` is not a peft model)."""
    if type(model).__name__ not in ("PeftModelForCausalLM", "PeftModel"):
        return None
    return model.base_model.model


def _lora_reason(lin) -> str | None:
    """Why a peft LoRA linear layer is outside what the step reproduces (None when it is plain LoRA: one active
    adapter, not merged, no DoRA or other variant, no LoRA bias, dropout inactive, fp32)."""
    if type(lin).__module__ != "peft.tuners.lora.layer" or type(lin).__name__ != "Linear":
        return f"replaced linear layer {type(lin).__name__} (quantised or adapter-wrapped)"
    if type(lin.base_layer) is not torch.nn.Linear:
        return f"LoRA over {type(lin.base_layer).__name__}"
    if lin.merged or lin.disable_adapters:
        return "LoRA adapter merged or disabled"
    if len(lin.active_adapters) != 1 or lin.active_adapters[0] not in lin.lora_A:
        return "not exactly one active LoRA adapter"
    name = lin.active_adapters[0]
    if name in getattr(lin, "lora_variant", {}) or getattr(lin, "use_dora", {}).get(name, False):
        return "LoRA variant (DoRA or other)"
    if lin.lora_A[name].bias is not None or lin.lora_B[name].bias is not None:
        return "LoRA bias"
    if lin.training and not isinstance(lin.lora_dropout[name], torch.nn.Identity):
        return "LoRA dropout in training mode"
    if lin.lora_A[name].weight.dtype != torch.float32 or lin.lora_B[name].weight.dtype != torch.float32:
        return "LoRA weights not float32"
    return None


def _lora(lin):
    """(lora_A, lora_B, scaling) of a LoRA layer's active adapter, or None for a plain nn.Linear."""
    if type(lin) is torch.nn.Linear:
        return None
    name = lin.active_adapters[0]
    return lin.lora_A[name], lin.lora_B[name], lin.scaling[name]


def unsupported_reason(model) -> str | None:
    """Why ``model`` cannot use the lean decode step (None when it can). Every config field the step relies on is
    checked explicitly; an unknown architecture is never guessed at. A peft model with plain LoRA adapters on the
    attention and MLP projections is supported (the adapter's low-rank term is added as peft adds it)."""
    inner = _peft_inner(model)
    if inner is not None:
        if len(getattr(model, "peft_config", {})) != 1 or type(model.peft_config[model.active_adapter]).__name__ \
                != "LoraConfig":
            return "peft model other than a single LoRA adapter"
        model = inner
    name = type(model).__name__
    if name not in _SUPPORTED:
        return f"architecture {name} (supported: {', '.join(_SUPPORTED)})"
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r} (only 'sdpa')"
    projections = set()
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            projections.update(map(id, lin.modules()))  # an adapter's own submodules are judged with its layer
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            return f"module hooks on {type(m).__name__} (offloading or instrumentation)"
        if type(m).__module__.startswith("peft.") and id(m) not in projections:
            return f"peft module {type(m).__name__} outside the attention and MLP projections"
        if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear and not type(m).__module__.startswith(
                "peft."):
            return f"replaced linear layer {type(m).__name__} (quantised or adapter-wrapped)"
    # the step reads these modules' weights directly: each must be a plain nn.Linear or plain LoRA over one (a LoRA
    # layer forwards .weight to its base layer; the step adds the adapter's term itself)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            if type(lin) is not torch.nn.Linear:
                reason = _lora_reason(lin)
                if reason is not None:
                    return reason
    if type(model.lm_head) is not torch.nn.Linear:
        return f"replaced output layer {type(model.lm_head).__name__}"
    for p in model.parameters():
        if p.dtype != torch.float32:
            return f"parameter dtype {p.dtype} (only float32)"
    if model.training and float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout in training mode"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "biases in attention or MLP"
    if name == "LlamaForCausalLM":
        if getattr(cfg, "hidden_act", None) != "silu":
            return f"hidden_act {cfg.hidden_act!r}"
        if getattr(cfg, "pretraining_tp", 1) != 1:
            return "pretraining_tp != 1"
    else:
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            return "attention logit soft-capping"
        if getattr(cfg, "use_bidirectional_attention", False):
            return "bidirectional attention"
        if set(cfg.layer_types) - {"sliding_attention", "full_attention"}:
            return f"layer types {sorted(set(cfg.layer_types))}"
    if model.model.layers[0].self_attn.num_key_value_groups * cfg.num_key_value_heads != cfg.num_attention_heads:
        return "attention heads not a multiple of key/value heads"
    return None


@dataclass
class DecodeState:
    """The key/value buffers of one batch being decoded, and how many columns are filled."""

    keys: list[torch.Tensor]  # per layer (b, kv_heads, capacity, head_dim)
    values: list[torch.Tensor]
    length: int  # filled columns (the same for every row: rows are left-padded)

    def select(self, idx: torch.Tensor) -> None:
        """Keep only the rows ``idx`` (finished rows dropped): one copy of the buffers, as DynamicCache does."""
        self.keys = [k.index_select(0, idx) for k in self.keys]
        self.values = [v.index_select(0, idx) for v in self.values]


class FastDecoder:
    """The decode step for one model. ``FastDecoder.build(model)`` returns None when the model is not supported."""

    def __init__(self, model):
        # a weak reference: decoders are cached in a WeakKeyDictionary keyed by the model, and a strong one from the
        # value would keep every model ever generated from alive
        model = _peft_inner(model) or model  # a LoRA model: the transformers model inside, adapters read per step
        self._model_ref = weakref.ref(model)
        cfg = model.config
        self.gemma = type(model).__name__ == "Gemma3ForCausalLM"
        self.layers = list(model.model.layers[: cfg.num_hidden_layers])
        attn0 = self.layers[0].self_attn
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = attn0.head_dim
        self.n_rep = attn0.num_key_value_groups
        self.scaling = attn0.scaling
        self.eps = cfg.rms_norm_eps
        self.q_dim = self.n_heads * self.head_dim
        self.kv_dim = self.n_kv * self.head_dim
        self.inter = self.layers[0].mlp.gate_proj.weight.shape[0]
        self.act = _plain_activation(self.layers[0].mlp.act_fn)
        if self.gemma:
            self.layer_types = list(cfg.layer_types[: cfg.num_hidden_layers])
            self.window = int(cfg.sliding_window)
            self.final_softcap = cfg.final_logit_softcapping
        else:
            self.layer_types = ["full_attention"] * len(self.layers)
            self.window = None
            self.final_softcap = None
        self._fingerprint: tuple | None = None  # of the source weights the copies were built from (_fingerprint)
        self._source_ids: set[int] = set()  # id() of each source weight, for _after_optimizer_step
        self.use_packed = _mkl_packed_available()
        self._pack_key: tuple[int, int, bool] | None = None  # (rows, threads, exact) the copies in _pack are for
        self._pack: dict[tuple[str, int], tuple[str, torch.Tensor]] = {}  # name -> ("packed" | "transposed", copy)
        self._greedy: tuple | None = None  # (weight key, GreedyHead or None)
        self.refresh()

    @property
    def model(self):
        return self._model_ref()

    @classmethod
    def build(cls, model) -> "FastDecoder | None":
        """The cached decoder of ``model`` (weights refreshed if they changed), or None if the model is unsupported."""
        if unsupported_reason(model) is not None:
            return None
        global _OPTIMIZER_HOOK
        if _OPTIMIZER_HOOK is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            _OPTIMIZER_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)
        dec = _DECODERS.get(model)
        if dec is None:
            dec = _DECODERS[model] = cls(model)
        else:
            dec.refresh()
        return dec

    # ----------------------------------------------------------------------------------------------------------------
    # fused weights
    def _sources(self) -> list[torch.Tensor]:
        out = []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            out += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, m.gate_proj.weight,
                    m.up_proj.weight, m.down_proj.weight]
            if self.gemma:
                out += [a.q_norm.weight, a.k_norm.weight, layer.input_layernorm.weight,
                        layer.post_attention_layernorm.weight, layer.pre_feedforward_layernorm.weight,
                        layer.post_feedforward_layernorm.weight]
        out.append(self.model.lm_head.weight)  # packed too (see prepare)
        return out

    def refresh(self) -> None:
        """(Re)build the fused weights if any source tensor was replaced or modified since the last build (module
        docstring: three checks)."""
        # per layer: projection name -> (lora_A, lora_B, scaling) of the active adapter; looked up on every build
        # (cheap), so switching adapters is picked up; the adapter weights themselves are read at each step
        self.lora: list[dict] = []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            named = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj, "gate": m.gate_proj,
                     "up": m.up_proj, "down": m.down_proj}
            self.lora.append({n: _lora(lin) for n, lin in named.items() if type(lin) is not torch.nn.Linear})
        sources = self._sources()
        fingerprint = _fingerprint(sources)
        if _same_fingerprint(fingerprint, self._fingerprint):
            return
        with torch.no_grad():
            self.qkv, self.gate_up, self.norms, self.plain = [], [], [], []
            for layer in self.layers:
                a, m = layer.self_attn, layer.mlp
                self.qkv.append(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach())
                self.gate_up.append(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach())
                # the tensors each step reads, looked up once: every `layer.mlp.down_proj.weight` is three
                # nn.Module.__getattr__ calls in Python (~10 per layer, ~0.4 ms of a 26 ms SmolLM2 step)
                self.plain.append((a.o_proj.weight, m.down_proj.weight, getattr(layer.input_layernorm, "weight", None),
                                   getattr(layer.post_attention_layernorm, "weight", None)))
                if self.gemma:
                    # Gemma3RMSNorm multiplies by (1 + weight) computed in fp32 every call; precomputing it is exact
                    self.norms.append(tuple(1.0 + n.weight.detach().float() for n in (
                        a.q_norm, a.k_norm, layer.input_layernorm, layer.post_attention_layernorm,
                        layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm)))
        self._fingerprint = fingerprint
        self._source_ids = {id(t) for t in sources}
        self._pack_key, self._pack = None, {}
        self._greedy = None

    # ----------------------------------------------------------------------------------------------------------------
    # MKL packed weights
    def _matrices(self) -> dict[tuple[str, int], torch.Tensor]:
        mats = {("head", 0): self.model.lm_head.weight}
        for i, layer in enumerate(self.layers):
            mats[("qkv", i)] = self.qkv[i]
            mats[("o", i)] = layer.self_attn.o_proj.weight
            mats[("gate_up", i)] = self.gate_up[i]
            mats[("down", i)] = layer.mlp.down_proj.weight
        return mats

    def prepare(self, rows: int, exact: bool = True) -> None:
        """Pack the weights for ``rows`` rows per step, where that is bit-identical to the plain matmul (``exact``), or
        wherever it is within fp32 rounding of it (``exact=False``).

        MKL's packed GEMM (the kernel inductor uses for frozen CPU linears) reorders a weight once into the layout its
        micro-kernel reads, which saves the per-call packing of the weight: 1.3-3x per matmul measured here at 16 rows.
        Whether it sums each dot product in the same order as the plain sgemm depends on the shape, the row count and
        the thread count (at 1 row it never does; at 16 rows and 1 thread it did for every SmolLM2 matrix but not
        Gemma's K = 1024 and 2048 ones). So each (shape, rows, threads) is probed once on random data, and a weight is
        packed only where the probe's outputs are bit-identical to ``F.linear``; elsewhere the plain matmul runs. When
        pruning changes the row count, ``_mkl_linear`` itself falls back to the plain matmul.

        ``exact=False`` is for sampling when no log-probability leaves the engine (PPO rollouts, Self-Instruct): only
        sampled tokens are returned, so a logit may differ from the forward's by the rounding of another summation
        order; every weight is packed whose probe stays within the fp32 worst-case bound of that (``_packed_probe``).
        At 8 rows this packs SmolLM2's gate/up, down and 49,152-row output layer too (the plain sgemm runs them at
        0.61, 0.23 and 15.3 ms per call): a LoRA rollout step 66 -> 48 ms.

        A weight that is not packed is kept transposed (in, out) where ``x @ W^T`` with that contiguous copy is
        bit-identical to ``F.linear`` and faster on the probe (``_transposed_probe``): MKL's sgemm without a transposed
        operand. At 16 rows this holds for gemma-3-270m's o (1024 -> 640) and down (2048 -> 640) projections, whose
        packed products are not exact: 0.23 -> 0.08 and 0.48 -> 0.27 ms per call (weights out of cache)."""
        key = (rows, torch.get_num_threads(), exact)
        if rows < 2 or key == self._pack_key:
            return
        if self.layers[0].mlp.gate_proj.weight.device.type != "cpu":
            return  # both copies are MKL-on-CPU measures (the probes time CPU kernels); a GPU runs the plain matmul
        self._pack, self._pack_key = {}, key  # one row count at a time: the packs are a copy of the weights
        verdict: dict[tuple[int, int], str | None] = {}
        with torch.no_grad():
            for name, w in self._matrices().items():
                shape = tuple(w.shape)
                if shape not in verdict:
                    verdict[shape] = ("packed" if self.use_packed and _packed_probe(shape, rows, exact) else
                                      "transposed" if _transposed_probe(shape, rows) else None)
                if verdict[shape] == "packed":
                    self._pack[name] = ("packed", torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), rows))
                elif verdict[shape] == "transposed":
                    self._pack[name] = ("transposed", w.detach().t().contiguous())

    def _linear(self, x: torch.Tensor, w: torch.Tensor, name: tuple[str, int]) -> torch.Tensor:
        prepared = self._pack.get(name)
        if prepared is None or x.shape[0] != self._pack_key[0]:  # rows pruned since: the plain matmul
            return F.linear(x, w)
        kind, wp = prepared
        if kind == "packed":
            return torch.ops.mkl._mkl_linear(x, wp, w, None, self._pack_key[0])
        return torch.mm(x, wp)

    # ----------------------------------------------------------------------------------------------------------------
    # cache
    def start(self, cache, batch: int, length: int, capacity: int, *, exact: bool = True,
              rows: torch.Tensor | None = None) -> DecodeState:
        """Buffers for ``capacity`` columns holding the prefill's ``cache`` (a transformers DynamicCache of ``length``
        columns; a sliding-window layer may hold only its last window - 1 of them, copied to the same columns).

        ``rows``: (batch,) the cache row each decoding row starts from (rows sharing one prompt share its prefill);
        None: row i is cache row i. ``exact``: see :meth:`prepare`."""
        if capacity - length >= 8:  # enough steps to pay for packing the weights once
            self.prepare(batch, exact)
        keys, values = [], []
        for i, layer_cache in enumerate(cache.layers[: len(self.layers)]):
            k_src, v_src = layer_cache.keys, layer_cache.values
            if rows is not None:
                k_src, v_src = k_src.index_select(0, rows), v_src.index_select(0, rows)
            k = k_src.new_zeros((batch, self.n_kv, capacity, self.head_dim))
            v = v_src.new_zeros((batch, self.n_kv, capacity, self.head_dim))
            n = k_src.shape[2]
            k[:, :, length - n:length] = k_src
            v[:, :, length - n:length] = v_src
            keys.append(k)
            values.append(v)
        return DecodeState(keys, values, length)

    # ----------------------------------------------------------------------------------------------------------------
    # one step
    def _attend(self, q, k_all, v_all, mask_cols, layer_type: str, length: int, masks: dict):
        """sdpa on the cached keys, exactly as transformers' sdpa integration calls it for one query token.

        q: (b, heads, 1, d); k_all/v_all: (b, kv_heads, length, d) views; mask_cols: (b, length) bool or None (no
        padding). Returns (b, heads * d)."""
        b = q.shape[0]
        start = 0
        materialise = False
        if layer_type == "sliding_attention" and length > self.window:
            start = length - self.window  # the cache keeps window - 1 old keys plus the new one
        if layer_type == "sliding_attention" and length >= self.window:
            materialise = True  # masking_utils never skips a local-attention mask from the window size on
        k = k_all[:, :, start:length]
        v = v_all[:, :, start:length]
        mask = masks.get((start, materialise), False)
        if mask is False:  # one mask per distinct key range and step
            mask = None
            if mask_cols is not None:
                cols = mask_cols[:, start:length]
                if materialise or not bool(cols.all()):
                    mask = cols[:, None, None, :]  # (b, 1, 1, kv) shared by all heads
            elif materialise:
                mask = torch.ones((b, 1, 1, length - start), dtype=torch.bool, device=q.device)
            masks[(start, materialise)] = mask
        if self.n_rep > 1 and mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, scale=self.scaling, enable_gqa=True)
        elif self.n_rep > 1:  # transformers' pack_gqa: the query heads of one kv head become a length-n_rep query
            qp = q.reshape(b, self.n_kv, self.n_rep, self.head_dim)
            out = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=self.scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return out.reshape(b, -1)  # (b, heads, 1, d) or (b, kv, n_rep, d) -> (b, heads * d), heads in order

    @staticmethod
    def _rotate(x, cos, sin_signed):
        """transformers' ``x * cos + rotate_half(x) * sin`` with rotate_half(x) = cat(-x2, x1), as
        ``x * cos + cat(x2, x1) * cat(-sin1, sin2)``: (-a) * b and a * (-b) are the same float, so the result is
        bit-identical with one roll instead of two slices, a negation and a concatenation per call."""
        return (x * cos) + (x.roll(x.shape[-1] // 2, -1) * sin_signed)

    def _llama_norm(self, x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _gemma_norm(self, x, one_plus_w):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * one_plus_w

    def _body(self, state: DecodeState, tokens: torch.Tensor, positions: torch.Tensor,
              attn_cols: torch.Tensor | None) -> torch.Tensor:
        """The transformer body for one new token per row: (b, h) final-normed hidden states."""
        model = self.model
        b = tokens.shape[0]
        t = state.length
        length = t + 1
        mask_cols = attn_cols.bool() if attn_cols is not None else None
        masks: dict = {}  # the attention mask of each key range, built once per step
        x = model.model.embed_tokens(tokens[:, None])  # (b, 1, h): scaled for Gemma
        rot = {}
        for lt in set(self.layer_types):
            if self.gemma:
                cos, sin = model.model.rotary_emb(x, positions, lt)
            else:
                cos, sin = model.model.rotary_emb(x, positions)
            half = sin.shape[-1] // 2
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # see _rotate
            rot[lt] = (cos, sin)  # (b, 1, d): broadcast over heads
        x = x[:, 0]  # (b, h)
        qd, kd, d = self.q_dim, self.kv_dim, self.head_dim
        for i, layer in enumerate(self.layers):
            o_w, down_w, in_w, post_w = self.plain[i]
            lt = self.layer_types[i]
            cos, sin = rot[lt]
            if self.gemma:
                n_q, n_k, n_in, n_post_attn, n_pre_ff, n_post_ff = self.norms[i]
                h = self._gemma_norm(x, n_in)
            else:
                h = self._llama_norm(x, in_w)
            qkv = self._linear(h, self.qkv[i], ("qkv", i))  # (b, (heads + 2 kv_heads) * d)
            lora = self.lora[i]
            v = qkv[:, qd + kd:]
            if not self.gemma and "q" not in lora and "k" not in lora:
                # q and k heads are adjacent in the fused output: one rotation for both, (b, heads + kv_heads, d)
                qk = self._rotate(qkv[:, :qd + kd].view(b, -1, d), cos, sin)
                q, k = qk[:, :self.n_heads, None], qk[:, self.n_heads:, None]  # (b, heads, 1, d), (b, kv, 1, d)
                if lora:
                    v = _add_lora(v, h, lora.get("v"))
            else:
                q, k = qkv[:, :qd], qkv[:, qd:qd + kd]
                if lora:
                    q, k, v = (_add_lora(y, h, lora.get(n)) for y, n in ((q, "q"), (k, "k"), (v, "v")))
                q = q.reshape(b, self.n_heads, 1, d)  # (b, heads, 1, d)
                k = k.reshape(b, self.n_kv, 1, d)
                if self.gemma:
                    q = self._gemma_norm(q, n_q)
                    k = self._gemma_norm(k, n_k)
                q = self._rotate(q, cos[:, None], sin[:, None])
                k = self._rotate(k, cos[:, None], sin[:, None])
            v = v.reshape(b, self.n_kv, 1, d)
            state.keys[i][:, :, t:length] = k
            state.values[i][:, :, t:length] = v
            att = self._attend(q, state.keys[i], state.values[i], mask_cols, lt, length, masks)
            o = self._linear(att, o_w, ("o", i))
            if lora:
                o = _add_lora(o, att, lora.get("o"))
            if self.gemma:
                x = x + self._gemma_norm(o, n_post_attn)
                h = self._gemma_norm(x, n_pre_ff)
            else:
                x = x + o
                h = self._llama_norm(x, post_w)
            gu = self._linear(h, self.gate_up[i], ("gate_up", i))  # (b, 2 * intermediate)
            gate, up = gu[:, :self.inter], gu[:, self.inter:]
            if lora:
                gate, up = _add_lora(gate, h, lora.get("gate")), _add_lora(up, h, lora.get("up"))
            m = self.act(gate) * up
            y = self._linear(m, down_w, ("down", i))
            m = _add_lora(y, m, lora.get("down")) if lora else y
            x = x + (self._gemma_norm(m, n_post_ff) if self.gemma else m)
        state.length = length
        return model.model.norm(x)

    def step(self, state: DecodeState, tokens: torch.Tensor, positions: torch.Tensor,
             attn_cols: torch.Tensor | None) -> torch.Tensor:
        """Feed one token per row and return the next-token logits.

        tokens: (b,) ids; positions: (b, 1) position ids; attn_cols: (b, length + 1) 0/1 padding mask including the new
        column, or None when no row is padded. Returns (b, vocab) logits of the new position."""
        x = self._body(state, tokens, positions, attn_cols)
        logits = self._linear(x, self.model.lm_head.weight, ("head", 0))  # (b, V)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def greedy_step(self, state: DecodeState, tokens: torch.Tensor, positions: torch.Tensor,
                    attn_cols: torch.Tensor | None) -> torch.Tensor:
        """Like :meth:`step`, but return the (b,) argmax token ids, the same ids as ``step(...).argmax(-1)``, found
        without computing every logit where :class:`GreedyHead` can (see there)."""
        x = self._body(state, tokens, positions, attn_cols)
        head = self._greedy_head()
        if head is not None:
            ids = head.argmax(x)
            if ids is not None:
                return ids
        logits = self._linear(x, self.model.lm_head.weight, ("head", 0))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.argmax(-1)

    def _greedy_head(self) -> "GreedyHead | None":
        """The output layer's GreedyHead, rebuilt when the weight changed; None where it cannot be exact (soft-capped
        logits: tanh can map two different logits to one float, so the argmax of the capped logits is not always the
        argmax of the raw ones) or its probe failed."""
        if self.final_softcap is not None:
            return None
        w = self.model.lm_head.weight
        key = (w.data_ptr(), w._version)  # the head probes each thread count itself; its copies stay valid
        if self._greedy is None or self._greedy[0] != key:
            self._greedy = (key, GreedyHead.build(w.detach()))
        return self._greedy[1]


def _plain_activation(act):
    """The functional form of a model's MLP activation module when it gives bit-identical outputs on a probe (one
    call instead of a module call per layer and step), else the module itself."""
    probe = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        ref = act(probe)
        for fn in (F.silu, lambda t: F.gelu(t, approximate="tanh"), F.gelu):
            if torch.equal(fn(probe), ref):
                return fn
    return act


def _add_lora(y: torch.Tensor, x: torch.Tensor, lora) -> torch.Tensor:
    """y + lora_B(lora_A(x)) * scaling, the expression peft's LoRA Linear evaluates (dropout is inactive here), so the
    sum is bit-identical to the peft model's; y unchanged without an adapter."""
    if lora is None:
        return y
    a, b, scaling = lora
    return y + F.linear(F.linear(x, a.weight), b.weight) * scaling


def _mkl_packed_available() -> bool:
    try:
        return bool(torch.backends.mkl.is_available()) and hasattr(torch.ops.mkl, "_mkl_linear")
    except (AttributeError, RuntimeError):
        return False


_EXACT: dict[tuple, bool] = {}


def _transposed_probe(shape: tuple[int, int], rows: int) -> bool:
    """Whether ``x @ Wt`` with Wt = W^T made contiguous gives bit-identical outputs to ``F.linear(x, W)`` for a
    (out, in) weight and ``rows`` input rows at the current thread count (two random probes), and is faster (median of
    15 calls each, by 10%). Timing decides only whether the copy is used, never a result."""
    key = (shape, rows, torch.get_num_threads(), "transposed")
    if key not in _EXACT:
        g = torch.Generator().manual_seed(1)
        w = torch.randn(shape, generator=g)
        wt = w.t().contiguous()
        xs = [torch.randn((rows, shape[1]), generator=g) for _ in range(2)]
        ok = all(torch.equal(torch.mm(x, wt), F.linear(x, w)) for x in xs)
        if ok:
            def median_s(fn):
                ts = []
                for _ in range(15):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                return sorted(ts)[7]
            x = xs[0]
            ok = median_s(lambda: torch.mm(x, wt)) < 0.9 * median_s(lambda: F.linear(x, w))
        _EXACT[key] = ok
    return _EXACT[key]


def _packed_probe(shape: tuple[int, int], rows: int, exact: bool = True) -> bool:
    """Whether MKL's packed matmul may replace ``F.linear`` for a (out, in) weight and ``rows`` input rows at the
    current thread count. ``exact``: its outputs are bit-identical (a different summation order shows up in almost
    every one of the rows x out outputs of a random probe). Otherwise: every output is within the worst-case bound
    of two fp32 summations of the same K products in any order, |a - b| <= 2 * gamma_K * sum_k |x_k w_k| with
    gamma_K = K u / (1 - K u) and u = 2^-24 (Higham, Accuracy and Stability, 3.1), i.e. at most 1.01 * K * 2^-23 *
    sum_k |x_k w_k| for K u < 0.005; a kernel that computes something else fails it. Two probes are run."""
    key = (shape, rows, torch.get_num_threads(), exact)
    if key not in _EXACT:
        g = torch.Generator().manual_seed(0)
        ok = True
        try:
            w = torch.randn(shape, generator=g)
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
            for _ in range(2):
                x = torch.randn((rows, shape[1]), generator=g)
                got, ref = torch.ops.mkl._mkl_linear(x, packed, w, None, rows), F.linear(x, w)
                if exact:
                    ok = ok and torch.equal(got, ref)
                else:
                    bound = 1.01 * shape[1] * 2.0**-23 * F.linear(x.abs(), w.abs())
                    ok = ok and bool(((got - ref).abs() <= bound).all())
        except RuntimeError:
            ok = False
        _EXACT[key] = ok
    return _EXACT[key]


class GreedyHead:
    """The argmax of ``F.linear(x, W)`` over the vocabulary, identical to it, from a cheap low-precision pass plus an
    exact recomputation of the few rows that can win.

    Why (this project's own): greedy decoding needs only the argmax, and the output layer is the largest matmul of a
    decode step (Gemma-3-270m: 262,144 x 640, 671 MB of fp32 read per step, half of it). So:

    1. approximate logits a_i from a low-precision copy W^ of W: int8 with one scale per row
       (``_weight_int8pack_mm``, a quarter of the bytes) for a single input row, bf16 (``F.linear`` in bf16, fp32
       accumulation, bf16 output) for several;
    2. a bound E_i on |a_i - z_i|, z_i the exact fp32 logit ``F.linear(x, W)_i``, for every vocabulary entry i of an
       input row x. With x^ = bf16(x), dx = x - x^ and dw_i = w_i - w^_i (both exact in fp32), the triangle inequality
       over z_i -> x.w_i -> x^.w^_i -> the kernel's fp32 sum s_i -> a_i = bf16(s_i) gives

           E_i = 1.25 * ( ||x|| (||dw_i|| + g ||w_i||)  +  (||dx|| + g' ||x^||) ||w^_i||  +  u / (1 - u) |a_i| )

       - ||x|| g ||w_i||: the fp32 dot product's own rounding, |z_i - x.w_i| <= g sum_j |x_j w_ij| (any summation
         order, FMA or not; g = K 2^-24 / (1 - K 2^-24)), then Cauchy-Schwarz;
       - ||x|| ||dw_i|| + ||dx|| ||w^_i||: x.w_i - x^.w^_i = x.dw_i + dx.w^_i, Cauchy-Schwarz on each;
       - g' ||x^|| ||w^_i||: the kernel sums exact products (bf16 x bf16, or bf16 x int8) in fp32; for int8 the row
         scale multiplies once more, so g' = (K + 1) 2^-24 / (1 - (K + 1) 2^-24);
       - u / (1 - u) |a_i|: rounding the sum to bf16 (u = 2^-8) moves it by at most u |s_i| <= u |a_i| / (1 - u);
       - 1.25: a margin that also covers the fp32 rounding of computing E and a_i +- E_i.

       The row norms ||dw_i||, ||w_i||, ||w^_i|| are measured once when the copy is built. Per entry and per row
       this is tight where a worst case over the whole layer is not: on SmolLM2's 49,152 x 576 layer at 16 rows the
       candidates of step 3 went from 5,000-17,000 (a single bound from the largest row norm and the largest int8
       error, the first version) to 20-55, and at one row from 130-6,600 to 1-13; the measured error stays below a
       quarter of E.
    3. entry i is a candidate when a_i + E_i >= max_k (a_k - E_k); every other entry is provably below the true
       maximum (ties with it included, so argmax's first-index rule is kept);
    4. the candidates' exact logits: ``F.linear(x, W[candidates])`` over the sorted candidate rows, padded to a
       multiple of 64. Each column is then the same dot product as in the full matmul (at other row counts MKL splits
       some of them differently: measured), and :meth:`_exact_for` probes that on this weight, this input row count
       and this thread count, together with the bound, before the head is used.

    The argmax of the candidates' exact logits is the full argmax. When the approximation is not finite, or more than
    an eighth of the vocabulary are candidates (a flat distribution), :meth:`argmax` returns None and the caller
    computes every logit. The head times itself: after 16 calls at one input row count, if its calls (plus the full
    matmul after each None) took longer on average than the full matmul took in the probe, it stops trying at that row
    count. Timing decides only which path runs, never the result.
    """

    PAD = 64
    U = 2.0 ** -8

    def __init__(self, weight: torch.Tensor):
        self.w = weight  # (V, K) fp32, the model's tensor (not copied)
        V, K = weight.shape
        self.g = K * 2.0 ** -24 / (1 - K * 2.0 ** -24)
        self.g1 = (K + 1) * 2.0 ** -24 / (1 - (K + 1) * 2.0 ** -24)
        self.max_candidates = max(4 * self.PAD, V // 8)
        # rows -> (fn x -> approximate logits, (V,) ||dw_i|| + g ||w_i||, (V,) ||w^_i||), built on first use
        self._bf16: tuple | None = None
        self._int8: tuple | None = None
        self._exact: dict[tuple[int, int], bool] = {}
        self._tries: dict[int, list] = {}  # rows -> [calls, calls that returned None, seconds spent]
        self._full_s: dict[tuple[int, int], float] = {}  # (rows, threads) -> seconds of the full matmul (probe)

    @classmethod
    def build(cls, weight: torch.Tensor) -> "GreedyHead | None":
        if (weight.dtype != torch.float32 or weight.dim() != 2 or not weight.is_contiguous()
                or weight.device.type != "cpu"):
            return None
        return cls(weight)

    def _row_norms(self, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(||w_i - w^_i|| + g ||w_i||, ||w^_i||) for a low-precision copy dequantised to fp32 (``low``, exact)."""
        return (self.w - low).norm(dim=1) + self.g * self.w.norm(dim=1), low.norm(dim=1)

    def _low(self, rows: int) -> tuple:
        """The low-precision copy used for ``rows`` input rows, built on first use: (fn x -> approximate logits,
        (V,) ||dw_i|| + g ||w_i||, (V,) ||w^_i||), the per-row terms of the bound."""
        if rows == 1 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            if self._int8 is None:
                s = self.w.abs().amax(dim=1) / 127
                s = (s * (1 + 2.0 ** -7)).clamp_min(1e-30).to(torch.bfloat16)  # rounded up: no |w / s| above 127
                q = torch.round(self.w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
                deq = q.float() * s.float()[:, None]  # exact in fp32 (7-bit times 8-bit significands)
                self._int8 = ((lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, s)),
                              *self._row_norms(deq))
                del deq
            return self._int8
        if self._bf16 is None:
            wb = self.w.to(torch.bfloat16)
            norms = self._row_norms(wb.float())
            fn = lambda x: F.linear(x.to(torch.bfloat16), wb)  # noqa: E731
            try:  # oneDNN's blocked layout, reordered once rather than on every call: SmolLM2's head at 16 rows,
                # weights out of cache, 4.2 -> 3.2 ms (fp32: 9.1). Any fp32 summation order satisfies the bound.
                wp = torch.ops.mkldnn._reorder_linear_weight(wb, rows)
                fn = lambda x: torch.ops.mkldnn._linear_pointwise(  # noqa: E731
                    x.to(torch.bfloat16), wp, None, "none", [None], "")
            except (AttributeError, RuntimeError):  # a torch build without oneDNN: the plain bf16 matmul
                pass
            self._bf16 = (fn, *norms)
        return self._bf16

    def _bound(self, x: torch.Tensor, approx: torch.Tensor, low: tuple) -> torch.Tensor:
        """E of the docstring, (b, V): x (b, K) fp32 inputs, approx (b, V) their approximate logits in fp32, ``low``
        what :meth:`_low` returned for them."""
        _, dw, wn = low
        xb = x.to(torch.bfloat16).float()
        e = approx.abs().mul_(self.U / (1 - self.U))
        e.addcmul_(x.norm(dim=1, keepdim=True), dw)
        e.addcmul_((x - xb).norm(dim=1, keepdim=True) + self.g1 * xb.norm(dim=1, keepdim=True), wn)
        return e.mul_(1.25)

    def _exact_for(self, rows: int) -> bool:
        """Probe once per (rows, threads): on random inputs the bound holds for every entry, and the padded
        candidate matmul gives the same bits as the full one for several candidate counts."""
        key = (rows, torch.get_num_threads())
        if key not in self._exact:
            gen = torch.Generator().manual_seed(0)
            ok = True
            try:
                with torch.no_grad():
                    low = self._low(rows)
                    for _ in range(2):
                        x = torch.randn((rows, self.w.shape[1]), generator=gen)
                        t0 = time.perf_counter()
                        full = F.linear(x, self.w)
                        self._full_s[key] = time.perf_counter() - t0  # the second (warm) one is kept
                        approx = low[0](x).float()
                        ok = ok and bool(((approx - full).abs() <= self._bound(x, approx, low)).all())
                        for n in (self.PAD, 3 * self.PAD, 16 * self.PAD):
                            idx = torch.randint(0, self.w.shape[0], (n,), generator=gen).sort().values
                            ok = ok and torch.equal(F.linear(x, self.w.index_select(0, idx)), full[:, idx])
            except RuntimeError:  # a kernel missing from this torch build
                ok = False
            self._exact[key] = ok
        return self._exact[key]

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """x: (b, K) fp32 final hidden states -> (b,) the ids ``F.linear(x, W).argmax(-1)`` gives, or None."""
        b = x.shape[0]
        if not self._exact_for(b):
            return None
        full_s = self._full_s[(b, torch.get_num_threads())]
        tries = self._tries.setdefault(b, [0, 0, 0.0])
        if tries[0] >= 16 and tries[2] / tries[0] >= full_s:
            return None  # slower than computing every logit here
        t0 = time.perf_counter()
        ids = self._argmax(x)
        tries[0] += 1
        tries[1] += ids is None
        tries[2] += time.perf_counter() - t0 + (full_s if ids is None else 0.0)
        return ids

    def _argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        b = x.shape[0]
        low = self._low(b)
        f = low[0](x).float()  # (b, V), exact conversion; fp32 reductions run several times faster than bf16 ones
        e = self._bound(x, f, low)  # (b, V)
        thr = (f - e).amax(dim=1, keepdim=True)  # (b, 1): below every row's true maximum
        if not bool(torch.isfinite(thr).all()):
            return None
        margin = e.add_(f).sub_(thr)  # >= 0 where a_i + E_i >= thr
        # a column is a candidate when it is one for any row (amax over rows: much faster than a bool .any)
        col = margin.amax(dim=0) if b > 1 else margin[0]
        idx = (col >= 0).nonzero()[:, 0]  # sorted candidate rows of W
        n = idx.numel()
        if n == 0 or n > self.max_candidates:
            return None
        pad = -n % self.PAD
        if pad:  # repeats of the first candidate after the end: argmax's first occurrence stays the original
            idx = torch.cat([idx, idx[:1].expand(pad)])
        exact = F.linear(x, self.w.index_select(0, idx))  # (b, n + pad)
        return idx[exact.argmax(dim=1)]
