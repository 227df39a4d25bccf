"""lm-evaluation-harness 0.4.13 against `instructkit serve` on the tiny model, through lm-eval's own API clients:
``local-completions`` on a log-likelihood (multiple-choice) task, which needs ``echo`` with prompt log-probabilities
and token-id prompts, and ``local-chat-completions`` on a generate_until task. Both tasks are defined here on local
data; the scores lm-eval logs must equal instructkit's own (eval/loglik.py for the log-likelihoods, Engine.chat for the
generations)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("uvicorn")

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
MC_DOCS = [
    {"question": "Question: What is the capital of France?\nAnswer:", "choices": ["Paris", "London", "a big city"],
     "answer": 0},
    {"question": "Question: 2 + 2 =\nAnswer: ", "choices": ["4", "five", "22"], "answer": 0},
    {"question": "The colour of the sky on a clear day is", "choices": ["blue", "green", "ünïcödé ☃"], "answer": 0},
]
GEN_DOCS = [{"q": "Give three tips for staying healthy.", "a": "x"}, {"q": "What is the capital of France?", "a": "y"}]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    env = {**os.environ, **OFFLINE_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "serve", "--model", str(tiny_model_dir), "--port",
                             "0", "--name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(proc.stdout.readline())
        yield first["url"]
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lmeval_server_tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in MC_DOCS), encoding="utf-8")
    (d / "gen.jsonl").write_text("".join(json.dumps(x) + "\n" for x in GEN_DOCS), encoding="utf-8")
    (d / "ik_srv_mc.yaml").write_text(
        f"task: ik_srv_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    (d / "ik_srv_gen.yaml").write_text(
        f"task: ik_srv_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \"{{a}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n")
    return d


def _evaluate(monkeypatch, tasks: Path, task: str, model: str, model_args: str, **kw) -> list[dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    for k, v in OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                  **kw)
    return out["samples"][task]


def test_local_completions_loglikelihood_equals_own_scoring(served, tasks, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.eval.loglik import loglikelihoods

    base = served.rsplit("/v1", 1)[0]
    samples = _evaluate(monkeypatch, tasks, "ik_srv_mc", "local-completions",
                        f"model=tiny,base_url={base}/v1/completions,num_concurrent=2,max_retries=1,batch_size=4")
    theirs = {}
    for rec in samples:
        for i, arg in enumerate(rec["arguments"]):
            theirs[tuple(arg)] = rec["resps"][i][0]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = [(d["question"], " " + c) for d in MC_DOCS for c in d["choices"]]
    assert set(theirs) == set(pairs)
    for p, ours in zip(pairs, loglikelihoods(model, tok, pairs)):
        logprob, greedy = theirs[p]
        assert abs(float(logprob) - ours.logprob) <= 1e-4, (p, logprob, ours.logprob)
        assert bool(greedy) == ours.is_greedy


def test_local_chat_completions_generate_until_equals_engine_chat(served, tasks, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.generation.engine import Engine, SamplingParams

    samples = _evaluate(monkeypatch, tasks, "ik_srv_gen", "local-chat-completions",
                        f"model=tiny,base_url={served}/chat/completions,max_retries=1",
                        apply_chat_template=True)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eng = Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), tok)
    by_q = {rec["doc"]["q"]: rec["resps"][0][0] for rec in samples}
    for d in GEN_DOCS:
        ref = eng.chat([[{"role": "user", "content": d["q"]}]],
                       SamplingParams(max_new_tokens=12, stop_strings=("\n\n",)))[0].text
        assert by_q[d["q"]] == ref
