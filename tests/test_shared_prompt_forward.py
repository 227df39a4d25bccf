"""Rows that repeat a prompt share its forward (models/value_head.response_hidden, used to score rollouts and in PPO
updates): response log-probs and gradients equal to the plain forward's within float rounding, for Llama and Gemma 3,
with left-padded prompts and right-padded responses; only the distinct prompts and R-1 response columns go through
the body; a sliding-window model with rows longer than its window takes the plain forward."""

from __future__ import annotations

import pytest
import torch

from instructkit.models import value_head
from instructkit.models.value_head import _prompt_groups, response_logits

P, R = 6, 4
A = [5, 6, 7, 8, 9, 10]  # a prompt of 6 tokens
B = [0, 0, 11, 12, 13, 14]  # a prompt of 4 tokens, left-padded (pad id 0)


def _batch():
    ids = torch.tensor([A + [20, 21, 22, 23], B + [30, 31, 0, 0], A + [40, 41, 42, 0], A + [50, 51, 52, 53],
                        B + [60, 61, 62, 63]])
    return ids, (ids != 0).long()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _gemma3(window: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                           sliding_window=window, layer_types=["sliding_attention", "full_attention"],
                           max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg)


def _run(model):
    """Response log-probs (B, R), the gradient of their masked mean w.r.t. every parameter, and the (batch, width)
    of every body call."""
    ids, attn = _batch()
    mask = attn[:, P:P + R].bool()
    calls: list[tuple[int, int]] = []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        model.zero_grad()
        logits, _ = response_logits(model, ids, attn, P, R)
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, P:P + R, None])[..., 0]
        (-(logp * mask).sum() / mask.sum()).backward()
    finally:
        hook.remove()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls, mask


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_shared_prompt_forward_equals_the_plain_forward(kind, monkeypatch):
    model = _llama() if kind == "llama" else _gemma3(window=64)
    logp, grads, calls, mask = _run(model)
    assert calls == [(2, P), (5, R - 1)]  # the 2 distinct prompts once, then every row's first R-1 response tokens
    monkeypatch.setattr(value_head, "_prompt_groups", lambda ids, attn: None)
    ref_logp, ref_grads, ref_calls, _ = _run(model)
    assert ref_calls == [(5, P + R)]
    assert (logp - ref_logp)[mask].abs().max() <= 1e-5
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-9, name


def test_rows_longer_than_a_sliding_window_take_the_plain_forward():
    model = _gemma3(window=8)  # P + R = 10 > 8
    _, _, calls, _ = _run(model)
    assert calls == [(5, P + R)]


def test_gradient_checkpointing_takes_the_plain_forward():
    """transformers turns the key/value cache off under gradient checkpointing in training: the shared path would lose
    the prompt, so it is not taken."""
    model = _llama()
    model.gradient_checkpointing_enable()
    model.train()
    _, _, calls, _ = _run(model)
    assert calls == [(5, P + R)]


def test_prompt_groups():
    ids, attn = _batch()
    distinct, source = _prompt_groups(ids[:, :P], attn[:, :P])
    assert distinct.tolist() == [0, 1] and source.tolist() == [0, 1, 0, 0, 1]
    assert _prompt_groups(ids[:2, :P], attn[:2, :P]) is None
    # the same ids under a different mask are a different prompt
    assert _prompt_groups(ids[[0, 0], :P], torch.tensor([[1] * P, [0] + [1] * (P - 1)])) is None
