"""Built-in task families and YAML task definitions."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
from collections import Counter

import pytest

from instructkit.data.schema import DataError, validate_conversation
from instructkit.config import RenderSpec
from instructkit.tasks.bank import render_example, render_task, render_variants
from instructkit.tasks.mixture import default_bank
from instructkit.tasks.yaml_tasks import load_yaml_tasks

BANK = default_bank()
WANTED_CLUSTERS = {"sentiment", "classification", "nli", "extraction", "summarization", "paraphrase", "closed_qa",
                   "open_generation", "format_control", "arithmetic", "logic", "code", "dialogue", "safety"}


def test_bank_size_and_coverage():
    tasks = list(BANK.tasks.values())
    assert len(tasks) >= 60
    assert set(BANK.clusters()) == WANTED_CLUSTERS
    assert all(len(t.templates) >= 5 for t in tasks)
    assert sum(len(t.templates) >= 10 for t in tasks) >= 15  # the common (classification-like) tasks have 10
    assert min(Counter(t.cluster for t in tasks).values()) >= 4  # every cluster has several tasks
    metrics = Counter(t.metric for t in tasks)
    assert metrics["accuracy"] >= 15 and metrics["exact_match"] >= 20 and metrics["rouge_l"] >= 8


@pytest.mark.parametrize("name", sorted(BANK.tasks))
def test_every_template_and_variant_renders(name):
    task = BANK.get(name)
    for i in range(3):
        ex = task.example(i, seed=7)
        shots = [task.example(j, seed=7, split="shots") for j in range(2)]
        for _, conv in render_variants(task, ex, shots):
            validate_conversation(conv)
            assert all(m.content.strip() for m in conv.messages)
            assert "{" + "options_}" not in conv.messages[-2].content
        if ex.options:
            assert ex.target in ex.options, (name, ex)
        json.dumps([c.to_dict() for c in render_task(task, 2, seed=1)])  # meta is JSON-serialisable


def test_templates_differ_within_a_task():
    for task in BANK.tasks.values():
        ex = task.example(0)
        texts = {render_example(task, ex, t).messages[-2].content + (t.system or "") for t in task.templates}
        assert len(texts) == len(task.templates), task.name


def _run(code: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {})  # our own generated snippets: an independent check of the computed answers
    return buf.getvalue().strip()


def test_code_trace_answers_match_execution():
    for name in ("trace_loop", "trace_branch", "trace_list_index", "trace_string"):
        for ex in BANK.get(name).get_examples(15, seed=2):
            assert _run(ex.inputs["code"]) == ex.target, (name, ex.inputs["code"])


def test_reasoning_answers_independently():
    for ex in BANK.get("date_add").get_examples(20):
        d = datetime.date.fromisoformat(ex.inputs["date"]) + datetime.timedelta(days=ex.inputs["k"])
        assert ex.target == d.isoformat()
    for ex in BANK.get("days_between").get_examples(20):
        a, b = (datetime.date.fromisoformat(ex.inputs[k]) for k in ("start", "end"))
        assert int(ex.target) == (b - a).days
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    for ex in BANK.get("weekday_after").get_examples(20):
        assert days.index(ex.target) == (days.index(ex.inputs["day"]) + ex.inputs["k"]) % 7
    for ex in BANK.get("sort_numbers").get_examples(20):
        nums = [int(x) for x in ex.inputs["numbers"].split(", ")]
        assert ex.target == ", ".join(str(x) for x in sorted(nums))
    for ex in BANK.get("count_letter").get_examples(20):
        assert int(ex.target) == ex.inputs["word"].count(ex.inputs["letter"])
    for ex in BANK.get("word_problem").get_examples(20):
        nums = [int(w) for w in ex.inputs["problem"].replace(".", " ").split() if w.isdigit()]
        assert int(ex.target) == nums[0] + nums[1] - nums[2]


def test_format_answers_independently():
    for ex in BANK.get("json_record").get_examples(10):
        assert json.loads(ex.target) == {"name": ex.inputs["name"], "age": ex.inputs["age"], "city": ex.inputs["city"]}
    for ex in BANK.get("reverse_words").get_examples(10):
        assert ex.target.split() == ex.inputs["sentence"].split()[::-1]
    for ex in BANK.get("repeat_word").get_examples(10):
        assert ex.target.split() == [ex.inputs["word"]] * ex.inputs["k"]


def test_multi_turn_and_system_roles():
    conv = render_task(BANK.get("recall_user_fact"), 1)[0]
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert conv.messages[-1].content in conv.messages[0].content  # the answer was said in the first turn
    rp = render_task(BANK.get("role_play"), 1)[0]
    assert rp.messages[0].role == "system" and "You are" in rp.messages[0].content


def test_safety_family_has_refusals_and_benign_answers():
    refusals = render_task(BANK.get("refuse_harmful"), 5)
    assert all("can't help" in c.messages[-1].content for c in refusals)
    benign = render_task(BANK.get("benign_lookalike"), 5)
    assert not any("can't help" in c.messages[-1].content for c in benign)


# ---------------------------------------------------------------------------------------------------------------------
# YAML tasks
# ---------------------------------------------------------------------------------------------------------------------
def test_yaml_task_inline_and_records_file(tmp_path):
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"city": "Lima", "label": "Peru", "choices": ["Peru", "Chile"]}) + "\n"
        + json.dumps({"city": "Oslo", "label": "Norway", "choices": ["Norway", "Sweden"]}) + "\n")
    (tmp_path / "tasks.yaml").write_text("""
