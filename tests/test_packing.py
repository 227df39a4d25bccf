"""Padding-free packing: first-fit rows, shifted labels that never cross a sample boundary, and per-sample losses that
equal the unpacked ones (each sample attends only to itself; positions restart per sample)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instructkit.models.load import block_causal_mask
from instructkit.training.packing import (IGNORE_INDEX, Sample, build_rows, collate_rows,
                                          epoch_order, pack_first_fit, prepare_samples)


def test_first_fit_hand_example():
    # lengths 5,3,4,2,6 into rows of 8: 5 -> row0 (room 3); 3 -> row0 (room 0); 4 -> row1 (room 4);
    # 2 -> row1 (room 2); 6 -> does not fit row1 (room 2) -> row2.
    assert pack_first_fit([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=40), st.integers(50, 120))
def test_first_fit_keeps_every_sample_once_and_fits(lengths, pack_length):
    rows = pack_first_fit(lengths, pack_length)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= pack_length for r in rows)


def test_prepare_samples_counts_every_drop():
    samples = [
        Sample([1, 2, 3], [0, 1, 1]),            # kept as is
        Sample([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 1]),  # truncated to 4: supervision gone -> dropped
        Sample([1, 2, 3, 4, 5, 6], [0, 1, 1, 1, 1, 1]),  # truncated to 4, keeps 3 supervised -> kept
        Sample([1, 2], [0, 0]),                  # nothing supervised -> dropped
        Sample([7], [1]),                        # a lone token has no previous token: nothing predicted -> dropped
        Sample([], []),
    ]
    kept, stats = prepare_samples(samples, max_length=4)
    assert [s.input_ids for s in kept] == [[1, 2, 3], [1, 2, 3, 4]]
    assert stats.truncated == 1
    assert dict(stats.dropped) == {"no_supervised_tokens_after_truncation": 1, "no_supervised_tokens": 2, "empty": 1}
    assert stats.kept + sum(stats.dropped.values()) == stats.total == 6


def test_collate_shifts_labels_inside_each_sample():
    a = Sample([10, 11, 12], [0, 1, 1])
    b = Sample([20, 21], [1, 1])  # first token "supervised" (mask=all): must NOT be predicted from a's last token
    batch = collate_rows([[a, b], [b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [20, 21, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, -1, -1, -1]]
    I = IGNORE_INDEX
    # row 0: pos0 predicts 11, pos1 predicts 12, pos2 (a's last) predicts nothing, pos3 predicts 21, pos4 nothing
    assert batch["labels"].tolist() == [[11, 12, I, 21, I], [21, I, I, I, I]]
    assert int(batch["n_supervised"]) == 4 and int(batch["n_tokens"]) == 7


def test_block_causal_mask_isolates_samples():
    seg = torch.tensor([[0, 0, 1, 1, -1]])
    allowed = block_causal_mask(seg, torch.float32)[0, 0] == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],  # padding attends to itself only (no all-masked softmax row)
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_rows_and_epoch_order_are_seeded():
    samples = [Sample([1] * n, [0] + [1] * (n - 1)) for n in (3, 5, 2, 7, 4)]
    r1 = build_rows(samples, pack=True, pack_length=8, seed=1)
    r2 = build_rows(samples, pack=True, pack_length=8, seed=1)
    assert [[len(s) for s in r] for r in r1] == [[len(s) for s in r] for r in r2]
    assert sorted(len(s) for r in r1 for s in r) == [2, 3, 4, 5, 7]
    assert epoch_order(10, 0, 0) == epoch_order(10, 0, 0) and epoch_order(10, 0, 0) != epoch_order(10, 0, 1)
    assert sorted(epoch_order(10, 0, 3)) == list(range(10))


def test_packed_losses_equal_unpacked_per_sample(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from instructkit.losses import sft_loss
    from instructkit.models.load import causal_lm_parts, packed_hidden_states

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (9, 5, 13, 4, 7):
        ids = torch.randint(5, 500, (n,), generator=g).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3)
        samples.append(Sample(ids, mask))
    _, head, _ = causal_lm_parts(model)

    def per_sample_losses(batch, n_rows_samples):
        hidden = packed_hidden_states(model, batch)
        out = []
        for b, k in n_rows_samples:
            labels = torch.full_like(batch["labels"], IGNORE_INDEX)
            sel = batch["segment_ids"][b] == k
            labels[b, sel] = batch["labels"][b, sel]
            loss, n = sft_loss(hidden, labels, head)
            out.append((loss / n).item())
        return out

    with torch.no_grad():
        unpacked = [per_sample_losses(collate_rows([[s]], 0), [(0, 0)])[0] for s in samples]
        # the plain model forward (full logits, no custom mask) agrees with the unpacked path
        s0 = samples[0]
        logits = model(input_ids=torch.tensor([s0.input_ids])).logits[0, :-1]
        tgt = torch.tensor(s0.input_ids[1:])
        m = torch.tensor(s0.loss_mask[1:], dtype=torch.bool)
        ref0 = torch.nn.functional.cross_entropy(logits[m], tgt[m]).item()
        assert abs(ref0 - unpacked[0]) < 1e-5
        # packed: rows [0,1,2] (9+5+13=27) and [3,4] (4+7=11) padded to 27
        batch = collate_rows([samples[:3], samples[3:]], 0)
        packed = per_sample_losses(batch, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)])
    for u, p in zip(unpacked, packed):
        assert abs(u - p) < 1e-5, (unpacked, packed)
    # and without the isolating mask the packed losses differ: the test can fail
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        labels = torch.full_like(batch["labels"], IGNORE_INDEX)
        sel = batch["segment_ids"][0] == 2
        labels[0, sel] = batch["labels"][0, sel]
        loss, n = sft_loss(hidden, labels, head)
    assert abs((loss / n).item() - unpacked[2]) > 1e-3


def _tiny_gemma3_window(window: int, head_dim: int = 16):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=head_dim,
                           query_pre_attn_scalar=head_dim,
                           sliding_window=window, layer_types=["sliding_attention", "full_attention"],
                           max_position_embeddings=256, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma3_wide_heads"])
def test_segment_attention_equals_the_dense_block_mask(arch, tiny_model_dir, monkeypatch):
    """packed_hidden_states runs each sample's attention on its own (models/load.py); it must give the hidden states
    and gradients of the dense block-causal mask path (GQA, and a Gemma 3 sliding window of 6 shorter than a 13-token
    sample, so the band mask is exercised), and leave the model's own attention switched back on. Heads of 128 take
    the matmul attention (short segments, wide heads), the others causal sdpa."""
    from transformers import AutoModelForCausalLM

    from instructkit.models import load
    from instructkit.models.load import packed_hidden_states

    if arch == "llama":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    else:
        model = _tiny_gemma3_window(6, head_dim=128 if arch == "gemma3_wide_heads" else 16)
    calls = []
    matmul_attention = load._matmul_attention
    monkeypatch.setattr(load, "_matmul_attention", lambda *a: (calls.append(a[0].shape[2]), matmul_attention(*a))[1])
    model.train()  # dropout is 0 in these configs; train mode as in the recipes
    g = torch.Generator().manual_seed(1)
    samples = [Sample(torch.randint(5, 500, (n,), generator=g).tolist(), [1] * n) for n in (9, 5, 13, 4, 7)]
    batch = collate_rows([samples[:3], samples[3:]], 0)
    assert load._segment_attention_ok(model.model)

    def run(segmented: bool):
        model.zero_grad()
        ok = load._segment_attention_ok
        if not segmented:
            load._segment_attention_ok = lambda body: False
        try:
            hidden = packed_hidden_states(model, batch)
        finally:
            load._segment_attention_ok = ok
        real = batch["segment_ids"] >= 0
        (hidden[real] ** 2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return hidden[real].detach(), grads

    h_seg, g_seg = run(True)
    h_dense, g_dense = run(False)
    assert torch.allclose(h_seg, h_dense, atol=1e-5, rtol=1e-5), (h_seg - h_dense).abs().max()
    assert len(g_seg) == len(g_dense) > 0
    for a, b in zip(g_seg, g_dense):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    assert model.config._attn_implementation == "sdpa"
    # every segment of both rows (padding included) in both layers, forward only (the backward reuses the graph)
    assert sorted(calls) == (sorted([9, 5, 13, 4, 7, 16] * 2) if arch == "gemma3_wide_heads" else [])
    # and the model's own forward is unaffected afterwards (no segments needed)
    model(input_ids=batch["input_ids"][:1, :9])


@pytest.mark.parametrize("window", [None, 3])
def test_matmul_attention_equals_sdpa(window):
    """The matmul attention against sdpa with the explicit causal (or band) mask, fp64, GQA of 3 query heads per kv
    head: outputs and the gradients of q, k and v."""
    from instructkit.models.load import _matmul_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
               for shape in ((1, 6, 11, 128), (1, 2, 11, 128), (1, 2, 11, 128)))
    i = torch.arange(11)
    allowed = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3, enable_gqa=True)
    out = _matmul_attention(q, k, v, 0.3, window)
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-12)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-12)
    # the mask really masks: without it the output differs
    free = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
    assert not torch.allclose(out, free, atol=1e-3)


def test_segments_of_a_packed_row():
    from instructkit.models.load import _segments

    assert _segments(torch.tensor([[0, 0, 0, 1, 1, -1, -1], [0, 1, 2, 2, 2, 2, 2]])) == [
        [(0, 3), (3, 5), (5, 7)], [(0, 1), (1, 2), (2, 7)]]
