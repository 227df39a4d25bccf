"""Reward-model, DPO and PPO losses against hand computations (derivations in comments) and invariants."""

import math

import pytest
import torch

from instructkit.losses import (
    dpo_loss,
    entropy_from_logits,
    kwise_reward_loss,
    masked_mean,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    ranking_pairs,
)


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_pairwise_reward_loss_by_hand():
    # diff = r_c - r_r = [1, -1]; loss = (log(1+e^-1) + log(1+e^1)) / 2 = (0.3132617 + 1.3132617) / 2 = 0.8132617
    loss, m = pairwise_reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx((softplus(-1) + softplus(1)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.8132617, abs=1e-6)
    assert m["accuracy"].item() == 0.5
    assert m["reward_margin"].item() == pytest.approx(0.0)


def test_pairwise_reward_loss_margin_by_hand():
    # with margin 1: shifted = [0, -2]; loss = (log 2 + log(1+e^2)) / 2 = (0.6931472 + 2.1269280) / 2 = 1.4100376
    loss, m = pairwise_reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx(1.4100376, abs=1e-6)
    assert m["accuracy"].item() == 0.5  # accuracy ignores the margin: it is r_c > r_r


def test_tie_is_log2_and_not_accurate():
    loss, m = pairwise_reward_loss(torch.zeros(3), torch.zeros(3))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert m["accuracy"].item() == 0.0


def test_ranking_pairs_are_all_k_choose_2_best_first():
    better, worse = ranking_pairs(4)
    pairs = sorted(zip(better.tolist(), worse.tolist()))
    assert pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_kwise_loss_by_hand():
    # rewards ranked [3, 2, 1]: pairs (0,1),(0,2),(1,2) have diffs 1, 2, 1
    # loss = (2 log(1+e^-1) + log(1+e^-2)) / 3 = (2 * 0.3132617 + 0.1269280) / 3 = 0.2511505
    loss, m = kwise_reward_loss(torch.tensor([[3.0, 2.0, 1.0]]))
    assert loss.item() == pytest.approx(0.2511505, abs=1e-6)
    assert m["accuracy"].item() == 1.0
    assert m["pairs"].item() == 3


def test_kwise_equals_pairwise_on_expanded_pairs_and_ignores_missing():
    torch.manual_seed(0)
    r = torch.randn(3, 4)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    loss, _ = kwise_reward_loss(r, valid)
    chosen, rejected = [], []
    for p in range(3):
        k = int(valid[p].sum())
        for i in range(k):
            for j in range(i + 1, k):
                chosen.append(r[p, i])
                rejected.append(r[p, j])
    ref, _ = pairwise_reward_loss(torch.stack(chosen), torch.stack(rejected))
    assert len(chosen) == 6 + 1 + 3
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_dpo_is_log2_when_policy_equals_reference():
    torch.manual_seed(0)
    c, r = torch.randn(5), torch.randn(5)
    for eps in (0.0, 0.2):
        loss, m = dpo_loss(c, r, c.clone(), r.clone(), beta=0.3, label_smoothing=eps)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
        assert m["reward_margin"].item() == 0.0


def test_dpo_sigmoid_cdpo_ipo_by_hand():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    # h = (-1 - -1.5) - (-2 - -1.5) = 0.5 + 0.5 = 1; beta 0.5: loss = -log sigmoid(0.5) = log(1+e^-0.5) = 0.4740770
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(0.4740770, abs=1e-6)
    assert m["rewards_chosen"].item() == pytest.approx(0.25)  # beta * 0.5
    assert m["rewards_rejected"].item() == pytest.approx(-0.25)
    assert m["reward_accuracy"].item() == 1.0
    # cDPO eps 0.1: 0.9 * log(1+e^-0.5) + 0.1 * log(1+e^0.5) = 0.9 * 0.4740770 + 0.1 * 0.9740770 = 0.5240770
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.5240770, abs=1e-6)
    # IPO beta 0.25: (h - 1/(2*0.25))^2 = (1 - 2)^2 = 1
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge-ish")


