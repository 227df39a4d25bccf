"""The lean decode step (generation/fast_decode.py): bit-identical logits to transformers' forward, token-identical
greedy generation, weight changes picked up, and a fallback for every model it does not support.

Bit-identical (torch.equal), not "close": the step makes the same float operations in the same order as the model's
forward (the fused q/k/v and gate/up matmuls compute each output element as the same dot product), so any difference
at all means the step drifted from the model, and greedy generation would sooner or later pick another token.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from instructkit.generation.engine import Engine, SamplingParams  # noqa: E402
from instructkit.generation.fast_decode import FastDecoder, unsupported_reason  # noqa: E402

TEXTS = ["Give three tips for staying healthy.", "What is the capital", "Hello",
         "Summarize the following text in one sentence. The report describes how the team"]


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tok


def _tiny_gemma3(sliding_window: int = 5, final_softcap: float | None = 30.0, seed: int = 0):
    """A 4-layer Gemma 3 text model from config: local, local, global, local layers with a window of a few tokens so
    that decoding runs past it; qk-norm, scaled embeddings, four norms per layer and GQA (4 query heads, 1 kv head) as
    in gemma-3-270m. Norm weights are randomised (Gemma initialises them to 0, i.e. scale 1) so they matter."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=sliding_window, final_logit_softcapping=final_softcap,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                        "sliding_attention"],
                           max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.1)  # larger than the default init so logits are not all near-ties
    return model


def _padded(prompts: list[list[int]], pad: int):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, attn


def _compare_steps(model, prompts, pad, steps, use_mask=True, exact=True):
    """Teacher-forced decoding of random tokens through (a) the model's forward with a DynamicCache, as the engine's
    generic path and generate do, (b) FastDecoder from the same prefill. Returns the per-step logits pairs."""
    from transformers import DynamicCache

    ids, attn = _padded(prompts, pad)
    padded = bool((attn == 0).any()) and use_mask
    pos = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
    g = torch.Generator().manual_seed(1)
    feed = torch.randint(3, model.config.vocab_size, (steps, len(prompts)), generator=g)
    dec = FastDecoder.build(model)
    assert dec is not None
    pairs = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=attn if padded else None, position_ids=pos, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        state = dec.start(cache, ids.shape[0], ids.shape[1], ids.shape[1] + steps, exact=exact)
        last, mask = pos[:, -1:], attn
        for s in range(steps):
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            last = last + 1
            ref = model(input_ids=feed[s][:, None], attention_mask=mask if padded else None, position_ids=last,
                        past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            ours = dec.step(state, feed[s], last, mask if padded else None)
            pairs.append((ours, ref))
    return pairs


def test_llama_step_logits_bit_identical_to_forward_padded_batch(llama):
    model, tok = llama
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    pairs = _compare_steps(model, prompts, tok.pad_token_id, steps=12)
    for s, (ours, ref) in enumerate(pairs):
        assert ours.shape == ref.shape == (4, model.config.vocab_size)
        assert torch.equal(ours, ref), f"step {s}: max diff {(ours - ref).abs().max().item()}"


def test_llama_step_logits_bit_identical_without_padding(llama):
    model, tok = llama
    ids = tok(TEXTS[0])["input_ids"]
    for ours, ref in _compare_steps(model, [ids, ids[::-1]], tok.pad_token_id, steps=6):
        assert torch.equal(ours, ref)


def test_gemma3_step_logits_bit_identical_past_the_sliding_window():
    """Window 5, prompts of 3-9 tokens plus 12 steps: local layers run below, at and past the window (where
    transformers keeps window - 1 old keys and materialises a mask even without padding), with and without padding;
    the global layer sees everything; final-logit soft-capping on."""
    model = _tiny_gemma3()
    assert unsupported_reason(model) is None
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24]]
    for ours, ref in _compare_steps(model, prompts, 0, steps=12):
        assert torch.equal(ours, ref)
    for ours, ref in _compare_steps(model, [prompts[1], prompts[1][::-1]], 0, steps=8):  # no padding
        assert torch.equal(ours, ref)


