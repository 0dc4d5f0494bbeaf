"""Load edit requests from the benchmark formats the project reads, and write the project's JSONL.

One small function per format maps a raw record to an :class:`EditRequest`; shared helpers
validate fields and raise :class:`EditDataError` naming the file, record, case_id and field.
JSONL and CSV are read with the standard library so that errors can name their line;
Parquet is read with polars.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kdpo.requests import EditRequest, LoadedRequests, PromptAnswer, SkippedRecord

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMATS = (
    "counterfact",  # EasyEdit CounterFact (flat strings)
    "zsre_mend",  # MEND zsRE (src/alt/answers/rephrase/loc/loc_ans)
    "knowedit",  # KnowEdit ZsRE, WikiData_recent, WikiData_counterfact
    "rome_counterfact",  # ROME's original CounterFact (requested_rewrite)
    "json",  # a JSON array of project records (EditRequest.to_dict())
    "jsonl",  # one project record per line
    "csv",  # project records; list fields are JSON-encoded cells
    "parquet",  # project records; list fields are native nested columns
)
_EXTENSION_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_LIST_FIELDS = ("rephrase_prompts", "locality", "portability")
_Triple = tuple[int, int | None, object]  # (record index, line number or None, raw record)


# line breaks, other control characters and lone surrogates: escaped so that a message is one printable line
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def one_line(text: str) -> str:
    """``text`` with line breaks, control characters and lone surrogates escaped (``\\n``, ``\\ud800``)."""
    return _UNPRINTABLE.sub(lambda match: match.group().encode("unicode_escape", "backslashreplace")
                            .decode("ascii"), text)


def error_line(path, reason: str, *, index=None, case_id=None, field=None, line=None) -> str:
    """One line naming the file, line, record (with its case_id) and field that ``reason`` is about."""
    where = [] if path is None else [str(path)]
    if line is not None:
        where.append(f"line {line}")
    if index is not None:
        where.append(f"record {index}" + ("" if case_id is None else f" (case_id {case_id})"))
    if field is not None:
        where.append(f"field '{field}'")
    return one_line(": ".join([*where, reason]))


class EditDataError(ValueError):
    """A data file, or one of its records, that cannot be turned into edit requests.

    ``path`` is None for requests that came from no file. ``index`` (0-based record index),
    ``case_id`` and ``field`` are None where they do not apply (file-level errors); ``line`` is
    the 1-based line number where it is known, and ``reason`` the message without the location.
    The message is one line (see :func:`error_line`).
    """

    def __init__(self, path, reason, *, index=None, case_id=None, field=None, line=None):
        self.path = None if path is None else Path(path)
        self.reason = reason
        self.index = index
        self.case_id = case_id
        self.field = field
        self.line = line
        super().__init__(error_line(path, reason, index=index, case_id=case_id, field=field, line=line))


class _FieldError(Exception):
    """Raised by the record helpers; the loading loop adds the file and record context."""

    def __init__(self, field, reason):
        super().__init__(reason)
        self.field = field
        self.reason = reason


# ---------------------------------------------------------------- field helpers


def _type_name(value) -> str:
    """JSON's name for a value's type, for error messages."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number",
             str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _get(record: dict, field: str, label: str):
    """``record[field]``, or an error naming ``label`` when the key is absent."""
    if field not in record:
        raise _FieldError(label, "required field is missing")
    return record[field]


def _clean_str(value, label: str, *, required: bool) -> str | None:
    """``value`` stripped; None or empty gives None, or an error when ``required``."""
    if value is not None and not isinstance(value, str):
        raise _FieldError(label, f"must be a string, got {_type_name(value)}")
    _check_unicode(value, label)
    text = (value or "").strip()
    if required and not text:
        raise _FieldError(label, "must be a non-empty string")
    return text or None


