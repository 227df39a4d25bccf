"""Files: containers, streaming, locations, strict and skip modes, the real data files with exact counts."""

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instructkit.data import io as dio
from instructkit.data.io import ReadStats, iter_examples, load_examples, read_examples, write_jsonl
from instructkit.data.schema import Conversation, DataError, PreferencePair

ALPACA = [
    {"instruction": "a", "input": "", "output": "1"},
    {"instruction": "b", "input": "x", "output": "2"},
    {"instruction": "c", "input": "", "output": "3"},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def contents(examples):
    return [[m.content for m in ex.messages] for ex in examples]


# ---- containers ---------------------------------------------------------------------------------------------------


def test_jsonl_physical_line_numbers_and_meta(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [json.dumps(ALPACA[0]), "", "   ", json.dumps(ALPACA[1])])
    ex = read_examples(f)
    assert [e.meta for e in ex] == [
        {"source": str(f), "line": 1, "format": "alpaca"},
        {"source": str(f), "line": 4, "format": "alpaca"},
    ]


@pytest.mark.parametrize("chunk", [3, 7, 64, 1 << 20])
def test_json_array_streams_identically_at_any_chunk_size(tmp_path, monkeypatch, chunk):
    # Values that straddle chunk boundaries: numbers, escapes, multi-byte UTF-8, nesting.
    records = [
        {"prompt": "é€𝄞 \"quoted\" \\ back", "completion": "ok", "n": 1234567890123, "f": -1.5e-7, "nest": {"a": [1, [2, {"b": None}]]}}
        for _ in range(5)
    ] + [{"prompt": "p" * 300, "completion": "c" * 300, "n": 7}]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    monkeypatch.setattr(dio, "CHUNK", chunk)
    raws = list(dio.iter_records(f))
    assert [r.value for r in raws] == records
    assert [r.record for r in raws] == list(range(6))


def test_json_array_is_lazy_and_a_bad_element_names_its_index(tmp_path, monkeypatch):
    monkeypatch.setattr(dio, "CHUNK", 16)
    f = tmp_path / "d.json"
    f.write_text("[" + json.dumps(ALPACA[0]) + ",\n" + json.dumps(ALPACA[1]) + ",\n{\"instruction\": oops}]")
    gen = iter_examples(f)
    assert contents([next(gen), next(gen)]) == [["a", "1"], ["b\n\nx", "2"]]  # streamed before the bad element
    with pytest.raises(DataError) as e:
        next(gen)
    assert str(e.value) == f"{f} record 2: malformed JSON in array element 2: Expecting value (line 3, column 17)"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2", "record 1: unexpected end of file after array element 1"),
        ("[1, 2,]", "record 1: trailing comma after array element 1"),
        ("[1 2]", "record 0: expected ',' or ']' after array element 0"),
        ("[1] x", ": extra data after the JSON array"),
    ],
)
def test_json_array_structure_errors(tmp_path, text, message):
    f = tmp_path / "d.json"
    f.write_text(text)
    with pytest.raises(DataError) as e:
        list(dio.iter_records(f))
    assert str(e.value) == f"{f}{message}" if message.startswith(":") else str(e.value) == f"{f} {message}"


def test_json_object_container_single_record_and_jsonl_named_json(tmp_path):
    f = tmp_path / "wrapped.json"
    f.write_text(json.dumps({"train": ALPACA}))
    assert contents(read_examples(f)) == [["a", "1"], ["b\n\nx", "2"], ["c", "3"]]
    f = tmp_path / "single.json"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    assert contents(read_examples(f)) == [["q", "a"]]
    f = write_lines(tmp_path / "lines.json", [json.dumps(r) for r in ALPACA])
    ex = read_examples(f)
    assert contents(ex) == [["a", "1"], ["b\n\nx", "2"], ["c", "3"]] and ex[2].meta["line"] == 3


def test_gzip_jsonl_and_json(tmp_path):
    f = tmp_path / "d.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as g:
        g.write("\n".join(json.dumps(r) for r in ALPACA))
    assert len(read_examples(f)) == 3
    f = tmp_path / "d.json.gz"
    with gzip.open(f, "wt", encoding="utf-8") as g:
        g.write(json.dumps(ALPACA))
    assert [e.meta["record"] for e in read_examples(f)] == [0, 1, 2]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    ex = read_examples(f)
    assert contents(ex) == [[f"q{i}", f"a{i}"] for i in range(5)]
    assert ex[4].meta == {"source": str(f), "record": 4, "format": "messages"}