def _hf_greedy_rows(model, prompts, pad, max_new_tokens, eos):
    ids, attn = _padded(prompts, pad)
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad)
    rows = []
    for r in out[:, ids.shape[1]:].tolist():
        cut = next((j + 1 for j, t in enumerate(r) if t in eos), None)
        rows.append(r[:cut] if cut is not None else r)
    return rows


class _Tok:
    """The two attributes the engine reads from a tokenizer, for a model without one."""

    pad_token_id = 0
    eos_token_id = 1

    def decode(self, ids, **kw):
        return " ".join(map(str, ids))


def test_gemma3_greedy_generation_identical_to_generate():
    model = _tiny_gemma3()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24], [30]]
    free = Engine(model, _Tok()).generate(prompts, SamplingParams(max_new_tokens=16, stop_token_ids=[]))
    # a stop token the model emits mid-way in some rows, so rows finish at different steps and get pruned
    stop = free[0].token_ids[5]
    refs = _hf_greedy_rows(model, prompts, 0, 16, [stop])
    eng = Engine(model, _Tok())
    ours = eng.generate(prompts, SamplingParams(max_new_tokens=16, stop_token_ids=[stop]))
    assert [o.token_ids for o in ours] == refs
    assert FastDecoder.build(model) is not None  # the fast path was the one used
    slow = Engine(model, _Tok(), fast=False).generate(prompts, SamplingParams(max_new_tokens=16, stop_token_ids=[stop]))
    assert [o.token_ids for o in slow] == refs


def test_gemma3_greedy_without_logprobs_identical_to_generate():
    """logprobs=False: the step returns each argmax through GreedyHead (no soft-capping here, so it is on); the
    tokens must equal generate's, with rows finishing at different steps."""
    model = _tiny_gemma3(final_softcap=None, seed=3)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24], [30]]
    free = Engine(model, _Tok()).generate(prompts, SamplingParams(max_new_tokens=16, stop_token_ids=[]))
    stop = free[1].token_ids[4]
    p = SamplingParams(max_new_tokens=16, stop_token_ids=[stop], logprobs=False)
    ours = Engine(model, _Tok()).generate(prompts, p)
    assert [o.token_ids for o in ours] == _hf_greedy_rows(model, prompts, 0, 16, [stop])
    assert all(o.logprobs == [] for o in ours)
    head = FastDecoder.build(model)._greedy_head()
    assert head is not None and head._tries and all(t[0] > 0 and t[1] == 0 for t in head._tries.values())


def _greedy_head_case(rows: int, seed: int):
    from instructkit.generation.fast_decode import GreedyHead

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4096, 96, generator=g) / 10
    x = torch.randn(rows, 96, generator=g) * 3
    w[1000] = w[2000] = x[-1] / x[-1].norm()  # an exact tie for the last row (argmax: first index)
    if rows > 1:
        w[7] = 1.2 * x[0] / x[0].norm()  # a clear winner for row 0
    return GreedyHead.build(w), w, x


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_greedy_head_argmax_equals_full_argmax(rows):
    """Against the full matmul's argmax, ties included; one row goes through the int8 copy, several through bf16.
    The bound each path uses must hold for every entry (checked here, not only in the head's own probe)."""
    for seed in range(3):
        head, w, x = _greedy_head_case(rows, seed)
        full = torch.nn.functional.linear(x, w)
        ids = head.argmax(x)
        assert ids is not None
        assert torch.equal(ids, full.argmax(-1))
        assert int(ids[-1]) == 1000 and (rows == 1 or int(ids[0]) == 7)
        low = head._low(rows)
        approx = low[0](x).float()
        err = (approx - full).abs()
        bound = head._bound(x, approx, low)
        assert bool((err <= bound).all())
        assert bool((err > 0).any())  # the approximation is really approximate
        # per entry, not a worst case over the layer: a handful of candidates per row, not thousands
        thr = (approx - bound).amax(dim=1, keepdim=True)
        assert int(((approx + bound) >= thr).sum()) <= 4 * rows + 2  # the tie adds one


