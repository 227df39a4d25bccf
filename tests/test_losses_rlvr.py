"""GRPO / RLOO advantages, the clipped surrogate with clip-higher, k3 KL and its three aggregations, KTO, ORPO and
SimPO, each against a value worked out by hand in the comment above the assertion."""

from __future__ import annotations

import math

import pytest
import torch

from instructkit.losses import clipped_policy_loss, kto_kl_baseline, kto_loss, orpo_loss, simpo_loss
from instructkit.rl.advantage import equal_reward_groups, group_advantages


def test_grpo_advantages_of_a_worked_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    # group 0: mean 0.5, deviations +-0.5, sample std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    a = group_advantages(r, "grpo")
    expect = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert a[0].tolist() == pytest.approx([expect, -expect, -expect, expect], abs=1e-6)
    # group 1: all rewards equal: no signal, advantage exactly 0
    assert a[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    # Dr. GRPO: centred only
    assert group_advantages(r, "grpo", scale_by_std=False)[0].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert equal_reward_groups(r).tolist() == [False, True]


def test_rloo_baseline_leaves_each_response_out():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # A_0 = 1 - (0 + 0 + 1) / 3 = 2/3;  A_1 = 0 - (1 + 0 + 1) / 3 = -2/3
    assert group_advantages(r, "rloo")[0].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], abs=1e-7)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([[1.0]]), "rloo")


def first_update():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]], dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    return logp, mask, adv


@pytest.mark.parametrize("aggregation,value,grads", [
    # ratio = 1: l_it = -A_i. sequence: ((-1 -1)/2 + (2 + 2 + 2)/3) / 2 = 0.5; dL/dlogp_it = -A_i / |o_i| / 2
    ("sequence", 0.5, [[-0.25, -0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]]),
    # token: (-1 - 1 + 2 + 2 + 2) / 5 = 0.8; dL/dlogp_it = -A_i / 5
    ("token", 0.8, [[-0.2, -0.2, 0.0], [0.4, 0.4, 0.4]]),
    # constant, L_max = 4: 4 / (2 * 4) = 0.5; dL/dlogp_it = -A_i / 8
    ("constant", 0.5, [[-0.125, -0.125, 0.0], [0.25, 0.25, 0.25]]),
])
def test_aggregations_on_the_first_update(aggregation, value, grads):
    logp, mask, adv = first_update()
    loss, m = clipped_policy_loss(logp, logp.detach(), adv, mask, aggregation=aggregation, max_length=4)
    assert m["ratio"].item() == 1.0 and m["approx_kl"].item() == 0.0  # exactly 1 on the first update
    assert loss.item() == pytest.approx(value, abs=1e-12)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx(sum(grads, []), abs=1e-12)
    assert logp.grad[0, 2].item() == 0.0


def test_micro_batches_with_step_normalisers_sum_to_the_full_batch():
    logp, mask, adv = first_update()
    for agg in ("sequence", "token", "constant"):
        full, _ = clipped_policy_loss(logp, logp.detach(), adv, mask, aggregation=agg, max_length=4)
        parts = sum(clipped_policy_loss(logp[i:i + 1], logp[i:i + 1].detach(), adv[i:i + 1], mask[i:i + 1],
                                        aggregation=agg, max_length=4, num_sequences=2,
                                        num_tokens=float(mask.sum()))[0] for i in range(2))
        assert parts.item() == pytest.approx(full.item(), abs=1e-12)


def test_clip_higher_bounds():
    old = torch.zeros(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.float64)

    def run(log_ratio, a, low=0.2, high=0.28):
        logp = torch.full((1, 1), log_ratio, dtype=torch.float64, requires_grad=True)
        loss, m = clipped_policy_loss(logp, old, torch.tensor([a], dtype=torch.float64), mask, clip_low=low,
                                      clip_high=high)
        loss.backward()
        return loss.item(), logp.grad.item(), m

    # ratio 1.25, A = +1: inside [0.8, 1.28] (a symmetric 0.2 would clip it): loss -1.25, gradient -1.25
    assert run(math.log(1.25), 1.0)[:2] == pytest.approx((-1.25, -1.25))
    # ratio e^0.5 = 1.6487 > 1.28, A = +1: clipped to 1.28, no gradient
    loss, grad, m = run(0.5, 1.0)
    assert (loss, grad) == pytest.approx((-1.28, 0.0)) and m["clipfrac_high"].item() == 1.0
    # ratio e^0.5, A = -1: the pessimistic min keeps the unclipped branch: loss +1.6487, gradient e^0.5
    assert run(0.5, -1.0)[:2] == pytest.approx((math.exp(0.5), math.exp(0.5)))
    # ratio e^-0.5 = 0.6065 < 0.8, A = -1: clipped to 0.8, loss 0.8, no gradient
    loss, grad, m = run(-0.5, -1.0)
    assert (loss, grad) == pytest.approx((0.8, 0.0)) and m["clipfrac_low"].item() == 1.0


