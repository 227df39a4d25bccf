"""Reading and writing data files: JSON / JSONL (optionally .gz), Parquet, local Hugging Face datasets folders.

``iter_examples`` is a generator: JSONL is read line by line and JSON arrays element by element (an incremental
decoder over 1 MiB chunks), so a file larger than memory streams. Only a JSON *object* wrapping a list (``{"data":
[...]}``), and oasst files (a tree needs all of its messages), are loaded whole.

Locations: JSONL records are named by their 1-based physical line number (``file:7``); JSON arrays, Parquet and
datasets rows by their 0-based record index (``file record 3``). Every example's meta carries ``source``, ``line`` or
``record``, and ``format``.

Plain text: a ``.txt`` file (optionally .gz) gives one ``{"text": line}`` record per non-blank line (located by its
line number), read as the ``text`` format: what the ``text`` loader of Hugging Face datasets does. Blank lines are
separators, not records.

Kinds: ``expect`` ("conversation", "preference", "unpaired", "text") refuses a file of another kind before reading
it, saying what the file holds and what to do with it (KTO data -> ``instructkit kto``; plain text is not chat data).

Strict mode (default) raises the first ``DataError``. Skip mode (``skip_invalid=True``) writes each rejected record
(location, reason, raw value) as one JSONL line to ``rejects_path``, counts it in ``ReadStats``, and raises at the end
if ``rejected / total > max_invalid_fraction``. ``kept + rejected == total`` always (records, not examples: a
Self-Instruct seed task is one record and several conversations).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from instructkit.data import formats as F
from instructkit.data.schema import Conversation, DataError, Example, PreferencePair, TextExample, UnpairedExample

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".jsonl.gz", ".ndjson.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")
CHUNK = 1 << 20
MAX_ELEMENT_CHARS = 1 << 28  # a JSON array element larger than this is reported instead of buffered further


@dataclass
class ReadStats:
    """What a read saw. ``total`` records = ``kept`` + ``rejected``; ``examples`` is what the kept records became
    (``skipped`` of them were passed over by a source's ``skip`` and not yielded)."""

    total: int = 0
    kept: int = 0
    rejected: int = 0
    examples: int = 0
    skipped: int = 0
    by_reason: Counter = field(default_factory=Counter)
    format: str | None = None
    sources: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "total": self.total,
            "kept": self.kept,
            "rejected": self.rejected,
            "examples": self.examples,
            **({"skipped": self.skipped} if self.skipped else {}),
            "by_reason": dict(self.by_reason.most_common()),
        }


def reason_key(reason: str) -> str:
    """Group reasons that differ only in numbers ("turn 3", "instances[2]") under one key."""
    key = re.sub(r"\d+", "N", reason)
    return key[:160]


@dataclass
class RawRecord:
    """One decoded record and where it came from; ``error`` is set instead of ``value`` for undecodable text."""

    source: str
    line: int | None
    record: int | None
    value: Any = None
    raw_text: str | None = None
    error: DataError | None = None

    def location(self) -> dict[str, Any]:
        loc: dict[str, Any] = {"source": self.source}
        if self.line is not None:
            loc["line"] = self.line
        else:
            loc["record"] = self.record
        return loc

    def locate(self, err: DataError) -> DataError:
        return err.at(self.source, line=self.line, record=self.record if self.line is None else None)


# ---------------------------------------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------------------------------------


