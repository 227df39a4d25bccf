"""RL maths for PPO on language models: KL-penalised per-token rewards, KL estimators, GAE, whitening, KL controllers.

Pure tensor functions (standard library + torch only). Shapes: B = rollouts, T = response tokens (right-padded);
``mask`` (B, T) is 1 on real response tokens and 0 on padding; every function leaves padding at exactly 0.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from instructkit.losses import masked_mean

KL_ESTIMATORS = ("k1", "k2", "abs", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(pi || ref) from samples y ~ pi (Schulman 2020, "Approximating KL divergence").

    With d = log pi(y) - log ref(y):
        k1 = d                      unbiased, high variance, can be negative per sample
        k2 = d^2 / 2                biased, low variance, >= 0
        abs = |d|                   >= 0 (used by some PPO implementations)
        k3 = (exp(-d) - 1) + d      unbiased, >= 0
    All four are 0 where pi and ref agree. Shapes: (B, T) in and out.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "abs":
        return d.abs()
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-padded (B, T) mask (0 for an empty row)."""
    t = mask.shape[1]
    positions = torch.arange(t, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values  # (B,)


def penalize_missing_eos(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Replace the score of a response that never produced the end-of-turn token by ``penalty`` (if set).

    A length-truncated response is unfinished; scoring it like a finished one teaches rambling (Huang et al. 2024,
    "The N+ implementation details of RLHF with PPO", detail 23.1: missing EOS penalty). Shapes: scores, ended: (B,).
    """
    if penalty is None:
        return scores
    return torch.where(ended.bool(), scores, torch.full_like(scores, float(penalty)))


def length_adjusted_scores(scores: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """s_i + coef * |y_i|: the score plus ``coef`` per response token (|y_i| = mask row sum).

    A negative coef is the length penalty of Singhal et al. 2023 ("A Long Way to Go: Investigating Length Correlations
    in RLHF"), against reward models that favour long answers; a positive one offsets a reward model that favours
    short ones (HH-RLHF harmless). Shapes: scores (B,), mask (B, R) -> (B,)."""
    if not coef:
        return scores
    return scores + coef * mask.sum(-1).to(scores.dtype)


def kl_penalized_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                         scores: torch.Tensor, beta: float, kl_kind: str = "k1"
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token reward of RLHF-PPO (Ziegler et al. 2019 eq. 2; Stiennon et al. 2020; Ouyang et al. 2022 eq. 2):

        r_t = -beta * kl_t               for every response token t
        r_T = -beta * kl_T + score       at the last response token T (the sequence-level score)

    where kl_t is an estimator of log pi(y_t) - log ref(y_t) (``kl_estimate``). Shapes: logprobs, ref_logprobs, mask:
    (B, T); scores: (B,). Returns rewards (B, T) (0 on padding) and metrics: ``kl`` (mean over rollouts of the summed
    per-sequence KL), ``non_score_reward`` (mean summed -beta*kl), ``score``.
    """
    kl = kl_estimate(logprobs, ref_logprobs, kl_kind) * mask  # (B, T)
    rewards = -beta * kl  # (B, T)
    last = last_token_index(mask)  # (B,)
    has_tokens = mask.sum(1) > 0  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.clone()
    rewards[rows, last] += torch.where(has_tokens, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    metrics = {
        "kl": kl.sum(1).mean().detach(),
        "non_score_reward": (-beta * kl).sum(1).mean().detach(),
        "score": scores.float().mean().detach(),
    }
    return rewards, metrics


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16) over right-padded, masked sequences.

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last real token is 0: the episode ended)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                             (the value target, "returns")

    Shapes: rewards, values, mask: (B, T). Returns advantages, returns (B, T), both 0 on padding.
    """
    mask = mask.to(rewards.dtype)
    b, t = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for i in reversed(range(t)):
        m = mask[:, i]
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        adv = delta + gamma * lam * next_adv
        advantages[:, i] = adv * m
        # a padding position resets the recursion: the next real token sees V = 0 and A = 0 beyond the end
        next_adv = adv * m
        next_value = values[:, i] * m
    returns = (advantages + values) * mask
    return advantages, returns


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise ``x`` to zero mean, unit variance over the masked positions of the whole batch (padding stays 0).

        x' = (x - mean) / sqrt(var + eps)          var with Bessel's correction (n / (n - 1))
    With ``shift_mean=False`` the mean is added back (used for rewards: scale only, keep the sign of the signal).
    Used for advantages (standard in PPO) and optionally rewards (Ziegler et al. 2019). Shapes: (B, T).

    ``all_reduce_sum`` (a function summing a tensor over processes, e.g. training/loop.DistContext.all_reduce_sum):
    the batch is split across data-parallel processes, each holding its rows; the mean and the variance are taken over
    the masked positions of every process's rows (float64 sums reduced across processes), so the result equals
    whitening the whole batch in one process up to float rounding.
    """
    if all_reduce_sum is not None:
        s = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]).double())  # [sum x, n] over all rows
        mean = s[0] / s[1]
        centred = x - mean.to(x.dtype)
        v = all_reduce_sum((centred * centred * mask).sum().double().reshape(1))[0] / s[1]
        if s[1] > 1:
            v = v * s[1] / (s[1] - 1)
        out = centred * torch.rsqrt(v + eps).to(x.dtype)
        return (out + mean.to(x.dtype) if not shift_mean else out) * mask
    mean = masked_mean(x, mask)
    centred = x - mean
    var = masked_mean(centred * centred, mask)
    n = mask.sum()
    if n > 1:
        var = var * n / (n - 1)
    out = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019 (section 2.2, "Fine-Tuning Language Models from Human
    Preferences"): a proportional controller steering the measured KL towards ``target``.

        e_t     = clip(KL_t / target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    ``n_steps`` is the number of rollouts (episodes) in the batch that produced KL_t.
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL needs target > 0 and horizon > 0")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        if math.isfinite(error):
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """A constant KL coefficient (``update`` is a no-op)."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# ---------------------------------------------------------------------------------------------------------------------
# Critic-free advantages for RL with verifiable rewards: one scalar per response, shared by all its tokens.
# Shapes: P = prompts, G = responses sampled per prompt (the group).
# ---------------------------------------------------------------------------------------------------------------------
GROUP_ADVANTAGES = ("grpo", "rloo")


def group_advantages(rewards: torch.Tensor, kind: str = "grpo", scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages of the G responses of each prompt relative to their own group.

        grpo (Shao et al. 2024, DeepSeekMath eq. 3-4):  A_i = (r_i - mean_j r_j) / (std_j r_j + eps)
             with ``scale_by_std=False`` (Liu et al. 2025, "Dr. GRPO"): A_i = r_i - mean_j r_j
        rloo (Kool et al. 2019; Ahmadian et al. 2024):   A_i = r_i - 1/(G-1) sum_{j != i} r_j
                                                             = G/(G-1) (r_i - mean_j r_j)

    std is the sample standard deviation (Bessel-corrected, as TRL's GRPOTrainer computes it). A group whose rewards
    are all equal gets A = 0 for every response (it carries no learning signal). Shapes: rewards (P, G) -> (P, G).
    RLOO needs G >= 2.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (prompts, group) shaped, got {tuple(rewards.shape)}")
    g = rewards.shape[1]
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    if kind == "grpo":
        if scale_by_std and g > 1:
            return centred / (rewards.std(dim=1, keepdim=True) + eps)
        return centred
    if kind == "rloo":
        if g < 2:
            raise ValueError("rloo needs at least 2 responses per prompt (a leave-one-out baseline)")
        return centred * (g / (g - 1))
    raise ValueError(f"unknown advantage {kind!r}; expected one of {GROUP_ADVANTAGES}")


def equal_reward_groups(rewards: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """(P,) bool: groups whose G rewards are all equal (max - min <= tol). DAPO's dynamic sampling (Yu et al. 2025)
    drops them: their advantages are 0, so they add no gradient but dilute the token-mean of the batch."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) <= tol