def test_k3_kl_to_the_reference():
    logp = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    zero_adv = torch.zeros(1, dtype=torch.float64)
    # policy == reference: k3 = 0 exactly, and so is the loss
    loss, m = clipped_policy_loss(logp, logp, zero_adv, mask, ref_logprobs=logp, kl_coef=0.5)
    assert m["kl"].item() == 0.0 and loss.item() == 0.0
    # pi = 0.5, ref = 0.25: d = log(ref / pi) = -log 2; k3 = e^d - d - 1 = 0.5 + log 2 - 1 = 0.193147
    ref = torch.log(torch.tensor([[0.25, 0.9]], dtype=torch.float64))
    loss, m = clipped_policy_loss(logp, logp, zero_adv, mask, ref_logprobs=ref, kl_coef=0.5)
    assert m["kl"].item() == pytest.approx(math.log(2) - 0.5, abs=1e-12)
    assert loss.item() == pytest.approx(0.5 * (math.log(2) - 0.5), abs=1e-12)  # one token, sequence mean


def test_kto_at_known_points():
    # policy == reference: r = 0, z0 = 0, each term lambda_y (1 - sigmoid(0)) = lambda_y / 2
    zero = torch.zeros(2)
    loss, _ = kto_loss(zero, zero, torch.tensor([True, False]), torch.tensor(0.0), beta=0.1, desirable_weight=1.0,
                       undesirable_weight=3.0)
    assert loss.item() == pytest.approx((0.5 + 1.5) / 2)
    # r = [2, -1], desirable [T, F], z0 = 0.5, beta 1, lambda_D 1, lambda_U 2:
    # desirable: 1 - sigmoid(2 - 0.5) = 0.182426; undesirable: 2 (1 - sigmoid(0.5 + 1)) = 0.364851; mean 0.273639
    s = 1 / (1 + math.exp(-1.5))
    loss, m = kto_loss(torch.tensor([2.0, -1.0]), torch.zeros(2), torch.tensor([True, False]), torch.tensor(0.5),
                       beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    assert loss.item() == pytest.approx(((1 - s) + 2 * (1 - s)) / 2, abs=1e-6)
    assert m["rewards_desirable"].item() == pytest.approx(2.0) and m["rewards_undesirable"].item() == -1.0
    # the baseline is clamped at 0 and carries no gradient
    p = torch.tensor([-1.0, -3.0], requires_grad=True)
    z = kto_kl_baseline(p, torch.tensor([-1.5, -1.5]))  # mean(0.5, -1.5) = -0.5 -> 0
    assert z.item() == 0.0 and not z.requires_grad
    assert kto_kl_baseline(torch.tensor([-1.0]), torch.tensor([-1.25])).item() == pytest.approx(0.25)


def test_orpo_at_a_known_point():
    # P_w = 0.5 -> odds 1; P_l = 0.25 -> odds 1/3; log odds ratio = log 3; L_OR = -log(3/4) = log(4/3)
    loss, m = orpo_loss(torch.tensor([math.log(0.5)], dtype=torch.float64),
                        torch.tensor([math.log(0.25)], dtype=torch.float64), torch.tensor(1.2, dtype=torch.float64),
                        lam=0.1)
    assert m["or_loss"].item() == pytest.approx(math.log(4 / 3), abs=1e-12)
    assert m["log_odds_ratio"].item() == pytest.approx(math.log(3), abs=1e-12)
    assert loss.item() == pytest.approx(1.2 + 0.1 * math.log(4 / 3), abs=1e-12)
    # equal likelihoods: L_OR = log 2
    eq, m = orpo_loss(torch.tensor([-0.7]), torch.tensor([-0.7]), torch.tensor(0.0), lam=1.0)
    assert eq.item() == pytest.approx(math.log(2), abs=1e-6)


def test_simpo_at_known_points():
    # equal average log-probs: -log sigmoid(-gamma) = log(1 + e^gamma)
    loss, _ = simpo_loss(torch.tensor([-1.3]), torch.tensor([-1.3]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(0.5)), abs=1e-6)
    # beta 2, avg logps -1 vs -2, gamma 1: margin 2 (-1) - 2 (-2) - 1 = 1; loss = log(1 + e^-1)
    loss, m = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert m["reward_margin"].item() == pytest.approx(2.0) and m["reward_accuracy"].item() == 1.0
