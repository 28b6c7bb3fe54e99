"""The one reader of a user's own files: CSV/TSV, JSON lines (or a JSON array), parquet, and
folders saved with datasets' `save_to_disk`.

`load_user_data` reads texts and labels for training (`data.task = <path>`); `read_texts` reads
texts only, plus plain `.txt` files (one text per line), for `fedtt predict`. Both go through
the same parsing, so a file means the same thing to either, and every problem raises an error
that names the file and the line (or row) at fault.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from fedtt.data.common import DataError, TaskData, _column, _dataset, _split

# A parsed row: (where, for messages; text; label) with where like "line 7" or "row 3". A
# text-only read (no label column) has None for every label.
_Row = tuple[str, Any, Any]

_TABLES = ".csv, .tsv, .jsonl, .json, .parquet, or a folder saved with datasets' save_to_disk"


def _missing_column(path: Path, column: str, role: str, present: Sequence[str]) -> DataError:
    return DataError(f"{path}: no column {column!r} for the {role}s; columns present: "
                      f"{', '.join(map(str, present)) or '(none)'}")


def _wanted(text_col: str, label_col: str | None) -> list[tuple[str, str]]:
    """(column, role) pairs a file must have: the text column, and the label column if any."""
    return [(text_col, "text")] + ([(label_col, "label")] if label_col is not None else [])


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 ({err.reason})") from None


def _blank(fields: list[str], *, keep_empty: bool) -> bool:
    """Whether a CSV line holds nothing. csv gives [] for an empty line and [""] for a line
    holding just `""`: with `keep_empty` (a text-only read past the header) that is a row, an
    empty text, rather than a blank line."""
    if not fields:
        return True
    if len(fields) != 1 or fields[0].strip():
        return False
    return not (keep_empty and fields[0] == "")


def _rows_csv(path: Path, text_col: str, label_col: str | None, delimiter: str) -> list[_Row]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter,
                        strict=True)
    rows: list[_Row] = []
    header: list[str] | None = None
    start = 1
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{path} line {start}: malformed CSV ({err})") from None
        if _blank(fields, keep_empty=label_col is None and header is not None):
            continue
        if header is None:
            header = [h.strip() for h in fields]
            for col, role in _wanted(text_col, label_col):
                if col not in header:
                    raise _missing_column(path, col, role, header)
            ti = header.index(text_col)
            li = header.index(label_col) if label_col is not None else None
            continue
        if len(fields) != len(header):
            raise DataError(f"{path} line {start}: expected {len(header)} fields (as in the "
                             f"header), found {len(fields)}")
        label = None if li is None or not fields[li].strip() else fields[li]
        rows.append((f"line {start}", fields[ti], label))
    if header is None:
        raise DataError(f"{path}: the file is empty (no header line)")
    return rows


def _rows_jsonl(path: Path, text_col: str, label_col: str | None) -> list[_Row]:
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: malformed JSON ({err.msg})") from None
        numbered = [(f"record {i}", r) for i, r in enumerate(records, 1)]
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {lineno}: malformed JSON ({err.msg})") from None
    keys: dict[str, None] = {}
    for where, rec in numbered:
        if not isinstance(rec, dict):
            raise DataError(f"{path} {where}: expected a JSON object, got "
                             f"{type(rec).__name__}")
        keys.update(dict.fromkeys(rec))
    for col, role in _wanted(text_col, label_col):
        if numbered and col not in keys:
            raise _missing_column(path, col, role, list(keys))
    return [(where, rec.get(text_col), None if label_col is None else rec.get(label_col))
            for where, rec in numbered]


def _rows_table(path: Path, table: pa.Table | datasets.Dataset, text_col: str,
                label_col: str | None) -> list[_Row]:
    names = list(table.column_names)
    for col, role in _wanted(text_col, label_col):
        if col not in names:
            raise _missing_column(path, col, role, names)
    if isinstance(table, pa.Table):
        texts = table.column(text_col).to_pylist()
        labels = table.column(label_col).to_pylist() if label_col is not None else None
    else:
        texts = _column(table, text_col)
        labels = _column(table, label_col) if label_col is not None else None
    if labels is None:
        labels = [None] * len(texts)
    return [(f"row {i}", t, v) for i, (t, v) in enumerate(zip(texts, labels, strict=True), 1)]


def _rows_txt(path: Path) -> list[_Row]:
    """A plain text file: one text per line, blank lines skipped, each line as written."""
    return [(f"line {i}", line, None)
            for i, line in enumerate(_read_text(path).splitlines(), 1) if line.strip()]


def _read_rows(path: Path, text_col: str,
               label_col: str | None) -> tuple[list[_Row], list[str] | None]:
    """Rows of a user file, plus label names when the file itself declares them. Without a
    label column (a text-only read) `.txt` files are accepted too."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DataError(f"{path} is a folder but not a saved Hugging Face dataset "
                             f"(datasets.save_to_disk): {err}") from None
        if isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"{path} holds a DatasetDict with splits {list(loaded)}; pass the "
                             f"folder of one split (e.g. {path / 'train'})")
        feature = loaded.features.get(label_col) if label_col is not None else None
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        return _rows_table(path, loaded, text_col, label_col), names
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _rows_csv(path, text_col, label_col, "\t" if suffix == ".tsv" else ","), None
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _rows_jsonl(path, text_col, label_col), None
    if suffix in (".parquet", ".pq"):
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
        return _rows_table(path, table, text_col, label_col), None
    if suffix == ".txt" and label_col is None:
        return _rows_txt(path), None
    kinds = f".txt, {_TABLES}" if label_col is None else _TABLES
    raise DataError(f"{path}: unknown file type {path.suffix!r}; use {kinds}")


