"""Speed options of LoRA/full SFT that must not change any number: losses.sft_loss_fused (the output layer's gradient
computed in forward, no recomputation in backward) against a hand-derived case, the full-logits reference and
losses.sft_loss, its fallbacks, and the SFT recipe's use of it."""

import math

import pytest
import torch

from instructkit.losses import sft_loss, sft_loss_fused

IGNORE = -100


def _problem(softcap: bool, seed: int = 0, dtype=torch.float64):
    """B=3, T=7, H=5, V=11; 13 supervised positions scattered (whole rows, gaps, none at the end); bias-free head."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 5, generator=g, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(5, 11, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(11, 5, generator=g, dtype=dtype))
    labels = torch.randint(0, 11, (3, 7), generator=g)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 1, 1, 0], [1, 0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    return hidden, head, labels.masked_fill(~keep, IGNORE), (3.0 if softcap else None)


def _reference(hidden, head, labels, cap):
    """Full (B*T, V) logits, soft-capped, log-softmax by hand, summed NLL of the supervised targets."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ head.weight.t()  # (21, 11)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    y = labels.reshape(-1)
    m = y != IGNORE
    return -logp[m].gather(1, y[m][:, None]).sum()


def test_hand_derived_zero_hidden_case():
    """h = 0 makes every logit 0, so softmax is uniform 1/V:
    loss = N log V; dL/dh_i = sum_v (1/V - [v = t_i]) W_v = mean_v W_v - W_{t_i}; dL/dW = sum_i (...) h_i^T = 0.
    (With a soft-cap the same holds: tanh(0) = 0 and its slope at 0 is 1.) Scaled by a backward factor 0.5."""
    V, H = 6, 4
    W = torch.arange(V * H, dtype=torch.float64).reshape(V, H) / 10.0
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(W)
    labels = torch.tensor([[2, IGNORE, 5, 0]])
    for cap in (None, 2.0):
        hidden = torch.zeros(1, 4, H, dtype=torch.float64, requires_grad=True)
        head.weight.grad = None
        head.weight.requires_grad_(True)
        loss, n = sft_loss_fused(hidden, labels, head, cap, chunk_rows=2)
        assert int(n) == 3
        assert loss.item() == pytest.approx(3 * math.log(6), abs=1e-12)
        (0.5 * loss).backward()
        for pos, t in ((0, 2), (2, 5), (3, 0)):
            assert torch.allclose(hidden.grad[0, pos], 0.5 * (W.mean(0) - W[t]), atol=1e-12, rtol=0)
        assert torch.count_nonzero(hidden.grad[0, 1]) == 0  # unsupervised position
        assert torch.count_nonzero(head.weight.grad) == 0


@pytest.mark.parametrize("softcap", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 4, 5, 13, 100])  # many chunks, ragged tail, exactly one, one with room
@pytest.mark.parametrize("train_head", [False, True])  # frozen head (LoRA) or trained head (full fine-tuning)
def test_fused_equals_full_logits_reference(softcap, chunk_rows, train_head):
    hidden, head, labels, cap = _problem(softcap)
    head.weight.requires_grad_(train_head)
    params = [hidden, head.weight] if train_head else [hidden]
    ref = _reference(hidden, head, labels, cap)
    ref_g = torch.autograd.grad(ref * 0.25, params)
    loss, n = sft_loss_fused(hidden, labels, head, cap, chunk_rows=chunk_rows)
    g = torch.autograd.grad(loss * 0.25, params)
    assert int(n) == 13
    assert abs(loss.item() - ref.item()) < 1e-12  # float64: only summation order differs
    for a, b in zip(g, ref_g):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert torch.count_nonzero(g[0].reshape(-1, 5)[labels.reshape(-1) == IGNORE]) == 0


def test_fused_loss_is_bit_identical_to_sft_loss_in_fp32():
    """The forward runs the same ops in the same order as sft_loss (linear, log-softmax, summed NLL per chunk, chunks
    added left to right), so the reported loss is the same float; gradients agree to rounding."""
    hidden, head, labels, cap = _problem(True, seed=3, dtype=torch.float32)
    for chunk_rows in (4, 100):
        a, _ = sft_loss(hidden, labels, head, cap, chunk_rows=chunk_rows)
        ga = torch.autograd.grad(a, hidden)[0]
        b, _ = sft_loss_fused(hidden, labels, head, cap, chunk_rows=chunk_rows)
        gb = torch.autograd.grad(b, hidden)[0]
        assert a.item() == b.item()
        assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-5)


