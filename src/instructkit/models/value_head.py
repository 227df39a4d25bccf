"""Scalar heads on a language-model backbone: reward models, value models (critics), and response-only log-probs.

All functions here work on the *prompt/response layout* of rl/rollout.py: each row is a left-padded prompt of width
P followed by a right-padded response of width R, so the response occupies the same columns P .. P+R-1 in every row.
Then the hidden state that predicts response token j is at column P-1+j for every row, and the output layer (or the
scalar head) runs only on those R columns: never on the prompt (TRL's DPO spends about 55% of a CPU step on prompt and
padding logits) and never on padding.

Reward model format: a plain Hugging Face ``*ForSequenceClassification`` folder with ``num_labels=1`` (for a Llama:
``LlamaForSequenceClassification``, whose ``score`` is our head), so ``AutoModelForSequenceClassification`` loads it
with no code of ours. Its raw score of a sequence without padding equals ours. The normalisation measured on the
training data (mean, std of the raw rewards) is stored in ``config.json`` under ``instructkit_reward_normalization``;
``normalized = (raw - mean) / std``. ``load_reward_model`` applies it; with plain transformers apply it yourself.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

NORM_KEY = "instructkit_reward_normalization"


def _unwrap(model):
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def backbone_and_score(model) -> tuple[nn.Module, nn.Module]:
    """(body, score head) of a ``*ForSequenceClassification`` model, through peft and DDP wrappers."""
    m = _unwrap(model)
    body = getattr(m, getattr(m, "base_model_prefix", "model"), None) or m.model
    head = getattr(m, "score", None) or getattr(m, "classifier", None)
    if head is None:
        raise TypeError(f"{type(m).__name__} has no 'score' or 'classifier' head")
    return body, head


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens (as transformers' generate computes them for left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def body_hidden(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) final hidden states of a decoder body on a left/right padded batch."""
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
               use_cache=False)
    return out.last_hidden_state


def response_hidden(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                    response_width: int) -> torch.Tensor:
    """(B, R, H) final hidden states at columns P-1 .. P+R-2, the ones that predict response tokens 0 .. R-1.

    Rows that repeat a prompt (the several responses per prompt of a PPO or GRPO rollout) share its forward: the
    distinct prompts run once into a key/value cache, each row's copy of its prompt's cache (``index_select``, so
    gradients from every copy add up in the prompt's forward) is followed by the row's response, and only R-1 response
    columns go through the body. With 2 prompts of ~100 tokens and 4 responses of 32 tokens each, the body computes 456
    instead of 1,080 positions. The same function scores the rollout and computes the update, so old and new log-probs
    of one batch are the same computation (the first PPO ratio is exactly 1); against the plain forward the hidden
    states differ by float rounding only (tested). A sliding-window model whose rows are longer than its window, and a
    body training with gradient checkpointing (transformers turns its cache off), take the plain forward."""
    P, R = prompt_width, response_width
    groups = _prompt_groups(input_ids[:, :P], attention_mask[:, :P])
    window = getattr(body.config, "sliding_window", None)
    checkpointing = body.training and getattr(body, "gradient_checkpointing", False)  # transformers drops the cache
    if groups is None or R < 1 or (window and P + R > window) or checkpointing:
        return body_hidden(body, input_ids, attention_mask)[:, P - 1:P - 1 + R]
    from transformers import DynamicCache

    distinct, source = groups
    pos = position_ids_from_mask(attention_mask)
    cache = DynamicCache(config=body.config)
    out = body(input_ids=input_ids[distinct, :P], attention_mask=attention_mask[distinct, :P],
               position_ids=pos[distinct, :P], past_key_values=cache, use_cache=True)
    last = out.last_hidden_state[:, -1:].index_select(0, source)  # (B, 1, H): predicts response token 0
    if R == 1:
        return last
    cache = out.past_key_values
    cache.batch_select_indices(source)
    out = body(input_ids=input_ids[:, P:P + R - 1], attention_mask=attention_mask[:, :P + R - 1],
               position_ids=pos[:, P:P + R - 1], past_key_values=cache, use_cache=True)
    return torch.cat([last, out.last_hidden_state], dim=1)


