"""Held-out evaluation: rank classification against hand-computed log-likelihoods, generative scoring, summaries,
and the contamination check."""

from __future__ import annotations

import json
import math

import pytest
import torch

from instructkit.data.schema import Conversation, Message
from instructkit.eval.contamination import check_contamination, words
from instructkit.eval.heldout import (
    HeldoutConfig,
    evaluate_heldout,
    exact_match,
    load_for_eval,
    response_token_spans,
    rouge_l_score,
    sequence_logprobs,
    summarize,
    to_markdown,
    write_results,
)
from instructkit.config import TaskMixtureConfig
from instructkit.tasks.bank import Task, TaskExample, Template, render_task
from instructkit.tasks.mixture import build_task_mixture, default_bank


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok = load_for_eval(tiny_model_dir)
    return model, tok


@pytest.fixture(scope="module")
def renderer(tiny):
    from instructkit.chat.render import Renderer

    return Renderer(tiny[1])


PROMPT = [Message("user", "Is the sky blue?\n\nOPTIONS:\n- yes\n- no")]


def test_scored_tokens_are_the_option_plus_end_of_turn(tiny, renderer):
    _, tok = tiny
    (ids, mask), = response_token_spans(renderer, PROMPT, ["yes"])
    scored = [t for t, m in zip(ids, mask) if m]
    assert scored == tok.encode("yes", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]


def test_option_logprob_equals_unbatched_reference(tiny, renderer):
    model, tok = tiny
    responses = ["yes", "no", "definitely not, the sky is green"]
    seqs = response_token_spans(renderer, PROMPT, responses)
    got = sequence_logprobs(model, seqs, tok.pad_token_id, batch_size=3)  # one padded batch of 3 lengths
    for (ids, mask), g in zip(seqs, got):
        # reference: full logits of the unpadded sequence; log p(ids[t] | ids[:t]) = log_softmax(logits[t-1])[ids[t]]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        lp = torch.log_softmax(logits.double(), -1)
        ref = sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t])
        assert g == pytest.approx(ref, abs=1e-4)
    assert got[2] < min(got[:2])  # many more tokens, random model: far less likely