def _open_binary(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _is_hf_dataset_dir(path: Path) -> bool:
    return any((path / n).exists() for n in ("dataset_dict.json", "state.json", "dataset_info.json"))


def data_files(path: Path) -> list[Path]:
    """The data files inside a folder (recursively, sorted), for folders that are not saved HF datasets. A folder of
    only .txt files is a plain-text corpus; beside JSON / Parquet data, .txt files are notes and are not read."""
    def files(suffixes):
        return sorted(p for p in path.rglob("*")
                      if p.is_file() and p.name.lower().endswith(suffixes) and not p.name.startswith("."))

    return files(DATA_SUFFIXES) or files(TEXT_SUFFIXES)


def iter_records(path: str | Path, *, split: str | None = None) -> Iterator[RawRecord]:
    """Every record of a file or folder, decoded, with its location. Malformed JSONL lines come as records with
    ``error`` set (so skip mode can count them); a malformed JSON array stops with a DataError (nothing after it
    can be found)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    if p.is_dir():
        if _is_hf_dataset_dir(p):
            yield from _iter_hf_dataset(p, split)
            return
        files = data_files(p)
        if not files:
            raise DataError(f"no data files ({', '.join(DATA_SUFFIXES + TEXT_SUFFIXES)}) and no saved dataset in folder",
                            source=str(p))
        for f in files:
            yield from iter_records(f)
        return
    name = _strip_gz(p.name.lower())
    try:
        if name.endswith(".parquet"):
            yield from _iter_parquet(p)
        elif name.endswith((".jsonl", ".ndjson")):
            yield from _iter_jsonl(p)
        elif name.endswith(".txt"):
            yield from _iter_text(p)
        else:
            yield from _iter_json_or_jsonl(p)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a corrupt or truncated .gz
        raise DataError(f"cannot decompress: {e or type(e).__name__}", source=str(p)) from None


def _iter_jsonl(p: Path) -> Iterator[RawRecord]:
    src = str(p)
    with _open_binary(p) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                err = DataError(f"line is not valid UTF-8 ({e.reason})")
                yield RawRecord(src, lineno, None, raw_text=repr(raw[:200]), error=err)
                continue
            text = text.rstrip("\r\n")
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                err = DataError(f"malformed JSON: {e.msg} at column {e.colno}")
                yield RawRecord(src, lineno, None, raw_text=text, error=err)
                continue
            except RecursionError:
                err = DataError("malformed JSON: nested too deeply")
                yield RawRecord(src, lineno, None, raw_text=text[:1000], error=err)
                continue
            yield RawRecord(src, lineno, None, value=value)


def _iter_text(p: Path) -> Iterator[RawRecord]:
    """A .txt file: one ``{"text": line}`` record per non-blank line (line endings removed)."""
    src = str(p)
    with _open_binary(p) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRecord(src, lineno, None, raw_text=repr(raw[:200]),
                                error=DataError(f"line is not valid UTF-8 ({e.reason})"))
                continue
            text = text.rstrip("\r\n")
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if text.strip():
                yield RawRecord(src, lineno, None, value={"text": text})


def _is_text_file(path: Path) -> bool:
    """A .txt file, or a folder whose data files are .txt files."""
    if path.is_dir():
        if _is_hf_dataset_dir(path):
            return False
        found = data_files(path)
        return bool(found) and all(_strip_gz(f.name.lower()).endswith(".txt") for f in found)
    return _strip_gz(path.name.lower()).endswith(".txt")


def _read_text_start(p: Path, n: int = 4096) -> str:
    with _open_binary(p) as f:
        head = f.read(n)
    return head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")


def _iter_json_or_jsonl(p: Path) -> Iterator[RawRecord]:
    """.json (or unknown suffix): a JSON array streams; a JSON object is a container of one list, or one record; a
    file of several objects one per line is JSONL whatever its suffix."""
    head = _read_text_start(p)
    if head.startswith("["):
        yield from _iter_json_array(p)
        return
    src = str(p)
    with _open_binary(p) as f:
        data = f.read()
    try:
        text = data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(f"file is not valid UTF-8 ({e.reason} at byte {e.start})", source=src) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: a JSONL file with a .json name
            yield from _iter_jsonl(p)
            return
        raise DataError(f"malformed JSON: {e.msg} at column {e.colno}", source=src, line=e.lineno) from None
    except RecursionError:
        raise DataError("malformed JSON: nested too deeply", source=src) from None
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if len(value) == 1 and lists and lists[0] not in ("messages", "conversations", "data", "instances"):
            for i, v in enumerate(value[lists[0]]):
                yield RawRecord(src, None, i, value=v)
            return
        yield RawRecord(src, None, 0, value=value)
        return
    if isinstance(value, list):  # not reached for arrays (streamed), kept for safety
        for i, v in enumerate(value):
            yield RawRecord(src, None, i, value=v)
        return
    raise DataError(f"expected a JSON array or object, got {type(value).__name__}", source=src)


def _iter_json_array(p: Path) -> Iterator[RawRecord]:
    """Stream the elements of a top-level JSON array with ``JSONDecoder.raw_decode`` over a growing buffer.

    Written by hand because the standard library has no incremental JSON parser and ijson would be a dependency for
    one loop. An element cut by a chunk boundary fails to decode; we read more and retry, so only a truly malformed
    element (at end of file) is an error.
    """
    src = str(p)
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    with _open_binary(p) as fb:
        import codecs

        reader = codecs.getincrementaldecoder("utf-8")()
        buf = ""
        pos = 0
        eof = False
        index = 0
        line, col0 = 1, 0  # line number and column offset of buf[0] in the file

        def more(size: int = CHUNK) -> bool:
            nonlocal buf, eof
            if eof:
                return False
            chunk = fb.read(size)
            try:
                text = reader.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"file is not valid UTF-8 ({e.reason})", source=src, record=index) from None
            if not chunk:
                eof = True
            buf += text
            return bool(chunk) or bool(text)

        def skip_ws() -> None:
            nonlocal pos
            while True:
                pos = ws.match(buf, pos).end()
                if pos < len(buf) or not more():
                    return

        more()
        buf = buf.lstrip("\ufeff")
        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise DataError("expected a JSON array", source=src)
        pos += 1
        skip_ws()
        if pos < len(buf) and buf[pos] == "]":
            pos += 1
        else:
            while True:
                # An element cut by the buffer's end: read geometrically more, so a huge element costs O(n) in all.
                grow = CHUNK
                while True:
                    try:
                        value, end = decoder.raw_decode(buf, pos)
                        # A number at the buffer's end may continue in the next chunk ("12" + "34").
                        if end == len(buf) and not eof and more(grow):
                            grow *= 2
                            continue
                        break
                    except json.JSONDecodeError as e:
                        if len(buf) - pos < MAX_ELEMENT_CHARS and more(grow):
                            grow *= 2
                            continue
                        err_line = line + buf.count("\n", 0, e.pos)
                        err_col = e.colno + (col0 if "\n" not in buf[: e.pos] else 0)
                        too_big = "" if eof else f" (or an element over {MAX_ELEMENT_CHARS} characters)"
                        raise DataError(
                            f"malformed JSON in array element {index}{too_big}: {e.msg} "
                            f"(line {err_line}, column {err_col})",
                            source=src,
                            record=index,
                        ) from None
                    except RecursionError:
                        raise DataError("malformed JSON: nested too deeply", source=src, record=index) from None
                yield RawRecord(src, None, index, value=value)
                index += 1
                pos = end
                skip_ws()
                if pos >= len(buf):
                    raise DataError(f"unexpected end of file after array element {index - 1}", src, record=index - 1)
                if buf[pos] == ",":
                    pos += 1
                    skip_ws()
                    if pos >= len(buf) or buf[pos] == "]":
                        raise DataError(f"trailing comma after array element {index - 1}", source=src, record=index - 1)
                elif buf[pos] == "]":
                    pos += 1
                    break
                else:
                    raise DataError(f"expected ',' or ']' after array element {index - 1}", src, record=index - 1)
                if pos > CHUNK:  # drop what has been consumed
                    nl = buf.rfind("\n", 0, pos)
                    col0 = col0 + pos if nl < 0 else pos - nl - 1
                    line += buf.count("\n", 0, pos)
                    buf = buf[pos:]
                    pos = 0
        skip_ws()
        if pos < len(buf):
            raise DataError("extra data after the JSON array", source=src)


def _iter_parquet(p: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    src = str(p)
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises its own error types for a file that is not Parquet
        raise DataError(f"cannot read Parquet: {e}", source=src) from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield RawRecord(src, None, i, value=row)
            i += 1


def _iter_hf_dataset(p: Path, split: str | None) -> Iterator[RawRecord]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    src = str(p)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if "train" in ds:
                split = "train"
            elif len(ds) == 1:
                split = next(iter(ds))
            else:
                raise DataError(f"dataset has splits {sorted(ds)}; choose one with split=", source=src)
        if split not in ds:
            raise DataError(f"dataset has no split '{split}' (splits: {sorted(ds)})", source=src)
        ds = ds[split]
        src = f"{p}[{split}]"
    for i, row in enumerate(ds):
        yield RawRecord(src, None, i, value=row)


# ---------------------------------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------------------------------


# Rejects files this process has started: the first read that rejects something truncates the file (a rerun does not
# inherit stale rejects), later reads append (several sources of one run can share one rejects file).
_REJECTS_STARTED: set[str] = set()


class _Rejects:
    """The rejects file: one JSON line per rejected record (location, reason, raw value). Opened on first use."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.f = None

    def write(self, rec: RawRecord, err: DataError) -> None:
        if self.path is None:
            return
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            key = str(self.path.resolve())
            self.f = open(self.path, "a" if key in _REJECTS_STARTED else "w", encoding="utf-8")
            _REJECTS_STARTED.add(key)
        row = dict(rec.location(), reason=err.reason)
        row["raw"] = rec.raw_text if rec.error is not None else rec.value
        try:
            line = json.dumps(row, ensure_ascii=False, default=str)
        except (RecursionError, ValueError):  # a value json can read but not write back (nesting limits)
            row["raw"] = repr(row["raw"])[:10000]
            line = json.dumps(row, ensure_ascii=False, default=str)
        self.f.write(line + "\n")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _with_meta(ex: Example, rec: RawRecord, fmt: str) -> Example:
    meta = dict(ex.meta)
    meta.update(rec.location())
    meta["format"] = fmt
    ex.meta = meta
    return ex


def _detect(records: Iterator[RawRecord], buffered: list[RawRecord], max_probe: int = 20) -> str:
    """Detect the format from the first records that are objects; the records read are kept in ``buffered``."""
    probed = 0
    first_error: DataError | None = None
    for rec in records:
        buffered.append(rec)
        if rec.error is not None or not isinstance(rec.value, dict):
            continue
        try:
            return F.detect_format(rec.value)
        except DataError as e:
            first_error = first_error or rec.locate(e)
            probed += 1
            if probed >= max_probe:
                break
    if first_error is not None:
        raise first_error
    src = buffered[0].source if buffered else "input"
    raise DataError("cannot detect the format: no JSON object records found", source=src)


def iter_examples(
    path: str | Path,
    format: str = "auto",
    *,
    skip_invalid: bool = False,
    rejects_path: str | Path | None = None,
    max_invalid_fraction: float = 0.0,
    stats: ReadStats | None = None,
    all_paths: bool = False,
    split: str | None = None,
    expect: str | None = None,
    max_examples: int | None = None,
    tool_call_format: str = "auto",
    split_think: bool = False,
    skip: int = 0,
) -> Iterator[Example]:
    """Stream the examples of a file or folder (see the module docstring).

    ``stats`` (a ReadStats you pass in) is filled as the generator runs. ``all_paths``: oasst trees give every
    root-to-leaf path, not only the best-ranked one. ``split``: which split of a saved DatasetDict. ``expect``:
    "conversation", "preference", "unpaired" or "text" to refuse the other kinds with a clear error.
    ``max_examples``: stop after that many examples (the stats then cover the records read so far).
    ``skip``: pass over the first N examples (still read and validated, counted in ``stats.skipped``) before
    ``max_examples`` counts: a slice [skip, skip + max_examples) of the file, as a data set's `train[1200:]`.
    ``tool_call_format``, ``split_think``: how assistant turns are read (formats.ReadOptions; DataConfig's fields of
    those names).
    """
    stats = stats if stats is not None else ReadStats()
    stats.sources.append(str(path))
    if skip < 0:
        raise DataError(f"skip must be >= 0, got {skip}", source=str(path))
    if not 0.0 <= max_invalid_fraction <= 1.0:
        raise DataError(f"max_invalid_fraction must be in [0, 1], got {max_invalid_fraction}")
    fmt = F.canonical_format(format)
    options = F.ReadOptions(tool_call_format=tool_call_format, split_think=split_think)
    records = iter_records(path, split=split)
    buffered: list[RawRecord] = []
    if fmt == "auto":
        fmt = "text" if _is_text_file(Path(path)) else _detect(records, buffered)
    stats.format = fmt
    if expect is not None:
        kind = F.format_kind(fmt)
        if kind != expect:
            raise DataError(wrong_kind(fmt, kind, expect), source=str(path))

    def all_records() -> Iterator[RawRecord]:
        yield from buffered
        buffered.clear()
        yield from records

    rejects = _Rejects(rejects_path if skip_invalid else None)

    def reject(rec: RawRecord, err: DataError) -> None:
        located = rec.locate(err)
        if not skip_invalid:
            raise located
        stats.rejected += 1
        stats.by_reason[reason_key(err.reason)] += 1
        rejects.write(rec, located)

    produced = 0
    try:
        if fmt == "oasst":
            yield from _oasst_examples(all_records(), stats, reject, all_paths, max_examples, skip)
        else:
            full = False  # max_examples reached: stop reading, then check the invalid fraction of what was read
            for rec in all_records():
                stats.total += 1
                try:
                    if rec.error is not None:
                        raise rec.error
                    examples = F.convert_record(rec.value, fmt, options)
                except DataError as e:
                    reject(rec, e)
                    continue
                stats.kept += 1
                for ex in examples:
                    stats.examples += 1
                    if stats.skipped < skip:
                        stats.skipped += 1
                        continue
                    produced += 1
                    yield _with_meta(ex, rec, fmt)
                    if max_examples is not None and produced >= max_examples:
                        full = True
                        break
                if full:
                    break
    finally:
        rejects.close()
    if skip_invalid and stats.total and stats.rejected / stats.total > max_invalid_fraction:
        top = "; ".join(f"{n} x {r}" for r, n in stats.by_reason.most_common(3))
        where = f"; rejects written to {rejects_path}" if rejects_path else ""
        raise DataError(
            f"{stats.rejected} of {stats.total} records rejected ({stats.rejected / stats.total:.1%}), above "
            f"max_invalid_fraction={max_invalid_fraction}: {top}{where}",
            source=str(path),
        )


def wrong_kind(fmt: str, kind: str, expect: str) -> str:
    """Why a file of one kind cannot be read where another is expected, and what to do instead."""
    if kind == "unpaired":
        return (f"format '{fmt}' holds unpaired (KTO) data: each example has a 'label' key (or 'kto_tag') marking its "
                f"completion desirable or not, so it is not {expect} data (as SFT data its undesirable answers would "
                "be trained on): train it with the KTO recipe, `instructkit kto`")
    if kind == "text":
        return (f"format '{fmt}' holds plain text (no roles, no prompt/response), not {expect} data: use it for "
                "continued pre-training or the PPO-ptx mix, or convert it to conversations first")
    return f"format '{fmt}' holds {kind} data, but {expect} data is expected"


def _oasst_examples(records, stats: ReadStats, reject, all_paths: bool, max_examples: int | None, skip: int = 0):
    """oasst: parse every message (bad ones rejected), build the trees, then reject what cannot hang in a tree."""
    parsed: list[F.OasstMessage] = []
    where: dict[int, RawRecord] = {}
    for order, rec in enumerate(records):
        stats.total += 1
        try:
            if rec.error is not None:
                raise rec.error
            parsed.append(F.parse_oasst_message(rec.value, order))
            where[order] = rec
        except DataError as e:
            reject(rec, e)
    convs, bad = F.oasst_conversations(parsed, all_paths=all_paths)
    for m in parsed:
        if m.order in bad:
            reject(where[m.order], DataError(bad[m.order]))
        else:
            stats.kept += 1
    produced = 0
    for end, conv in convs:
        stats.examples += 1
        if stats.skipped < skip:
            stats.skipped += 1
            continue
        produced += 1
        yield _with_meta(conv, where[end.order], "oasst")
        if max_examples is not None and produced >= max_examples:
            return


def read_examples(path: str | Path, format: str = "auto", **kwargs: Any) -> list[Example]:
    """``list(iter_examples(...))``; pass ``stats=ReadStats()`` to get the counts."""
    return list(iter_examples(path, format, **kwargs))


def load_examples(path: str | Path, format: str = "auto", **kwargs: Any) -> tuple[list[Example], ReadStats]:
    """Examples and the ReadStats of reading them."""
    stats = ReadStats()
    return list(iter_examples(path, format, stats=stats, **kwargs)), stats


def read_conversations(path: str | Path, format: str = "auto", **kwargs: Any) -> list[Conversation]:
    return read_examples(path, format, expect="conversation", **kwargs)  # type: ignore[return-value]


def read_pairs(path: str | Path, format: str = "auto", **kwargs: Any) -> list[PreferencePair]:
    return read_examples(path, format, expect="preference", **kwargs)  # type: ignore[return-value]


def read_unpaired(path: str | Path, format: str = "auto", **kwargs: Any) -> list[UnpairedExample]:
    """KTO data: UnpairedExamples (a file of another kind is refused)."""
    return read_examples(path, format, expect="unpaired", **kwargs)  # type: ignore[return-value]


def read_texts(path: str | Path, format: str = "auto", **kwargs: Any) -> list[TextExample]:
    """Plain text: TextExamples (a file of another kind is refused)."""
    return read_examples(path, format, expect="text", **kwargs)  # type: ignore[return-value]


def write_jsonl(path: str | Path, examples: Iterable[Example | dict]) -> int:
    """Internal JSONL (one ``to_dict()`` per line), written atomically (temporary file, then rename). Returns the
    number of lines written."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for ex in examples:
                d = ex if isinstance(ex, dict) else ex.to_dict()
                # default=str: meta copied from Parquet/datasets rows may hold dates or bytes
                f.write(json.dumps(d, ensure_ascii=False, default=str) + "\n")
                n += 1
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n
