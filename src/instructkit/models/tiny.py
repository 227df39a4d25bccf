"""Tiny random-initialised models with a real tokenizer and chat template, built in seconds, fully offline.

Tests, smoke runs and users' own CI use them (`instructkit models create-tiny PATH`). The tokenizer is a byte-level BPE
trained in-process on a small built-in English corpus (chat/standin.py's CORPUS), so any text (any unicode) encodes, and it carries ChatML special
tokens and a ChatML chat template. The model is a Llama built from a config with a fixed seed. Everything is written as a
normal Hugging Face folder (safetensors), so plain transformers loads it.
"""

from __future__ import annotations

from pathlib import Path

from instructkit.chat.standin import CORPUS

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in CORPUS.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_model(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                intermediate_size: int = 128, max_positions: int = 1024, seed: int = 0, tie_word_embeddings: bool = False):
    """A random Llama sized for tests; deterministic for a given seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def create_tiny(path: str | Path, *, seed: int = 0, vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2,
                tie_word_embeddings: bool = False) -> Path:
    """Write a tiny model + tokenizer folder at ``path`` (safetensors) and return it."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    model = build_model(tok, hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                        tie_word_embeddings=tie_word_embeddings)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def resolve_tiny_path(path: str, run_dir: str | Path, *, seed: int = 0, create: bool = True) -> str:
    """The one place that handles a recipe's ``model.path: "tiny:"``: a tiny random Llama at ``<run_dir>/tiny_model``
    (written once with ``seed``; ``create=False`` on non-main ranks, which wait for rank 0). Any other path is returned
    unchanged."""
    if not str(path).startswith("tiny:"):
        return str(path)
    target = Path(run_dir) / "tiny_model"
    if create and not (target / "config.json").exists():
        create_tiny(target, seed=seed)
    return str(target)
