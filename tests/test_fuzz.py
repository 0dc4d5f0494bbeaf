"""Fuzzing the loaders and the data gate: over a thousand malformed edit files, of every supported format, from a
seeded generator. Each must load, or fail with one :class:`EditDataError` line naming the file and, where one
record is at fault, that record and field; the data gate must report the files that load, or refuse an empty one
naming it. Nothing else may escape."""
from __future__ import annotations

import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from data_checks import validate_requests
from kdpo.loaders import EditDataError, load_requests
from test_loaders import COUNTERFACT, REQUESTS, ROME, ZSRE_MEND, knowedit_record

SEED = 20240917
FILES_PER_SHAPE = 130  # x 8 shapes: 1,040 files
GATED_FILES = 20  # GX takes ~0.3 s a run: the gate sees this many of the files that load (and every empty one)

PROJECT = [request.to_dict() for request in REQUESTS] * 2  # four records (case_ids repeat: the gate's business)
SHAPES = {  # file name -> valid records of that shape
    "counterfact.json": COUNTERFACT + [dict(COUNTERFACT[0], case_id=19)],
    "zsre.json": ZSRE_MEND + ZSRE_MEND[:1],
    "knowedit.json": [knowedit_record("mayor of Vienna"), knowedit_record(["mayor", "Bürgermeister"])],
    "rome.json": ROME * 3,
    "project.json": PROJECT,
    "project.jsonl": PROJECT,
    "project.csv": PROJECT,
    "project.parquet": PROJECT,
}
# values of the wrong type, empty, huge, broken Unicode, line breaks, wrong nesting
BAD_VALUES = [None, 0, -1, 1.5, True, "", "   ", [], {}, [1], {"a": 1}, [[["x"]]], [None], [{"prompt": 3}],
              "x" * 100_000, 10**30, "\ud800", "a\nb\x00c\u2028", "\x85", {"prompt": "p"}, [{"ground_truth": "g"}]]


@dataclass
class Case:
    """A malformed file; ``index``/``root``: the record and top-level field at fault (None: file-level damage);
    ``relaxed``: the fault may change how the file is detected, so any one-line file error is right."""

    path: Path
    what: str
    index: int | None = None
    root: str | None = None
    relaxed: bool = False