def _check_unicode(text: str | None, label: str) -> None:
    """An error for a string that is not valid Unicode (JSON's ``\\ud800`` escapes give lone surrogates)."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError as err:
        raise _FieldError(label, f"not valid Unicode: lone surrogate at character {err.start}") from None


def _require_str(record: dict, field: str, label: str | None = None) -> str:
    """A present, non-empty string field, stripped."""
    label = label or field
    return _clean_str(_get(record, field, label), label, required=True)


def _optional_str(record: dict, field: str, label: str | None = None) -> str | None:
    """A string field that may be absent, null or empty (all give None), stripped."""
    return _clean_str(record.get(field), label or field, required=False)


def _require_dict(record: dict, field: str, label: str) -> dict:
    """A present object field."""
    value = _get(record, field, label)
    if not isinstance(value, dict):
        raise _FieldError(label, f"must be an object, got {_type_name(value)}")
    return value


def _as_list(value, label: str) -> list:
    """None gives [], a lone string or object a one-item list, a list itself."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        return [value]
    if not isinstance(value, list):
        raise _FieldError(label, f"must be a list, got {_type_name(value)}")
    return value


def _str_list(record: dict, field: str) -> tuple[str, ...]:
    """A string or list of strings as a tuple of stripped strings; empty items are left out."""
    items = (_clean_str(item, f"{field}[{i}]", required=False)
             for i, item in enumerate(_as_list(record.get(field), field)))
    return tuple(item for item in items if item)


def _first_alias(value, label: str) -> str | None:
    """The first string of a string, list or nested list of aliases; None when there is none."""
    while isinstance(value, list):
        value = value[0] if value else None
    return _clean_str(value, label, required=False)


def _probes(value, label: str) -> tuple[PromptAnswer, ...]:
    """A list (or lone object) of ``{prompt, ground_truth}`` probes.

    Both keys must be present; a probe whose prompt or answer is empty is left out
    (KnowEdit has some). Either value may be a string or a (nested) list of aliases.
    """
    probes = []
    for i, item in enumerate(_as_list(value, label)):
        where = f"{label}[{i}]"
        if not isinstance(item, dict):
            raise _FieldError(where, f"must be an object with 'prompt' and 'ground_truth', "
                                     f"got {_type_name(item)}")
        prompt = _first_alias(_get(item, "prompt", f"{where}.prompt"), f"{where}.prompt")
        answer = _first_alias(_get(item, "ground_truth", f"{where}.ground_truth"),
                              f"{where}.ground_truth")
        if prompt and answer:
            probes.append(PromptAnswer(prompt, answer))
    return tuple(probes)


def _pair(record: dict, prompt_field: str, answer_field: str) -> tuple[PromptAnswer, ...]:
    """One probe from two flat fields; () when the prompt or the answer is empty."""
    prompt = _optional_str(record, prompt_field)
    if prompt is None:
        return ()
    answer = _first_alias(_get(record, answer_field, answer_field), answer_field)
    return (PromptAnswer(prompt, answer),) if answer else ()


def _categories(record: dict, field: str) -> tuple[PromptAnswer, ...]:
    """KnowEdit probes: an object of category -> probes, flattened in order (or a plain list)."""
    value = record.get(field)
    if not isinstance(value, dict):
        return _probes(value, field)
    return tuple(probe for name, items in value.items()
                 for probe in _probes(items, f"{field}.{name}"))


def _case_id(record: dict, index: int) -> str:
    """The record's case_id as a string, or its index when it has none."""
    value = record.get("case_id")
    if isinstance(value, bool) or not isinstance(value, (int, str, type(None))):
        raise _FieldError("case_id", f"must be a string or an integer, got {_type_name(value)}")
    if isinstance(value, str):
        _check_unicode(value, "case_id")
    text = "" if value is None else str(value).strip()
    return text or str(index)


# ---------------------------------------------------------------- one mapper per format


def _from_counterfact(record: dict, case_id: str) -> EditRequest:
    """EasyEdit CounterFact: flat prompt/target/rephrase/locality strings."""
    return EditRequest(
        case_id=case_id,
        subject=_require_str(record, "subject"),
        prompt=_require_str(record, "prompt"),
        target_new=_require_str(record, "target_new"),
        ground_truth=_optional_str(record, "ground_truth"),
        rephrase_prompts=_str_list(record, "rephrase_prompt"),
        locality=_pair(record, "locality_prompt", "locality_ground_truth"),
    )


