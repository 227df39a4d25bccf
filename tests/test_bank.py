"""The task bank: rendering variants, meta, determinism, held-out splits, mixtures."""

from __future__ import annotations

import random

import pytest

from instructkit.config import RenderSpec, TaskMixtureConfig, TaskMixtureEntry
from instructkit.data.schema import DataError
from instructkit.tasks.bank import (
    Task,
    TaskBank,
    TaskExample,
    Template,
    options_block,
    render_example,
    render_task,
    render_variants,
)
from instructkit.tasks.mixture import build_task_mixture, count_by, default_bank


def toy_task(**kw) -> Task:
    exs = [TaskExample({"text": f"sentence {i}"}, "yes" if i % 2 else "no") for i in range(6)]
    return Task(
        kw.pop("name", "toy"), kw.pop("cluster", "c1"),
        [Template("plain", "Is this good? {text}"),
         Template("slot", "{text}\n{options_}\nAnswer:", "Answer: {target}", version=3)],
        examples=exs, options=("yes", "no"), **kw,
    )


def test_zero_shot_with_options_appends_flan_block_and_records_meta():
    t = toy_task()
    ex = t.examples[1]
    conv = render_example(t, ex, t.templates[0], with_options=True)
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[0].content == "Is this good? sentence 1\n\nOPTIONS:\n- yes\n- no"
    assert conv.messages[1].content == "yes"
    m = conv.meta
    assert (m["task"], m["cluster"], m["template"], m["template_version"], m["variant"]) == (
        "toy", "c1", "plain", 1, "zero_shot")
    assert m["options"] == ["yes", "no"] and m["target"] == "yes" and m["options_shown"] is True


def test_options_slot_and_without_options_and_response_template():
    t = toy_task()
    ex = t.examples[0]
    with_opts = render_example(t, ex, t.templates[1], with_options=True)
    assert with_opts.messages[0].content == "sentence 0\nOPTIONS:\n- yes\n- no\nAnswer:"
    assert with_opts.messages[1].content == "Answer: no"
    without = render_example(t, ex, t.templates[1], with_options=False)
    # the slot renders empty: the classification task becomes a generation task
    assert without.messages[0].content == "sentence 0\n\nAnswer:"
    assert "OPTIONS" not in without.messages[0].content and without.meta["options_shown"] is False
    assert without.meta["template_version"] == 3


def test_few_shot_inline_and_turns():
    t = toy_task()
    q, e1, e2 = t.examples[0], t.examples[3], t.examples[4]
    conv = render_example(t, q, t.templates[0], with_options=False, exemplars=[e1, e2], separator="\n###\n")
    assert conv.messages[0].content == (
        "Is this good? sentence 3\nyes\n###\nIs this good? sentence 4\nno\n###\nIs this good? sentence 0")
    assert conv.meta["variant"] == "few_shot" and conv.meta["k"] == 2
    turns = render_example(t, q, t.templates[0], with_options=False, exemplars=[e1, e2], fewshot_format="turns")
    assert [(m.role, m.content) for m in turns.messages] == [
        ("user", "Is this good? sentence 3"), ("assistant", "yes"), ("user", "Is this good? sentence 4"),
        ("assistant", "no"), ("user", "Is this good? sentence 0"), ("assistant", "no")]


def test_prompt_only_rendering_ends_with_user_turn():
    t = toy_task()
    conv = render_example(t, t.examples[0], t.templates[0], include_response=False)
    assert conv.messages[-1].role == "user"


def test_missing_template_field_is_a_named_error():
    t = Task("bad", "c", [Template("t", "{nope}")], "exact_match", examples=[TaskExample({"text": "x"}, "y")])
    with pytest.raises(DataError, match=r"task bad template t: template uses \{nope\}"):
        render_example(t, t.examples[0], t.templates[0])


def test_render_task_is_deterministic_by_seed_and_split():
    t = default_bank().get("addition")
    spec = RenderSpec(fewshot_fraction=0.5, k=2)
    a = [c.to_dict() for c in render_task(t, 20, seed=3, spec=spec)]
    b = [c.to_dict() for c in render_task(t, 20, seed=3, spec=spec)]
    c = [c.to_dict() for c in render_task(t, 20, seed=4, spec=spec)]
    d = [c.to_dict() for c in render_task(t, 20, seed=3, split="eval", spec=spec)]
    assert a == b and a != c and a != d
    # drawing more examples never changes the first ones
    assert [x.to_dict() for x in render_task(t, 5, seed=3, spec=RenderSpec())] == \
        [x.to_dict() for x in render_task(t, 30, seed=3, spec=RenderSpec())][:5]
    # both variants and several templates occur at fewshot_fraction 0.5
    assert {x["meta"]["variant"] for x in a} == {"zero_shot", "few_shot"}
    assert len({x["meta"]["template"] for x in a}) >= 5


