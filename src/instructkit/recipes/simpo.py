"""SimPO: preference optimisation on a length-normalised reward margin, without a reference model (Meng et al. 2024).

    loss = -log sigmoid( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )        (losses.simpo_loss)

Phases: config -> data (preference pairs, read and checked before the model is loaded) -> model (no reference copy)
-> pairs rendered with the chat template -> loop on the run runtime -> held-out loss, margin and accuracy -> final/
and summary.json. The data, batching, loop and evaluation are those of every reference-free pair recipe
(training/pairs.py: chosen and rejected in one forward pass, each side's per-token mean response log-prob); this file
owns the loss.
"""

from __future__ import annotations

from typing import Any

import torch

from instructkit.config import SimPOConfig
from instructkit.losses import simpo_loss
from instructkit.training.pairs import encode_pair_splits, read_pairs, train_on_pairs


def main(cfg: SimPOConfig) -> dict[str, Any]:
    from instructkit.chat.render import Renderer
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.training.run import Run

    run = Run.start(cfg, "simpo", shardable=True)

    # -- data (read and checked before the model is loaded)
    train_pairs, val_pairs, read_stats = read_pairs(cfg, run)

    # -- model (no reference: SimPO's reward is the policy's own length-normalised log-likelihood)
    model, tok = load_model_and_tokenizer(run.model_config(), cfg.lora, precision=run.precision)
    model = run.prepare(model)  # activation checkpointing, FSDP2 (training/pairs.py routes every forward)
    renderer = Renderer.from_config(tok, cfg.model.template, cfg.data)

    # -- encode
    train_items, val_items = encode_pair_splits(renderer, train_pairs, val_pairs, cfg, run, read_stats)

    # -- loss: (chosen, rejected) per-token mean response log-probs, (n,) each
    def pair_loss(chosen: torch.Tensor, rejected: torch.Tensor):
        return simpo_loss(chosen, rejected, cfg.beta, cfg.gamma)

    # -- loop, held-out evaluation (loss, margin beta (avg_w - avg_l), accuracy) and save
    initial_eval, final_eval = train_on_pairs(run, model, train_items, val_items, tok.pad_token_id, pair_loss)
    return run.finish(model, tok, {"train_pairs": len(train_items), "initial_eval": initial_eval, **final_eval},
                      template=renderer.template)
