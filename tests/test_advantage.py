"""KL estimators, KL-penalised rewards, GAE, whitening and KL controllers against hand computations."""

import math

import pytest
import torch

from instructkit.rl.advantage import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_estimate,
    kl_penalized_rewards,
    last_token_index,
    length_adjusted_scores,
    masked_whiten,
    penalize_missing_eos,
)


def test_kl_estimators_by_hand():
    # d = logp - ref = 0.5: k1 = 0.5, k2 = 0.125, abs = 0.5, k3 = e^-0.5 - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(logp, ref, "abs").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.1065307, abs=1e-6)
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


@pytest.mark.parametrize("kind", ["k1", "k2", "abs", "k3"])
def test_kl_is_zero_when_equal(kind):
    x = torch.randn(3, 4)
    assert torch.equal(kl_estimate(x, x.clone(), kind), torch.zeros(3, 4))


def test_k1_and_k3_are_unbiased_in_exact_expectation():
    # E_{y~p}[k] computed exactly by weighting each outcome with p(y): k1 and k3 give KL(p||q), k2 does not
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    kl = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        e = (p * kl_estimate(p.log(), q.log(), kind)).sum()
        assert e.item() == pytest.approx(kl.item(), abs=1e-6)
    assert (kl_estimate(p.log(), q.log(), "k3") >= 0).all()  # k3 >= 0 per sample
    assert (kl_estimate(p.log(), q.log(), "k1") < 0).any()  # k1 is not


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 1, 0, 0]


def test_kl_penalized_rewards_by_hand():
    # row 0: d = [0.5, 0, 0], beta 0.1 -> r = [-0.05, 0, 0 + score 2] = [-0.05, 0, 2]
    # row 1: d = [0, -1, <pad>] -> r = [0, 0.1 + score 3, 0] = [0, 3.1, 0]
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, 9.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, m = kl_penalized_rewards(logp, ref, mask, torch.tensor([2.0, 3.0]), beta=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 2.0], [0.0, 3.1, 0.0]]))
    assert m["kl"].item() == pytest.approx((0.5 - 1.0) / 2)  # mean over rollouts of per-sequence sums
    assert m["non_score_reward"].item() == pytest.approx((-0.05 + 0.1) / 2)


def test_rewards_are_pure_score_when_policy_equals_reference():
    logp = torch.randn(2, 4)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards, m = kl_penalized_rewards(logp, logp.clone(), mask, torch.tensor([1.0, -2.0]), beta=5.0, kl_kind="k3")
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, -2.0]]))
    assert m["kl"].item() == 0.0


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 2.0, 3.0])
    ended = torch.tensor([True, False, True])
    assert penalize_missing_eos(scores, ended, -1.0).tolist() == [1.0, -1.0, 3.0]
    assert penalize_missing_eos(scores, ended, None).tolist() == [1.0, 2.0, 3.0]


def test_gae_by_hand_and_padding_is_ignored():
    # r = [1, 0, 2], V = [0.5, 1.0, 0.5], gamma 0.9, lambda 0.8 (gamma*lambda = 0.72)
    # t2: delta = 2 + 0 - 0.5 = 1.5;              A2 = 1.5
    # t1: delta = 0 + 0.9*0.5 - 1.0 = -0.55;      A1 = -0.55 + 0.72*1.5 = 0.53
    # t0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;        A0 = 1.4 + 0.72*0.53 = 1.7816
    # returns = A + V = [2.2816, 1.53, 2.0]
    rewards = torch.tensor([[1.0, 0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 0.5, -99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[1.7816, 0.53, 1.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.2816, 1.53, 2.0, 0.0]]))


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    r, v = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5], dtype=torch.float32)
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    togo = torch.flip(torch.cumsum(torch.flip(r * mask, [1]), 1), [1])
    torch.testing.assert_close(adv, (togo - v) * mask)
    torch.testing.assert_close(ret, togo * mask)


def test_masked_whiten_by_hand():
    # x = [1, 2, 3] (pad 50): mean 2, unbiased var = (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1]
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask, eps=0.0), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False, eps=0.0), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


def test_adaptive_kl_controller_by_hand():
    # Ziegler et al.: e = clip(KL/target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon; n / horizon = 100 / 10000
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert c.update(12.0, 100) == pytest.approx(0.2 * (1 + 0.2 * 0.01))  # e clipped to +0.2
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert c.update(3.0, 100) == pytest.approx(0.2 * (1 - 0.2 * 0.01))  # e = -0.5 clipped to -0.2
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert c.update(6.6, 100) == pytest.approx(0.2 * (1 + 0.1 * 0.01))  # e = 0.1
    assert c.update(6.0, 100) == pytest.approx(0.2 * 1.001)  # on target: unchanged
    state = c.state_dict()
    d = AdaptiveKLController(1.0, target=6.0, horizon=10000)
    d.load_state_dict(state)
    assert d.value == c.value
    assert not math.isnan(c.update(float("nan"), 10))
    assert FixedKLController(0.05).update(100.0, 10) == 0.05


def test_masked_whiten_over_two_processes_equals_one_batch():
    """Data-parallel PPO whitens over every process's rows: two halves whose sums are reduced (a fake all-reduce of two
    threads) give the whitening of the whole batch; padding stays exactly 0."""
    import threading

    x = torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.0, 0.0], [3.0, 5.0, 7.0], [-2.0, 6.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    barrier, slots = threading.Barrier(2), [[], []]

    def reducer(rank):
        def all_reduce_sum(t):
            slots[rank].append(t)
            barrier.wait()
            out = slots[0][-1] + slots[1][-1]
            barrier.wait()
            return out
        return all_reduce_sum

    out = [None, None]

    def work(rank, shift):
        rows = slice(2 * rank, 2 * rank + 2)
        out[rank] = masked_whiten(x[rows], mask[rows], shift_mean=shift, eps=0.0, all_reduce_sum=reducer(rank))

    for shift in (True, False):
        threads = [threading.Thread(target=work, args=(r, shift)) for r in (0, 1)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        # by hand: 9 values, mean 35/9, Bessel-corrected variance over the 9 masked positions
        vals = x[mask.bool()]
        mean, var = vals.mean(), vals.var(unbiased=True)
        expected = ((x - mean) / var.sqrt() + (0 if shift else mean)) * mask
        torch.testing.assert_close(torch.cat(out), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.cat(out), masked_whiten(x, mask, shift_mean=shift, eps=0.0))
        assert (torch.cat(out)[mask == 0] == 0).all()


def test_length_adjusted_scores():
    scores = torch.tensor([1.0, 2.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])  # 3, 1, 4 response tokens
    assert length_adjusted_scores(scores, mask, 0.25).tolist() == [1.75, 2.25, 0.0]
    assert length_adjusted_scores(scores, mask, -0.5).tolist() == [-0.5, 1.5, -3.0]
    assert length_adjusted_scores(scores, mask, 0.0) is scores
    # before the missing-EOS penalty, which replaces the whole score of an unfinished response
    ended = torch.tensor([True, True, False])
    assert penalize_missing_eos(length_adjusted_scores(scores, mask, 0.25), ended, -1.0).tolist() == [1.75, 2.25, -1.0]
