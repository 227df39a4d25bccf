"""Log-likelihood of continuations, scored the way lm-evaluation-harness scores them.

``loglikelihoods(model, tokenizer, [(context, continuation), ...])`` returns, per pair, the sum over the continuation's
tokens of log p(token | everything before it) and whether greedy decoding would have produced exactly that
continuation: the two numbers lm-eval's ``loglikelihood`` requests return, so multiple-choice accuracy computed here
and by ``lm_eval --model hf`` agree (tests/test_interop_lmeval.py checks it to 1e-5).

Why by hand and not by calling lm-eval: lm-eval is a test-only dependency (the `test` extra) and its HFLM wants to own
model loading; here the model is whatever instructkit already holds (a peft model in training, a merged one after).
What has to match is the tokenisation convention, copied in behaviour from lm_eval/api/model.py ``_encode_pair`` and
``loglikelihood`` (0.4.x):
- trailing whitespace of the context moves to the start of the continuation ("Answer: " + "Paris" is scored as
  "Answer:" + " Paris"), so a word keeps its leading-space token;
- context + continuation is encoded as ONE string and split after the tokens of the context alone, so a merge across
  the boundary is scored as the tokenizer would really produce it;
- both are encoded with the tokenizer's own special-token default (a BOS where the tokenizer adds one), unless the
  text already starts with the BOS string;
- an empty context is replaced by the prefix token (BOS, else EOS);
- the input is the last ``max_length + 1`` tokens of context + continuation, minus the final token.
One forward pass per pair (batched, right-padded); the output layer runs only on the continuation positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class LogLikelihood:
    logprob: float
    """Sum over continuation tokens of log p(token | preceding tokens), natural log."""
    is_greedy: bool
    """True when every continuation token is the argmax of its predicted distribution."""
    n_tokens: int
    """Number of continuation tokens scored."""


def _prefix_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer, text: str) -> list[int]:
    kwargs = {}
    bos = tokenizer.decode(_prefix_token_id(tokenizer))
    if bos and text.startswith(bos):  # the text carries its own BOS: do not add a second one
        kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with lm-eval's whitespace and boundary convention (see module docstring)."""
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _default_max_length(model, tokenizer) -> int:
    cfg = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    mml = getattr(tokenizer, "model_max_length", None)
    return int(mml) if mml and mml < 10**9 else 2048


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                   max_length: int | None = None) -> list[LogLikelihood]:
    """Score each (context, continuation) pair; results in input order."""
    from instructkit.models.load import causal_lm_parts

    max_length = max_length or _default_max_length(model, tokenizer)
    encoded = []
    for context, continuation in pairs:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length {max_length}")
        full = (ctx + cont)[-(max_length + 1):]
        encoded.append((full[:-1], cont))  # the model reads all but the last token

    body, head, softcap = causal_lm_parts(model)
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[LogLikelihood | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # similar lengths together: less padding
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)  # (B, T) right-padded
        attn = torch.zeros((len(idx), T), dtype=torch.long)
        for row, i in enumerate(idx):
            inp = encoded[i][0]
            ids[row, :len(inp)] = torch.tensor(inp)
            attn[row, :len(inp)] = 1
        hidden = body(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state  # (B, T, H)
        for row, i in enumerate(idx):
            inp, cont = encoded[i]
            # the last len(cont) positions of the input predict the continuation tokens
            h = hidden[row, len(inp) - len(cont):len(inp)]  # (C, H)
            logits = head(h).float()  # (C, V)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            logp = torch.log_softmax(logits, dim=-1)  # (C, V)
            target = torch.tensor(cont)  # (C,)
            picked = logp.gather(1, target[:, None]).squeeze(1)  # (C,)
            out[i] = LogLikelihood(float(picked.double().sum()), bool((logp.argmax(-1) == target).all()), len(cont))
    if was_training:
        model.train()
    return out  # type: ignore[return-value]


def choice_scores(model, tokenizer, context: str, choices: Sequence[str], delimiter: str = " ",
                  **kwargs) -> list[float]:
    """Per-choice log-likelihoods of a multiple-choice item, as lm-eval's ``multiple_choice`` output type builds its
    requests: (context, delimiter + choice)."""
    return [r.logprob for r in loglikelihoods(model, tokenizer, [(context, delimiter + c) for c in choices], **kwargs)]