def test_hf_datasets_folders(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ALPACA)
    ds.save_to_disk(str(tmp_path / "single"))
    assert contents(read_examples(tmp_path / "single")) == [["a", "1"], ["b\n\nx", "2"], ["c", "3"]]
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(ALPACA[:1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(read_examples(tmp_path / "dict")) == 3  # train by default
    test = read_examples(tmp_path / "dict", split="test")
    assert len(test) == 1 and test[0].meta["source"] == f"{tmp_path / 'dict'}[test]"
    with pytest.raises(DataError, match="no split 'dev'"):
        read_examples(tmp_path / "dict", split="dev")
    # A plain folder of data files: every file, sorted, each named in meta.
    folder = tmp_path / "files"
    folder.mkdir()
    write_lines(folder / "b.jsonl", [json.dumps(ALPACA[1])])
    (folder / "a.json").write_text(json.dumps([ALPACA[0]]))
    (folder / "notes.txt").write_text("ignored")
    ex = read_examples(folder)
    assert contents(ex) == [["a", "1"], ["b\n\nx", "2"]]
    assert [Path(e.meta["source"]).name for e in ex] == ["a.json", "b.jsonl"]


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        read_examples(tmp_path / "empty")


# ---- strict and skip modes ----------------------------------------------------------------------------------------

BAD_LINES = [
    json.dumps(ALPACA[0]),                                            # 1 ok
    '{"instruction": "x", "output": ',                                # 2 malformed JSON
    json.dumps({"instruction": "x"}),                                 # 3 missing field
    "",                                                               # 4 blank: not a record
    json.dumps({"instruction": 5, "output": "y"}),                    # 5 wrong type
    json.dumps({"instruction": "x", "output": " "}),                  # 6 empty assistant turn
    json.dumps(ALPACA[1]),                                            # 7 ok
    json.dumps({"instruction": "x", "output": "y", "history": [["u", ""]]}),  # 8 empty assistant (history)
]


def test_strict_mode_names_the_physical_line(tmp_path):
    f = write_lines(tmp_path / "bad.jsonl", BAD_LINES)
    gen = iter_examples(f)
    assert contents([next(gen)]) == [["a", "1"]]
    with pytest.raises(DataError) as e:
        next(gen)
    assert str(e.value) == f"{f}:2: malformed JSON: Expecting value at column 32"
    assert (e.value.source, e.value.line) == (str(f), 2)


def test_skip_mode_counts_and_writes_rejects(tmp_path):
    f = write_lines(tmp_path / "bad.jsonl", BAD_LINES)
    rejects = tmp_path / "out" / "rejects.jsonl"
    ex, stats = load_examples(f, skip_invalid=True, rejects_path=rejects, max_invalid_fraction=0.75)
    assert contents(ex) == [["a", "1"], ["b\n\nx", "2"]]
    assert (stats.total, stats.kept, stats.rejected, stats.examples) == (7, 2, 5, 2)
    assert stats.kept + stats.rejected == stats.total
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rows] == [
        (2, "malformed JSON: Expecting value at column 32"),
        (3, "missing field 'output'"),
        (5, "field 'instruction' must be a string, got int"),
        (6, "conversation turn 1: empty assistant turn"),
        (8, "conversation turn 1: empty assistant turn"),
    ]
    assert rows[0]["raw"] == '{"instruction": "x", "output": '
    assert rows[1]["raw"] == {"instruction": "x"} and rows[1]["source"] == str(f)
    assert stats.by_reason["conversation turn N: empty assistant turn"] == 2


def test_skip_mode_fails_above_the_threshold(tmp_path):
    f = write_lines(tmp_path / "bad.jsonl", BAD_LINES)
    with pytest.raises(DataError) as e:
        read_examples(f, skip_invalid=True, max_invalid_fraction=0.5, rejects_path=tmp_path / "r.jsonl")
    # 5 of 7 = 71.4% > 50%
    assert str(e.value).startswith(f"{f}: 5 of 7 records rejected (71.4%), above max_invalid_fraction=0.5: ")
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 5  # rejects are written even when the read fails


def test_skip_mode_threshold_also_holds_for_a_slice(tmp_path):
    """max_examples stops the read early; the invalid fraction of the records read so far is still checked (it was
    not: a slice of a file never failed the threshold)."""
    good = json.dumps({"instruction": "q", "output": "a"})
    bad = json.dumps({"instruction": "q", "output": ""})
    f = write_lines(tmp_path / "d.jsonl", [good, bad, bad, good, good, good])
    with pytest.raises(DataError, match=r"2 of 4 records rejected \(50.0%\), above max_invalid_fraction=0.25"):
        list(iter_examples(f, "alpaca", skip_invalid=True, max_invalid_fraction=0.25, max_examples=2))
    stats = ReadStats()
    ex = list(iter_examples(f, "alpaca", skip_invalid=True, max_invalid_fraction=0.5, max_examples=2, stats=stats))
    assert len(ex) == 2 and (stats.total, stats.rejected) == (4, 2)


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(st.one_of(st.sampled_from(BAD_LINES), st.text(max_size=40).filter(lambda s: "\n" not in s and "\r" not in s)), max_size=20))
def test_property_kept_plus_rejected_is_total(tmp_path_factory, lines):
    f = tmp_path_factory.mktemp("p") / "d.jsonl"
    f.write_bytes(("\n".join(lines)).encode("utf-8", errors="surrogatepass"))
    stats = ReadStats()
    try:
        list(iter_examples(f, "alpaca", skip_invalid=True, max_invalid_fraction=1.0, stats=stats))
    except DataError:
        pytest.fail("skip mode with max_invalid_fraction=1 must not raise")
    assert stats.kept + stats.rejected == stats.total
    assert stats.total == sum(1 for line in lines if line.strip())