def test_greedy_head_gives_up_where_it_cannot_help():
    """Non-finite inputs and flat distributions return None (the caller computes all logits); after 16 calls at one
    row count that cost more than the full matmul (every one returned None here) the head stops computing its
    approximation there."""
    from instructkit.generation.fast_decode import GreedyHead

    head, w, x = _greedy_head_case(2, 0)
    bad = x.clone()
    bad[0, 3] = float("nan")
    assert head.argmax(bad) is None
    flat = GreedyHead.build(torch.ones(4096, 96) + torch.randn(4096, 96) * 1e-4)
    calls = []
    low = flat._low
    flat._low = lambda rows: (calls.append(rows), low(rows))[1]
    for _ in range(20):
        assert flat.argmax(torch.randn(2, 96)) is None
    assert flat._tries[2][:2] == [16, 16]
    assert len([c for c in calls if c == 2]) == 16 + 1  # 16 tries plus the probe, none after giving up
    assert GreedyHead.build(w.double()) is None


def test_llama_fast_and_generic_paths_agree_on_sampling_and_logprobs(llama):
    """Sampling draws from the same logits in both paths, so seeded samples and their log-probs are equal too."""
    model, tok = llama
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    p = SamplingParams(max_new_tokens=15, temperature=1.0, top_p=0.9, seed=4, repetition_penalty=1.2)
    fast = Engine(model, tok).generate(prompts, p)
    slow = Engine(model, tok, fast=False).generate(prompts, p)
    assert [o.token_ids for o in fast] == [o.token_ids for o in slow]
    assert [o.logprobs for o in fast] == [o.logprobs for o in slow]


def test_weight_updates_between_calls_are_used(llama):
    """PPO updates the policy in place between rollouts: the fused weights must follow (tensor version counters)."""
    model, tok = llama
    import copy

    model = copy.deepcopy(model)
    ids = tok(TEXTS[0])["input_ids"]
    eng = Engine(model, tok)
    before = eng.generate([ids], SamplingParams(max_new_tokens=20))[0].token_ids
    dec = FastDecoder.build(model)
    fused_before = dec.qkv[0].clone()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(3.0)
            layer.mlp.up_proj.weight.add_(0.05)
    after = eng.generate([ids], SamplingParams(max_new_tokens=20))[0].token_ids
    assert not torch.equal(FastDecoder.build(model).qkv[0], fused_before)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                         eos_token_id=[tok.eos_token_id])[0, len(ids):].tolist()
    assert after == ref
    assert after != before  # the change mattered on this prompt


def test_updates_by_the_projects_optimizer_step_are_used(llama):
    """The same through training/loop.optimizer_step, which knows nothing of the decode step: its fused AdamW writes
    parameters without bumping their version counters; the decoder's optimizer hook sees the step."""
    import copy

    from instructkit.config import TrainConfig
    from instructkit.training import loop

    model, tok = llama
    model = copy.deepcopy(model)
    ids = tok(TEXTS[0])["input_ids"]
    eng = Engine(model, tok)
    before = eng.generate([ids], SamplingParams(max_new_tokens=20))[0].token_ids
    fused_before = FastDecoder.build(model).qkv[0].clone()
    cfg = TrainConfig(lr=0.05, schedule="constant", warmup_steps=0)
    opt = loop.build_optimizer(model, cfg)
    batch = {"ids": torch.tensor([ids])}

    def loss_fn(m, b):
        return -m(input_ids=b["ids"]).logits[0, :, 7].sum(), torch.tensor(len(ids))

    loop.optimizer_step(model, opt, loop.build_scheduler(opt, cfg, 1), [batch], loss_fn, lambda b: len(ids))
    model.eval()
    after = eng.generate([ids], SamplingParams(max_new_tokens=20))[0].token_ids
    assert not torch.equal(FastDecoder.build(model).qkv[0], fused_before)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                         eos_token_id=[tok.eos_token_id])[0, len(ids):].tolist()
    assert after == ref
    assert after != before