def test_generated_answers_are_exact():
    bank = default_bank()
    for conv in render_task(bank.get("addition"), 10, seed=0, spec=RenderSpec(templates="t01")):
        a, b = conv.meta["inputs"]["a"], conv.meta["inputs"]["b"]
        assert conv.messages[0].content == f"What is {a} + {b}?"
        assert conv.messages[-1].content == str(a + b)


def test_few_shot_exemplars_never_repeat_the_query():
    t = toy_task()
    for conv in render_task(t, 30, seed=1, spec=RenderSpec(fewshot_fraction=1.0, k=3, options_fraction=0.0,
                                                                 templates="plain")):
        parts = conv.messages[0].content.split("\n\n")
        query = parts[-1]
        assert all(not p.startswith(query + "\n") for p in parts[:-1])
        assert conv.meta["k"] == 3


def test_render_all_templates_and_variants():
    t = toy_task()
    shown = render_variants(t, t.examples[0], [t.examples[1], t.examples[2]])
    # 2 templates x 2 variants x (with, without options)
    assert len(shown) == 8
    assert len({c.messages[0].content for _, c in shown}) == 8


def test_split_by_cluster_holds_out_whole_clusters():
    bank = default_bank()
    train, held = bank.split_by_cluster(["nli", "code"])
    assert {t.cluster for t in held} == {"nli", "code"}
    assert not {t.cluster for t in train} & {"nli", "code"}
    assert len(train) + len(held) == len(bank.tasks)
    with pytest.raises(KeyError, match="unknown cluster"):
        bank.split_by_cluster(["nope"])


def test_duplicate_task_names_refused():
    with pytest.raises(ValueError, match="duplicate task"):
        TaskBank().extend([toy_task(), toy_task()])


def test_mixture_reuses_data_mixture_and_excludes_heldout_clusters():
    cfg = TaskMixtureConfig(
        tasks=[TaskMixtureEntry("cluster:arithmetic", weight=2.0), TaskMixtureEntry("sort_words", weight=1.0),
               TaskMixtureEntry("cluster:nli")],
        exclude_clusters=["nli"], strategy="weighted", total=300, examples_per_task=40, seed=0)
    mixture = build_task_mixture(cfg)
    assert len(mixture.examples) == 300
    tasks = {c.meta["task"] for c in mixture.examples}
    assert "sort_words" in tasks and not any(c.meta["cluster"] == "nli" for c in mixture.examples)
    # weights: arithmetic (6 tasks) shares 2.0, sort_words 1.0 -> rates 2/3 and 1/3 -> counts 200 / 100
    arith = sum(mixture.counts[t.name] for t in default_bank().in_clusters(["arithmetic"]))
    assert arith == 200 and mixture.counts["sort_words"] == 100
    assert sum(count_by(mixture.examples, "task", "template").values()) == 300
    again = build_task_mixture(cfg)
    assert [c.to_dict() for c in again.examples] == [c.to_dict() for c in mixture.examples]


def test_proportional_mixture_caps_task_sizes():
    # sizes: 3 tasks of 50 rendered examples each, plus capital_cities (40 countries x 10 templates, capped at 50 by
    # examples_per_task) -> all equal: rates 1/4 each; with cap 20 also equal. Use unequal examples instead:
    cfg = TaskMixtureConfig(
        tasks=[TaskMixtureEntry("addition", examples=90), TaskMixtureEntry("subtraction", examples=10)],
        strategy="proportional", cap=30, temperature=1.0, total=40, seed=0)
    m = build_task_mixture(cfg)
    # rates: min(90, 30) : min(10, 30) = 30 : 10 -> 30 and 10 of 40
    assert m.counts == {"addition": 30, "subtraction": 10}
    assert m.sizes == {"addition": 90, "subtraction": 10}


def test_options_block_format():
    assert options_block(["a", "b c"]) == "OPTIONS:\n- a\n- b c"


def test_example_stream_is_independent_of_python_hash_seed():
    t = default_bank().get("sort_numbers")
    # random.Random(str) is seeded through SHA-512, so this is fixed across runs and processes
    rng = random.Random("sort_numbers|train|0|0")
    assert t.example(0).target == t.generator(rng).target
