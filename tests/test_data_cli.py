"""`instructkit data ...` through the CLI: inspect on every shared file, convert, validate (exact lines), mix, dedup."""

import json
import subprocess
import sys

import pytest

from instructkit.cli import main
from instructkit.data.io import read_examples

SHARED = {
    "self_instruct_seed_tasks.jsonl": ("self_instruct", 175, 0, "conversation"),
    "lf_alpaca_en_demo.json": ("alpaca", 999, 0, "conversation"),
    "lf_dpo_en_demo.json": ("sharegpt_preference", 300, 0, "preference"),
    "hh_rlhf_harmless_base_test.jsonl.gz": ("hh_rlhf", 2312, 13, "preference"),
    "ifeval_input_data.jsonl": ("prompt_only", 541, 0, "conversation"),
}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", sorted(SHARED))
def test_inspect_json_on_every_shared_file(capsys, shared_data, name):
    fmt, records, rejected, kind = SHARED[name]
    code, out, _ = run(capsys, "data", "inspect", str(shared_data / name), "--json")
    assert code == 0
    report = json.loads(out)  # exactly one JSON object
    assert (report["format"], report["records"], report["rejected"], report["kind"]) == (fmt, records, rejected, kind)
    assert report["kept"] + report["rejected"] == report["records"]
    assert report["sample"]["example"]["meta"]["source"] == str(shared_data / name)


def test_inspect_alpaca_numbers(capsys, shared_data):
    code, out, _ = run(capsys, "data", "inspect", str(shared_data / "lf_alpaca_en_demo.json"), "--json")
    r = json.loads(out)
    # every alpaca record is one user turn and one assistant turn
    assert r["roles"] == {"system": 0, "user": 999, "assistant": 999, "tool": 0}
    assert r["turns"] == {"min": 2, "mean": 2.0, "median": 2, "p95": 2, "max": 2}
    examples = read_examples(shared_data / "lf_alpaca_en_demo.json")
    chars = sorted(len(e.messages[-1].content) for e in examples)
    assert (r["response_chars"]["min"], r["response_chars"]["max"]) == (chars[0], chars[-1])
    assert r["response_chars"]["median"] == chars[499]


def test_inspect_text_with_tokenizer_and_rendered_mask(capsys, shared_data, tiny_model_dir, tiny_tokenizer):
    code, out, _ = run(
        capsys, "data", "inspect", str(shared_data / "self_instruct_seed_tasks.jsonl"), "--tokenizer", str(tiny_model_dir)
    )
    assert code == 0
    assert "format:    self_instruct (detected)" in out
    assert "records:   175  (kept 175, rejected 0)  ->  175 examples" in out
    assert "tokens:" in out and "supervised:" in out
    # The first seed task rendered with ChatML; the supervised span is the answer plus <|im_end|>.
    first = read_examples(shared_data / "self_instruct_seed_tasks.jsonl")[0]
    answer = first.messages[-1].content
    assert f"<|im_start|>assistant\n[[{answer}<|im_end|>]]" in out


def test_inspect_json_with_tokenizer_counts_tokens(capsys, shared_data, tiny_model_dir):
    code, out, _ = run(
        capsys, "data", "inspect", str(shared_data / "lf_dpo_en_demo.json"), "--tokenizer", str(tiny_model_dir), "--json"
    )
    r = json.loads(out)
    assert r["tokens"]["min"] > 0 and r["supervised_tokens"]["min"] > 0
    s = r["sample"]
    assert s["template"] and s["supervised_tokens"] > 0 and "[[" in s["rendered"]


def test_convert_to_internal_jsonl_round_trips(capsys, shared_data, tmp_path):
    out_file = tmp_path / "pairs.jsonl"
    code, _, err = run(capsys, "data", "convert", str(shared_data / "lf_dpo_en_demo.json"), str(out_file))
    assert code == 0 and "wrote 300 examples (sharegpt_preference)" in err
    back = read_examples(out_file)
    orig = read_examples(shared_data / "lf_dpo_en_demo.json")
    assert [(b.prompt, b.chosen, b.rejected) for b in back] == [(o.prompt, o.chosen, o.rejected) for o in orig]
    assert back[0].meta["format"] == "preference"


def test_convert_hh_needs_skip_invalid(capsys, shared_data, tmp_path):
    src = shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"
    code, _, err = run(capsys, "data", "convert", str(src), str(tmp_path / "hh.jsonl"))
    assert code == 2
    assert err.strip() == f"error: {src}:87: chosen turn 3: empty assistant turn"
    assert not (tmp_path / "hh.jsonl").exists()  # nothing half-written
    rejects = tmp_path / "rejects.jsonl"
    code, _, err = run(
        capsys, "data", "convert", str(src), str(tmp_path / "hh.jsonl"), "--skip-invalid", "--rejects", str(rejects),
        "--max-invalid-fraction", "0.01",
    )
    assert code == 0 and "records 2312: kept 2299, rejected 13" in err
    assert len(read_examples(tmp_path / "hh.jsonl")) == 2299
    assert len(rejects.read_text().splitlines()) == 13


BAD = [
    '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}',
    '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}',
    "",
    '{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}',
    '{"conversations": [{"from": "gpt", "value": "x"}]}',
    '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]',
    '{"conversations": "nope"}',
    '{"chats": []}',
]


@pytest.fixture
def bad_file(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(BAD) + "\n")
    return f