def _bad_text(path: Path, where: str, text_col: str, text: Any) -> DataError:
    what = "missing" if text is None else "empty" if isinstance(text, str) else \
        f"not a string ({type(text).__name__})"
    return DataError(f"{path} {where}: text column {text_col!r} is {what}")


def _check_rows(path: Path, rows: list[_Row], text_col: str,
                label_col: str) -> tuple[list[str], list[int | str]]:
    texts: list[str] = []
    labels: list[int | str] = []
    for where, text, label in rows:
        if not isinstance(text, str) or not text.strip():
            raise _bad_text(path, where, text_col, text)
        if label is None or (isinstance(label, float) and math.isnan(label)):
            raise DataError(f"{path} {where}: label column {label_col!r} is missing")
        if isinstance(label, str):
            label = label.strip()
            if label.lstrip("-").isdigit():
                label = int(label)
        elif isinstance(label, float) and label.is_integer():
            label = int(label)
        elif isinstance(label, bool) or not isinstance(label, int):
            raise DataError(f"{path} {where}: label {label!r} is neither a string nor an "
                             "integer")
        texts.append(text)
        labels.append(label)
    return texts, labels


def read_texts(path: str | os.PathLike[str], text_column: str = "text") -> list[str]:
    """The texts of a file to label: a `.txt` file (one text per line, blank lines skipped) or
    any file `load_user_data` reads, from its `text_column` (no label column needed).

    Each text is kept exactly as written ("007" stays "007", "NA" stays "NA", `""` in a CSV
    is an empty text); a missing or non-string text raises `DataError` naming its line or
    row, as do the file problems `load_user_data` reports.
    """
    path = Path(path)
    rows, _ = _read_rows(path, text_column, None)
    for where, text, _label in rows:
        if not isinstance(text, str):
            raise _bad_text(path, where, text_column, text)
    return [text for _, text, _ in rows]


def load_user_data(path: str | os.PathLike[str], *, text_column: str = "text",
                   label_column: str = "label", test_path: str | os.PathLike[str] | None = None,
                   test_fraction: float = 0.2, seed: int = 0) -> TaskData:
    """Load a user's CSV/TSV, JSON lines, parquet file or saved HF dataset folder.

    Labels may be strings or integers: the sorted distinct values become 0..k-1 and their
    string forms the label names (a `ClassLabel` column of a saved dataset keeps its names).
    Without `test_path` the data is split with a seeded, stratified `test_fraction`.
    Problems raise errors that name them: `FileNotFoundError` for a missing file, and
    `DataError` for an unknown extension, a missing column (with the columns present), a
    malformed row (with its 1-based line number in a CSV/JSON lines file, else row number)
    or training labels of a single class (with that class).
    """
    files = [Path(path)] + ([Path(test_path)] if test_path is not None else [])
    parsed = []
    declared: list[str] | None = None
    for f in files:
        rows, names = _read_rows(f, text_column, label_column)
        if not rows:
            raise DataError(f"{f}: no data rows")
        parsed.append(_check_rows(f, rows, text_column, label_column))
        declared = declared or names
    found = {str(v) for v in parsed[0][1]}  # (int and str labels compare as strings)
    if len(found) < 2:
        raise DataError(f"{files[0]}: label column {label_column!r} holds a single class, "
                        f"{found.pop()!r}: a classifier needs at least two")
    all_labels = [v for _, labels in parsed for v in labels]
    if declared is not None and all(isinstance(v, int) for v in all_labels):
        bad = [v for v in all_labels if not 0 <= int(v) < len(declared)]
        if bad:
            raise DataError(f"label {bad[0]} is outside the dataset's ClassLabel names")
        label_names = declared
        index: dict[Any, int] = {i: i for i in range(len(declared))}
    else:
        if not all(isinstance(v, int) for v in all_labels):
            all_labels = [str(v) for v in all_labels]  # mixed types: compare as strings
        values = sorted(set(all_labels))
        label_names = [str(v) for v in values]
        index = {v: i for i, v in enumerate(values)}
        as_str = not all(isinstance(v, int) for v in values)
        parsed = [(t, [str(v) if as_str else v for v in ls]) for t, ls in parsed]
    encoded = [(t, [index[v] for v in ls]) for t, ls in parsed]
    if len(encoded) == 2:
        train, test = (_dataset(*pair) for pair in encoded)
    else:
        train, test = _split(*encoded[0], test_fraction, seed)
    return TaskData(Path(path).stem or str(path), train, test, label_names)