def _paths(value, prefix=()):
    """Every key/index path into a JSON value."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield (*prefix, key)
        yield from _paths(item, (*prefix, key))


def _set(record, path, value):
    """``record`` with the value at ``path`` replaced (``...``: the key removed)."""
    *parents, last = path
    holder = record
    for key in parents:
        holder = holder[key]
    if value is ...:
        del holder[last]
    else:
        holder[last] = value


def _mutate_record(rng: random.Random, records: list) -> tuple[list, int, str | None, str]:
    """A deep copy of ``records`` with one record damaged: a value replaced or removed, or the record itself."""
    records = json.loads(json.dumps(records))
    index = rng.randrange(len(records))
    if rng.random() < 0.08:
        records[index] = rng.choice(["a string", 7, None, [records[index]], True])
        return records, index, None, "record replaced"
    path = rng.choice(list(_paths(records[index])))
    value = ... if rng.random() < 0.2 else rng.choice(BAD_VALUES)
    _set(records[index], path, value)
    return records, index, str(path[0]), f"{'.'.join(map(str, path))} = {str(value)[:20]!r}"


def _damage_text(rng: random.Random, text: str) -> tuple[bytes, str]:
    """File-level damage to a text file: truncation, bad bytes, wrong encoding, junk, deep nesting, huge numbers."""
    data = text.encode("utf-8", "surrogatepass")
    cut = rng.randrange(1, max(2, len(data)))
    return rng.choice([
        (data[:cut], "truncated"),
        (data[:cut] + b"\xff\xfe\x80" + data[cut:], "non-UTF-8 bytes"),
        (text.encode("utf-16"), "UTF-16"),
        (b"", "empty"),
        (b" \n\t\n", "blank"),
        (b"\xef\xbb\xbf" + data, "BOM"),
        (bytes(rng.randrange(256) for _ in range(200)), "random bytes"),
        (b"[" * 100_000 + b"]" * 100_000, "deep nesting"),
        (b'[{"case_id": ' + b"9" * 5000 + b"}]", "huge integer"),
        (b"{" + data + b"}", "wrong nesting"),
        (data.replace(b"\n", b"\r", 3), "carriage returns"),
        (data[:cut] + b"\x00" + data[cut:], "NUL byte"),
    ])


def _write(path: Path, text: str) -> bool:
    """Write ``text`` as UTF-8, lone surrogates too (as invalid bytes); whether the file is valid UTF-8."""
    data = text.encode("utf-8", "surrogatepass")
    path.write_bytes(data)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _csv_text(records: list[dict]) -> str:
    """Project records as CSV, list fields JSON-encoded (values that are not strings become JSON too)."""
    import csv

    columns = list(dict.fromkeys(key for record in records if isinstance(record, dict) for key in record))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for record in records:
        record = record if isinstance(record, dict) else {}
        writer.writerow(["" if record.get(c) is None else record[c] if isinstance(record[c], str)
                         else json.dumps(record[c]) for c in columns])
    return out.getvalue()


def _parquet_case(rng: random.Random, path: Path) -> Case:
    """Project records as Parquet with one column, one row or the file itself damaged."""
    frame = pl.DataFrame(PROJECT)
    column = rng.choice(frame.columns)
    n = frame.height
    kind = rng.randrange(7)
    if kind == 0:
        replacement = rng.choice([pl.Series([1] * n), pl.Series([1.5] * n), pl.Series([True] * n),
                                  pl.Series([None] * n, dtype=pl.String), pl.Series([[1, 2]] * n),
                                  pl.Series([{"a": 1}] * n), pl.Series([b"\xff"] * n),
                                  pl.Series([[None]] * n, dtype=pl.List(pl.String))])
        frame = frame.with_columns(replacement.alias(column))
        case = Case(path, f"column {column} as {replacement.dtype}", 0, column)
    elif kind == 1:
        frame = frame.drop(column)
        case = Case(path, f"column {column} dropped", 0, column)
    elif kind == 2:
        index = rng.randrange(n)
        value = rng.choice(["", "   ", "x" * 100_000, "a\nb", None])
        frame = frame.with_columns(pl.when(pl.int_range(n) == index).then(pl.lit(value, dtype=pl.String))
                                   .otherwise(pl.col(column).cast(pl.String, strict=False)).alias(column)
                                   if frame.schema[column] == pl.String else pl.col(column))
        case = Case(path, f"row {index} {column} = {str(value)[:10]!r}", index, column)
    elif kind == 3:
        frame = frame.head(0)
        case = Case(path, "no rows")
    else:
        frame.write_parquet(path)
        data = path.read_bytes()
        cut = rng.randrange(1, len(data))
        damaged = rng.choice([data[:cut], data[:cut] + bytes(16) + data[cut + 16:], data[::-1], b"PAR1" * 3])
        path.write_bytes(damaged)
        return Case(path, "damaged Parquet bytes")
    frame.write_parquet(path)
    return case


def _cases(root: Path) -> list[Case]:
    rng = random.Random(SEED)
    cases = []
    for shape, records in SHAPES.items():
        suffix = Path(shape).suffix
        for number in range(FILES_PER_SHAPE):
            path = root / f"{number:03d}-{shape}"
            if suffix == ".parquet":
                cases.append(_parquet_case(rng, path))
                continue
            if rng.random() < 0.25:  # the file itself is damaged
                text = (_csv_text(records) if suffix == ".csv" else "\n".join(json.dumps(r) for r in records)
                        if suffix == ".jsonl" else json.dumps(records))
                data, what = _damage_text(rng, text)
                path.write_bytes(data)
                cases.append(Case(path, what))
                continue
            damaged, index, key, what = _mutate_record(rng, records)
            if suffix == ".csv":
                utf8 = _write(path, _csv_text(damaged))
                # a damaged record's columns are every record's (empty elsewhere); non-objects are empty rows
                cases.append(Case(path, what, None if key is None else index, key, relaxed=True))
            elif suffix == ".jsonl":
                utf8 = _write(path, "\n".join(json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in damaged))
                cases.append(Case(path, what, index, key))
            else:
                nesting = rng.choice(["object", "nested", "lines"]) if rng.random() < 0.1 else "array"
                data = {"array": damaged, "object": {"data": damaged}, "nested": [damaged]}.get(nesting)
                utf8 = _write(path, "\n".join(json.dumps(r) for r in damaged) if data is None
                              else json.dumps(data, ensure_ascii=rng.random() < 0.5))
                cases.append(Case(path, f"{what} ({nesting})", index, key,
                                  relaxed=index == 0 or nesting != "array"))  # record 0 decides the format
            cases[-1].relaxed |= not utf8  # a raw lone surrogate: the file is not UTF-8, a file-level fault
    return cases


def _check_error(case: Case, error: EditDataError) -> str | None:
    """What is wrong with the error raised for ``case``, or None."""
    message = str(error)
    if len(message.splitlines()) != 1 or "\n" in message:
        return "message is not one line"
    if not message.startswith(f"{case.path}: "):
        return "message does not start with the file"
    if error.index is not None and f"record {error.index}" not in message:
        return "record index not in the message"
    if error.field is not None and f"field '{error.field}'" not in message:
        return "field not in the message"
    if case.index is None or case.relaxed:
        return None
    if error.index != case.index:
        return f"names record {error.index}, the fault is in record {case.index}"
    if case.root is not None and (error.field is None or re.split(r"[.\[]", error.field)[0] != case.root):
        return f"names field {error.field!r}, the fault is in {case.root!r}"
    return None


def test_a_thousand_malformed_files_give_one_line_errors(tmp_path):
    cases = _cases(tmp_path)
    tracebacks, wrong, loaded = [], [], []
    for case in cases:
        try:
            result = load_requests(case.path)
        except EditDataError as error:
            if (problem := _check_error(case, error)) is not None:
                wrong.append(f"{case.path.name} ({case.what}): {problem}: {error}")
        except BaseException as error:  # noqa: BLE001 - the point: nothing but EditDataError may escape
            if isinstance(error, KeyboardInterrupt):
                raise
            tracebacks.append(f"{case.path.name} ({case.what}): {type(error).__name__}: {error}"[:300])
        else:
            loaded.append((case, result.requests))

    empty = [(case, requests) for case, requests in loaded if not requests]
    gated = empty + random.Random(SEED).sample([item for item in loaded if item[1]],
                                               min(GATED_FILES, len(loaded) - len(empty)))
    for case, requests in gated:
        try:
            report = validate_requests(requests, source=case.path)
        except EditDataError as error:
            if requests or str(error) != f"{case.path}: no edit requests: an empty edit file fails the data gate":
                wrong.append(f"{case.path.name} ({case.what}): gate: {error}")
        except Exception as error:  # noqa: BLE001
            tracebacks.append(f"{case.path.name} ({case.what}): gate: {type(error).__name__}: {error}"[:300])
        else:
            assert all(requests[f["index"]].case_id == f["case_id"] and f["checks"] for f in report.failures)

    print(f"fuzz: {len(cases)} files, {len(loaded)} loaded ({len(empty)} empty), {len(gated)} gated, "
          f"{len(cases) - len(loaded)} one-line errors, {len(tracebacks)} tracebacks")
    assert len(cases) >= 1000 and {case.path.suffix for case in cases} == {".json", ".jsonl", ".csv", ".parquet"}
    assert len(loaded) >= 50 and len(cases) - len(loaded) >= 500  # both sides are exercised
    assert tracebacks == [], f"{len(tracebacks)} tracebacks:\n" + "\n".join(tracebacks[:30])
    assert wrong == [], f"{len(wrong)} wrong messages:\n" + "\n".join(wrong[:30])