def test_validate_strict_reports_the_first_bad_line(capsys, bad_file):
    code, _, err = run(capsys, "data", "validate", str(bad_file))
    assert code == 1
    assert err.strip() == f"invalid: {bad_file}:2: conversation turn 1: empty assistant turn"


def test_validate_skip_lists_every_reason_with_lines(capsys, bad_file, tmp_path):
    rejects = tmp_path / "rej.jsonl"
    code, out, err = run(
        capsys, "data", "validate", str(bad_file), "--skip-invalid", "--rejects", str(rejects), "--max-invalid-fraction", "1"
    )
    assert code == 0  # within the allowed fraction
    assert "format sharegpt: records 7, kept 1, rejected 6, examples 1" in out
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rows] == [
        (2, "conversation turn 1: empty assistant turn"),
        (4, "conversations[1]: unknown role 'robot' (expected one of human, user, gpt, assistant, bot, chatgpt, "
            "system, tool, function_call, observation, function)"),
        (5, "conversation turn 0: roles out of order: 'assistant' after 'start'"),
        (6, "malformed JSON: Expecting ',' delimiter at column 85"),
        (7, "'conversations' must be a list of {from, value} objects, got str"),
        (8, "missing field 'conversations'"),
    ]
    code, out, err = run(capsys, "data", "validate", str(bad_file), "--skip-invalid", "--max-invalid-fraction", "0.5")
    assert code == 1
    assert f"invalid: {bad_file}: 6 of 7 records rejected (85.7%), above max_invalid_fraction=0.5" in err


def test_validate_good_file_and_bad_usage(capsys, shared_data, tmp_path):
    code, out, _ = run(capsys, "data", "validate", str(shared_data / "lf_alpaca_en_demo.json"))
    assert code == 0 and out.strip().endswith("valid")
    code, _, err = run(capsys, "data", "validate", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "data file not found" in err
    code, _, err = run(capsys, "data", "validate", str(shared_data / "lf_alpaca_en_demo.json"), "--format", "bogus")
    assert code == 2 and "unknown format 'bogus'" in err


def test_inspect_json_array_error_names_the_record(capsys, tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 3}]))
    code, _, err = run(capsys, "data", "inspect", str(f), "--strict")
    assert code == 2
    assert err.strip() == f"error: {f} record 1: field 'output' must be a string, got int"


def test_mix_from_yaml(capsys, shared_data, tmp_path):
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(
        f"""
strategy: proportional
cap: 500
temperature: 1.0
total: 100
seed: 3
sources:
  - {{path: {shared_data / 'lf_alpaca_en_demo.json'}, format: alpaca}}
  - {{path: {shared_data / 'self_instruct_seed_tasks.jsonl'}, format: auto, max_examples: 100}}
"""
    )
    out1 = tmp_path / "m1.jsonl"
    code, out, _ = run(capsys, "data", "mix", str(cfg), "--out", str(out1))
    assert code == 0
    # rates: min(999, 500) = 500 and min(100, 500) = 100 -> 5/6 and 1/6; 100 * 5/6 = 83.33 -> 83, 16.67 -> 17
    assert "lf_alpaca_en_demo: 83 of 999 (rate 0.8333)" in out
    assert "self_instruct_seed_tasks: 17 of 100 (rate 0.1667)" in out
    mixed = read_examples(out1)
    assert len(mixed) == 100
    assert sum(e.meta["format"] == "messages" for e in mixed) == 100
    out2 = tmp_path / "m2.jsonl"
    run(capsys, "data", "mix", str(cfg), "--out", str(out2))
    assert out1.read_bytes() == out2.read_bytes()  # deterministic
    out3 = tmp_path / "m3.jsonl"
    run(capsys, "data", "mix", str(cfg), "seed=4", "--out", str(out3))
    assert out1.read_bytes() != out3.read_bytes()


def test_dedup_cli_on_alpaca(capsys, shared_data, tmp_path):
    report = tmp_path / "removed.jsonl"
    code, out, _ = run(
        capsys, "data", "dedup", str(shared_data / "lf_alpaca_en_demo.json"), str(tmp_path / "d.jsonl"),
        "--report", str(report),
    )
    assert code == 0
    # The demo file repeats 14 records verbatim (e.g. record 275 == record 117).
    assert out.strip() == "kept 985 of 999; removed 14 exact and 0 near duplicates"
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert rows[0] == {"index": 275, "kind": "exact", "duplicate_of": 117, "similarity": 1.0,
                       "meta": {"source": str(shared_data / "lf_alpaca_en_demo.json"), "record": 275, "format": "alpaca"}}
    assert len(read_examples(tmp_path / "d.jsonl")) == 985


def test_filter_cli_self_instruct_blacklist(capsys, shared_data, tmp_path):
    code, out, _ = run(
        capsys, "data", "filter", str(shared_data / "self_instruct_seed_tasks.jsonl"), str(tmp_path / "f.jsonl"),
        "--blacklist", "self-instruct", "--blacklist-in", "prompt",
    )
    assert code == 0
    assert "kept 171 of 175" in out and "blacklist: removed 4 (flagged 4)" in out


def test_module_entry_point_runs(shared_data):
    proc = subprocess.run(
        [sys.executable, "-m", "instructkit", "data", "inspect", str(shared_data / "ifeval_input_data.jsonl"), "--json"],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["records"] == 541
