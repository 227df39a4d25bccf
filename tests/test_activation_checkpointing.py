"""Activation checkpointing (``train.gradient_checkpointing``, models/load.enable_activation_checkpointing): the same
loss and gradients as without it (fp32, within 1e-5; here they agree bit for bit) on the paths training uses: the
per-sample packed attention, the dense block-causal mask, the fused output-layer loss with a trainable head, the
streaming loss with a frozen head (LoRA, with adapter dropout), tied embeddings and a Gemma-3 with sliding-window
layers."""

from __future__ import annotations

import pytest
import torch

from instructkit.config import ConfigError, LoRAConfig
from instructkit.losses import sft_loss_fused
from instructkit.models.load import apply_lora, causal_lm_parts, enable_activation_checkpointing, packed_hidden_states
from instructkit.training.packing import Sample, collate_rows


def _batch(vocab: int = 500):
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(2):
        row = []
        for _ in range(3):
            n = int(torch.randint(5, 30, (1,), generator=g))
            ids = torch.randint(5, vocab, (n,), generator=g).tolist()
            row.append(Sample(ids, [0, 0] + [1] * (n - 2)))
        rows.append(row)
    return collate_rows(rows, 3)


def _llama(tie=False, attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
                      attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).float()


def _loss_and_grads(model, batch, checkpointed: bool):
    if checkpointed:
        assert enable_activation_checkpointing(model) == 2
    model.train()
    torch.manual_seed(7)  # adapter dropout draws the same masks in both runs
    hidden = packed_hidden_states(model, batch)
    _, head, softcap = causal_lm_parts(model)
    loss, n = sft_loss_fused(hidden, batch["labels"], head, softcap)
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", ["segments", "dense_mask", "tied", "lora_dropout", "gemma3"])
def test_checkpointing_keeps_loss_and_gradients(case):
    def build():
        if case == "gemma3":
            return _gemma3()
        model = _llama(tie=case == "tied", attn="eager" if case == "dense_mask" else "sdpa")
        if case == "lora_dropout":
            torch.manual_seed(1)
            model = apply_lora(model, LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.2))
        return model

    batch = _batch()
    loss_a, grads_a = _loss_and_grads(build(), batch, checkpointed=False)
    loss_b, grads_b = _loss_and_grads(build(), batch, checkpointed=True)
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_a)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-7, msg=k)


def test_checkpointing_recomputes_in_backward():
    """The layers' activations are not kept: each checkpointed layer runs its forward again in backward."""
    model = _llama().train()
    enable_activation_checkpointing(model)
    calls = []
    # a pre-hook: torch stops the recomputation as soon as the last saved tensor is rebuilt (inside the MLP)
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    batch = _batch()
    hidden = packed_hidden_states(model, batch)
    _, head, _ = causal_lm_parts(model)
    loss, _ = sft_loss_fused(hidden, batch["labels"], head)
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2  # the recomputation


def test_a_model_without_checkpointable_layers_is_an_error():
    class Tiny(torch.nn.Module):
        supports_gradient_checkpointing = True

        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)
            self.model.config = type("C", (), {"_attn_implementation": "sdpa"})()
            self.base_model_prefix = "model"
            self.config = self.model.config

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            pass

        def get_output_embeddings(self):
            return self.model

    with pytest.raises(ConfigError, match="no checkpointable layers"):
        enable_activation_checkpointing(Tiny())