def test_dpo_gradient_by_hand():
    # dL/d(pc) = -beta * sigmoid(-beta h) = -0.5 * sigmoid(-0.5) = -0.5 * 0.3775407 = -0.1887703
    pc = torch.tensor([-1.0], requires_grad=True)
    loss, _ = dpo_loss(pc, torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.5)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.1887703, abs=1e-6)


def test_ppo_policy_loss_by_hand():
    # old logp 0; ratios [1.5, 0.5, 0.5, <pad>], A = [1, 1, -1, 5], eps 0.2
    #  t0: -A*r = -1.5, -A*clip = -1.2 -> max -1.2 (clipped branch)
    #  t1: -0.5 vs -0.8 -> -0.5 (unclipped)
    #  t2: 0.5 vs 0.8 -> 0.8 (clipped branch)
    # loss = (-1.2 - 0.5 + 0.8) / 3 = -0.3; clipfrac 2/3
    new = torch.tensor([[math.log(1.5), math.log(0.5), math.log(0.5), 50.0]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, m = ppo_policy_loss(new, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.3, abs=1e-6)
    assert m["clipfrac"].item() == pytest.approx(2 / 3, abs=1e-6)
    # approx_kl = mean(0.5 * log(r)^2) = 0.5 * (log1.5^2 + 2 log0.5^2) / 3
    assert m["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 3, abs=1e-6)


def test_ppo_ratio_is_exactly_one_before_first_update_and_masked_grad_is_zero():
    torch.manual_seed(0)
    logp = torch.randn(2, 5).requires_grad_(True)
    old = logp.detach().clone()
    adv = torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    loss, m = ppo_policy_loss(logp, old, adv, mask)
    assert m["ratio"].item() == 1.0
    assert m["clipfrac"].item() == 0.0
    assert m["approx_kl"].item() == 0.0
    # ratio 1 -> loss = -mean(A) over 8 real tokens and dL/dlogp = -A / 8 there, exactly 0 on padding
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / 8, abs=1e-6)
    loss.backward()
    assert torch.equal(logp.grad[0, 3:], torch.zeros(2))
    torch.testing.assert_close(logp.grad * mask, -adv * mask / 8)


def test_fully_masked_batch_gives_zero_loss_and_zero_gradient():
    logp = torch.randn(2, 3).requires_grad_(True)
    v = torch.randn(2, 3).requires_grad_(True)
    mask = torch.zeros(2, 3)
    lp, _ = ppo_policy_loss(logp, logp.detach() - 1.0, torch.randn(2, 3), mask)
    lv, _ = ppo_value_loss(v, torch.zeros(2, 3), torch.ones(2, 3), mask)
    (lp + lv).backward()
    assert lp.item() == 0.0 and lv.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros(2, 3)) and torch.equal(v.grad, torch.zeros(2, 3))


def test_ppo_value_loss_by_hand():
    # token 0: v 1.5, old 1.0, R 2.0: v_clip = 1.2; (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.64 (clipped)
    # token 1: v 0.9, old 1.0, R 0.0: v_clip = 0.9; both 0.81
    # loss = 0.5 * (0.64 + 0.81) / 2 = 0.3625; value clipfrac 1/2
    values = torch.tensor([[1.5, 0.9, 7.0]])
    old = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, m = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.3625, abs=1e-6)
    assert m["value_clipfrac"].item() == pytest.approx(0.5)
    # explained variance: R = [2, 0] (var 1), R - old = [1, -1] (var 1) -> 1 - 1/1 = 0
    assert m["explained_variance"].item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_uniform_and_one_hot():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = torch.tensor([100.0, 0.0, 0.0, 0.0])  # ~one-hot: entropy ~0
    h, _ = entropy_from_logits(logits, torch.tensor([[1.0, 0.0]]))
    assert h.item() == pytest.approx(math.log(4), abs=1e-6)
    h, _ = entropy_from_logits(logits, torch.tensor([[1.0, 1.0]]))
    assert h.item() == pytest.approx(math.log(4) / 2, abs=1e-6)


def test_masked_mean_pools_tokens():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
