"""Continuous batching (generation/continuous.py), the server's decode loop: rows that join a running batch, leave it,
take finished rows' slots, and get what they get alone. Counted in steps and prefills, never timed."""

from __future__ import annotations

import pytest
import torch

from instructkit.generation.continuous import ContinuousBatch
from instructkit.generation.engine import Engine, Row, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return Engine(model, tok)


def _prompt(engine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def _solo(engine, prompt, params: SamplingParams):
    return engine.generate([prompt], params)[0]


def _run_until_done(batch: ContinuousBatch, limit: int = 500) -> None:
    for _ in range(limit):
        if not batch.live:
            return
        batch.step()
    raise AssertionError("rows did not finish")


def test_rows_joining_a_running_batch_get_their_solo_output(engine):
    assert ContinuousBatch.supported(engine)
    greedy = dict(temperature=0.0, logprobs=False, stop_token_ids=[])
    specs = [  # (prompt, params, steps of the batch before it joins)
        ("Hi", SamplingParams(max_new_tokens=20, **greedy), 0),
        # a prompt longer than the columns filled so far: the batch shifts right to take it
        ("A much longer prompt that has many more tokens than the first one did", SamplingParams(
            max_new_tokens=12, temperature=0.0, logprobs=True, top_logprobs=2, stop_token_ids=[]), 3),
        ("Short", SamplingParams(max_new_tokens=30, **greedy), 3),
        ("Seeded sample", SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, logprobs=False,
                                         stop_token_ids=[]), 5),
        ("Penalised", SamplingParams(max_new_tokens=9, temperature=0.0, repetition_penalty=1.5, logprobs=False,
                                     stop_token_ids=[]), 6),
        # joins after the first row finished: it takes that row's slot
        ("Late comer", SamplingParams(max_new_tokens=15, **greedy), 19),
    ]
    batch = ContinuousBatch(engine)
    rows, step = [], 0
    for text, params, at in specs:
        while step < at:
            batch.step()
            step += 1
        r = Row(index=len(rows), prompt=_prompt(engine, text), params=params, seed=params.seed or 0)
        slots_before, dead_before = len(batch.slots), len(batch.slots) - len(batch.live)
        batch.add([r])
        rows.append(r)
    assert dead_before == 1 and len(batch.slots) == slots_before == 2  # "Hi" finished, "Short" still runs
    _run_until_done(batch)
    for (text, params, _), r in zip(specs, rows):
        ref = _solo(engine, r.prompt, params)
        assert r.tokens == ref.token_ids, text
        assert r.finish_reason == ref.finish_reason == "length"
        assert engine.output(r).text == ref.text
        if params.logprobs:
            assert r.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
            assert [[t for t, _ in top] for top in r.top_logprobs] == [[t for t, _ in top] for top in ref.top_logprobs]
    # shared steps: fewer decode steps than the rows alone (each alone: max_new_tokens - 1 steps after its prefill)
    solo_steps = sum(p.max_new_tokens - 1 for _, p, _ in specs)
    assert batch.steps < solo_steps and batch.max_rows == 5 and batch.prefills == len(specs)


def test_choices_share_one_prefill_and_cancelled_rows_leave(engine):
    ids = _prompt(engine, "Tell me a story")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3, logprobs=False, stop_token_ids=[])
    rows = [Row(index=j, prompt=ids, params=params, seed=3 + j) for j in range(3)]
    batch = ContinuousBatch(engine)
    batch.add(rows)
    assert batch.prefills == 1  # three choices of one prompt: one prefill
    batch.step()
    rows[1].cancelled = True  # as the server does when a client goes away
    batch.step()
    assert rows[1].finish_reason == "cancelled" and len(rows[1].tokens) == 2
    assert len(batch.live) == 2
    _run_until_done(batch)
    ref = engine.generate([ids] * 3, params)  # row j seeded 3 + j, as above
    assert rows[0].tokens == ref[0].token_ids and rows[2].tokens == ref[2].token_ids


def test_a_batch_that_never_empties_keeps_its_buffers_bounded(engine):
    """Rows join one after another for 120 steps while earlier ones finish: finished rows are dropped and the columns
    no live row reads are moved out, so the filled columns stay near the longest prompt plus max_new_tokens."""
    params = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=False, stop_token_ids=[])
    texts = ["one", "two words", "three words here", "and a fourth one with more"]
    batch = ContinuousBatch(engine)
    rows = []
    for step in range(120):
        if step % 3 == 0:
            r = Row(index=len(rows), prompt=_prompt(engine, texts[len(rows) % 4] + f" {step}"), params=params)
            batch.add([r])
            rows.append(r)
        batch.step()
        assert batch.state.length <= 64 and len(batch.slots) <= 8
    _run_until_done(batch)
    for r in rows[::7]:
        assert r.tokens == _solo(engine, r.prompt, params).token_ids
    assert batch.steps >= 120 and batch.prefills == 40


def test_max_tokens_zero_and_one_never_enter_the_batch(engine):
    ids = _prompt(engine, "Hello")
    zero = Row(index=0, prompt=ids, params=SamplingParams(max_new_tokens=0))
    one = Row(index=1, prompt=ids, params=SamplingParams(max_new_tokens=1, temperature=0.0, stop_token_ids=[]))
    batch = ContinuousBatch(engine)
    batch.add([zero, one])
    assert zero.finish_reason == "length" and zero.tokens == []
    assert one.finish_reason == "length" and one.tokens == _solo(engine, ids, one.params).token_ids
    assert not batch.live and batch.slots == []
