"""training/loop.py and losses.sft_loss: schedule values, output layer only at supervised positions, exact gradient
accumulation, the non-finite guard, empty supervision, step plans over ranks."""

from __future__ import annotations

import math

import pytest
import torch

from instructkit.config import TrainConfig
from instructkit.losses import sft_loss
from instructkit.training import loop
from instructkit.training.packing import IGNORE_INDEX, Sample, collate_rows


def test_lr_factor_hand_values():
    # warm-up 2 of 10 steps: step0 = 1/2, step1 = 2/2; cosine over the remaining 8: step 2 -> progress 0 -> 1.0,
    # step 6 -> progress 4/8 -> 0.5 * (1 + cos(pi/2)) = 0.5, step 10 -> progress 1 -> 0.
    f = lambda s, kind="cosine": loop.lr_factor(s, kind, 2, 10)  # noqa: E731
    assert f(0) == 0.5 and f(1) == 1.0 and f(2) == 1.0
    assert math.isclose(f(6), 0.5, abs_tol=1e-12) and math.isclose(f(10), 0.0, abs_tol=1e-12)
    assert math.isclose(f(4), 0.5 * (1 + math.cos(math.pi * 2 / 8)), abs_tol=1e-12)
    assert math.isclose(f(6, "linear"), 0.5, abs_tol=1e-12) and f(9, "constant") == 1.0
    with pytest.raises(ValueError):
        loop.lr_factor(3, "exponential", 0, 10)


def _model(tiny_model_dir, dtype=torch.float32, tie=False):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    if tie:
        m.config.tie_word_embeddings = True
        m.lm_head.weight = m.model.embed_tokens.weight
    return m


def _samples(seed=0, lengths=(7, 12, 4, 9)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(5, 500, (n,), generator=g).tolist()
        mask = [0] * (i + 1) + [1] * (n - i - 1)  # partly masked, a different prompt length each
        out.append(Sample(ids, mask))
    return out


@pytest.mark.parametrize("variant", ["plain", "tied", "lora"])
def test_sft_loss_equals_full_logits_loss(tiny_model_dir, variant):
    from instructkit.models.load import causal_lm_parts, packed_hidden_states

    model = _model(tiny_model_dir, tie=variant == "tied")
    if variant == "lora":
        from instructkit.config import LoRAConfig
        from instructkit.models.load import apply_lora

        model = apply_lora(model, LoRAConfig(enabled=True, r=4, dropout=0.0))
        for n, p in model.named_parameters():  # non-zero B so the adapter changes the output
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    model.eval()
    batch = collate_rows([[s] for s in _samples()], pad_id=3)
    _, head, _ = causal_lm_parts(model)
    loss, n = sft_loss(packed_hidden_states(model, batch), batch["labels"], head)
    # reference: full logits at every position of every (unpacked, unpadded) sample, summed CE over supervised targets
    ref, ref_n = 0.0, 0
    for s in _samples():
        logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1]
        m = torch.tensor(s.loss_mask[1:], dtype=torch.bool)
        ref += torch.nn.functional.cross_entropy(logits[m], torch.tensor(s.input_ids[1:])[m], reduction="sum").item()
        ref_n += int(m.sum())
    assert int(n) == ref_n == int(batch["n_supervised"])
    assert abs(loss.item() - ref) / ref_n < 1e-5


def test_sft_loss_no_supervision_is_zero_with_zero_grad():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    head = torch.nn.Linear(4, 6, bias=False)
    loss, n = sft_loss(hidden, torch.full((2, 3), IGNORE_INDEX), head)
    loss.backward()
    assert loss.item() == 0.0 and int(n) == 0 and torch.count_nonzero(hidden.grad) == 0


def _sft_loss_fn(model, batch):
    from instructkit.recipes.sft import sft_batch_loss

    return sft_batch_loss(model, batch)


def _count(batch):
    return int((batch["labels"] != IGNORE_INDEX).sum())


def _grads_after_step(model, micro_batches):
    """With SGD(lr=1) and a constant schedule, (before - after) of each parameter is exactly its gradient."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    res = loop.optimizer_step(model, opt, sched, micro_batches, _sft_loss_fn, _count, max_grad_norm=0.0)
    grads = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    return grads, res


def test_gradient_accumulation_is_exact_fp64(tiny_model_dir):
    model = _model(tiny_model_dir, dtype=torch.float64)
    model.config.attention_dropout = 0.0
    samples = _samples(lengths=(7, 12, 4, 9))
    one = [collate_rows([[s] for s in samples], pad_id=3)]  # 1 micro-batch of 4 (padded)
    four = [collate_rows([[s]], pad_id=3) for s in samples]  # 4 micro-batches of 1
    g1, r1 = _grads_after_step(model, one)
    g4, r4 = _grads_after_step(model, four)
    assert r1.units == r4.units == sum(s.n_supervised for s in samples)
    assert abs(r1.loss - r4.loss) < 1e-12
    worst = max((g1[n] - g4[n]).abs().max().item() for n in g1)
    assert worst < 1e-6
    assert max(g.abs().max().item() for g in g1.values()) > 1e-3  # gradients are not trivially zero

    # the per-micro-batch mean averaged over micro-batches (the 2024 accumulation bug) gives a different gradient:
    # this test can fail
    model.zero_grad()
    for b in four:
        loss, n = _sft_loss_fn(model, b)
        (loss / n / len(four)).backward()
    naive = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert max((naive[n] - g1[n]).abs().max().item() for n in g1) > 1e-4


def test_non_finite_loss_raises_and_changes_nothing(tiny_model_dir):
    model = _model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = loop.build_optimizer(model, TrainConfig(lr=1e-2))
    sched = loop.build_scheduler(opt, TrainConfig(schedule="constant"), 10)
    batch = collate_rows([[s] for s in _samples()], pad_id=3)

    def nan_loss(m, b):
        loss, n = _sft_loss_fn(m, b)
        return loss * float("nan"), n

    with pytest.raises(loop.NonFiniteError, match="non-finite loss"):
        loop.optimizer_step(model, opt, sched, [batch], nan_loss, _count, step=3)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())

    def inf_grad_loss(m, b):  # finite loss, infinite gradient on the output layer
        loss, n = _sft_loss_fn(m, b)
        return loss + _InfGrad.apply(m.lm_head.weight), n

    with pytest.raises(loop.NonFiniteError, match="gradient norm"):
        loop.optimizer_step(model, opt, sched, [batch], inf_grad_loss, _count, max_grad_norm=1.0)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


class _InfGrad(torch.autograd.Function):
    """Forward 0, backward an infinite gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx, g):
        return g * torch.full(ctx.shape, float("inf"))