@pytest.mark.parametrize("write", ["fused_adamw", "storage_view"])
def test_a_cached_decoder_sees_writes_that_bypass_version_counters(llama, write):
    """Writes that leave the version counters alone: a fused optimizer's step (seen by the optimizer hook) and a write
    through another view of the storage (seen by the sampled values). The next generate call must decode with the new weights, equal to
    ``model.generate`` after the write, and the fused copies must have been rebuilt."""
    import copy

    model, tok = llama
    model = copy.deepcopy(model)
    ids = tok(TEXTS[0])["input_ids"]
    eng = Engine(model, tok)
    before = eng.generate([ids], SamplingParams(max_new_tokens=20))[0].token_ids
    dec = FastDecoder.build(model)
    fused_before = dec.qkv[0].clone()
    versions = [p._version for p in model.parameters()]
    if write == "fused_adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
        model.train()
        (-model(input_ids=torch.tensor([ids])).logits[0, :, 7].sum()).backward()
        opt.step()
        model.eval()
        assert dec._fingerprint is None  # the optimizer hook dropped the copies at once
    else:  # through another view of the storage, as FSDP's all-gather refills gathered weights
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.detach().numpy()[:] *= 3.0
            layer.mlp.up_proj.weight.detach().numpy()[:] += 0.05
    assert [p._version for p in model.parameters()] == versions  # the write bypassed the counters
    after = eng.generate([ids], SamplingParams(max_new_tokens=20))[0].token_ids
    assert FastDecoder.build(model) is dec and not torch.equal(dec.qkv[0], fused_before)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                         eos_token_id=[tok.eos_token_id])[0, len(ids):].tolist()
    assert after == ref
    assert after != before  # the change mattered on this prompt


def test_an_unrelated_optimizer_step_keeps_the_copies(llama):
    """The hook drops only the copies of the model whose weights were stepped."""
    model, tok = llama
    dec = FastDecoder.build(model)
    qkv = dec.qkv[0]
    other = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(other.parameters(), lr=0.1, fused=True)
    other(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert FastDecoder.build(model).qkv[0] is qkv


def test_unsupported_models_fall_back(llama):
    model, tok = llama
    import copy

    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="eager")
    assert "attention implementation" in unsupported_reason(eager)
    assert FastDecoder.build(eager) is None
    hooked = copy.deepcopy(model)
    h = hooked.model.layers[0].register_forward_hook(lambda *a: None)
    assert "hooks" in unsupported_reason(hooked)
    h.remove()
    assert unsupported_reason(hooked) is None
    half = copy.deepcopy(model).to(torch.float64)
    assert "dtype" in unsupported_reason(half)

    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    assert "variant" in unsupported_reason(dora)
    on_head = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert "outside the attention and MLP projections" in unsupported_reason(on_head)
    lora = _lora_model(model, ["q_proj", "v_proj"])
    with lora.disable_adapter():
        assert "disabled" in unsupported_reason(lora)
    assert unsupported_reason(lora) is None
    lora.train()
    assert "LoRA dropout in training mode" in unsupported_reason(lora)
    lora.eval()
    # the engine generates through the fallback identical to generate
    ids = tok(TEXTS[1])["input_ids"]
    ours = Engine(dora, tok).generate([ids], SamplingParams(max_new_tokens=10))[0].token_ids
    ref = dora.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref


