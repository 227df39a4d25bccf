"""ORPO: supervised fine-tuning and preference alignment in one stage, without a reference model (Hong et al. 2024).

    loss = L_SFT + lambda * -log sigmoid( log odds(y_w|x) - log odds(y_l|x) )                    (losses.orpo_loss)
    odds(y|x) = P / (1 - P),  P = exp( (1/|y|) log pi(y|x) )

L_SFT here is the mean over pairs of each chosen response's per-token NLL (TRL takes the token mean over the batch;
the two agree when responses have equal lengths), so a step's loss does not depend on how it is split into
micro-batches.

Phases: config -> data (preference pairs, read and checked before the model is loaded) -> model (no reference copy)
-> pairs rendered with the chat template -> loop on the run runtime -> held-out loss, log odds ratio and accuracy ->
final/ and summary.json. The data, batching, loop and evaluation are those of every reference-free pair recipe
(training/pairs.py: chosen and rejected in one forward pass, each side's per-token mean response log-prob); this file
owns the loss.
"""

from __future__ import annotations

from typing import Any

import torch

from instructkit.config import ORPOConfig
from instructkit.losses import orpo_loss
from instructkit.training.pairs import encode_pair_splits, read_pairs, train_on_pairs


def main(cfg: ORPOConfig) -> dict[str, Any]:
    from instructkit.chat.render import Renderer
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.training.run import Run

    run = Run.start(cfg, "orpo", shardable=True)

    # -- data (read and checked before the model is loaded)
    train_pairs, val_pairs, read_stats = read_pairs(cfg, run)

    # -- model (no reference: the odds ratio compares the policy's own likelihoods)
    model, tok = load_model_and_tokenizer(run.model_config(), cfg.lora, precision=run.precision)
    model = run.prepare(model)  # activation checkpointing, FSDP2 (training/pairs.py routes every forward)
    renderer = Renderer.from_config(tok, cfg.model.template, cfg.data)

    # -- encode
    train_items, val_items = encode_pair_splits(renderer, train_pairs, val_pairs, cfg, run, read_stats)

    # -- loss: (chosen, rejected) per-token mean response log-probs, (n,) each; L_SFT is the mean per-pair chosen NLL
    def pair_loss(chosen: torch.Tensor, rejected: torch.Tensor):
        return orpo_loss(chosen, rejected, -chosen.mean(), cfg.lam)

    # -- loop, held-out evaluation (loss, its odds-ratio and SFT terms, log odds ratio, accuracy) and save
    initial_eval, final_eval = train_on_pairs(run, model, train_items, val_items, tok.pad_token_id, pair_loss)
    return run.finish(model, tok, {"train_pairs": len(train_items), "initial_eval": initial_eval, **final_eval},
                      template=renderer.template)
