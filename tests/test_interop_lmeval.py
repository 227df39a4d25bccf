"""Interoperability with lm-evaluation-harness: an exported model and an exported LoRA adapter, evaluated by
`lm_eval --model hf` on a local multiple-choice task, give the same per-choice log-likelihoods as instructkit's own
scoring (eval/loglik.py), within 1e-5. Plus unit tests of eval/loglik.py against a plain full-sequence computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructkit.eval.loglik import choice_scores, encode_pair, loglikelihoods

pytest.importorskip("lm_eval")

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Contexts exercise the whitespace rule (a trailing space moves into the continuation), multi-token choices,
# unicode, and a newline inside the context.
DOCS = [
    {"question": "Question: What is the capital of France?\nAnswer:", "choices": ["Paris", "London", "a big city"],
     "answer": 0},
    {"question": "Question: 2 + 2 =\nAnswer: ", "choices": ["4", "five", "22"], "answer": 0},
    {"question": "Translate 'thank you' to German:", "choices": ["danke", "merci", "grazie schön"], "answer": 0},
    {"question": "The colour of the sky on a clear day is", "choices": ["blue", "green", "ünïcödé ☃"],
     "answer": 0},
]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A LoRA adapter on the tiny model with non-zero B weights (init_lora_weights=False draws A and B at random),
    exported by instructkit as <out>/adapter (peft format) and <out>/merged (plain transformers folder)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.models.export import export

    root = tmp_path_factory.mktemp("interop")
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(root / "adapter_src")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "adapter_src")
    result = export(root / "adapter_src", root / "out", merge=True, adapter=True)
    return {"base": tiny_model_dir, "adapter": Path(result["adapter"]), "merged": Path(result["merged"]),
            "root": root}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A tiny multiple-choice task: YAML + local JSONL, loaded by lm-eval through --include_path."""
    d = tmp_path_factory.mktemp("lmeval_task")
    (d / "data.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in DOCS), encoding="utf-8")
    (d / "ik_tiny_mc.yaml").write_text(
        "task: ik_tiny_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {d / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
    )
    return d


def _lm_eval_args(model_args: str, task_dir: Path, out: Path) -> list[str]:
    return ["--model", "hf", "--model_args", f"{model_args},dtype=float32", "--tasks", "ik_tiny_mc",
            "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "4",
            "--log_samples", "--output_path", str(out)]


def _run_lm_eval_in_process(args: list[str], monkeypatch) -> None:
    """The `lm_eval` console script's own code path (lm_eval.__main__.cli_evaluate), run in this process so the
    heavy imports are paid once per session rather than once per run."""
    from lm_eval.__main__ import cli_evaluate

    for k, v in OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["lm_eval", "run", *args])
    cli_evaluate()


def _logged_loglikelihoods(out: Path) -> dict[tuple[str, str], float]:
    """{(context, continuation): log-likelihood} from lm-eval's --log_samples file."""
    (samples,) = out.rglob("samples_ik_tiny_mc_*.jsonl")
    scores = {}
    for line in samples.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        for k, arg in rec["arguments"].items():
            i = int(k.rsplit("_", 1)[1])
            scores[(arg["arg_0"], arg["arg_1"])] = float(rec["resps"][i][0][0])
    return scores


def _own_loglikelihoods(model, tokenizer) -> dict[tuple[str, str], float]:
    pairs = [(d["question"], " " + c) for d in DOCS for c in d["choices"]]  # lm-eval's default target_delimiter " "
    return {p: r.logprob for p, r in zip(pairs, loglikelihoods(model, tokenizer, pairs))}


def _assert_same(theirs: dict, ours: dict) -> None:
    assert set(theirs) == set(ours) and len(ours) == sum(len(d["choices"]) for d in DOCS)
    for key in ours:
        assert abs(theirs[key] - ours[key]) <= 1e-5, (key, theirs[key], ours[key])