tasks:
  - name: country_of_capital
    cluster: geography
    metric: accuracy
    templates:
      - {name: direct, version: 2, instruction: "Which country has {city} as its capital?\\n{options_}", response: "It is {target}."}
      - "Name the country whose capital is {city}."
    examples:
      - {inputs: {city: Paris}, target: France, options: [France, Spain]}
    file: rows.jsonl
    format: records
    fields: {target: label, options: choices}
""")
    (task,) = load_yaml_tasks(tmp_path / "tasks.yaml")
    assert task.cluster == "geography" and len(task.examples) == 3
    conv = render_example(task, task.examples[1], task.templates[0])
    assert conv.messages[0].content == "Which country has Lima as its capital?\nOPTIONS:\n- Peru\n- Chile"
    assert conv.messages[1].content == "It is Peru." and conv.meta["template_version"] == 2
    bank = default_bank([tmp_path / "tasks.yaml"])
    assert "geography" in bank.clusters() and bank.get("country_of_capital") is not None


def test_yaml_task_from_a_data_file_any_format(tmp_path, shared_data):
    (tmp_path / "t.yaml").write_text(f"""
tasks:
  - name: alpaca_demo
    cluster: user_generation
    metric: rouge_l
    templates: ["{{prompt}}", "Instruction: {{prompt}}", "{{prompt}}\\n\\nAnswer helpfully."]
    file: {shared_data / 'lf_alpaca_en_demo.json'}
    format: alpaca
""")
    (task,) = load_yaml_tasks(tmp_path / "t.yaml")
    assert len(task.examples) > 100
    conv = render_task(task, 1, spec=RenderSpec(templates="t02"))[0]
    assert conv.messages[-2].content.startswith("Instruction: ")
    assert conv.messages[-1].content == conv.meta["target"]


@pytest.mark.parametrize("body, match", [
    ("tasks:\n  - {name: x, templates: ['{a}'], examples: [{a: 1}]}\n", "must be a mapping with a 'target'"),
    ("tasks:\n  - {name: x, templates: [], examples: [{a: 1, target: 2}]}\n", "non-empty 'templates'"),
    ("tasks:\n  - {name: x, templates: ['{b}'], examples: [{a: 1, target: 2}]}\n", r"template uses \{b\}"),
    ("tasks:\n  - {name: x, metric: bleu, templates: ['{a}'], examples: [{a: 1, target: 2}]}\n", "metric must be"),
    ("tasks:\n  - {name: x, metric: accuracy, templates: ['{a}'], examples: [{a: 1, target: 2}]}\n", "needs options"),
    ("tasks:\n  - {name: x, colour: red, templates: ['{a}'], examples: [{a: 1, target: 2}]}\n", "unknown key"),
    ("nothing: here\n", "expected a mapping with a 'tasks' list"),
])
def test_yaml_task_errors_name_the_problem(tmp_path, body, match):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(DataError, match=match):
        load_yaml_tasks(p)


# ---------------------------------------------------------------------------------------------------------------------
# property tests: arbitrary templates and values render or raise DataError, nothing else
# ---------------------------------------------------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from instructkit.tasks.bank import Task, TaskExample, Template  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(template=st.text(max_size=40), value=st.text(max_size=40), target=st.text(min_size=1, max_size=20))
def test_any_template_text_renders_or_raises_data_error(template, value, target):
    task = Task("p", "c", [Template("t", template)], "exact_match", examples=[TaskExample({"x": value}, target)])
    try:
        conv = render_example(task, task.examples[0], task.templates[0])
    except DataError:
        return
    assert conv.messages[-1].content == target.strip() or not target.strip()


@settings(max_examples=100, deadline=None)
@given(value=st.text(max_size=60), opts=st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=4))
def test_values_with_braces_and_unicode_are_inserted_verbatim(value, opts):
    task = Task("p", "c", [Template("t", "<{x}>\n{options_}")], examples=[TaskExample({"x": value}, opts[0], tuple(opts))])
    try:
        conv = render_example(task, task.examples[0], task.templates[0])
    except DataError:  # e.g. a whitespace-only target: an empty assistant turn is refused
        assert not opts[0].strip()
        return
    assert conv.messages[0].content.startswith(("<" + value + ">").strip())


@pytest.mark.parametrize("bad", ["{x.__class__}", "{x[0]}", "{0}", "{}", "{x!r}", "{x", "x}"])
def test_template_attribute_index_and_malformed_fields_are_refused(bad):
    task = Task("p", "c", [Template("t", bad)], "exact_match", examples=[TaskExample({"x": "v"}, "y")])
    with pytest.raises(DataError, match="task p template t"):
        render_example(task, task.examples[0], task.templates[0])
