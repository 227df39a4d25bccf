"""Losses as pure tensor functions: the equation, the paper and the shapes in each docstring.

Each returns ``(loss, metrics)`` where ``metrics`` is a dict of detached scalars, and never sees a config object.
"""

from __future__ import annotations


# ---------------------------------------------------------------------------------------------------------------------
# Preference and RL losses (reward model, DPO/cDPO/IPO, PPO). Shapes: B = batch, T = tokens, K = responses per prompt.
# ---------------------------------------------------------------------------------------------------------------------
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all tokens of the batch pooled: a token-level mean).

    A fully masked input gives 0 (not NaN), so it contributes zero gradient instead of poisoning the step.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def pairwise_reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                         margin: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry pairwise loss for a reward model.

        loss = mean_b  -log sigmoid(r_c[b] - r_r[b] - m[b])

    (Christiano et al. 2017; Stiennon et al. 2020; Ouyang et al. 2022 "InstructGPT" eq. 1; the margin m is Llama 2's
    (Touvron et al. 2023, eq. 2), 0 when absent.) Shapes: chosen_rewards, rejected_rewards, margin: (B,).
    Metrics: accuracy (fraction with r_c > r_r; ties count as wrong), mean margin r_c - r_r.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    shifted = diff if margin is None else diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    loss = -F.logsigmoid(shifted).mean()
    metrics = {
        "accuracy": (diff > 0).to(diff.dtype).mean().detach(),
        "reward_margin": diff.mean().detach(),
        "chosen_reward": chosen_rewards.mean().detach(),
        "rejected_reward": rejected_rewards.mean().detach(),
    }
    return loss, metrics


def ranking_pairs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All K-choose-2 (better, worse) index pairs for a ranking whose index order is best first."""
    better, worse = torch.triu_indices(k, k, offset=1)
    return better, worse


def kwise_reward_loss(rewards: torch.Tensor, valid: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InstructGPT's K-wise ranking loss: every one of the K-choose-2 pairs of a prompt's ranked responses in one batch.

        loss = -1 / sum_p C(K_p, 2) * sum_p sum_{i<j} log sigmoid(r[p, i] - r[p, j])

    (Ouyang et al. 2022, eq. 1: each prompt's pairs are one batch element, so a prompt is not over-counted across
    epochs.) Shapes: rewards (P, K), index order = rank (0 best); valid (P, K) bool marks present responses when
    prompts have fewer than K (absent ones are ignored). The loss is the mean over all valid pairs of the batch.
    """
    p, k = rewards.shape
    better, worse = ranking_pairs(k)  # (C,), (C,)
    diff = rewards[:, better] - rewards[:, worse]  # (P, C)
    pair_ok = torch.ones_like(diff, dtype=torch.bool) if valid is None else (valid[:, better] & valid[:, worse])
    w = pair_ok.to(diff.dtype)
    n = w.sum().clamp(min=1.0)
    loss = -(F.logsigmoid(diff) * w).sum() / n
    metrics = {
        "accuracy": (((diff > 0).to(diff.dtype)) * w).sum().detach() / n,
        "reward_margin": (diff * w).sum().detach() / n,
        "pairs": w.sum().detach(),
    }
    return loss, metrics


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization and two variants, from summed (or, for IPO, mean) response log-probs.

        h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))
        sigmoid (DPO, Rafailov et al. 2023, eq. 7):   loss = -log sigmoid(beta * h)
        cDPO (Mitchell 2023, label smoothing eps):    loss = -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        ipo (Azar et al. 2023, eq. 17):               loss = (h - 1 / (2 beta))^2

    Shapes: all four inputs (B,). Implicit rewards are beta * (log pi - log ref) for chosen and rejected.
    When the policy equals the reference h = 0, so the sigmoid loss is log 2 and the IPO loss 1/(4 beta^2).
    Metrics: implicit chosen/rejected rewards, their margin and accuracy (chosen reward > rejected reward).
    """
    chosen_logratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratio - rejected_logratio  # (B,)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")
    chosen_rewards = (beta * chosen_logratio).detach()
    rejected_rewards = (beta * rejected_logratio).detach()
    metrics = {
        "rewards_chosen": chosen_rewards.mean(),
        "rewards_rejected": rejected_rewards.mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).to(h.dtype).mean(),
        "logps_chosen": policy_chosen_logps.detach().mean(),
        "logps_rejected": policy_rejected_logps.detach().mean(),
    }
    return losses.mean(), metrics


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise, per token.

        ratio = exp(logp - logp_old)
        loss  = masked_mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )

    Shapes: logprobs, old_logprobs, advantages, mask: (B, T) over response tokens; mask is 1 on real response tokens.
    Metrics: clip fraction (tokens where the clipped branch is active), approx_kl = masked_mean(0.5 (logp - logp_old)^2)
    (Schulman's k2; TRL/OpenAI's summarize-from-feedback log this), and the mean ratio.
    """
    log_ratio = (logprobs - old_logprobs) * mask  # (B, T); masked so padding cannot overflow exp
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, metrics


