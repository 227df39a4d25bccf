"""losses.sft_loss chunking: the chunked output layer + cross entropy equals the one-shot computation, loss and
gradients, and no chunk's (rows, V) logits are saved for backward."""

import pytest
import torch

from instructkit.losses import SFT_CHUNK_BYTES, _vocab_size, sft_loss

IGNORE = -100


def _problem(softcap: bool, seed: int = 0):
    """B=3, T=7, H=5, V=11, float64; 13 supervised positions in a scattered pattern (whole rows, gaps, none at the end)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(5, 11, bias=True, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(11, 5, generator=g, dtype=torch.float64))
        head.bias.copy_(torch.randn(11, generator=g, dtype=torch.float64))
    labels = torch.randint(0, 11, (3, 7), generator=g)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 1, 1, 0], [1, 0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    labels = labels.masked_fill(~keep, IGNORE)
    return hidden, head, labels, (3.0 if softcap else None)


def _reference(hidden, head, labels, cap):
    """Full (B*T, V) logits, soft-capped, log-softmax by hand, summed NLL of supervised targets (the unchunked loss)."""
    logits = head(hidden.reshape(-1, hidden.shape[-1]))  # (21, 11)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    y = labels.reshape(-1)
    m = y != IGNORE
    return -logp[m].gather(1, y[m][:, None]).sum(), int(m.sum())


def _grads(loss, hidden, head):
    return torch.autograd.grad(loss, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("softcap", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 2, 4, 5, 13, 100])  # 13 supervised: many chunks, ragged tail, one chunk
def test_chunked_loss_and_grads_equal_unchunked(softcap, chunk_rows):
    hidden, head, labels, cap = _problem(softcap)
    ref, ref_n = _reference(hidden, head, labels, cap)
    ref_g = _grads(ref, hidden, head)
    loss, n = sft_loss(hidden, labels, head, cap, chunk_rows=chunk_rows)
    g = _grads(loss, hidden, head)
    assert int(n) == ref_n == 13
    assert abs(loss.item() - ref.item()) < 1e-6
    for a, b in zip(g, ref_g):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    # unsupervised positions get exactly zero gradient
    assert torch.count_nonzero(g[0].reshape(-1, 5)[labels.reshape(-1) == IGNORE]) == 0


def test_chunked_lora_head_grads_equal_unchunked():
    """A LoRA-wrapped output layer (extra trainable parameters inside the chunk function) gets identical gradients."""
    peft = pytest.importorskip("peft")
    hidden, head, labels, _ = _problem(False)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = head

    lora = peft.get_peft_model(M(), peft.LoraConfig(r=2, target_modules=["lm_head"], lora_dropout=0.0)).base_model.model
    lh = lora.lm_head
    with torch.no_grad():
        for n_, p in lh.named_parameters():
            if "lora_" in n_:
                p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(1)) * 0.5)
    params = [p for p in lh.parameters() if p.requires_grad]
    assert len(params) == 2  # lora_A, lora_B (the base layer is frozen)
    full, _ = sft_loss(hidden, labels, lh, chunk_rows=100)
    chunked, _ = sft_loss(hidden, labels, lh, chunk_rows=3)
    g_full = torch.autograd.grad(full, [hidden, *params])
    g_chunk = torch.autograd.grad(chunked, [hidden, *params])
    assert abs(full.item() - chunked.item()) < 1e-6
    for a, b in zip(g_chunk, g_full):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_no_chunk_logits_saved_for_backward():
    """Structural memory check: with several chunks no saved-for-backward tensor has the vocab width (rows x V logits,
    log-softmax or tanh output); unchunked (one chunk) the (N, V) log-softmax is saved, which is what chunking removes."""
    hidden, head, labels, cap = _problem(True)
    V = 11

    def saved_shapes(chunk_rows):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = sft_loss(hidden, labels, head, cap, chunk_rows=chunk_rows)
        loss.backward()  # the recompute in backward still works
        return shapes

    one_shot = saved_shapes(100)
    assert (13, V) in one_shot
    chunked = saved_shapes(4)
    assert not [s for s in chunked if len(s) == 2 and s[-1] == V]


def test_default_chunk_rows_follow_vocab():
    """Default chunk = SFT_CHUNK_BYTES of fp32 logits: 64 MiB / (262,144 x 4 B) = 64 rows for Gemma 3's vocabulary."""
    assert _vocab_size(torch.nn.Linear(4, 262144, bias=False, device="meta")) == 262144
    assert SFT_CHUNK_BYTES // (4 * 262144) == 64
    assert _vocab_size(lambda h: h) is None


def test_empty_supervision_with_chunk_rows_is_zero():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    loss, n = sft_loss(hidden, torch.full((2, 3), IGNORE), torch.nn.Linear(4, 6), chunk_rows=1)
    loss.backward()
    assert loss.item() == 0.0 and int(n) == 0 and torch.count_nonzero(hidden.grad) == 0
