"""Engine: greedy identical to transformers' generate, sampling controls, stops, streaming, log-probs."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from instructkit.generation.engine import Engine, SamplingParams, _settled_length  # noqa: E402

TEXTS = [
    "Give three tips for staying healthy.",
    "What is the capital",
    "Hello",
    "Summarize the following text in one sentence. The report describes how the team",
]


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tok


def _hf_greedy(model, tok, texts, max_new_tokens, eos_ids):
    """transformers' generate on a left-padded batch; rows cut after their first eos, pads removed."""
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                         pad_token_id=tok.pad_token_id)
    refs = []
    for i in range(len(texts)):
        ref = out[i, enc.input_ids.shape[1]:].tolist()
        for j, t in enumerate(ref):
            if t in eos_ids:
                ref = ref[:j + 1]
                break
        else:
            ref = [t for t in ref if t != tok.pad_token_id]
        refs.append(ref)
    return refs


def test_greedy_matches_hf_generate_batch_1(model_tok):
    model, tok = model_tok
    eng = Engine(model, tok)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        ours = eng.generate([ids], SamplingParams(max_new_tokens=30))[0]
        ref = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, len(ids):].tolist()
        assert ours.token_ids == ref
        assert ours.finish_reason == ("stop" if ref[-1] == tok.eos_token_id else "length")


MORE_TEXTS = TEXTS + ["Translate the sentence into French.", "Write a short poem about the sea.",
                      "The quick brown fox", "List the steps needed to bake bread"]


@pytest.mark.parametrize("prune", [True, False])
def test_greedy_matches_hf_generate_padded_batch_with_early_stops(model_tok, prune):
    """Different-length prompts (left padding) and a stop token that ends rows at different steps. Finished rows stay
    in the batch (and must get no more tokens) until a quarter of the batch is done, then are dropped; with prune off
    they stay to the end. Every row must still equal generate's row."""
    model, tok = model_tok
    eng = Engine(model, tok)
    eng.prune_finished = prune
    prompts = [tok(t)["input_ids"] for t in MORE_TEXTS]
    free = eng.generate(prompts, SamplingParams(max_new_tokens=30))
    # choose as "stop token" one the tiny random model actually emits, early in some rows and late or never in others
    counts: dict[int, int] = {}
    for o in free:
        for t in set(o.token_ids[2:20]):
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=lambda t: (counts[t] < len(MORE_TEXTS), counts[t]))
    refs = _hf_greedy(model, tok, MORE_TEXTS, 30, [stop])
    ours = eng.generate(prompts, SamplingParams(max_new_tokens=30, stop_token_ids=[stop]))
    assert [o.token_ids for o in ours] == refs
    lengths = sorted(len(o.token_ids) for o in ours if o.finish_reason == "stop")
    # rows that stop at different steps, the first while fewer than a quarter of the batch is done
    assert len(set(lengths)) > 1 and lengths.count(lengths[0]) * 4 < len(MORE_TEXTS), lengths
    for o in ours:
        if o.finish_reason == "stop":
            assert o.token_ids[-1] == stop and stop not in o.token_ids[:-1]
        else:
            assert len(o.token_ids) == 30


def test_more_prompts_than_max_batch_keep_request_order(model_tok):
    model, tok = model_tok
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    whole = Engine(model, tok).generate(prompts, SamplingParams(max_new_tokens=12))
    split = Engine(model, tok, max_batch_size=3).generate(prompts, SamplingParams(max_new_tokens=12))
    assert [o.prompt_ids for o in split] == prompts
    assert [o.token_ids for o in split] == [o.token_ids for o in whole]


def test_logprobs_equal_teacher_forced_log_softmax(model_tok):
    model, tok = model_tok
    ids = tok(TEXTS[0])["input_ids"]
    out = Engine(model, tok).generate([ids], SamplingParams(max_new_tokens=10, temperature=1.0, seed=3))[0]
    full = torch.tensor([ids + out.token_ids])
    with torch.no_grad():
        logits = model(full).logits[0].float()
    # position len(ids)-1+k predicts generated token k
    lp = torch.log_softmax(logits[len(ids) - 1:-1], dim=-1)
    ref = lp.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.logprobs), ref, atol=1e-4)


def test_seeded_sampling_is_reproducible_and_independent_of_batch(model_tok):
    model, tok = model_tok
    eng = Engine(model, tok)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    p = SamplingParams(max_new_tokens=15, temperature=1.0, seed=7)
    a = eng.generate(prompts, p)
    b = eng.generate(prompts, p)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = eng.generate(prompts, SamplingParams(max_new_tokens=15, temperature=1.0, seed=8))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