GRPO_AGGREGATIONS = ("sequence", "token", "constant")


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                        ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                        aggregation: str = "sequence", num_sequences: float | None = None,
                        num_tokens: float | None = None, max_length: int | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate with a k3 KL to a reference, per token, and three ways to aggregate it.

    Per token t of response i (Shao et al. 2024, DeepSeekMath eq. 3; clip-higher of Yu et al. 2025, DAPO eq. 10):

        ratio_it = exp(logp_it - logp_old_it)
        l_it     = -min(ratio_it A_i, clip(ratio_it, 1 - eps_low, 1 + eps_high) A_i) + beta k3_it
        k3_it    = exp(logp_ref_it - logp_it) - (logp_ref_it - logp_it) - 1      (>= 0; 0 when pi = pi_ref)

    Aggregation (the normalisers are the whole optimizer step's, so that micro-batches that each return their part
    sum to the loss of the full batch: pass ``num_sequences`` / ``num_tokens`` of the step; by default this batch's):

        sequence (GRPO):     L = 1/N_seq  sum_i 1/|o_i| sum_t l_it          (sequence-mean of token-means)
        token (DAPO eq. 12): L = 1/N_tok  sum_i sum_t l_it                  (every token weighs the same)
        constant (Dr. GRPO): L = 1/(N_seq L_max) sum_i sum_t l_it          (no length bias; L_max = ``max_length``)

    Shapes: logprobs, old_logprobs, ref_logprobs, mask: (B, T) over response tokens (mask 1 on real ones);
    advantages: (B,) one per response, or (B, T). On the first update of a rollout batch logprobs == old_logprobs,
    so ratio = 1 exactly and the loss's gradient is -A_i d logp_it (the REINFORCE estimator with the group baseline).
    Metrics: clip fractions (low: ratio < 1 - eps_low with A < 0; high: ratio > 1 + eps_high with A > 0), the mean
    ratio, approx_kl to the rollout policy (k2), and the mean k3 KL to the reference when given.
    """
    if aggregation not in GRPO_AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {GRPO_AGGREGATIONS}")
    mask = mask.to(logprobs.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    log_ratio = (logprobs - old_logprobs) * mask  # (B, T); masked so padding cannot overflow exp
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    kl = None
    if ref_logprobs is not None:
        d = (ref_logprobs - logprobs) * mask
        kl = torch.expm1(d) - d  # (B, T): k3 of Schulman (2020), as DeepSeekMath writes it
        if kl_coef:
            per_token = per_token + kl_coef * kl
    per_token = per_token * mask
    lengths = mask.sum(dim=1)  # (B,)
    n_seq = float(num_sequences) if num_sequences is not None else float(logprobs.shape[0])
    if aggregation == "sequence":
        loss = (per_token.sum(dim=1) / lengths.clamp(min=1.0)).sum() / max(n_seq, 1.0)
    elif aggregation == "token":
        n_tok = num_tokens if num_tokens is not None else float(lengths.sum())
        loss = per_token.sum() / max(float(n_tok), 1.0)
    else:
        if not max_length:
            raise ValueError("aggregation 'constant' (Dr. GRPO) needs max_length, the longest response allowed")
        loss = per_token.sum() / (max(n_seq, 1.0) * float(max_length))
    with torch.no_grad():
        adv_full = adv.expand_as(ratio)
        metrics = {
            "clipfrac_low": masked_mean(((ratio < 1.0 - clip_low) & (adv_full < 0)).to(ratio.dtype), mask),
            "clipfrac_high": masked_mean(((ratio > 1.0 + clip_high) & (adv_full > 0)).to(ratio.dtype), mask),
            "ratio": masked_mean(ratio, mask),
            "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask)
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (Schulman et al. 2017 baselines; Ziegler et al. 2019; the TRL/OpenAI PPO implementations).

        v_clip = old_v + clip(v - old_v, -eps, eps)
        loss   = 0.5 * masked_mean( max((v - R)^2, (v_clip - R)^2) )

    Shapes: values, old_values, returns, mask: (B, T). Metrics: value clip fraction, explained variance
    1 - Var(R - old_v) / Var(R) over masked tokens (of the rollout's values: how well the critic predicted).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    l_unclipped = (values - returns) ** 2
    l_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l_unclipped, l_clipped), mask)
    with torch.no_grad():
        var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        resid = returns - old_values
        var_resid = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
        explained = 1.0 - var_resid / var_r if var_r > 0 else torch.zeros((), dtype=values.dtype)
        metrics = {
            "value_clipfrac": masked_mean((l_clipped > l_unclipped).to(values.dtype), mask),
            "explained_variance": explained,
        }
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level mean entropy of the policy, H = -sum_v p_v log p_v, over masked positions.

    Shapes: logits (B, T, V), mask (B, T). An entropy bonus enters the PPO loss as ``- coef * H``.
    """
    return entropy_from_logprobs(torch.log_softmax(logits.float(), dim=-1), mask)


def entropy_from_logprobs(logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`entropy_from_logits` from log-probabilities logp = log_softmax(logits) (B, T, V) already computed (the
    PPO loss reuses the log-softmax of its ratio)."""
    ent = -(logp.exp() * logp).sum(-1)  # (B, T)
    h = masked_mean(ent, mask)
    return h, {"entropy": h.detach()}


# ---------------------------------------------------------------------------------------------------------------------
# SFT: next-token cross entropy with the output layer applied only at supervised positions.
# ---------------------------------------------------------------------------------------------------------------------
SFT_CHUNK_BYTES = 64 * 2**20  # fp32 logits of one output-layer chunk: 64 MiB (64 rows of Gemma 3's 262,144 vocab)


def _vocab_size(output_layer) -> int | None:
    """Output width of the output layer if it says (nn.Linear, peft's LoRA Linear: ``out_features``), else None."""
    v = getattr(output_layer, "out_features", None)
    if v is None and isinstance(getattr(output_layer, "weight", None), torch.Tensor):
        v = output_layer.weight.shape[0]
    return int(v) if v else None


def _sft_chunk_loss(h: torch.Tensor, target: torch.Tensor, output_layer, logit_softcap: float | None) -> torch.Tensor:
    """Summed cross entropy of one chunk of supervised rows: h (n, H), target (n,) -> scalar."""
    logits = output_layer(h)  # (n, V)
    if logit_softcap:
        logits = torch.tanh(logits / logit_softcap) * logit_softcap
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, target, reduction="sum")


def _supervised_rows(hidden: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (B, T, H), labels (B, T) -> the N supervised rows of hidden (N, H), their targets (N,), and N as a
    tensor (the count the caller normalises by)."""
    flat_labels = labels.reshape(-1)  # (B*T,)
    idx = (flat_labels != -100).nonzero(as_tuple=True)[0]  # (N,)
    n_tokens = torch.tensor(idx.numel(), device=hidden.device)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx), flat_labels.index_select(0, idx), n_tokens


def sft_loss(hidden: torch.Tensor, labels: torch.Tensor, output_layer,
             logit_softcap: float | None = None, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy over supervised positions, and how many there are.

        sum_loss = sum_{(b,t): labels[b,t] != -100}  -log softmax(W h[b,t])[labels[b,t]]

    Shapes: hidden (B, T, H) from the model body; labels (B, T), already shifted (labels[b, t] is the token at t + 1, or
    -100); output_layer maps (N, H) -> (N, V) (the lm_head module, LoRA-wrapped or tied to the embedding: any callable).
    Only the N supervised rows reach the output layer, so its vocab x hidden cost is paid for N positions, not B x T
    (for Gemma-3-270M that layer costs more FLOPs than the body). With ``logit_softcap`` c, logits = c * tanh(logits / c)
    (Gemma 2's final soft-capping).

    Memory: the N rows go through the output layer and the cross entropy in chunks of ``chunk_rows`` (default: as many
    rows as fit SFT_CHUNK_BYTES of fp32 logits, i.e. 64 for a 262,144 vocab, 32,768 for a 512 vocab). With more than one
    chunk each chunk runs under activation checkpointing, so no (chunk, V) logits, log-softmax or gradient outlives its
    chunk: the output layer's peak is O(chunk_rows x V), not O(N x V), for one extra output-layer forward per chunk in
    backward (the idea of TRL's / Liger's fused linear cross entropy, here via torch.utils.checkpoint so any callable
    output layer, LoRA or tied, works). A single chunk runs plainly (no recompute; its peak is one chunk anyway).

    Returns ``(sum_loss, n_tokens)`` rather than a mean, so the caller normalises over the supervised tokens of the whole
    optimizer step, across micro-batches and ranks (exact gradient accumulation). With no supervised token the loss
    is an exact 0 that still depends on the graph (zero gradient, never NaN); the caller counts such batches.
    """
    h, target, n_tokens = _supervised_rows(hidden, labels)
    n = target.numel()
    if n == 0:
        return hidden.sum() * 0.0, n_tokens
    if chunk_rows is None:
        vocab = _vocab_size(output_layer)
        chunk_rows = max(1, SFT_CHUNK_BYTES // (4 * vocab)) if vocab else 1024
    if n <= chunk_rows:
        return _sft_chunk_loss(h, target, output_layer, logit_softcap), n_tokens
    from torch.utils.checkpoint import checkpoint

    loss = None
    for s in range(0, n, chunk_rows):
        part = checkpoint(_sft_chunk_loss, h[s:s + chunk_rows], target[s:s + chunk_rows], output_layer,
                          logit_softcap, use_reentrant=False)  # scalar; the chunk's logits are recomputed in backward
        loss = part if loss is None else loss + part
    return loss, n_tokens


# ---------------------------------------------------------------------------------------------------------------------
# SFT, fused output layer: the same sum as sft_loss, with the output layer's gradients computed in the forward pass.
# ---------------------------------------------------------------------------------------------------------------------
# fp32 logits of one fused chunk: 128 MiB (128 rows of Gemma 3's 262,144 vocab). Measured on gemma-3-270m (LoRA step,
# 233 supervised rows, 1 thread, CPU seconds): 64 rows 3.05, 128 rows 2.82, 256 rows (one chunk) 2.60: the
# (rows x 640) @ (640 x 262,144) product runs at 84 / 106 / 116 GFLOP/s. 128 keeps the step's peak RSS under TRL's.
SFT_FUSED_CHUNK_BYTES = 128 * 2**20


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(h_i W^T), t_i) for h (N, H), W (V, H), t (N,), chunk by chunk over the N rows.

    Written by hand: TRL 1.16's fused head recomputes each logits tile in backward; Liger's fused linear cross entropy
    computes the gradients in forward as here, but is a Triton (GPU) kernel. It works because the gradient of a summed
    cross entropy is known in closed form while the chunk's logits are still in memory: d/dz = softmax(z) - onehot(t)
    (times 1 - tanh^2 under the soft-cap), so forward computes dL/dh = G W and dL/dW = G^T h right away and backward
    only scales them by the incoming scalar gradient. Per supervised row that is 4 V H FLOPs (logits, dL/dh) instead
    of 6 V H (logits, their recomputation, dL/dh) for ``sft_loss``'s checkpointed chunks, with the same O(chunk x V)
    peak."""

    @staticmethod
    def forward(ctx, h, weight, target, logit_softcap, chunk_rows, compute_dtype=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hw, ww = h, weight  # what the matmuls see: under autocast (compute_dtype) both cast once, as autocast would
        if compute_dtype is not None and (h.dtype != compute_dtype or weight.dtype != compute_dtype):
            hw, ww = h.to(compute_dtype), weight.to(compute_dtype)
        if need_h and not need_w and not logit_softcap and hw.dtype in (torch.float32, torch.float64) \
                and ww.dtype == hw.dtype:  # a frozen head (LoRA): one streaming pass over W
            loss, grad_h = _streaming_ce_and_input_grad(hw, ww, target)
            ctx.save_for_backward(grad_h.to(h.dtype), None)
            ctx.used = False
            return loss
        grad_h = torch.zeros_like(h) if need_h else None  # (N, H)
        grad_w = torch.zeros_like(weight) if need_w else None  # (V, H), fp32 for fp32 master weights: summed in fp32
        loss = None
        work = _logits_workspace(min(chunk_rows, h.shape[0]), ww.shape[0], ww.dtype, ww.device)
        for s in range(0, h.shape[0], chunk_rows):
            hc, tc = hw[s:s + chunk_rows], target[s:s + chunk_rows]  # (n, H), (n,)
            z = torch.mm(hc, ww.t(), out=work[:hc.shape[0]])  # (n, V): the output layer's F.linear, bit for bit
            th = None
            if logit_softcap:
                th = torch.tanh(z / logit_softcap)
                z = th * logit_softcap
            if z.dtype in (torch.float16, torch.bfloat16):
                z = z.float()
            logp = torch.log_softmax(z, dim=-1, out=z)  # (n, V), in place: the same values as out of place
            del z
            part = F.nll_loss(logp, tc, reduction="sum")  # == F.cross_entropy(z, tc, reduction="sum"), bit for bit
            loss = part if loss is None else loss + part
            if need_h or need_w:
                g = logp.exp_()  # softmax, in place
                g[torch.arange(g.shape[0], device=g.device), tc] -= 1.0  # dL/dz = softmax - onehot
                if th is not None:
                    g.mul_(1.0 - th * th)  # d(c tanh(z / c))/dz
                g = g.to(ww.dtype)
                if need_h:
                    if grad_h.dtype == ww.dtype:
                        torch.mm(g, ww, out=grad_h[s:s + chunk_rows])
                    else:
                        grad_h[s:s + chunk_rows] = torch.mm(g, ww)
                if need_w:
                    if grad_w.dtype == ww.dtype:
                        grad_w.addmm_(g.t(), hc)
                    else:  # a bf16 product per chunk, the sum over chunks in the weight's fp32
                        grad_w += torch.mm(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError("sft_loss_fused: its gradients are scaled in place, so backward runs once per forward")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h.mul_(grad_out) if grad_h is not None else None,
                grad_w.mul_(grad_out) if grad_w is not None else None, None, None, None, None)


STREAM_BLOCK = 4096  # vocabulary rows per block of the streaming pass
STREAM_ROWS = 1024  # input rows per pass over W
# vocabulary rows per logits matmul inside a block. Why: a 512 x 640 slice of W (1.3 MB) stays in the 2 MB L2 cache
# while MKL sweeps the rows of h; gemma-3-270m's logits for 233 rows, 2 threads: 235 -> 218 ms per pass, step
# 1.098 -> 1.087 s. Each logit is the same dot product either way (bit-identical at that shape here; equal within
# rounding in the tests' tiny fp64 problem, where MKL picks other kernels for the slices).
STREAM_SUB = 512


def _streaming_ce_and_input_grad(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i CE(W h_i, t_i) and its gradient dL/dh = softmax(W h_i) W - W_{t_i}, for a frozen W, in one pass over
    W's rows in blocks of STREAM_BLOCK, with the online (running-maximum) softmax of flash attention: per block b,

        z = h W_b^T;  m' = max(m, max_b z);  s = s e^(m - m') + sum_b e^(z - m');  a = a e^(m - m') + e^(z - m') W_b

    and at the end lse = m + log s, loss = sum_i (lse_i - z_{i, t_i}), dL/dh = a / s - W_t. Shapes: h (N, H), W (V, H),
    t (N,); z (N, block) stays in cache. Why: the two-pass chunks write the (rows, V) logits out to memory and read
    them back four times (log-softmax, exp, the gradient matmul); here each block's logits are used while hot, the
    same FLOPs (4 V H per row). Measured on gemma-3-270m's 262,144 x 640 head, 233 rows, 2 threads: 539 -> 481 ms.
    The loss differs from the two-pass value only by summation order (~1e-7 relative in fp32)."""
    n_rows, vocab = h.shape[0], weight.shape[0]
    loss = None
    grad_h = torch.empty_like(h)
    for r0 in range(0, n_rows, STREAM_ROWS):
        hc, tc = h[r0:r0 + STREAM_ROWS], target[r0:r0 + STREAM_ROWS]
        n = hc.shape[0]
        m = torch.full((n,), float("-inf"), dtype=h.dtype, device=h.device)
        s = torch.zeros(n, dtype=h.dtype, device=h.device)
        acc = torch.zeros_like(hc)  # (n, H)
        z_t = torch.empty(n, dtype=h.dtype, device=h.device)
        work = _logits_workspace(n, min(STREAM_BLOCK, vocab), h.dtype, h.device)
        for b0 in range(0, vocab, STREAM_BLOCK):
            wb = weight[b0:b0 + STREAM_BLOCK]  # (B, H)
            if wb.shape[0] == work.shape[1]:
                z = work[:n]  # (n, B)
                for j in range(0, wb.shape[0], STREAM_SUB):
                    torch.mm(hc, wb[j:j + STREAM_SUB].t(), out=z[:, j:j + STREAM_SUB])
            else:  # a last, shorter block
                z = torch.mm(hc, wb.t())
            here = ((tc >= b0) & (tc < b0 + wb.shape[0])).nonzero()[:, 0]
            if here.numel():
                z_t[here] = z[here, tc[here] - b0]
            m_new = torch.maximum(m, z.amax(dim=1))
            rescale = torch.exp(m - m_new)  # 0 on the first block (m = -inf)
            z.sub_(m_new[:, None]).exp_()
            s = s * rescale + z.sum(dim=1)
            acc.mul_(rescale[:, None]).addmm_(z, wb)
            m = m_new
        part = (m + torch.log(s) - z_t).sum()
        loss = part if loss is None else loss + part
        torch.sub(acc / s[:, None], weight[tc], out=grad_h[r0:r0 + n])
    return loss, grad_h


_WORKSPACE: dict[tuple, torch.Tensor] = {}


def _logits_workspace(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (>= rows, vocab) buffer for one chunk of logits, kept between calls. Why: on CPU a fresh 134 MB chunk
    (128 x 262,144 fp32) is mapped from the OS and page-faulted on first write at every step; reusing one buffer for
    the logits and, in place, their log-softmax measured 177 -> 135 ms for the chunk's matmul and 89 -> 62 ms for the
    log-softmax on gemma-3-270m (2 threads). It stays allocated (one chunk's worth, already part of the peak)."""
    key = (dtype, device, vocab)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.shape[0] < rows:
        _WORKSPACE.clear()  # one buffer at a time
        buf = _WORKSPACE[key] = torch.empty((rows, vocab), dtype=dtype, device=device)
    return buf


def sft_loss_fused(hidden: torch.Tensor, labels: torch.Tensor, output_layer,
                   logit_softcap: float | None = None, chunk_rows: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sft_loss`` (same arguments, same returned sum and count) with a fused output layer and cross entropy.

        sum_loss = sum_{(b,t): labels[b,t] != -100}  -log softmax(W h[b,t])[labels[b,t]]

    When ``output_layer`` is a plain bias-free ``nn.Linear`` (the usual lm_head, tied or not) and a gradient is being
    recorded, the N supervised rows go through ``_FusedLinearCrossEntropy`` in chunks of ``chunk_rows`` (default: as
    many rows as fit SFT_FUSED_CHUNK_BYTES of fp32 logits, in one reused buffer): the loss value is the same float
    sum as sft_loss's, and the gradients are the same up to summation order (~1e-7 relative), for one third fewer
    output-layer FLOPs (measured on gemma-3-270m, 233 supervised rows, 1 thread, 64-row chunks: output layer forward +
    backward 6.1 s -> 3.4 s; whole LoRA step 4.4 -> 3.0 CPU-seconds). Any other output layer (LoRA-wrapped, quantised,
    with a bias) and no-grad evaluation use sft_loss unchanged. A frozen fp32/fp64 head without soft-capping (LoRA)
    takes ``_streaming_ce_and_input_grad`` instead: one pass over W in vocabulary blocks, the loss equal to sft_loss's
    up to summation order (~1e-7 relative in fp32).
    """
    weight = getattr(output_layer, "weight", None)
    plain = (type(output_layer) is torch.nn.Linear and output_layer.bias is None and isinstance(weight, torch.Tensor)
             and weight.dtype.is_floating_point)
    if not plain or not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return sft_loss(hidden, labels, output_layer, logit_softcap, chunk_rows)
    h, target, n_tokens = _supervised_rows(hidden, labels)
    n = target.numel()
    if n == 0:
        return hidden.sum() * 0.0, n_tokens
    if chunk_rows is None:
        chunk_rows = max(1, SFT_FUSED_CHUNK_BYTES // (4 * weight.shape[0]))
    # mixed precision (models/precision.py): under autocast the matmuls run in its dtype (bf16), the log-softmax, the
    # loss and the weight gradient's sum over chunks in fp32; autocast itself is off inside (it would mix dtypes)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return _FusedLinearCrossEntropy.apply(h, weight, target, logit_softcap, chunk_rows,
                                                  torch.get_autocast_dtype(device_type)), n_tokens
    return _FusedLinearCrossEntropy.apply(h, weight, target, logit_softcap, chunk_rows), n_tokens


# ---------------------------------------------------------------------------------------------------------------------
# The rest of the preference family: KTO (unpaired labels, with a reference), ORPO and SimPO (no reference).
# Shapes: B = examples or pairs. "logps" are summed response log-probs, "avg_logps" per-token means.
# ---------------------------------------------------------------------------------------------------------------------
def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl_baseline: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, eq. 8), from unpaired desirable / undesirable examples.

        r(x, y) = log pi(y|x) - log ref(y|x)
        z0      = max(0, E_{x, y'} [ log pi(y'|x) - log ref(y'|x) ])     (detached; y' a response to another prompt)
        v(x, y) = lambda_D sigma(beta (r - z0))   if y is desirable
                  lambda_U sigma(beta (z0 - r))   if y is undesirable
        loss    = mean_b  lambda_y - v(x_b, y_b)   =  mean_b lambda_y (1 - sigma(...))

    ``kl_baseline`` is z0, computed by the caller from mismatched pairs (see :func:`kto_kl_baseline`) over the whole
    step and across processes; it is treated as a constant. Shapes: policy_logps, ref_logps: (B,); desirable: (B,)
    bool; kl_baseline: scalar. When the policy equals the reference r = 0 and z0 = 0, so each term is lambda_y / 2.
    Metrics: mean implicit reward of desirable and undesirable examples and the baseline z0.
    """
    r = policy_logps - ref_logps  # (B,)
    z0 = torch.as_tensor(kl_baseline, dtype=r.dtype, device=r.device).detach().clamp(min=0.0)
    desirable = desirable.to(torch.bool)
    value = torch.where(desirable, torch.sigmoid(beta * (r - z0)), torch.sigmoid(beta * (z0 - r)))  # (B,)
    weight = torch.where(desirable, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    loss = (weight * (1.0 - value)).mean()
    with torch.no_grad():
        d, u = desirable.to(r.dtype), (~desirable).to(r.dtype)
        metrics = {
            "rewards_desirable": (beta * r * d).sum() / d.sum().clamp(min=1.0),
            "rewards_undesirable": (beta * r * u).sum() / u.sum().clamp(min=1.0),
            "kl_baseline": z0,
        }
    return loss, metrics


def kto_kl_baseline(mismatched_policy_logps: torch.Tensor, mismatched_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean_m (log pi(y'_m|x_m) - log ref(y'_m|x_m))), detached, from M mismatched
    (prompt, response of another prompt) pairs (Ethayarajh et al. 2024, section 4.1: a biased but practical estimate
    of KL(pi || ref)). Shapes: (M,) -> scalar."""
    return (mismatched_policy_logps - mismatched_ref_logps).mean().detach().clamp(min=0.0)


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, chosen_nll: torch.Tensor,
              lam: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Odds Ratio Preference Optimization (Hong et al. 2024, eq. 6-7): SFT on the chosen response plus an odds-ratio
    term, no reference model.

        P(y|x)   = exp( 1/|y| sum_t log pi(y_t | x, y_<t) )      (length-normalised likelihood; avg_logps = its log)
        odds(y)  = P / (1 - P);    log odds = avg_logp - log(1 - exp(avg_logp))
        L_OR     = -log sigmoid( log odds(y_w) - log odds(y_l) )
        loss     = L_SFT + lambda * mean_b L_OR

    ``chosen_nll`` is L_SFT (the mean next-token NLL of the chosen responses, computed by the caller). Shapes:
    chosen_avg_logps, rejected_avg_logps: (B,), each < 0; chosen_nll: scalar. With equal likelihoods L_OR = log 2.
    Metrics: the odds-ratio term, the mean log odds ratio, accuracy (chosen odds > rejected odds).
    """
    def log_odds(avg):  # log(P / (1 - P)) with P = exp(avg) < 1; log1p(-exp(a)) is exact near P -> 0
        return avg - torch.log1p(-torch.exp(avg))

    log_odds_ratio = log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps)  # (B,)
    or_term = -F.logsigmoid(log_odds_ratio).mean()
    loss = chosen_nll + lam * or_term
    metrics = {
        "or_loss": or_term.detach(),
        "log_odds_ratio": log_odds_ratio.detach().mean(),
        "reward_accuracy": (log_odds_ratio > 0).to(log_odds_ratio.dtype).mean().detach(),
        "nll": torch.as_tensor(chosen_nll).detach(),
    }
    return loss, metrics


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float = 2.0,
               gamma: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Simple Preference Optimization (Meng et al. 2024, eq. 6): a length-normalised margin, no reference model.

        loss = mean_b  -log sigmoid( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )

    Shapes: chosen_avg_logps, rejected_avg_logps (B,) = (1/|y|) log pi(y|x). ``gamma`` is the target reward margin
    (TRL's ``gamma_beta_ratio`` is gamma / beta). With equal average log-probs the loss is -log sigmoid(-gamma) =
    log(1 + e^gamma). Metrics: implicit rewards beta * avg_logp of each side, their margin and accuracy.
    """
    chosen_r = beta * chosen_avg_logps
    rejected_r = beta * rejected_avg_logps
    losses = -F.logsigmoid(chosen_r - rejected_r - gamma)
    metrics = {
        "rewards_chosen": chosen_r.detach().mean(),
        "rewards_rejected": rejected_r.detach().mean(),
        "reward_margin": (chosen_r - rejected_r).detach().mean(),
        "reward_accuracy": (chosen_r > rejected_r).to(chosen_r.dtype).mean().detach(),
    }
    return losses.mean(), metrics