def test_lm_eval_merged_export_matches_own_scoring(exported, task_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _run_lm_eval_in_process(_lm_eval_args(f"pretrained={exported['merged']}", task_dir, tmp_path / "o"), monkeypatch)
    theirs = _logged_loglikelihoods(tmp_path / "o")
    model = AutoModelForCausalLM.from_pretrained(exported["merged"], dtype=torch.float32)
    ours = _own_loglikelihoods(model, AutoTokenizer.from_pretrained(exported["merged"]))
    _assert_same(theirs, ours)


def test_lm_eval_peft_adapter_matches_own_scoring(exported, task_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = _lm_eval_args(f"pretrained={exported['base']},peft={exported['adapter']}", task_dir, tmp_path / "o")
    _run_lm_eval_in_process(args, monkeypatch)
    theirs = _logged_loglikelihoods(tmp_path / "o")
    tok = AutoTokenizer.from_pretrained(exported["adapter"])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(exported["base"]), exported["adapter"])
    ours = _own_loglikelihoods(peft_model, tok)
    _assert_same(theirs, ours)
    # the adapter really changes the scores, so this test tells base from base + adapter
    base = _own_loglikelihoods(AutoModelForCausalLM.from_pretrained(exported["base"]), tok)
    assert max(abs(base[k] - ours[k]) for k in ours) > 1e-2


@pytest.mark.slow
def test_lm_eval_console_script_subprocess(exported, task_dir, tmp_path):
    """The installed `lm_eval` command itself, in a fresh process (slow: about a minute of imports here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exe = Path(sys.executable).with_name("lm_eval")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lm_eval"]
    env = {**os.environ, **OFFLINE_ENV}
    subprocess.run(cmd + _lm_eval_args(f"pretrained={exported['merged']}", task_dir, tmp_path / "o"),
                   check=True, env=env, capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(exported["merged"], dtype=torch.float32)
    _assert_same(_logged_loglikelihoods(tmp_path / "o"),
                 _own_loglikelihoods(model, AutoTokenizer.from_pretrained(exported["merged"])))


# ---------------------------------------------------------------------------------------------------------------------
# eval/loglik.py on its own
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _reference(model, ctx: list[int], cont: list[int]) -> float:
    """sum_j log softmax(logits[len(ctx) + j - 1])[cont[j]] from one unbatched forward over ctx + cont: the
    definition of log p(cont | ctx) for a causal LM (position t predicts token t + 1)."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)  # (T, V)
    return sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))


def test_encode_pair_moves_trailing_space_and_splits_the_joint_encoding(tiny):
    _, tok = tiny
    # "Answer: " + "4" is scored as "Answer:" + " 4": the space stays with the word, as lm-eval does
    assert encode_pair(tok, "Answer: ", "4") == encode_pair(tok, "Answer:", " 4")
    ctx, cont = encode_pair(tok, "Answer:", " 4")
    assert ctx + cont == tok.encode("Answer: 4") and ctx == tok.encode("Answer:")
    assert tok.decode(cont) == " 4"
    # an empty context is replaced by the prefix token (no BOS here is auto-added; the tokenizer's bos is used)
    ctx, cont = encode_pair(tok, "", "hello")
    assert ctx == [tok.bos_token_id] and cont == tok.encode("hello", add_special_tokens=False)


def test_loglikelihoods_equal_unbatched_reference(tiny):
    model, tok = tiny
    pairs = [(d["question"], " " + c) for d in DOCS for c in d["choices"]] + [("", "hello world")]
    got = loglikelihoods(model, tok, pairs, batch_size=5)  # batches of 5 mix lengths: padding must not leak in
    for (c, x), r in zip(pairs, got):
        ctx, cont = encode_pair(tok, c, x)
        assert r.n_tokens == len(cont)
        assert abs(r.logprob - _reference(model, ctx, cont)) <= 1e-5
        assert r.logprob < 0
    # choice_scores is the same thing with lm-eval's " " delimiter
    d = DOCS[0]
    assert choice_scores(model, tok, d["question"], d["choices"]) == [r.logprob for r in got[:3]]


def test_is_greedy_and_truncation(tiny):
    model, tok = tiny
    # find a greedy continuation whose text re-encodes to the same tokens (byte-level BPE of a random model may
    # produce byte pieces that merge differently when re-encoded), so is_greedy has a known answer
    found = None
    for ctx_text in ("The colour of the sky", "Question: 2 + 2 =\nAnswer:", "hello", "Paris is"):
        ctx = tok.encode(ctx_text)
        with torch.no_grad():
            gen = model.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False)[0, len(ctx):].tolist()
        for n in (3, 2, 1):
            text = tok.decode(gen[:n])
            if text.strip() and encode_pair(tok, ctx_text, text)[1] == gen[:n]:
                found = (ctx_text, text)
                break
        if found:
            break
    assert found, "no re-encodable greedy continuation found"
    ctx_text, text = found
    r_greedy, r_other = loglikelihoods(model, tok, [(ctx_text, text), (ctx_text, " zzzq")])
    assert r_greedy.is_greedy and not r_other.is_greedy
    # max_length keeps the last max_length + 1 tokens of context + continuation (minus the last as input), as lm-eval
    ctx_ids, cont_ids = encode_pair(tok, ctx_text, " zzzq")
    kept = (ctx_ids + cont_ids)[-(len(cont_ids) + 3):]
    r = loglikelihoods(model, tok, [(ctx_text, " zzzq")], max_length=len(cont_ids) + 2)[0]
    assert abs(r.logprob - _reference(model, kept[:-len(cont_ids)], cont_ids)) <= 1e-5
    assert abs(r.logprob - r_other.logprob) > 1e-4  # the truncation did change the context
    with pytest.raises(ValueError, match="exceeds max_length"):
        loglikelihoods(model, tok, [(ctx_text, " zzzq")], max_length=len(cont_ids) - 1)