def test_option_logprob_hand_computed_with_uniform_output_layer(tiny_model_dir, renderer):
    # With the output layer zeroed every logit is 0, so p(token) = 1/V and an option of n scored tokens (its content
    # tokens plus the end-of-turn token) has log-likelihood exactly n * -ln(V), V = the output layer's rows.
    model, tok = load_for_eval(tiny_model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    V = model.get_output_embeddings().weight.shape[0]
    responses = ["yes", "no way"]
    seqs = response_token_spans(renderer, PROMPT, responses)
    got = sequence_logprobs(model, seqs, tok.pad_token_id)
    for r, (ids, mask), g in zip(responses, seqs, got):
        n = len(tok.encode(r, add_special_tokens=False)) + 1
        assert sum(mask) == n
        assert g == pytest.approx(-n * math.log(V), rel=1e-6)


def test_rank_classification_picks_the_most_likely_option(tiny_model_dir):
    # Uniform output layer: the option with fewer tokens always wins, so accuracy is the fraction of examples whose
    # target is the short option: targets alternate short/long over 4 examples -> exactly 0.5 for every template.
    model, tok = load_for_eval(tiny_model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    opts = ("a", "a much longer option text")
    exs = [TaskExample({"q": f"question {i}"}, opts[i % 2], opts) for i in range(4)]
    task = Task("toy", "toys", [Template("t1", "{q}\n{options_}"), Template("t2", "Q: {q}")], examples=exs)
    res = evaluate_heldout(model, tok, [task], HeldoutConfig(examples_per_task=4))
    assert res["tasks"]["toy"]["mean"] == 0.5 and res["overall"] == 0.5
    assert all(r["prediction"] == "a" for r in res["records"])
    assert res["tasks"]["toy"]["templates"] == 2 and res["tasks"]["toy"]["examples"] == 8


def test_generative_tasks_are_scored_on_greedy_generations(tiny):
    model, tok = tiny
    bank = default_bank()
    tasks = [bank.get("addition"), bank.get("news_headline")]
    cfg = HeldoutConfig(examples_per_task=2, templates="t01", max_new_tokens=4)
    res = evaluate_heldout(model, tok, tasks, cfg)
    recs = res["records"]
    assert len(recs) == 4 and all(isinstance(r["prediction"], str) for r in recs)
    # a random tiny model cannot add 3-digit numbers; ROUGE-L of 4 random tokens against a headline is small
    assert res["tasks"]["addition"]["mean"] == 0.0
    assert 0.0 <= res["tasks"]["news_headline"]["mean"] < 0.5
    assert set(res["clusters"]) == {"arithmetic", "summarization"}


def test_exact_match_and_rouge_normalisation():
    assert exact_match("  Paris. ", ["paris"]) == 1.0
    assert exact_match("Paris is nice", ["paris"]) == 0.0
    assert exact_match("42", ["The answer is 42.", "42"]) == 1.0
    from instructkit.eval.heldout import contains_match

    assert contains_match("The capital of Chile is Santiago.", ["Santiago"]) == 1.0
    assert contains_match("I am 42 years old", ["4"]) == 0.0  # whole words only
    assert contains_match("New Delhi!", ["new delhi"]) == 1.0 and contains_match("x", ["..."]) == 0.0
    # ROUGE-L F: target 4 words, prediction 2 words, LCS 2 -> P = 1, R = 0.5, F = 2*0.5/1.5 = 2/3
    assert rouge_l_score("the cat", ["the cat sat down"]) == pytest.approx(2 / 3)


def test_summary_spread_across_templates():
    recs = []
    # task A: template t1 scores [1, 1], t2 [0, 1] -> means 1.0 and 0.5: mean 0.75, min 0.5, max 1, pstdev 0.25
    for tpl, scores in (("t1", [1, 1]), ("t2", [0, 1])):
        for s in scores:
            recs.append({"task": "A", "cluster": "c", "template": tpl, "score": s, "metric": "accuracy"})
    recs.append({"task": "B", "cluster": "c", "template": "t1", "score": 0.25, "metric": "rouge_l"})
    recs.append({"task": "C", "cluster": "d", "template": "t1", "score": 1.0, "metric": "exact_match"})
    res = summarize(recs)
    a = res["tasks"]["A"]
    assert (a["mean"], a["min"], a["max"], a["std"]) == (0.75, 0.5, 1.0, 0.25)
    assert res["clusters"]["c"]["mean"] == pytest.approx((0.75 + 0.25) / 2)
    assert res["overall"] == pytest.approx((0.5 + 1.0) / 2)
    md = to_markdown(res)
    assert "| c | A | accuracy | 0.750 | 0.500 | 1.000 | 0.250 | 2 | 4 |" in md


def test_write_results(tmp_path):
    res = summarize([{"task": "A", "cluster": "c", "template": "t1", "score": 1.0, "metric": "accuracy"}])
    j, m = write_results(res, tmp_path)
    assert json.loads(j.read_text())["overall"] == 1.0 and "| c | 1.000 | 1 |" in m.read_text()


# ---------------------------------------------------------------------------------------------------------------------
# contamination
# ---------------------------------------------------------------------------------------------------------------------
def _heldout_eval_convs(clusters, n=10):
    bank = default_bank()
    return [c for t in bank.in_clusters(clusters) for c in render_task(t, n, seed=0, split="eval")]


def test_heldout_clusters_do_not_occur_in_the_training_mixture():
    held = ["nli", "summarization"]
    mixture = build_task_mixture(TaskMixtureConfig(exclude_clusters=held, examples_per_task=30, seed=0))
    evals = _heldout_eval_convs(held)
    report = check_contamination(mixture.examples, evals, n=8)
    assert report.checked >= len(evals) * 0.9  # nearly all have a field of >= 4 words
    assert report.clean, report.to_dict()["overlaps"][:3]
    # the same check with the held-out clusters IN the mixture finds the fixed-list examples (SNLI-like premises,
    # news articles): the check can fail
    leaky = build_task_mixture(TaskMixtureConfig(examples_per_task=30, seed=0))
    bad = check_contamination(leaky.examples, evals, n=8)
    assert bad.contaminated > 0
    assert bad.by_task["news_summary"]["contaminated"] == bad.by_task["news_summary"]["checked"] == 10


def test_contamination_flags_an_injected_example_with_its_ngram():
    evals = _heldout_eval_convs(["nli"], n=3)
    victim = evals[0]
    premise = victim.meta["inputs"]["premise"]
    train = [Conversation([Message("user", "Some unrelated text about cooking pasta and rice."),
                           Message("assistant", "Boil water.")]),
             Conversation([Message("user", "Copy: " + premise + " Thanks."), Message("assistant", "Done.")])]
    report = check_contamination(train, evals, n=8)
    assert report.contaminated >= 1
    hit = report.overlaps[0]
    assert hit.index == 0 and hit.ngram in " ".join(words(premise))
    # short texts (fewer than n words) are matched whole, as a contiguous word sequence
    short = [Conversation([Message("user", "q"), Message("assistant", "a")],
                          {"task": "s", "inputs": {"text": "red quiet bright old small"}, "target": "x"})]
    assert check_contamination(train, short, n=8).clean
    train.append(Conversation([Message("user", "the Red, quiet bright old small house"), Message("assistant", "ok")]))
    assert not check_contamination(train, short, n=8).clean


def test_shared_prefix_scoring_equals_separate_rows(tiny, renderer):
    # Options share the prompt; scoring them in one packed row (prefix once, options masked from each other, positions
    # restarting after the prefix) must give each option the log-likelihood it gets alone.
    from instructkit.eval.heldout import score_options

    model, tok = tiny
    items = [(PROMPT, ["yes", "no", "maybe, it depends on the weather"]),
             ([Message("system", "Be brief."), Message("user", "Pick one.\nOPTIONS:\n- a\n- b")], ["a", "b"]),
             ([Message("user", "x")], ["only option"])]
    shared = score_options(model, renderer, items, tok.pad_token_id, batch_size=4, shared_prefix=True)
    separate = score_options(model, renderer, items, tok.pad_token_id, batch_size=4, shared_prefix=False)
    assert [len(s) for s in shared] == [3, 2, 1]
    for a, b in zip(shared, separate):
        assert a == pytest.approx(b, abs=1e-4)


def test_sliding_window_model_shares_the_prompt_of_items_shorter_than_the_window(tiny, renderer, monkeypatch):
    # Gemma 3's sliding-window layers cannot use the packed (shared-prefix) mask for a sequence as long as the window:
    # that item takes unshared rows, while every shorter item still shares its prompt; scores equal the unshared ones.
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from instructkit.eval import heldout

    _, tok = tiny
    window = 24
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                           sliding_window=window, layer_types=["sliding_attention", "full_attention"],
                           max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    long_prompt = [Message("user", "The quick brown fox jumps over the lazy dog near the river bank. " * 4 + "Yes?")]
    items = [([Message("user", "x")], ["a", "b"]), (long_prompt, ["yes", "no"]), ([Message("user", "y?")], ["c", "d"])]
    lengths = [[len(s) for s, _ in heldout.response_token_spans(renderer, p, o)] for p, o in items]
    assert max(lengths[0] + lengths[2]) < window <= min(lengths[1])  # items 0 and 2 fit, item 1 does not
    shared_calls = []
    real = heldout._shared_prefix_logprobs
    monkeypatch.setattr(heldout, "_shared_prefix_logprobs",
                        lambda m, per_item, *a: shared_calls.append(len(per_item)) or real(m, per_item, *a))
    got = heldout.score_options(model, renderer, items, tok.pad_token_id, batch_size=4)
    assert shared_calls == [2]  # the two short items, in one shared-prefix call
    separate = heldout.score_options(model, renderer, items, tok.pad_token_id, batch_size=4, shared_prefix=False)
    assert shared_calls == [2]
    for a, b in zip(got, separate):
        assert a == pytest.approx(b, abs=1e-4)