@pytest.mark.parametrize("fast", [True, False])
def test_sampled_rows_with_one_prompt_share_its_prefill(model_tok, fast):
    """Sampling several responses per prompt (PPO/GRPO rollouts): the prefill runs the distinct prompts once and each
    row starts from its prompt's cache and logits; rows still draw their own samples (row i: seed + i), and the first
    token's log-probability is the same for every row of one prompt and that of an unshared run within rounding."""
    model, tok = model_tok
    a, b = tok(TEXTS[0])["input_ids"], tok(TEXTS[3])["input_ids"]
    prompts = [a, b, a, a, b]
    p = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11, top_k=1)  # top_k=1: row tokens comparable
    widths: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: widths.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        eng = Engine(model, tok, fast=fast)
        shared = eng.generate(prompts, p)
        assert widths[0] == 2  # the prefill: one row per distinct prompt
        eng.share_prompts = False
        widths.clear()
        alone = eng.generate(prompts, p)
        assert widths[0] == 5
    finally:
        hook.remove()
    for s, u in zip(shared, alone):
        assert s.token_ids == u.token_ids
        assert s.logprobs == pytest.approx(u.logprobs, abs=1e-5)
    assert shared[0].logprobs[0] == shared[2].logprobs[0] == shared[3].logprobs[0]
    eng.share_prompts = True
    free = eng.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.0, seed=11))
    assert len({tuple(free[i].token_ids) for i in (0, 2, 3)}) == 3  # each row of prompt a draws its own samples


def test_top_k_1_is_greedy_and_low_temperature_is_greedy(model_tok):
    model, tok = model_tok
    eng = Engine(model, tok)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    greedy = [o.token_ids for o in eng.generate(prompts, SamplingParams(max_new_tokens=12))]
    k1 = [o.token_ids for o in eng.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=1))]
    assert k1 == greedy
    cold = [o.token_ids for o in eng.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1e-4, seed=1))]
    assert cold == greedy


def test_choose_sampling_distribution_top_k_top_p():
    """Engine._choose on fixed logits: empirical frequencies match the truncated, renormalised softmax.

    logits = log([0.5, 0.25, 0.15, 0.1]). top_p=0.7: cumulative mass before each token is [0, 0.5, 0.75, 0.9], so
    tokens 2 and 3 (mass before them >= 0.7) are dropped; kept {0: 0.5, 1: 0.25} -> renormalised [2/3, 1/3, 0, 0].
    top_k=3 keeps [0.5, 0.25, 0.15] / 0.9. With 20,000 draws the standard error of a frequency is <= 0.0036, so a 0.015
    tolerance is > 4 sigma.
    """
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log()[None].repeat(20000, 1)
    g = [torch.Generator().manual_seed(i) for i in range(20000)]
    toks = Engine._choose(logits, SamplingParams(temperature=1.0, top_p=0.7), g)
    freq = torch.bincount(toks, minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.015)
    assert freq[2] == 0 and freq[3] == 0  # masked tokens are never drawn (inverse-CDF: zero-width intervals)
    toks = Engine._choose(logits, SamplingParams(temperature=1.0, top_k=3), g)
    freq = torch.bincount(toks, minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.15, 0]) / 0.9, atol=0.015)
    # temperature 2: p ~ sqrt(probs) renormalised
    toks = Engine._choose(logits, SamplingParams(temperature=2.0), g)
    freq = torch.bincount(toks, minlength=4).float() / 20000
    ref = probs.sqrt() / probs.sqrt().sum()
    assert torch.allclose(freq, ref, atol=0.015)


def test_repetition_penalty_matches_hf(model_tok):
    model, tok = model_tok
    eng = Engine(model, tok)
    ids = tok(TEXTS[3])["input_ids"]
    ours = eng.generate([ids], SamplingParams(max_new_tokens=25, repetition_penalty=1.3))[0].token_ids
    ref = model.generate(torch.tensor([ids]), max_new_tokens=25, do_sample=False,
                         repetition_penalty=1.3)[0, len(ids):].tolist()
    assert ours == ref
    plain = eng.generate([ids], SamplingParams(max_new_tokens=25))[0].token_ids
    assert ours != plain  # the penalty changed something on this prompt