def _from_zsre_mend(record: dict, case_id: str) -> EditRequest:
    """MEND zsRE: edit ``src`` toward ``alt``; ``answers[0]`` is the old answer."""
    return EditRequest(
        case_id=case_id,
        subject=_require_str(record, "subject"),
        prompt=_require_str(record, "src"),
        target_new=_require_str(record, "alt"),
        ground_truth=_first_alias(record.get("answers"), "answers"),
        rephrase_prompts=_str_list(record, "rephrase"),
        locality=_pair(record, "loc", "loc_ans"),
    )


def _from_knowedit(record: dict, case_id: str) -> EditRequest:
    """KnowEdit: alias lists as answers, locality/portability grouped by category."""
    return EditRequest(
        case_id=case_id,
        subject=_require_str(record, "subject"),
        prompt=_require_str(record, "prompt"),
        target_new=_require_str(record, "target_new"),
        ground_truth=_first_alias(record.get("ground_truth"), "ground_truth"),
        rephrase_prompts=_str_list(
            record, "rephrase_prompt" if "rephrase_prompt" in record else "rephrase"),
        locality=_categories(record, "locality"),
        portability=_categories(record, "portability"),
    )


def _rome_target(rewrite: dict, key: str) -> str:
    """``requested_rewrite[key]["str"]``."""
    label = f"requested_rewrite.{key}"
    return _require_str(_require_dict(rewrite, key, label), "str", f"{label}.str")


def _from_rome_counterfact(record: dict, case_id: str) -> EditRequest:
    """ROME CounterFact: a ``{}`` prompt template; neighborhood prompts keep ``target_true``.

    ``attribute_prompts`` and ``generation_prompts`` are not used.
    """
    rewrite = _require_dict(record, "requested_rewrite", "requested_rewrite")
    subject = _require_str(rewrite, "subject", "requested_rewrite.subject")
    template = _require_str(rewrite, "prompt", "requested_rewrite.prompt")
    if "{}" not in template:
        raise _FieldError("requested_rewrite.prompt", "must contain '{}' where the subject goes")
    target_new = _rome_target(rewrite, "target_new")
    target_true = _rome_target(rewrite, "target_true")
    return EditRequest(
        case_id=case_id,
        subject=subject,
        prompt=template.replace("{}", subject, 1),
        target_new=target_new,
        ground_truth=target_true,
        rephrase_prompts=_str_list(record, "paraphrase_prompts"),
        locality=tuple(PromptAnswer(prompt, target_true)
                       for prompt in _str_list(record, "neighborhood_prompts")),
    )


def _from_project(record: dict, case_id: str) -> EditRequest:
    """The project's own record, as written by :meth:`EditRequest.to_dict`."""
    return EditRequest(
        case_id=case_id,
        subject=_require_str(record, "subject"),
        prompt=_require_str(record, "prompt"),
        target_new=_require_str(record, "target_new"),
        ground_truth=_optional_str(record, "ground_truth"),
        rephrase_prompts=_str_list(record, "rephrase_prompts"),
        locality=_probes(record.get("locality"), "locality"),
        portability=_probes(record.get("portability"), "portability"),
    )


def _from_csv_row(record: dict, case_id: str) -> EditRequest:
    """A project record whose list fields are JSON-encoded cells (empty cells mean none)."""
    decoded = dict(record)
    for field in _LIST_FIELDS:
        cell = (record.get(field) or "").strip()
        try:
            decoded[field] = _loads(cell) if cell else None
        except _BadJSON as err:
            raise _FieldError(field, f"cell is not valid JSON: {err.reason}") from None
    return _from_project(decoded, case_id)


_MAPPERS: dict[str, Callable[[dict, str], EditRequest]] = {
    "counterfact": _from_counterfact,
    "zsre_mend": _from_zsre_mend,
    "knowedit": _from_knowedit,
    "rome_counterfact": _from_rome_counterfact,
    "json": _from_project,
    "jsonl": _from_project,
    "csv": _from_csv_row,
    "parquet": _from_project,
}


# ---------------------------------------------------------------- reading files


