"""Self-Instruct: prompt format, parsing, filters with exact accounting, resume after a kill, end to end into SFT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from instructkit.config import BackendConfig, ConfigError, SelfInstructConfig
from instructkit.data.rouge import rouge_l
from instructkit.data.seed_tasks import load_seed_tasks
from instructkit.recipes import self_instruct as si

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

GEN = ["Write a limerick about a cat who learns to surf.", "Explain how a bill becomes a law in simple terms.",
       "Suggest a weekly meal plan for a vegetarian student.", "Describe the water cycle to a curious child."]
CLF = ["Classify the movie genre from the story summary: comedy, horror or drama.",
       "Decide whether the tweet expresses anger or joy.", "Label each email subject line as urgent or not urgent.",
       "Tell whether the animal described lives on land or in water."]


class ScriptedBackend:
    """Answers each kind of prompt with a fixed, known text, so every filter's count can be derived by hand.

    Call k of the instruction prompt returns (as the continuation after "9."):
      GEN[k] (kept), a blacklisted one, a 2-word one, one starting with a quote, one starting with "É",
      a seed instruction verbatim (ROUGE-L 1.0), CLF[k] (kept).
    """

    name = "scripted-model"

    def __init__(self, fail_after: int | None = None):
        self.instruction_calls = 0
        self.prompts: list[str] = []
        self.fail_after = fail_after
        self.calls = 0

    def complete(self, requests, params):
        out = []
        for r in requests:
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise RuntimeError("backend died")
            text = r if isinstance(r, str) else r[-1]["content"]
            self.prompts.append(text)
            if text.startswith("Come up with a series of tasks"):
                k = self.instruction_calls
                self.instruction_calls += 1
                out.append(f" {GEN[k]}\n10. Draw a picture of a dog.\n11. Say hi\n12. \"Quoted start is punctuation here\n"
                           f"13. Écrivez un poème sur la mer.\n14. Give three tips for staying healthy.\n15. {CLF[k]}\n16")
            elif text.startswith(si.CLF_QUESTION):
                task = text.rsplit("Task: ", 1)[1]
                out.append(" Yes" if any(task.startswith(c) for c in CLF) else " No")
            elif text.startswith(si.OUTPUT_FIRST_HEADER):
                out.append("Class label: Yes\nInput: I love it.\nClass label: No\nInput: I hate it.\n"
                           "Class label: No\nInput: I hate it.\n")
            elif text.startswith(si.INPUT_FIRST_HEADER):
                out.append("Example 1\nInput: 3 apples\nOutput: three apples\nExample 2\nOutput: done\n"
                           "Example 3\nInput: same\nOutput: same\n")
            else:
                raise AssertionError(f"unexpected prompt {text[:60]!r}")
        cut = []  # stop strings apply, as in every real backend
        for t in out:
            hits = [t.find(s) for s in params.stop_strings if s in t]
            cut.append(t[:min(hits)] if hits else t)
        return cut


def _cfg(tmp_path, **kw) -> SelfInstructConfig:
    base = dict(output_dir=str(tmp_path), run_name="run", num_instructions=6, max_rounds=5, prompts_per_round=2,
                instance_batch_size=4, seed=0)
    base.update(kw)
    return SelfInstructConfig(**base)


def test_prompt_format_and_parsing():
    p = si.encode_instruction_prompt(["Do a.", "Do  b:\n", "Do c."])
    assert p == "Come up with a series of tasks:\n1. Do a.\n2. Do b\n3. Do c.\n4."
    assert si.parse_instructions(" First task.\n5. Second task\n6.Third") == ["First task.", "Second task", "Third"]
    assert si.parse_instructions(" First task.\n5. Second task\n16") == ["First task.", "Second task"]
    assert si.parse_instructions("Sure! Here are tasks:\n1. One two three.\n2) Four five six.", chat=True) == [
        "One two three.", "Four five six."]
    assert si.parse_yes_no(" Yes, it is") is True and si.parse_yes_no("no.") is False
    assert si.parse_yes_no("maybe") is None and si.parse_yes_no("Nope") is None
    assert si.first_verb("Please write a poem.") == "write" and si.first_verb("123") == ""


def test_instance_parsing_and_filters():
    text = "Example 1\nInput: 2 + 2\nOutput: 4\nExample 2\nOutput: 5\nInput: x\n\nTask: next"
    assert si.parse_instances(text, output_first=False) == [{"input": "2 + 2", "output": "4"},
                                                            {"input": "", "output": "5"}]
    assert si.parse_instances("Just an answer.", output_first=False) == [{"input": "", "output": "Just an answer."}]
    clf = "Class label: Spam\nInput: Win money now\nClass label: Not spam\nInput: See you at 5"
    assert si.parse_instances(clf, output_first=True) == [{"input": "Win money now", "output": "Spam"},
                                                          {"input": "See you at 5", "output": "Not spam"}]
    kept, dropped = si.filter_instances([{"input": "a", "output": ""}, {"input": "b", "output": "b"},
                                         {"input": "c", "output": "d"}, {"input": "c", "output": "d"},
                                         {"input": "e", "output": "f"}], max_instances=1)
    assert kept == [{"input": "c", "output": "d"}]
    assert dropped == {"empty_output": 1, "input_equals_output": 1, "duplicate": 1, "over_max_instances": 1}


def test_candidate_filters(tmp_path):
    cfg = _cfg(tmp_path)
    import re

    bl = re.compile(r"\b(" + "|".join(re.escape(w) for w in cfg.blacklist) + r")\b", re.IGNORECASE)
    cases = {"": "empty", "Say hi": "too_short", " ".join(["word"] * 151): "too_long",
             "Plot the sales numbers by month.": "blacklist", "Please go to the store.": "blacklist",
             "Make a flowchart of it.": "blacklist", "(Optional) write a poem.": "punctuation_start",
             "Écrivez un poème.": "non_ascii_start", "Write a mapping of keys to values.": None,
             "Summarize the profile of the author.": None}  # "mapping", "profile" are not whole blacklisted words
    for text, reason in cases.items():
        assert si.candidate_filter(text, cfg, bl) == reason, text


def test_builtin_seed_set():
    seeds = load_seed_tasks("builtin")
    assert len(seeds) >= 60
    assert all(s.instances and s.instances[0]["output"] for s in seeds)
    assert 8 <= sum(s.is_classification for s in seeds) < len(seeds)
    assert len({s.instruction for s in seeds}) == len(seeds)


def test_shared_seed_file_loads(shared_data):
    seeds = load_seed_tasks(shared_data / "self_instruct_seed_tasks.jsonl")
    assert len(seeds) == 175 and any(s.is_classification for s in seeds)


def test_scripted_run_exact_accounting(tmp_path):
    """Hand derivation (2 prompts per round, target 6):
    round 0: calls 0,1 keep GEN0, CLF0, GEN1, CLF1 (4); round 1: call 2 keeps GEN2, CLF2 (6 = target), call 3's
    GEN3, CLF3 are "target_reached". Per round, the 2 calls give 2 blacklist, 2 too_short, 2 punctuation_start,
    2 non_ascii_start, and the seed copy once as rouge (score 1.0) and once as a duplicate within the round.
    Candidates 2 rounds x 2 calls x 7 = 28 = 6 kept + 4 + 4 + 4 + 4 + 2 rouge + 2 duplicate + 2 target_reached.
    Classification: CLF0..2 yes, GEN0..2 no. Instances: input-first parses 3, drops the input == output one;
    output-first parses 3, drops the repeated pair: 6 x 2 = 12 conversations."""
    for texts in (GEN, CLF):  # the scripted instructions really are novel against the seeds and each other
        for i, a in enumerate(texts):
            assert max(rouge_l(a, s.instruction) for s in load_seed_tasks("builtin")) < 0.7
            assert all(rouge_l(a, b) < 0.7 for b in GEN + CLF if b != a)
    backend = ScriptedBackend()
    cfg = _cfg(tmp_path)
    summary = si.main(cfg, backend=backend, log=lambda m: None)
    rep = summary["report"]
    ins = rep["instructions"]
    assert ins["candidates"] == 28 and ins["kept"] == 6
    assert ins["rejected"] == {"empty": 0, "too_short": 4, "too_long": 0, "blacklist": 4, "punctuation_start": 4,
                               "non_ascii_start": 4, "duplicate": 2, "rouge": 2, "target_reached": 2}
    assert ins["candidates"] == ins["kept"] + sum(ins["rejected"].values())
    assert rep["rounds"] == 2 and rep["prompts"] == 4
    assert rep["classification"] == {"tasks": 6, "yes": 3, "unparsed": 0}
    assert rep["instances"]["parsed"] == 18 and rep["instances"]["kept"] == 12
    assert rep["instances"]["dropped"] == {"input_equals_output": 3, "duplicate": 3}
    assert rep["exported"] == 12
    assert rep["verbs"] == {"write": 1, "explain": 1, "suggest": 1, "classify": 1, "decide": 1, "label": 1}

    # prompts: 8 numbered instructions, ending "9."; round 0 shows only seeds, round 1 shows 2 generated ones
    first, third = backend.prompts[0], [p for p in backend.prompts if p.startswith("Come up")][2]
    assert first.startswith("Come up with a series of tasks:\n1. ") and first.endswith("\n9.") and "\n8. " in first
    seed_set = {s.instruction for s in load_seed_tasks("builtin")}
    shown = [line.split(". ", 1)[1] for line in first.splitlines()[1:-1]]
    assert len(shown) == 8 and set(shown) <= seed_set
    shown = [line.split(". ", 1)[1] for line in third.splitlines()[1:-1]]
    assert len(set(shown) & set(GEN[:2] + CLF[:2])) == 2 and len(set(shown) & seed_set) == 6

    # rouge decisions record the score and the most similar pool instruction
    cands = [c for line in (tmp_path / "run" / "instructions.jsonl").open() for c in json.loads(line)["candidates"]]
    rouge_rej = [c for c in cands if c["reason"] == "rouge"]
    assert all(c["rouge"] == 1.0 and c["most_similar"] == "Give three tips for staying healthy." for c in rouge_rej)

    rows = [json.loads(line) for line in Path(summary["data"]).open()]
    assert len(rows) == 12
    from instructkit.data.io import read_conversations

    convs = read_conversations(summary["data"])
    assert len(convs) == 12
    for row in rows:
        meta = row["meta"]
        assert meta["model"] == "scripted-model" and meta["prompt_template_version"] == si.PROMPT_VERSION
        assert meta["seed"] == 0 and [m["role"] for m in row["messages"]] == ["user", "assistant"]
    clf_rows = [r for r in rows if r["meta"]["is_classification"]]
    assert {r["messages"][1]["content"] for r in clf_rows} == {"Yes", "No"}
    assert clf_rows[0]["messages"][0]["content"] == CLF[0] + "\n\nI love it."
    report_md = (tmp_path / "run" / "report.md").read_text()
    assert "| rejected: blacklist | 4 |" in report_md and "| classify | 1 |" in report_md


def test_crash_and_resume_has_no_gaps_or_duplicates(tmp_path):
    ref = si.main(_cfg(tmp_path, run_name="ref"), backend=ScriptedBackend(), log=lambda m: None)
    cfg = _cfg(tmp_path, run_name="crash")
    # die in each phase in turn (calls counted per invocation): run 1 dies in round 1 (call 4); run 2 redoes round 1
    # (2 calls), classification batch 0 (4), dies in batch 1 (call 8); run 3 redoes classification batch 1 (2 calls)
    # and dies in instance batch 0 (call 5)
    for fail_after in (3, 7, 4):
        b = ScriptedBackend(fail_after=fail_after)
        done_rounds = len(si.read_journal(tmp_path / "crash" / "instructions.jsonl"))
        b.instruction_calls = done_rounds * 2  # the scripted model "continues" where the journal says it was
        with pytest.raises(RuntimeError, match="backend died"):
            si.main(cfg, backend=b, log=lambda m: None)
    b = ScriptedBackend()
    b.instruction_calls = 4
    out = si.main(cfg, backend=b, log=lambda m: None)
    for name in ("instructions.jsonl", "classification.jsonl", "instances.jsonl", "data.jsonl"):
        assert (tmp_path / "crash" / name).read_text() == (tmp_path / "ref" / name).read_text(), name
    assert out["report"] == ref["report"]


def test_torn_journal_line_is_dropped_and_drift_is_refused(tmp_path):
    j = tmp_path / "j.jsonl"
    j.write_text('{"round": 0}\n{"round": 1, "cand')
    assert si.read_journal(j) == [{"round": 0}]
    assert j.read_text() == '{"round": 0}\n'
    si.main(_cfg(tmp_path), backend=ScriptedBackend(), log=lambda m: None)
    with pytest.raises(ConfigError, match="rouge_threshold"):
        si.main(_cfg(tmp_path, rouge_threshold=0.5), backend=ScriptedBackend(), log=lambda m: None)


# ---------------------------------------------------------------------------------------------------------------------
# the real thing: the tiny model through the CLI, killed and resumed; through `instructkit serve`; then SFT on the data
def _tiny_si_config(tmp_path: Path, model_dir: Path, run_name: str, **backend) -> Path:
    cfg = {"backend": {"kind": "local", "model": str(model_dir), "max_batch_size": 4, **backend},
           "seed_tasks": "builtin", "output_dir": str(tmp_path / "runs"), "run_name": run_name,
           "num_instructions": 6, "max_rounds": 4, "prompts_per_round": 2, "temperature": 1.0, "top_p": 1.0,
           "instruction_max_tokens": 24, "instance_max_tokens": 12, "instance_batch_size": 2, "seed": 1,
           "threads": 1}
    path = tmp_path / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _si_cli(config: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "instructkit", "self-instruct", "--config", str(config), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _check_accounting(run_dir: Path) -> dict:
    rep = json.loads((run_dir / "report.json").read_text())
    ins = rep["instructions"]
    assert ins["candidates"] == ins["kept"] + sum(ins["rejected"].values())
    cands = [c for line in (run_dir / "instructions.jsonl").open() for c in json.loads(line)["candidates"]]
    assert len(cands) == ins["candidates"] and len({c["id"] for c in cands if c["kept"]}) == ins["kept"]
    assert rep["classification"]["tasks"] == ins["kept"]
    from instructkit.data.io import read_conversations

    convs = read_conversations(run_dir / "data.jsonl")
    assert len(convs) == rep["exported"] == rep["instances"]["kept"] - sum(rep["export_rejected"].values())
    assert all(c.meta["prompt_template_version"] == si.PROMPT_VERSION and c.meta["seed"] == 1 for c in convs)
    return rep


class _one_thread:
    """torch.set_num_threads(1) inside the block (as the CLI runs with threads=1), restored after."""

    def __enter__(self):
        import torch

        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.saved)


def _run_in_process(config: Path, backend=None) -> dict:
    from instructkit.config import load_config

    cfg = load_config(SelfInstructConfig, config)
    if backend is None:
        from instructkit.generation.backends import make_backend

        backend = make_backend(cfg.backend)
    with _one_thread():
        return si.main(cfg, backend=backend, log=lambda m: None)


def _sft_steps(tmp_path: Path, model_dir: Path, data: Path, name: str, capsys) -> dict:
    from instructkit.cli import main as cli_main

    cfg = {"model": {"path": str(model_dir)},
           "data": {"sources": [{"path": str(data)}], "max_length": 256, "validation_fraction": 0.0},
           "train": {"output_dir": str(tmp_path / "sft"), "run_name": name, "max_steps": 2, "micro_batch_size": 2,
                     "pack_length": 256, "lr": 0.001, "threads": 1, "resume": "never"}}
    path = tmp_path / f"{name}_sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    with _one_thread():
        code = cli_main(["sft", "--config", str(path)])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["first_loss"] > 0
    return summary


def test_kill_and_resume_local_backend_then_sft(tiny_model_dir, tmp_path, capsys):
    """SIGKILL a CLI run after its first journal line; resume: the journals and data equal an uninterrupted run."""
    _run_in_process(_tiny_si_config(tmp_path, tiny_model_dir, "ref"))

    cfg = _tiny_si_config(tmp_path, tiny_model_dir, "killed")
    journal = tmp_path / "runs" / "killed" / "instructions.jsonl"
    p = _si_cli(cfg)
    while p.poll() is None and not (journal.exists() and journal.read_text().count("\n") >= 1):
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    lines_at_kill = journal.read_text().count("\n")
    assert lines_at_kill >= 1 and not (tmp_path / "runs" / "killed" / "data.jsonl").exists()
    _run_in_process(cfg)  # resumes from the journal
    for name in ("instructions.jsonl", "classification.jsonl", "instances.jsonl", "data.jsonl"):
        assert ((tmp_path / "runs" / "killed" / name).read_text()
                == (tmp_path / "runs" / "ref" / name).read_text()), name
    rounds = [json.loads(line)["round"] for line in journal.open()]
    assert rounds == list(range(len(rounds)))  # no gaps, no duplicates
    rep = _check_accounting(tmp_path / "runs" / "killed")
    assert rep["exported"] > 0
    _sft_steps(tmp_path, tiny_model_dir, tmp_path / "runs" / "killed" / "data.jsonl", "local", capsys)


def test_end_to_end_through_instructkit_serve_then_sft(tiny_model_dir, tmp_path, capsys, monkeypatch):
    key = "sk-e2e-sentinel-key"
    monkeypatch.setenv("IK_SI_KEY", key)
    server = subprocess.Popen([sys.executable, "-m", "instructkit", "serve", "--model", str(tiny_model_dir), "--port",
                               "0", "--name", "tiny", "--api-key-env", "IK_SI_KEY", "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "IK_SI_KEY": key})
    try:
        url = json.loads(server.stdout.readline())["url"]
        cfg = _tiny_si_config(tmp_path, tiny_model_dir, "served", kind="openai", model="tiny", base_url=url,
                              api_key_env="IK_SI_KEY", concurrency=2)
        capsys.readouterr()
        _run_in_process(cfg)
        captured = capsys.readouterr()
    finally:
        server.terminate()
        _, server_err = server.communicate(timeout=60)
    run_dir = tmp_path / "runs" / "served"
    rep = _check_accounting(run_dir)
    assert rep["model"] == "tiny" and rep["exported"] > 0
    assert "POST /v1/completions" in server_err  # it really went through the server
    for f in run_dir.iterdir():  # the key is nowhere in the outputs
        assert key not in f.read_text(errors="replace"), f
    assert key not in captured.out + captured.err + server_err
    _sft_steps(tmp_path, tiny_model_dir, run_dir / "data.jsonl", "served", capsys)


@pytest.mark.slow
def test_self_instruct_with_smollm2_teacher(tmp_path):
    """The real-model variant: SmolLM2-135M-Instruct as the teacher (chat prompts), a few rounds."""
    from instructkit.config import load_config

    cfg = load_config(SelfInstructConfig, Path(__file__).resolve().parents[1] / "configs" / "self_instruct.yaml",
                      [f"output_dir={tmp_path}", "num_instructions=8", "max_rounds=3", "prompts_per_round=4",
                       "instance_batch_size=4", "instruction_max_tokens=160", "instance_max_tokens=96"])
    summary = si.main(cfg, log=print)
    rep = summary["report"]
    assert rep["instructions"]["candidates"] == rep["instructions"]["kept"] + sum(rep["instructions"]["rejected"].values())
    assert rep["instructions"]["kept"] >= 1 and rep["exported"] >= 1
    assert isinstance(BackendConfig(), BackendConfig)


def test_cli_missing_api_key_variable_is_exit_2(tmp_path, capsys, monkeypatch):
    from instructkit.cli import main

    monkeypatch.delenv("IK_NOT_SET", raising=False)
    code = main(["self-instruct", f"output_dir={tmp_path}", "backend.kind=openai", "backend.model=m",
                 "backend.base_url=http://127.0.0.1:9/v1", "backend.api_key_env=IK_NOT_SET"])
    assert code == 2 and "IK_NOT_SET" in capsys.readouterr().err