def test_empty_supervision_is_counted_not_logged_as_zero(tiny_model_dir):
    model = _model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = loop.build_optimizer(model, TrainConfig(lr=1e-2))
    sched = loop.build_scheduler(opt, TrainConfig(schedule="constant"), 10)
    empty = collate_rows([[Sample([5, 6, 7], [0, 0, 0])]], pad_id=3)
    res = loop.optimizer_step(model, opt, sched, [empty, empty], _sft_loss_fn, _count)
    assert res.loss is None and res.grad_norm is None and res.empty_micro_batches == 2 and res.units == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert loop.step_record(1, res, 0)["empty_step"] is True and loop.step_record(1, res, 0)["loss"] is None
    # a step mixing an empty and a non-empty micro-batch trains on the non-empty one and counts the empty one
    full = collate_rows([[s] for s in _samples()], pad_id=3)
    res = loop.optimizer_step(model, opt, sched, [empty, full], _sft_loss_fn, _count)
    assert res.loss is not None and math.isfinite(res.loss) and res.empty_micro_batches == 1


def test_step_plan_covers_every_row_once_per_epoch_across_ranks():
    plan1 = loop.StepPlan(n_rows=11, micro_batch_size=2, grad_accum=2, world_size=1, seed=5)
    plan2 = loop.StepPlan(n_rows=11, micro_batch_size=2, grad_accum=1, world_size=2, seed=5)
    assert plan1.rows_per_step == plan2.rows_per_step == 4 and plan1.steps_per_epoch == 3  # ceil(11 / 4): none dropped
    for epoch in range(2):
        seen = []
        for step in range(epoch * 3, epoch * 3 + 3):
            one = [r for mb in plan1.micro_batches(step) for r in mb]
            two = [r for rank in range(2) for mb in plan2.micro_batches(step, rank) for r in mb]
            assert sorted(one) == sorted(two)
            seen += one
        assert sorted(seen) == list(range(11))
    assert plan1.position(4) == (1, 4)


def test_metrics_logger_truncates_after_resume_step(tmp_path):
    m = loop.MetricsLogger(tmp_path)
    for s in range(1, 6):
        m.log({"step": s, "loss": 1.0 / s})
    m.truncate_after(3)
    assert [r["step"] for r in loop.read_metrics(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimizer_is_fused_grouping_independent_and_matches_the_loop(dtype):
    """build_optimizer uses torch's fused AdamW. Its arithmetic must not depend on how the tensors are grouped (resume
    and DDP compare bit for bit), and it must agree with the per-tensor loop (foreach=False) to rounding over several
    steps, weight decay on matrices and none on vectors."""
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 48), (48,)]
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(4)]
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)

    def run(make):
        model = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in init])
        opt = make(model)
        for step_grads in grads:
            for p, gr in zip(model, step_grads):
                p.grad = gr.clone()
            opt.step()
        return opt, [p.detach().clone() for p in model]

    fused, got = run(lambda m: loop.build_optimizer(m, cfg))
    assert fused.defaults["fused"] is True
    assert [grp["weight_decay"] for grp in fused.param_groups] == [0.1, 0.0]
    # the same tensors one group per tensor: the same bits
    _, split = run(lambda m: torch.optim.AdamW([{"params": [m[0]], "weight_decay": 0.1},
                                                {"params": [m[1]], "weight_decay": 0.1},
                                                {"params": [m[2]], "weight_decay": 0.0}], lr=1e-2, fused=True))
    assert all(torch.equal(a, b) for a, b in zip(got, split))
    _, ref = run(lambda m: torch.optim.AdamW([{"params": [m[0], m[1]], "weight_decay": 0.1},
                                              {"params": [m[2]], "weight_decay": 0.0}], lr=1e-2, foreach=False))
    eps = torch.finfo(dtype).eps
    assert all(torch.allclose(a, b, rtol=4 * eps, atol=4 * eps) for a, b in zip(got, ref))
    assert not torch.equal(got[0], init[0])  # the parameters moved