def _prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """``load.repeated_rows`` of (B, P) prompt columns: a row's prompt is its ids and its mask."""
    from instructkit.models.load import repeated_rows

    keys = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1).tolist()
    return repeated_rows([tuple(k) for k in keys], prompt_ids.device)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                    response_width: int, temperature: float = 1.0,
                    hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, R, V) predicting each response token, and the (B, R, H) hidden states they came from.

    Only the R response columns go through the output layer. ``temperature`` divides the logits, so log-probs match
    the distribution the rollout sampled from (Huang et al. 2024, "N+ implementation details", detail 4)."""
    from instructkit.models.load import causal_lm_parts

    body, head, softcap = causal_lm_parts(model)
    if hidden is None:
        h = response_hidden(body, input_ids, attention_mask, prompt_width, response_width)  # (B, R, H)
    else:
        h = hidden[:, prompt_width - 1: prompt_width - 1 + response_width]  # (B, R, H)
    # as one (B*R, H) matrix: the strided 3-D slice made the output layer a batched matmul with the weight expanded
    # per row (190 vs 350 GFLOP/s for SmolLM2's 49,152 rows here, forward and backward)
    logits = head(h.reshape(-1, h.shape[-1])).float().view(h.shape[0], h.shape[1], -1)  # (B, R, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    return logits, h


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: (B, R, V), (B, R) -> (B, R)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                      response_width: int, temperature: float = 1.0) -> torch.Tensor:
    """(B, R) log-probs of the response tokens (columns P..P+R-1 of ``input_ids``); padding positions are 0."""
    logits, _ = response_logits(model, input_ids, attention_mask, prompt_width, response_width, temperature)
    tokens = input_ids[:, prompt_width: prompt_width + response_width]
    mask = attention_mask[:, prompt_width: prompt_width + response_width].to(logits.dtype)
    return gather_logprobs(logits, tokens) * mask


def frozen_reference(policy: nn.Module, lora_enabled: bool) -> nn.Module | None:
    """The reference policy of KL-regularised RL (PPO, GRPO): a frozen copy of the starting weights, or None with LoRA,
    where the policy with its adapter disabled is the reference (no second copy of the model; reference_logprobs)."""
    return None if lora_enabled else copy.deepcopy(policy).eval().requires_grad_(False)


@torch.no_grad()
def reference_logprobs(policy, reference, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                       response_width: int, temperature: float = 1.0) -> torch.Tensor:
    """(B, R) response log-probs (response_logprobs) under the reference: ``reference`` (frozen_reference), or when it
    is None the ``policy`` with its LoRA adapter disabled."""
    if reference is not None:
        return response_logprobs(reference, input_ids, attention_mask, prompt_width, response_width, temperature)
    with policy.disable_adapter():
        return response_logprobs(policy, input_ids, attention_mask, prompt_width, response_width, temperature)


class ValueHead(nn.Module):
    """A scalar per position on top of a policy's hidden states (the shared-backbone critic of Ziegler et al. 2019).

    Zero-initialised so the first value estimates are 0 and do not disturb the first advantages."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, R, H) -> (B, R)
        return self.summary(hidden.float()).squeeze(-1)


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """(B, width) score-head outputs at columns ``start .. start+width-1`` of a ``*ForSequenceClassification`` model.

    Used for a separate critic: the value of the state after column c (predicting the next token) is the score at c.
    """
    body, head = backbone_and_score(model)
    return head(response_hidden(body, input_ids, attention_mask, start + 1, width)).float().squeeze(-1)


class ActorCritic(nn.Module):
    """A policy and its critic in one module, so one optimizer and one checkpoint see every trainable parameter. The
    critic is a ValueHead on the policy's hidden states (shared backbone), or a separate ``*ForSequenceClassification``
    model (InstructGPT: initialised from the reward model) read at every response position (token_scores)."""

    def __init__(self, policy, value_head: ValueHead | None = None, critic=None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.critic = critic

    def pretrained_parts(self) -> list[nn.Module]:
        """The transformers models inside (the policy, and a separate critic): activation checkpointing applies to
        each (training/sharding.prepare_training)."""
        return [m for m in (self.policy, self.critic) if m is not None]

    def values(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
               response_width: int) -> torch.Tensor:
        """(B, R) value of the state before each response token of a prompt/response batch (B, P+R); ``hidden``
        (B, R, H): the policy's hidden states of the response columns (response_logits), read by a value head."""
        if self.value_head is not None:
            return self.value_head(hidden)
        return token_scores(self.critic, input_ids, attention_mask, prompt_width - 1, response_width)


def disable_dropout(module: nn.Module) -> None:
    """Zero every dropout probability (RL: the log-prob ratio of the first update must be exactly 1; Huang et al. 2024,
    "The N+ implementation details of RLHF", detail 2)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    last_index: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) raw reward-model scores read at the last real token of each row.

    ``last_index`` defaults to the last position where ``attention_mask`` is 1 (never a pad-id search, so a sampled
    token equal to the pad id cannot move the read-out)."""
    body, head = backbone_and_score(model)
    hidden = body_hidden(body, input_ids, attention_mask)  # (B, L, H)
    if last_index is None:
        pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last_index = (attention_mask.long() * pos).argmax(-1)  # (B,)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head(hidden[rows, last_index]).float().squeeze(-1)  # (B,)


def read_normalization(model_or_path: Any) -> tuple[float, float]:
    """(mean, std) stored with a reward model; (0, 1) when absent."""
    if isinstance(model_or_path, (str, Path)):
        cfg = json.loads((Path(model_or_path) / "config.json").read_text())
        norm = cfg.get(NORM_KEY)
    else:
        norm = getattr(_unwrap(model_or_path).config, NORM_KEY, None)
    if not norm:
        return 0.0, 1.0
    return float(norm["mean"]), float(norm["std"])


def load_sequence_classifier(path: str | Path, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """``AutoModelForSequenceClassification`` with one label from a folder (a reward model, or a causal LM whose new
    score head is then randomly initialised), fp32, pad token id set from the tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                               trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def load_reward_model(path: str | Path, *, trust_remote_code: bool = False):
    """(model, tokenizer, (mean, std)) of a saved reward model, frozen and in eval mode."""
    model, tok = load_sequence_classifier(path, trust_remote_code=trust_remote_code)
    model.eval().requires_grad_(False)
    return model, tok, read_normalization(model)


def save_reward_model(model, tokenizer, out_dir: str | Path, mean: float, std: float) -> Path:
    """Write a plain ``*ForSequenceClassification`` folder (LoRA merged in) with the normalisation in config.json."""
    m = model
    if hasattr(m, "merge_and_unload"):
        m = m.merge_and_unload()
    setattr(m.config, NORM_KEY, {"mean": float(mean), "std": float(std)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