def test_tied_head_gets_embedding_plus_head_gradient():
    """A head tied to the input embedding (Gemma, SmolLM2): the fused head's dW adds to the embedding's gradient."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(11, 5, dtype=torch.float64)
    head = torch.nn.Linear(5, 11, bias=False, dtype=torch.float64)
    head.weight = emb.weight  # tied
    ids = torch.randint(0, 11, (2, 6))
    labels = torch.randint(0, 11, (2, 6)).masked_fill(torch.rand(2, 6) < 0.3, IGNORE)
    grads = []
    for fn in (sft_loss, sft_loss_fused):
        emb.weight.grad = None
        hidden = torch.tanh(emb(ids) * 1.5)
        loss, _ = fn(hidden, labels, head, None, chunk_rows=3)
        loss.backward()
        grads.append(emb.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-12, rtol=0)


def test_fallbacks_use_sft_loss():
    """A head with a bias, a LoRA-wrapped head, and no-grad evaluation take sft_loss's path (same value)."""
    hidden, head, labels, cap = _problem(False)
    biased = torch.nn.Linear(5, 11, bias=True, dtype=torch.float64)
    a, _ = sft_loss(hidden, labels, biased, cap, chunk_rows=4)
    b, _ = sft_loss_fused(hidden, labels, biased, cap, chunk_rows=4)
    assert a.item() == b.item() and b.grad_fn is not None
    assert "Fused" not in type(b.grad_fn).__name__
    with torch.no_grad():
        c, _ = sft_loss_fused(hidden, labels, head, cap, chunk_rows=4)
    assert c.item() == pytest.approx(_reference(hidden, head, labels, cap).item(), abs=1e-12)
    d, _ = sft_loss_fused(hidden, labels, head, cap, chunk_rows=4)
    assert "Fused" in type(d.grad_fn).__name__


def test_no_vocab_wide_tensor_is_saved_and_backward_runs_once():
    """Structural memory check: only (N, H) dL/dh is kept for backward (frozen head), never (rows, V) logits; and
    since backward scales the saved gradients in place, a second backward is refused instead of returning wrong
    numbers."""
    hidden, head, labels, cap = _problem(True)
    head.weight.requires_grad_(False)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = sft_loss_fused(hidden, labels, head, cap, chunk_rows=4)
    assert not [s for s in shapes if s and s[-1] == 11]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


def test_empty_supervision_is_zero_with_graph():
    hidden, head, labels, _ = _problem(False)
    loss, n = sft_loss_fused(hidden, torch.full_like(labels, IGNORE), head)
    assert int(n) == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_sft_batch_loss_uses_fused_head_on_tiny_model(tiny_model_dir):
    """The recipe's loss on a real (tiny Llama) model: same loss and gradients as the unfused sft_loss, fp64."""
    from instructkit.config import ModelConfig
    from instructkit.models.load import causal_lm_parts, load_model_and_tokenizer, packed_hidden_states
    from instructkit.recipes.sft import sft_batch_loss
    from instructkit.training.packing import Sample, collate_rows

    model, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir), dtype="float64"))
    g = torch.Generator().manual_seed(1)
    samples = [Sample(torch.randint(5, 500, (n,), generator=g).tolist(), [0] * (n // 2) + [1] * (n - n // 2))
               for n in (9, 14, 6)]
    batch = collate_rows([samples[:2], samples[2:]], pad_id=0)

    def grads(fn):
        model.zero_grad()
        loss, n = fn(model, batch)
        loss.backward()
        return loss.item(), int(n), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    def unfused(m, b):
        _, head, cap = causal_lm_parts(m)
        return sft_loss(packed_hidden_states(m, b), b["labels"], head, cap, chunk_rows=4)

    l1, n1, g1 = grads(sft_batch_loss)
    l2, n2, g2 = grads(unfused)
    assert n1 == n2 == sum(s.n_supervised for s in samples)
    assert abs(l1 - l2) < 1e-12
    assert g1.keys() == g2.keys() and len(g1) > 5
    assert max((g1[k] - g2[k]).abs().max().item() for k in g1) < 1e-12


def test_streaming_pass_over_blocks_and_row_groups(monkeypatch):
    """The frozen-head path streams W in blocks with a running-maximum softmax: with blocks of 4 vocabulary rows (11 =
    4 + 4 + a shorter 3) and row groups of 5 (13 rows = 5 + 5 + 3) it must equal the full-logits reference in fp64, a
    target in every block, and a large logit range (the running maximum changes between blocks)."""
    from instructkit import losses

    monkeypatch.setattr(losses, "STREAM_BLOCK", 4)
    monkeypatch.setattr(losses, "STREAM_ROWS", 5)
    hidden, head, labels, _ = _problem(False, seed=7)
    labels[0, :3] = torch.tensor([1, 5, 9])  # targets in each block (row 0 is fully supervised)
    with torch.no_grad():
        head.weight[9] *= 25.0  # one far larger logit, in the last block
    head.weight.requires_grad_(False)
    ref = _reference(hidden, head, labels, None)
    ref_g = torch.autograd.grad(ref * 0.5, hidden)[0]
    loss, n = sft_loss_fused(hidden, labels, head, None)
    g = torch.autograd.grad(loss * 0.5, hidden)[0]
    assert "Fused" in type(loss.grad_fn).__name__
    assert abs(loss.item() - ref.item()) < 1e-11
    assert torch.allclose(g, ref_g, atol=1e-11, rtol=0)
    assert {int(t) // 4 for t in labels[labels != IGNORE]} == {0, 1, 2}
    # the logits of a block computed in slices of 3 vocabulary rows (4 = 3 + 1): the same dot products
    monkeypatch.setattr(losses, "STREAM_SUB", 3)
    loss_sub, _ = sft_loss_fused(hidden, labels, head, None)
    g_sub = torch.autograd.grad(loss_sub * 0.5, hidden)[0]
    assert abs(loss_sub.item() - loss.item()) < 1e-12 and torch.allclose(g_sub, g, atol=1e-12, rtol=0)
