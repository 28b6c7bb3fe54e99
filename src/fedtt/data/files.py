"""The one reader of a user's own files: CSV/TSV, JSON lines (or a JSON array), parquet, and
folders saved with datasets' `save_to_disk`.

`load_user_data` reads texts and labels for training (`data.task = <path>`); `load_user_pairs`
reads prompt/response pairs (and an optional category to partition by) for a causal-lm run;
`read_texts` reads texts only, plus plain `.txt` files (one text per line), for `fedtt
predict`. All go through the same parsing, so a file means the same thing to each, and every
problem raises an error that names the file and the line (or row) at fault.
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

from fedtt.data.common import (
    DataError,
    TaskData,
    _column,
    _dataset,
    _pairs,
    _split,
    _split_pairs,
)

# A parsed row: (where, for messages; one value per wanted column) with where like "line 7"
# or "row 3". A value a row lacks is None.
_Row = tuple[str, tuple[Any, ...]]
# The columns a read wants, each with its role for messages: [(column, role), ...]. The first
# is the text (kept exactly as written); the others are None when blank in a CSV.
_Wanted = list[tuple[str, str]]

_TABLES = ".csv, .tsv, .jsonl, .json, .parquet, or a folder saved with datasets' save_to_disk"


def _missing_column(path: Path, column: str, role: str, present: Sequence[str]) -> DataError:
    return DataError(f"{path}: no column {column!r} for the {role}s; columns present: "
                      f"{', '.join(map(str, present)) or '(none)'}")


def _wanted(text_col: str, label_col: str | None) -> _Wanted:
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


def _rows_csv(path: Path, wanted: _Wanted, delimiter: str) -> list[_Row]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter,
                        strict=True)
    rows: list[_Row] = []
    header: list[str] | None = None
    index: list[int] = []
    start = 1
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{path} line {start}: malformed CSV ({err})") from None
        if _blank(fields, keep_empty=len(wanted) == 1 and header is not None):
            continue
        if header is None:
            header = [h.strip() for h in fields]
            for col, role in wanted:
                if col not in header:
                    raise _missing_column(path, col, role, header)
            index = [header.index(col) for col, _ in wanted]
            continue
        if len(fields) != len(header):
            raise DataError(f"{path} line {start}: expected {len(header)} fields (as in the "
                             f"header), found {len(fields)}")
        values = [fields[index[0]]] + [fields[i] if fields[i].strip() else None
                                       for i in index[1:]]
        rows.append((f"line {start}", tuple(values)))
    if header is None:
        raise DataError(f"{path}: the file is empty (no header line)")
    return rows


def _rows_jsonl(path: Path, wanted: _Wanted) -> list[_Row]:
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
    for col, role in wanted:
        if numbered and col not in keys:
            raise _missing_column(path, col, role, list(keys))
    return [(where, tuple(rec.get(col) for col, _ in wanted)) for where, rec in numbered]


def _rows_table(path: Path, table: pa.Table | datasets.Dataset, wanted: _Wanted) -> list[_Row]:
    names = list(table.column_names)
    for col, role in wanted:
        if col not in names:
            raise _missing_column(path, col, role, names)
    if isinstance(table, pa.Table):
        columns = [table.column(col).to_pylist() for col, _ in wanted]
    else:
        columns = [_column(table, col) for col, _ in wanted]
    return [(f"row {i}", values) for i, values in enumerate(zip(*columns, strict=True), 1)]


def _rows_txt(path: Path) -> list[_Row]:
    """A plain text file: one text per line, blank lines skipped, each line as written."""
    return [(f"line {i}", (line,))
            for i, line in enumerate(_read_text(path).splitlines(), 1) if line.strip()]


def _read_columns(path: Path, wanted: _Wanted) -> tuple[list[_Row], list[str] | None]:
    """Rows of a user file with the `wanted` columns, plus the label names the file itself
    declares for a column of role "label" (a saved dataset's `ClassLabel`). A read of one
    column (a text-only read) accepts `.txt` files too."""
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
        label_col = next((col for col, role in wanted if role == "label"), None)
        feature = loaded.features.get(label_col) if label_col is not None else None
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        return _rows_table(path, loaded, wanted), names
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _rows_csv(path, wanted, "\t" if suffix == ".tsv" else ","), None
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _rows_jsonl(path, wanted), None
    if suffix in (".parquet", ".pq"):
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
        return _rows_table(path, table, wanted), None
    if suffix == ".txt" and len(wanted) == 1:
        return _rows_txt(path), None
    kinds = f".txt, {_TABLES}" if len(wanted) == 1 else _TABLES
    raise DataError(f"{path}: unknown file type {path.suffix!r}; use {kinds}")


def _read_rows(path: Path, text_col: str,
               label_col: str | None) -> tuple[list[tuple[str, Any, Any]], list[str] | None]:
    """Rows (where, text, label) of a user file, plus label names when the file itself
    declares them. Without a label column (a text-only read) every label is None and `.txt`
    files are accepted too."""
    rows, names = _read_columns(path, _wanted(text_col, label_col))
    return [(where, values[0], values[1] if label_col is not None else None)
            for where, values in rows], names


def _bad_text(path: Path, where: str, text_col: str, text: Any) -> DataError:
    what = "missing" if text is None else "empty" if isinstance(text, str) else \
        f"not a string ({type(text).__name__})"
    return DataError(f"{path} {where}: text column {text_col!r} is {what}")


def _check_rows(path: Path, rows: list[tuple[str, Any, Any]], text_col: str,
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


def load_user_pairs(path: str | os.PathLike[str], *, prompt_column: str = "prompt",
                    response_column: str = "response", category_column: str = "",
                    test_path: str | os.PathLike[str] | None = None,
                    test_fraction: float = 0.2, seed: int = 0) -> TaskData:
    """Prompt/response pairs for a causal-lm run, from the same files `load_user_data` reads.

    With `category_column`, each row's value there (any string or number) is its category:
    the sorted distinct values (as strings) become the label names, and partitioning can skew
    by them (dirichlet, pathological); the split is stratified by them. Without one, every
    row is in the single category "all". Problems raise `DataError` naming the file and the
    row or column (a missing column lists the columns present), like `load_user_data`.
    """
    wanted = [(prompt_column, "prompt"), (response_column, "response")]
    if category_column:
        wanted.append((category_column, "partition value"))
    files = [Path(path)] + ([Path(test_path)] if test_path is not None else [])
    parsed: list[tuple[list[str], list[str], list[str]]] = []
    for f in files:
        rows, _ = _read_columns(f, wanted)
        if not rows:
            raise DataError(f"{f}: no data rows")
        prompts, responses, categories = [], [], []
        for where, values in rows:
            for (col, role), value in zip(wanted[:2], values, strict=False):
                if not isinstance(value, str) or not value.strip():
                    what = "missing" if value is None else "empty" if isinstance(value, str) \
                        else f"not a string ({type(value).__name__})"
                    raise DataError(f"{f} {where}: {role} column {col!r} is {what}")
            category = values[2] if category_column else "all"
            if category is None or isinstance(category, bool | dict | list) or (
                    isinstance(category, float) and (math.isnan(category)
                                                     or not category.is_integer())):
                raise DataError(f"{f} {where}: partition column {category_column!r} is "
                                f"{'missing' if category is None else repr(category)}; it "
                                "needs a category (a string or an integer)")
            prompts.append(values[0])
            responses.append(values[1])
            categories.append(str(int(category)) if isinstance(category, float)
                              else str(category).strip())
        parsed.append((prompts, responses, categories))
    names = sorted({c for _, _, cats in parsed for c in cats})
    index = {c: i for i, c in enumerate(names)}
    encoded = [(p, r, [index[c] for c in cats]) for p, r, cats in parsed]
    if len(encoded) == 2:
        train, test = (_pairs(*triple) for triple in encoded)
    else:
        train, test = _split_pairs(*encoded[0], test_fraction, seed)
    return TaskData(Path(path).stem or str(path), train, test, names, kind="causal-lm")