def _lora_model(model, targets):
    """A peft LoRA model over a copy of ``model`` with random, non-zero adapters (B starts at zero in peft, which
    would make the adapter term vanish), dropout 0.1 (inactive in eval mode)."""
    import copy

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                           target_modules=targets))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return lora.eval()


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]])
def test_lora_step_bit_identical_to_peft_forward(llama, targets):
    """PPO's policy is a peft LoRA model: the step adds each adapter's term as peft does, so the logits are
    bit-identical to the peft model's forward (padded batch), sampling and greedy generation equal generate's, and
    an adapter update between calls is used."""
    model, tok = llama
    lora = _lora_model(model, targets)
    assert unsupported_reason(lora) is None
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    for s, (ours, ref) in enumerate(_compare_steps(lora, prompts, tok.pad_token_id, steps=8)):
        assert torch.equal(ours, ref), f"step {s}: max diff {(ours - ref).abs().max().item()}"
    assert FastDecoder.build(lora).lora[0]
    eng = Engine(lora, tok)
    p = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, logprobs=True)
    assert [o.token_ids for o in eng.generate(prompts, p)] == \
        [o.token_ids for o in Engine(lora, tok, fast=False).generate(prompts, p)]
    before = eng.generate(prompts[:1], SamplingParams(max_new_tokens=10))[0].token_ids
    with torch.no_grad():
        for n, prm in lora.named_parameters():
            if "lora_A" in n:
                prm.mul_(-2.0)
    after = eng.generate(prompts[:1], SamplingParams(max_new_tokens=10, logprobs=False))[0].token_ids
    ids = torch.tensor(prompts[:1])
    assert after == lora.generate(input_ids=ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert after != before


def test_packed_weights_only_where_bit_identical_and_step_stays_identical(llama):
    """16 rows: the packed MKL path is probed per weight shape and used only where bit-identical; the step's logits
    must still equal the forward's, also after rows are pruned to 11 (``_mkl_linear`` then runs the plain matmul)."""
    from instructkit.generation import fast_decode

    model, tok = llama
    base = [tok(t)["input_ids"] for t in TEXTS]
    prompts = [base[i % 4][: 3 + i % 5] + [10 + i] for i in range(16)]
    for ours, ref in _compare_steps(model, prompts, tok.pad_token_id, steps=9):
        assert torch.equal(ours, ref)
    dec = FastDecoder.build(model)
    threads = torch.get_num_threads()
    verdicts = {k: v for k, v in fast_decode._EXACT.items() if k[1] == 16 and k[2] == threads}
    assert verdicts  # the probes ran for the 16-row batch
    shapes = {kind: {tuple(dec._matrices()[n].shape) for n, (k, _) in dec._pack.items() if k == kind}
              for kind in ("packed", "transposed")}
    packed_ok = {k[0] for k, ok in verdicts.items() if ok and k[3] is True} if dec.use_packed else set()
    assert shapes["packed"] == packed_ok
    assert shapes["transposed"] == {k[0] for k, ok in verdicts.items() if ok and k[3] == "transposed"} - packed_ok
    eng = Engine(model, tok)
    counts: dict[int, int] = {}
    free = eng.generate(prompts, SamplingParams(max_new_tokens=12))
    for o in free:
        for t in set(o.token_ids[1:6]):
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=lambda t: (counts[t] < 10, counts[t]))  # ends some rows early: pruning to fewer rows
    ours = eng.generate(prompts, SamplingParams(max_new_tokens=12, stop_token_ids=[stop]))
    assert [o.token_ids for o in ours] == _hf_greedy_rows(model, prompts, tok.pad_token_id, 12, [stop])
    assert any(o.finish_reason == "stop" for o in ours) and any(o.finish_reason == "length" for o in ours)


def test_packed_probe_rejects_a_different_summation_order():
    """At one row MKL's packed kernel sums in another order than the plain sgemv (seen on every shape here), and the
    probe must say so; a shape it accepts must then be bit-identical on fresh data."""
    from instructkit.generation import fast_decode

    if not fast_decode._mkl_packed_available():
        pytest.skip("torch built without MKL")
    assert fast_decode._packed_probe((3072, 576), 1) is False
    for rows in (4, 16, 32):
        if fast_decode._packed_probe((960, 576), rows):
            w, x = torch.randn(960, 576), torch.randn(rows, 576)
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
            assert torch.equal(torch.ops.mkl._mkl_linear(x, packed, w, None, rows), torch.nn.functional.linear(x, w))