def test_stop_strings_cut_text_and_stream_concatenates_to_text(model_tok):
    model, tok = model_tok
    eng = Engine(model, tok)
    ids = tok(TEXTS[0])["input_ids"]
    free = eng.generate([ids], SamplingParams(max_new_tokens=30))[0]
    stop = free.text[12:15]  # three characters that appear in the free-running output
    assert len(stop) == 3
    out = eng.generate([ids], SamplingParams(max_new_tokens=30, stop_strings=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.find(stop)]
    assert free.token_ids[:len(out.token_ids)] == out.token_ids
    pieces = list(eng.stream(ids, SamplingParams(max_new_tokens=30, stop_strings=[stop])))
    assert "".join(pieces) == out.text
    assert stop not in "".join(pieces)
    pieces = list(eng.stream(ids, SamplingParams(max_new_tokens=30)))
    assert len(pieces) > 1 and "".join(pieces) == free.text


def test_settled_length_holds_back_stop_prefixes_and_partial_chars():
    assert _settled_length("hello wor", ("world",)) == 6  # "wor" may become "world"
    assert _settled_length("hello", ("xyz",)) == 5
    assert _settled_length("ab\ufffd", ()) == 2
    assert _settled_length("abc#", ("##", "#END")) == 3


def test_max_new_tokens_zero_and_bad_params(model_tok):
    model, tok = model_tok
    out = Engine(model, tok).generate([[5, 6]], SamplingParams(max_new_tokens=0))[0]
    assert out.token_ids == [] and out.finish_reason == "length"
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        Engine(model, tok).generate([[]])


def test_chat_uses_template_and_default_stops(model_tok):
    model, tok = model_tok
    eng = Engine(model, tok)
    msgs = [{"role": "user", "content": "Hi"}]
    ids = eng.chat_prompt_ids(msgs)
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") in eng.chat_stop_token_ids()
    out = eng.chat([msgs], SamplingParams(max_new_tokens=5))[0]
    assert out.prompt_ids == ids and len(out.token_ids) <= 5


@pytest.mark.slow
def test_greedy_matches_hf_on_smollm2():
    from instructkit.models.zoo import resolve_model  # prepared by the models engineer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eng = Engine(model, tok)
    texts = ["What is the capital of France?", "Give three tips for staying healthy.", "Hi"]
    eos = eng.default_stop_token_ids
    refs = _hf_greedy(model, tok, texts, 24, eos)
    ours = eng.generate([tok(t)["input_ids"] for t in texts], SamplingParams(max_new_tokens=24, stop_token_ids=eos))
    assert [o.token_ids for o in ours] == refs


def test_generate_cli(tiny_model_dir, tmp_path, capsys, model_tok):
    from instructkit.cli import main

    model, tok = model_tok
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n" + json.dumps("Hello") + "\n")
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "What is", "--input", str(prompts),
                 "--max-new-tokens", "6"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    eng = Engine(model, tok)
    p = SamplingParams(max_new_tokens=6, seed=0)
    assert [r["prompt"] for r in rows] == ["What is", [{"role": "user", "content": "Hi"}], "Hello"]
    assert rows[0]["completion"] == eng.generate([tok("What is")["input_ids"]], p)[0].text
    assert rows[1]["completion"] == eng.chat([[{"role": "user", "content": "Hi"}]], p)[0].text
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert main(["generate", "--model", str(tiny_model_dir), "--input", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_sampling_refuses_non_finite_probabilities():
    """As torch.multinomial did: NaN logits must not silently turn into tokens."""
    logits = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match="nan"):
        Engine._choose(logits, SamplingParams(temperature=1.0), [torch.Generator().manual_seed(0)])


def test_rows_with_their_own_parameters_in_one_batch_equal_each_alone(model_tok):
    """Engine.run with per-row parameters (what the server batches): greedy, seeded sampling, different lengths, stop
    strings and top log-probs side by side give each row what it gets alone."""
    from instructkit.generation.engine import Row

    model, tok = model_tok
    eng = Engine(model, tok)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    free = eng.generate(prompts[3:4], SamplingParams(max_new_tokens=12))[0].text
    params = [SamplingParams(max_new_tokens=12, top_logprobs=2),
              SamplingParams(max_new_tokens=9, temperature=0.8, top_k=20, seed=11),
              SamplingParams(max_new_tokens=4, logprobs=False),
              SamplingParams(max_new_tokens=12, stop_strings=(free[4:7],))]
    rows = [Row(index=i, prompt=p, params=q, seed=(q.seed or 0)) for i, (p, q) in enumerate(zip(prompts, params))]
    for _ in eng.run(rows):
        pass
    for r, p, q in zip(rows, prompts, params):
        alone = eng.generate([p], q)[0]
        got = eng.output(r)
        assert (got.token_ids, got.text, got.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
        assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
        assert [[t for t, _ in top] for top in got.top_logprobs] == [[t for t, _ in top] for top in alone.top_logprobs]
    assert rows[3].finish_reason == "stop" and len(rows[0].top_logprobs[0]) == 2


def test_prompt_logprobs_equal_teacher_forced(model_tok):
    model, tok = model_tok
    eng = Engine(model, tok)
    prompts = [tok(t)["input_ids"] for t in TEXTS[:3]]
    scored = eng.prompt_logprobs(prompts, top_k=3)
    for p, (lps, tops) in zip(prompts, scored):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1)
        ref = logp[:-1].gather(1, torch.tensor(p[1:])[:, None])[:, 0]
        assert lps[0] is None and tops[0] is None and len(lps) == len(p)
        assert torch.allclose(torch.tensor(lps[1:]), ref, atol=1e-5)
        assert [t for t, _ in tops[1]] == logp[0].topk(3).indices.tolist()