class _BadJSON(Exception):
    """Text that is not JSON; ``reason`` says why, ``line`` where when it is known."""

    def __init__(self, reason: str, line: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.line = line


def _loads(text: str):
    """``json.loads``, with every way of failing (huge integers and deep nesting too) as :class:`_BadJSON`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _BadJSON(f"{err.msg} (column {err.colno})", err.lineno) from None
    except ValueError as err:  # Python's limit on the digits of an integer
        raise _BadJSON(str(err).split(";")[0]) from None
    except RecursionError:
        raise _BadJSON("nested too deeply") from None


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise EditDataError(path, "file not found" if not path.exists() else "not a file")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise EditDataError(path, f"not UTF-8 text ({err.reason} at byte {err.start})",
                            line=err.object.count(b"\n", 0, err.start) + 1) from None


def _read_json_array(path: Path) -> list:
    try:
        data = _loads(_read_text(path))
    except _BadJSON as err:
        raise EditDataError(path, f"invalid JSON: {err.reason}", line=err.line) from None
    if not isinstance(data, list):
        raise EditDataError(path, f"expected a JSON array of records, got {_type_name(data)}")
    return data


def _jsonl_records(path: Path) -> Iterator[_Triple]:
    """Records of a JSONL file, parsed lazily; blank lines are ignored."""
    index = 0
    for line_no, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = _loads(line)
        except _BadJSON as err:
            raise EditDataError(path, f"invalid JSON: {err.reason}", index=index, line=line_no) from None
        yield index, line_no, record
        index += 1


def _csv_records(path: Path) -> Iterator[_Triple]:
    """Rows of a CSV file with a header row, as dicts of strings; blank rows are ignored."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    index = 0
    try:
        header = next(reader, None)
        if not header:
            raise EditDataError(path, "no header row", line=1)
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise EditDataError(path, f"expected {len(header)} cells, found {len(row)}",
                                    index=index, line=reader.line_num)
            yield index, reader.line_num, dict(zip(header, row))
            index += 1
    except csv.Error as err:
        raise EditDataError(path, f"malformed CSV: {err}", index=index,
                            line=reader.line_num) from None


def _parquet_records(path: Path) -> Iterator[_Triple]:
    import polars as pl

    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError, ValueError) as err:  # a damaged
        # file can make polars' reader panic (PanicException is a BaseException)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EditDataError(path, f"cannot read Parquet: {reason}") from None
    for index, row in enumerate(frame.iter_rows(named=True)):
        yield index, None, row


_READERS: dict[str, Callable[[Path], Iterator[_Triple]]] = {
    "jsonl": _jsonl_records,
    "csv": _csv_records,
    "parquet": _parquet_records,
}


def _json_format(records: list, path: Path) -> str:
    """Which JSON format a record array is in, judged by the keys of its first record."""
    hint = f"pass format= one of {', '.join(FORMATS)}"
    if not records:
        raise EditDataError(path, f"empty JSON array: cannot detect the format; {hint}")
    first = records[0]
    if not isinstance(first, dict):
        raise EditDataError(path, f"record must be an object, got {_type_name(first)}", index=0)
    if "requested_rewrite" in first:
        return "rome_counterfact"
    if "src" in first and "alt" in first:
        return "zsre_mend"
    if isinstance(first.get("locality_prompt"), str) or (
            "case_id" in first and isinstance(first.get("rephrase_prompt"), str)):
        return "counterfact"
    if (any(isinstance(first.get(key), dict) for key in ("locality", "portability"))
            or isinstance(first.get("ground_truth"), list)
            or "rephrase_prompt" in first or "rephrase" in first):
        return "knowedit"
    if "prompt" in first and "target_new" in first:
        return "json"
    raise EditDataError(path, f"cannot detect the format from the keys of record 0 "
                              f"({', '.join(sorted(first))}); {hint}")