def test_sampling_without_logprobs_packs_every_weight_within_rounding(llama, monkeypatch):
    """exact=False (sampling, no log-probs returned): every weight whose packed product passes the rounding-bound
    probe is packed, and the step's logits stay within fp32 rounding of the forward's; a kernel that computes
    something else than the product fails the probe."""
    from instructkit.generation import fast_decode

    if not fast_decode._mkl_packed_available():
        pytest.skip("torch built without MKL")
    model, tok = llama
    base = [tok(t)["input_ids"] for t in TEXTS]
    prompts = [base[i % 4][: 3 + i % 5] + [10 + i] for i in range(8)]
    for ours, ref in _compare_steps(model, prompts, tok.pad_token_id, steps=9, exact=False):
        assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
    dec = FastDecoder.build(model)
    assert dec._pack_key == (8, torch.get_num_threads(), False)
    assert set(dec._pack) == set(dec._matrices())  # all of them, the output layer too

    # the bound: |packed - plain| <= K 2^-23 sum_k |x_k w_k| holds on fresh data, and a kernel off by 1e-3 fails it
    w, x = torch.randn(96, 1000), torch.randn(8, 1000)
    got = torch.ops.mkl._mkl_linear(x, torch.ops.mkl._mkl_reorder_linear_weight(w, 8), w, None, 8)
    assert ((got - x @ w.T).abs() <= 1000 * 2.0**-23 * (x.abs() @ w.abs().T)).all()
    real = torch.ops.mkl._mkl_linear
    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", lambda *a: real(*a) * (1 + 1e-3))
    assert fast_decode._packed_probe((96, 1000), 8, exact=False) is False


def test_transposed_probe_accepts_only_bit_identical_products():
    """A weight kept transposed is used only where ``x @ W^T`` (contiguous) equals ``F.linear`` bit for bit at that
    row count; a shape the probe accepts must be bit-identical on fresh data too, and at one row (a gemv, summed in
    another order) the probe says no for Gemma's down projection shape."""
    from instructkit.generation import fast_decode

    assert fast_decode._transposed_probe((640, 2048), 1) is False
    for rows in (4, 16):
        if fast_decode._transposed_probe((640, 2048), rows):
            w, x = torch.randn(640, 2048), torch.randn(rows, 2048)
            assert torch.equal(x @ w.t().contiguous(), torch.nn.functional.linear(x, w))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_real_models_step_bit_identical_and_greedy_identical(name):
    """The real zoo models: step logits bit-identical to the forward for 16 left-padded rows (the MKL-packed path where
    the probe allows it) and for one row; greedy chat generation identical to generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.models.zoo import resolve_model

    path = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # transformers 5 can leave loaded weights at addresses that are not 64-byte aligned (safetensors offsets), and
    # MKL's one-row product (gemv) rounds differently on an unaligned matrix than on an aligned copy of it (1e-8 here,
    # ~1e-5 in the logits): the decoder's fused copies are aligned. Aligned model weights make the comparison one of
    # arithmetic, not of where the loader put the bytes.
    with torch.no_grad():
        for prm in model.parameters():
            prm.data = prm.data.clone()
    assert unsupported_reason(model) is None
    eng = Engine(model, tok)
    texts = ["What is the capital of France?", "Give three tips for staying healthy.", "Hi",
             "Write a haiku about autumn leaves falling."]
    prompts = [eng.chat_prompt_ids([{"role": "user", "content": t}]) for t in texts]
    rows16 = [prompts[i % 4][: len(prompts[i % 4]) - i % 3] for i in range(16)]
    for ours, ref in _compare_steps(model, rows16, tok.pad_token_id, steps=10):
        assert torch.equal(ours, ref)
    for ours, ref in _compare_steps(model, prompts[:1], tok.pad_token_id, steps=6):
        assert torch.equal(ours, ref)
    stops = eng.chat_stop_token_ids()
    refs = _hf_greedy_rows(model, prompts, tok.pad_token_id, 24, stops)
    ours = eng.generate(prompts, SamplingParams(max_new_tokens=24, stop_token_ids=stops))
    assert [o.token_ids for o in ours] == refs
    greedy = eng.generate(prompts, SamplingParams(max_new_tokens=24, stop_token_ids=stops, logprobs=False))
    assert [o.token_ids for o in greedy] == refs  # through GreedyHead where it helps
    one = eng.generate(prompts[1:2], SamplingParams(max_new_tokens=24, stop_token_ids=stops, logprobs=False))
    assert [o.token_ids for o in one] == refs[1:2]


def test_cached_decoder_does_not_keep_the_model_alive(llama):
    import copy
    import gc
    import weakref

    model, tok = llama
    m = copy.deepcopy(model)
    Engine(m, tok).generate([tok("Hi")["input_ids"]], SamplingParams(max_new_tokens=3))
    assert FastDecoder.build(m) is not None
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None
