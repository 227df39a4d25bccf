"""models/load.py: fp32 loading, pad token never equal to eos, LoRA targets, QLoRA on CPU (bitsandbytes), merge."""

from __future__ import annotations

import shutil

import pytest
import torch

from instructkit.config import LoRAConfig, ModelConfig
from instructkit.models.load import (apply_lora, causal_lm_parts, ensure_pad_token, load_model_and_tokenizer,
                                     merge_and_save, packed_attention_mask, save_model)


def test_loads_fp32_with_distinct_pad(tiny_model_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template  # the template is installed (chat/templates.py prepare_tokenizer)


def test_pad_equal_to_eos_is_replaced_by_an_existing_distinct_token(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    msg = ensure_pad_token(tok, model)
    assert tok.pad_token == "<pad>" and "existing token" in msg
    assert model.config.pad_token_id == tok.pad_token_id and model.get_input_embeddings().weight.shape[0] == n_vocab


def test_missing_pad_is_added_and_embeddings_resized():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # a 3-token vocabulary with an eos and no pad candidate at all
    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    assert tok.pad_token is None
    model = LlamaForCausalLM(LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    msg = ensure_pad_token(tok, model)
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 3 and "added" in msg
    assert model.get_input_embeddings().weight.shape[0] == 4 and model.config.pad_token_id == 3
    assert ensure_pad_token(tok, model) == ""  # idempotent


def test_lora_all_linear_targets_body_not_output_layer(tiny_model_dir):
    model, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)),
                                        LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".")[-4] for n in trainable}  # ...q_proj.lora_A.default.weight
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    body, head, softcap = causal_lm_parts(model)
    assert head is model.get_base_model().lm_head and softcap is None
    assert body is model.get_base_model().model


def test_qlora_int4_on_cpu_forward_backward(tiny_model_dir):
    bnb = pytest.importorskip("bitsandbytes")
    model, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)),
                                        LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0, quantize="int4"))
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    # the 4-bit layer computes close to, but not exactly, the fp32 layer (a real quantisation happened)
    fp32, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    w = fp32.model.layers[0].self_attn.q_proj.weight
    h = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (q(h) - h @ w.T).abs().max().item()
        scale = (h @ w.T).abs().max().item()
    assert 0 < err < 0.25 * scale


def test_quantize_without_lora_is_an_error(tiny_model_dir):
    from instructkit.config import ConfigError

    with pytest.raises(ConfigError, match="lora.enabled"):
        load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)), LoRAConfig(enabled=False, quantize="int4"))


def test_merge_and_save_equals_adapter_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base_dir)
    model, tok = load_model_and_tokenizer(ModelConfig(path=str(base_dir)), LoRAConfig(enabled=True, r=4, dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    save_model(model, tok, tmp_path / "adapter")
    out = merge_and_save(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model.eval()
    x = torch.randint(5, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=x).logits, merged(input_ids=x).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=x).logits
    assert (a - b).abs().max().item() < 1e-5
    assert (a - base).abs().max().item() > 1e-3  # the adapter mattered
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_and_save(tmp_path / "merged", tmp_path / "x")


def test_sliding_window_models_get_a_per_layer_type_mask():
    class Cfg:
        layer_types = ["sliding_attention", "full_attention"]
        sliding_window = 2

    class M:
        config = Cfg()

    seg = torch.tensor([[0, 0, 0, 0]])
    masks = packed_attention_mask(M(), seg, torch.float32)
    full = masks["full_attention"][0, 0] == 0
    sliding = masks["sliding_attention"][0, 0] == 0
    assert torch.equal(full, torch.ones(4, 4, dtype=torch.bool).tril())
    # window 2: query i sees keys i-1 and i only
    assert torch.equal(sliding, torch.ones(4, 4, dtype=torch.bool).tril() & ~torch.ones(4, 4, dtype=torch.bool).tril(-2))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_gemma3_packed_loss_equals_plain_forward_with_sliding_window(softcap):
    """A Gemma-3 text model from a small config: sliding-window layers (window 4 < sample lengths) get their own packed
    mask, embeddings are scaled inside the body, and logit soft-capping is applied by sft_loss like the model does."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from instructkit.losses import sft_loss
    from instructkit.models.load import packed_hidden_states
    from instructkit.training.packing import Sample, collate_rows

    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=softcap,
                           max_position_embeddings=256)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(5, 500, (n,), generator=g).tolist(), [0, 0] + [1] * (n - 2)) for n in (9, 7, 11)]
    batch = collate_rows([samples[:2], samples[2:]], pad_id=0)  # rows 9+7=16 and 11 (padded to 16)
    _, head, cap = causal_lm_parts(model)
    assert cap == softcap
    with torch.no_grad():
        loss, n = sft_loss(packed_hidden_states(model, batch), batch["labels"], head, cap)
        ref = 0.0
        for s in samples:
            logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1]
            m = torch.tensor(s.loss_mask[1:], dtype=torch.bool)
            ref += torch.nn.functional.cross_entropy(logits[m], torch.tensor(s.input_ids[1:])[m], reduction="sum")
    assert int(n) == sum(s.n_supervised for s in samples)
    assert abs(loss.item() - ref.item()) / int(n) < 1e-5