def _detect(path: Path) -> tuple[str, list | None]:
    """The file's format, and for a .json file its already parsed record array."""
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix in _EXTENSION_FORMATS:
        return _EXTENSION_FORMATS[suffix], None
    if suffix == ".json":
        records = _read_json_array(path)
        return _json_format(records, path), records
    raise EditDataError(path, f"unknown file extension {suffix or '(none)'!r}: cannot detect "
                              f"the format; pass format= one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------- public API


def detect_format(path) -> str:
    """The format name of a data file (one of :data:`FORMATS`).

    By extension (.jsonl, .csv, .parquet), or for .json by the keys of the first record.
    Raises :class:`EditDataError` when the file is missing or the format cannot be told.
    """
    return _detect(Path(path))[0]


def load_requests(path, format: str = "auto", skip_invalid: bool = False,
                  limit: int | None = None) -> LoadedRequests:
    """Read edit requests from ``path``, in file order.

    ``format`` is "auto" or one of :data:`FORMATS`. An invalid record raises
    :class:`EditDataError`, or with ``skip_invalid`` is left out and listed in ``skipped``
    (a file that cannot be parsed always raises). ``limit`` (at least 1) keeps the first N
    valid records; every record of the file is still checked, so an error after them is not missed.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    records = None
    if format == "auto":
        format, records = _detect(path)
    elif format not in FORMATS:
        raise EditDataError(path, f"unknown format {format!r}; expected 'auto' or one of "
                                  f"{', '.join(FORMATS)}")
    else:
        _check_file(path)
    if format in _READERS:
        triples = _READERS[format](path)
    else:
        records = _read_json_array(path) if records is None else records
        triples = ((index, None, record) for index, record in enumerate(records))
    loaded = _map_records(path, format, triples, skip_invalid)
    if limit is not None:
        del loaded.requests[limit:]
    return loaded


def _map_records(path: Path, format: str, triples: Iterable[_Triple], skip_invalid: bool) -> LoadedRequests:
    """Map raw records with the format's mapper, raising or collecting what is invalid."""
    mapper = _MAPPERS[format]
    loaded = LoadedRequests(requests=[], format=format)
    for index, line, record in triples:
        case_id = None
        try:
            if not isinstance(record, dict):
                raise _FieldError(None, f"record must be an object, got {_type_name(record)}")
            case_id = _case_id(record, index)
            loaded.requests.append(mapper(record, case_id))
        except _FieldError as err:
            if not skip_invalid:
                raise EditDataError(path, err.reason, index=index, case_id=case_id,
                                    field=err.field, line=line) from None
            loaded.skipped.append(SkippedRecord(index, case_id, err.field, err.reason))
    return loaded


def context_limit(config) -> int | None:
    """How many positions a model's config allows (``max_position_embeddings``, or GPT-2's
    ``n_positions``); None when it names no limit."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)


def check_context(requests: Iterable[EditRequest], tokenizer: "PreTrainedTokenizerBase",
                  max_positions: int | None, source=None) -> None:
    """Raise :class:`EditDataError` for the first prompt that, with its answer, does not fit the model's context.

    Every teacher-forced sequence the editors and metrics build (``prompt + " " + answer``, tokenized
    as :func:`kdpo.modeling.encode_pairs` does) must be at most ``max_positions`` tokens (see
    :func:`context_limit`; None checks nothing). The error names ``source`` (the edit file), the
    record index, its case_id, the field and the limit.
    """
    from kdpo.modeling import answer_token_ids

    if max_positions is None:
        return
    for index, request in enumerate(requests):
        pairs = [("prompt", request.prompt, "target_new", request.target_new)]
        if request.ground_truth:
            pairs.append(("prompt", request.prompt, "ground_truth", request.ground_truth))
        pairs += [(f"rephrase_prompts[{i}]", prompt, "target_new", request.target_new)
                  for i, prompt in enumerate(request.rephrase_prompts)]
        pairs += [(f"{kind}[{i}].prompt", item.prompt, f"{kind}[{i}].ground_truth", item.ground_truth)
                  for kind in ("locality", "portability") for i, item in enumerate(getattr(request, kind))]
        prompt_lengths = [len(ids) for ids in tokenizer([prompt for _, prompt, _, _ in pairs])["input_ids"]]
        for (prompt_field, _, answer_field, answer), prompt_length in zip(pairs, prompt_lengths):
            length = prompt_length + len(answer_token_ids(tokenizer, answer))
            if length > max_positions:
                raise EditDataError(
                    source, f"{length} tokens with its answer ({prompt_length} in the prompt), over the model's "
                            f"context of {max_positions} positions", index=index, case_id=request.case_id,
                    field=prompt_field if prompt_length >= max_positions else answer_field)


def write_jsonl(requests: Iterable[EditRequest], path) -> int:
    """Write one :meth:`EditRequest.to_dict` record per line (UTF-8); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for request in requests:
            out.write(json.dumps(request.to_dict(), ensure_ascii=False) + "\n")
            count += 1
    return count