def test_expect_kind_and_max_examples(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in ALPACA])
    with pytest.raises(DataError, match="format 'alpaca' holds conversation data, but preference data is expected"):
        read_examples(f, expect="preference")
    assert contents(read_examples(f, max_examples=2)) == [["a", "1"], ["b\n\nx", "2"]]


def test_write_jsonl_round_trip(tmp_path):
    src = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in ALPACA])
    ex = read_examples(src)
    out = tmp_path / "internal.jsonl"
    assert write_jsonl(out, ex) == 3
    back = read_examples(out)
    assert [e.messages for e in back] == [e.messages for e in ex]
    assert back[0].meta["format"] == "messages" and back[0].meta["line"] == 1
    assert not list(tmp_path.glob(".internal.jsonl.*"))  # no temporary left behind


def test_oasst_file(tmp_path):
    rows = [
        {"message_id": "P", "parent_id": None, "role": "prompter", "text": "q", "rank": None, "message_tree_id": "T"},
        {"message_id": "A", "parent_id": "P", "role": "assistant", "text": "best", "rank": 0, "message_tree_id": "T"},
        {"message_id": "B", "parent_id": "P", "role": "assistant", "text": "worse", "rank": 1, "message_tree_id": "T"},
        {"message_id": "O", "parent_id": "gone", "role": "assistant", "text": "orphan", "message_tree_id": "T"},
        {"message_id": "E", "parent_id": "P", "role": "assistant", "text": "", "message_tree_id": "T"},
    ]
    f = write_lines(tmp_path / "oasst.jsonl", [json.dumps(r) for r in rows])
    ex, stats = load_examples(f, skip_invalid=True, max_invalid_fraction=1.0)
    assert contents(ex) == [["q", "best"]]
    assert ex[0].meta == {"message_tree_id": "T", "source": str(f), "line": 2, "format": "oasst"}
    assert (stats.total, stats.kept, stats.rejected) == (5, 3, 2)
    assert set(stats.by_reason) == {"parent 'gone' not found", "empty assistant turn"}
    assert sorted(contents(read_examples(f, skip_invalid=True, max_invalid_fraction=1.0, all_paths=True))) == [
        ["q", "best"],
        ["q", "worse"],
    ]
    # Strict: record-level errors come first (the empty answer on line 5), tree-level ones after all are read.
    with pytest.raises(DataError, match=rf"^{f}:5: empty assistant turn$"):
        read_examples(f)
    f = write_lines(tmp_path / "oasst2.jsonl", [json.dumps(r) for r in rows[:4]])
    with pytest.raises(DataError, match=rf"^{f}:4: parent 'gone' not found$"):
        read_examples(f)


# ---- the real files -----------------------------------------------------------------------------------------------


def test_real_self_instruct_seed_tasks(shared_data):
    ex, stats = load_examples(shared_data / "self_instruct_seed_tasks.jsonl")
    # 175 seed tasks, each with exactly one instance in this file -> 175 conversations.
    assert (stats.format, stats.total, stats.kept, stats.rejected) == ("self_instruct", 175, 175, 0)
    assert len(ex) == 175
    assert sum(e.meta["is_classification"] for e in ex) == 26
    assert ex[0].meta["id"] == "seed_task_0" and ex[174].meta["line"] == 175


def test_real_alpaca(shared_data):
    ex, stats = load_examples(shared_data / "lf_alpaca_en_demo.json")
    assert (stats.format, stats.total, stats.kept, len(ex)) == ("alpaca", 999, 999, 999)
    assert all(isinstance(e, Conversation) and [m.role for m in e.messages] == ["user", "assistant"] for e in ex)


def test_real_llama_factory_dpo(shared_data):
    ex, stats = load_examples(shared_data / "lf_dpo_en_demo.json")
    assert (stats.format, stats.total, stats.kept, len(ex)) == ("sharegpt_preference", 300, 300, 300)
    assert all(isinstance(e, PreferencePair) for e in ex)
    assert sum(e.prompt[0].role == "system" for e in ex) == 80


def test_real_hh_rlhf_exact_counts(shared_data, tmp_path):
    f = shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"
    rejects = tmp_path / "rejects.jsonl"
    ex, stats = load_examples(f, skip_invalid=True, rejects_path=rejects, max_invalid_fraction=0.01)
    # 2,312 records; none has identical chosen and rejected. 13 are malformed transcripts: 4 whose chosen side ends
    # with an empty "Assistant:" turn, and 9 where a "Human:" marker lacks its blank line (so two assistant turns
    # follow each other) - 8 in the chosen side, 1 only in the rejected side.
    assert (stats.format, stats.total, stats.kept, stats.rejected, len(ex)) == ("hh_rlhf", 2312, 2299, 13, 2299)
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [r["line"] for r in rows] == [87, 517, 668, 764, 926, 1104, 1255, 1320, 1689, 1850, 1951, 1953, 2037]
    assert dict(stats.by_reason) == {
        "chosen turn N: empty assistant turn": 4,
        "chosen turn N: roles out of order: 'assistant' after 'assistant'": 8,
        "rejected turn N: roles out of order: 'assistant' after 'assistant'": 1,
    }
    with pytest.raises(DataError) as e:
        read_examples(f)
    assert str(e.value) == f"{f}:87: chosen turn 3: empty assistant turn"


def test_real_ifeval_prompts(shared_data):
    ex, stats = load_examples(shared_data / "ifeval_input_data.jsonl")
    assert (stats.format, stats.total, len(ex)) == ("prompt_only", 541, 541)
    assert ex[0].meta["key"] == 1000 and ex[0].messages[0].role == "user"


# ---- property test at the file level: arbitrary bytes or JSON in any container -> only DataError ----------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(["instruction", "output", "messages", "prompt", "chosen", "rejected", "data", "x"]), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(
    payload=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.lists(json_values.map(json.dumps), max_size=5).map(lambda ls: "\n".join(ls).encode()),
    ),
    suffix=st.sampled_from([".json", ".jsonl", ".json.gz", ".jsonl.gz", ".txt"]),
    compress=st.booleans(),
    skip=st.booleans(),
)
def test_property_any_file_raises_only_data_error(tmp_path_factory, payload, suffix, compress, skip):
    f = tmp_path_factory.mktemp("any") / f"d{suffix}"
    f.write_bytes(gzip.compress(payload) if compress else payload)
    stats = ReadStats()
    try:
        list(iter_examples(f, skip_invalid=skip, max_invalid_fraction=1.0, stats=stats))
    except DataError:
        return
    assert stats.kept + stats.rejected == stats.total


def test_corrupt_gzip_is_a_data_error(tmp_path):
    f = tmp_path / "d.jsonl.gz"
    f.write_bytes(gzip.compress(b'{"prompt": "p", "completion": "c"}\n' * 100)[:60])
    with pytest.raises(DataError, match="cannot decompress"):
        read_examples(f)


def test_sources_sharing_a_rejects_file_append(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps({"instruction": "x"}), json.dumps(ALPACA[0])])
    b = write_lines(tmp_path / "b.jsonl", [json.dumps(ALPACA[1]), json.dumps({"output": "y"})])
    rejects = tmp_path / "rejects.jsonl"
    rejects.write_text('{"stale": "from an earlier run"}\n')
    for f in (a, b):
        read_examples(f, skip_invalid=True, rejects_path=rejects, max_invalid_fraction=1.0)
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(Path(r["source"]).name, r["line"], r["reason"]) for r in rows] == [
        ("a.jsonl", 1, "missing field 'output'"),
        ("b.jsonl", 2, "missing field 'instruction'"),
    ]


def test_json_array_error_column_on_one_long_line(tmp_path, monkeypatch):
    # Minified: everything on line 1, so the column must count from the start of the file, not of the buffer.
    monkeypatch.setattr(dio, "CHUNK", 16)
    good = json.dumps(ALPACA[0])  # 48 characters: the buffer (16) is trimmed several times before the error
    text = "[" + ",".join([good] * 3) + ',{"instruction": @}]'
    f = tmp_path / "min.json"
    f.write_text(text)
    with pytest.raises(DataError) as e:
        list(dio.iter_records(f))
    col = text.index("@") + 1  # 1-based column of the bad character
    assert str(e.value) == f"{f} record 3: malformed JSON in array element 3: Expecting value (line 1, column {col})"
