"""Issue 15, hardening: nothing a user already has is overwritten, every user error is one
line (`fedtt: error: ...`, exit 2) while a bug keeps its traceback, a resume checks the whole
checkpoint before it touches a file, no setting is unbounded, and a label column of one class
is refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import faulty_app, tiny
from safetensors import safe_open
from safetensors.torch import save_file

from fedtt import cli
from fedtt.cli import main
from fedtt.config import ConfigError, load_config, to_toml
from fedtt.data import DataError, load_user_data
from fedtt.export import export_run
from fedtt.federated import checkpoint
from fedtt.federated.inprocess import run_inprocess
from fedtt.federated.safeguards import RoundFailed
from fedtt.results import Recorder


def files(run_dir):
    """Every file under `run_dir` with its bytes."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(Path(run_dir).rglob("*"))
            if p.is_file()}


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("fedtt: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed tiny run."""
    cfg = tiny(tmp_path_factory.mktemp("finished"), **{"federation.rounds": 2})
    run_inprocess(cfg, quiet=True)
    return Path(cfg.output.dir)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A FedTT+ run stopped in round 2 (too few replies): summary.json says "stopped", the
    checkpoint is of round 1; `fedtt run --resume` may continue it."""
    cfg = tiny(tmp_path_factory.mktemp("stopped"),
               **{"method.name": "fedtt+", "fedtt.policy": "adaptive",
                  "federation.rounds": 3, "federation.min_replies": 3,
                  "federation.round_retries": 0})
    with pytest.raises(RoundFailed):
        run_inprocess(cfg, quiet=True, client_app=faulty_app("raise", from_round=2))
    return Path(cfg.output.dir)


@pytest.fixture
def tiny_toml(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(tiny(tmp_path)))
    return path


# --- 5. --out never replaces what is there ---------------------------------------------------

def _user_dir(tmp_path, finished, stopped):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    return tmp_path / "mine"


def _a_file(tmp_path, finished, stopped):
    (tmp_path / "file").write_text("keep me")
    return tmp_path / "file"


OUT_CASES = {
    "a finished run": (lambda tmp, f, s: f, ["not empty", "--overwrite"]),
    "a stopped run": (lambda tmp, f, s: s, ["not empty", "--resume {out}", "--overwrite"]),
    "a user's files": (_user_dir, ["not empty", "--overwrite"]),
    "a file": (_a_file, ["is a file"]),
}


@pytest.mark.parametrize("command", ["run", "deploy"])
@pytest.mark.parametrize("case", list(OUT_CASES))
def test_out_refuses_anything_already_there(tmp_path, capsys, finished, stopped, tiny_toml,
                                           case, command):
    make, needles = OUT_CASES[case]
    out = make(tmp_path, finished, stopped)
    before = files(out) if out.is_dir() else out.read_bytes()
    assert main([command, "--config", str(tiny_toml), "--out", str(out)]) == 2
    one_error_line(capsys, str(out), *(n.format(out=out) for n in needles))
    assert (files(out) if out.is_dir() else out.read_bytes()) == before


def test_overwrite_replaces_the_old_run_and_keeps_other_files(tmp_path, finished, tiny_toml):
    out = tmp_path / "again"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("keep me")
    old = json.loads((out / "summary.json").read_text())
    assert main(["run", "--quiet", "--config", str(tiny_toml), "--out", str(out),
                 "--set", "federation.rounds=1", "--overwrite"]) == 0
    new = json.loads((out / "summary.json").read_text())
    assert (old["rounds"], new["rounds"]) == (2, 1)
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", ['quote"d', "back\\slash", "both\"\\n"])
def test_out_is_taken_as_a_path_never_as_toml(tmp_path, tiny_toml, name):
    out = tmp_path / name
    assert main(["run", "--quiet", "--config", str(tiny_toml), "--out", str(out),
                 "--set", "federation.rounds=1"]) == 0
    assert (out / "summary.json").exists()
    assert load_config(out / "config.toml").output.dir == str(out)


# --- 6. a resume checks the whole checkpoint before it touches anything ---------------------

def _meta(change):
    def tamper(meta, tensors):
        change(meta)
        return meta, tensors
    return tamper


def _tensors(change):
    def tamper(meta, tensors):
        change(tensors)
        return meta, tensors
    return tamper


def _first_global(tensors):
    return next(k for k in tensors if k.startswith("global/"))


def _set_first_global(value):
    return _tensors(lambda t: t.update({_first_global(t): value(t[_first_global(t)])}))


def _policy(meta):
    return meta["method"]["policy"]


TAMPERING = {
    # (how the checkpoint is changed, what the refusal says)
    "round a string": (_meta(lambda m: m.update(round="two")), "round must be an integer"),
    "round negative": (_meta(lambda m: m.update(round=-7)), "in [0, 3], got -7"),
    "round past the run": (_meta(lambda m: m.update(round=999)), "in [0, 3], got 999"),
    "round a float": (_meta(lambda m: m.update(round=2.5)), "got 2.5"),
    "round not recorded": (_meta(lambda m: m.update(round=3)), "does not record round 2"),
    "round true": (_meta(lambda m: m.update(round=True)), "got True"),
    "no rng": (_meta(lambda m: m.pop("rng")), "lacks rng"),
    "rng garbage": (_meta(lambda m: m.update(rng=[3, [1, 2], None])), "rng is not"),
    "version of a newer round": (_meta(lambda m: m["version"].update(
        dict.fromkeys(m["version"], 7))), "must be an integer in [0, 1], got 7"),
    "held of a newer round": (_meta(lambda m: m["held"].update({"2": 5})), "held[2]"),
    "held key not a node": (_meta(lambda m: m["held"].update({"x": 0})), "'x'"),
    "client out of range": (_meta(lambda m: m["node_client"].update({"2": 7})),
                            "node_client[2]"),
    "client rank zero": (_meta(lambda m: m["client_rank"].update({"2": 0})), "client_rank[2]"),
    "epsilon NaN": (_meta(lambda m: m["epsilon"].update({"0": float("nan")})), "epsilon[0]"),
    "unknown engine": (_meta(lambda m: m.update(engine="cloud")), "engine"),
    "method state lost": (_meta(lambda m: m.update(method={})), "fedtt+ can load"),
    "method state NaN": (_meta(lambda m: _policy(m)["rel_update"].update(
        dict.fromkeys(_policy(m)["rel_update"], float("nan")))), "finite"),
    "NaN tensor": (_set_first_global(lambda t: torch.full_like(t, float("nan"))), "NaN"),
    "infinite tensor": (_set_first_global(lambda t: torch.full_like(t, float("inf"))), "NaN"),
    "integer tensor": (_set_first_global(lambda t: t.to(torch.int64)), "not floating"),
    "wrong shape": (_set_first_global(lambda t: t.unsqueeze(0)),
                    "does not fit the global"),
    "global tensor missing": (_tensors(lambda t: t.pop(_first_global(t))), "version must name"),
    "unknown tensor": (_tensors(lambda t: t.update({"bogus": torch.zeros(1)})), "bogus"),
}


def write_checkpoint(run_dir, tamper):
    path = Path(run_dir) / checkpoint.CHECKPOINT
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["fedtt"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    meta, tensors = tamper(meta, tensors)
    save_file(tensors, str(path), metadata={"fedtt": json.dumps(meta)})


def resume_is_refused(run_dir, capsys, needle):
    before = files(run_dir)
    assert {"rounds.jsonl", "ledger.jsonl", "summary.json"} <= {str(p) for p in before}
    assert main(["run", "--quiet", "--resume", str(run_dir)]) == 2
    one_error_line(capsys, "cannot be resumed from", needle)
    assert files(run_dir) == before  # history, summary, checkpoint: byte for byte


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_checkpoint_is_refused_before_anything_changes(tmp_path, capsys, stopped,
                                                                case):
    run_dir = shutil.copytree(stopped, tmp_path / "run")
    tamper, needle = TAMPERING[case]
    write_checkpoint(run_dir, tamper)
    resume_is_refused(run_dir, capsys, needle)


BROKEN_FILES = {
    "empty": (lambda raw: b"", "not a readable safetensors file"),
    "truncated": (lambda raw: raw[:len(raw) // 2], "not a readable safetensors file"),
    "no metadata": (None, "no fedtt metadata"),
    "metadata not JSON": ("{round: 1", "not JSON"),
    "metadata a list": ("[1, 2]", "no fedtt metadata"),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_broken_checkpoint_file_is_refused_before_anything_changes(tmp_path, capsys, stopped,
                                                                   case):
    run_dir = shutil.copytree(stopped, tmp_path / "run")
    path = run_dir / checkpoint.CHECKPOINT
    change, needle = BROKEN_FILES[case]
    if callable(change):
        path.write_bytes(change(path.read_bytes()))
    else:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        save_file(tensors, str(path), metadata=None if change is None else {"fedtt": change})
    resume_is_refused(run_dir, capsys, needle)


def test_the_untampered_stopped_run_resumes(tmp_path, stopped):
    run_dir = shutil.copytree(stopped, tmp_path / "run")
    assert main(["run", "--quiet", "--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_the_server_app_refuses_too_and_so_does_the_recorder(tmp_path, stopped):
    run_dir = shutil.copytree(stopped, tmp_path / "run")
    write_checkpoint(run_dir, _meta(lambda m: m.update(round=999)))
    before = files(run_dir)
    cfg = load_config(run_dir / "config.toml", values={"output.dir": str(run_dir)})
    with pytest.raises(checkpoint.CheckpointError, match="got 999"):
        run_inprocess(cfg, quiet=True, resume=True)
    with pytest.raises(ValueError, match="cannot continue after round 999"):
        Recorder(run_dir, to_toml(cfg), resume_round=999)
    assert files(run_dir) == before


def test_travelling_tensors_must_match_the_run(stopped):
    resumed = checkpoint.load(stopped)
    saved = resumed["strategy"]["global"]
    first = next(iter(saved))
    flags = {"restores_clients": True, "private": False, "local_only": False}
    checkpoint.check_resumable(resumed, **flags, travelling=saved)
    for travelling, needle in [
        ({**saved, "extra.weight": torch.zeros(2)}, "missing ['extra.weight']"),
        ({n: t for n, t in saved.items() if n != first}, "unknown"),
        ({**saved, first: torch.zeros(3, 3)}, "[3, 3]"),
        ({**saved, first: saved[first].double()}, "torch.float64"),
    ]:
        with pytest.raises(checkpoint.CheckpointError, match=needle.replace("[", r"\[")):
            checkpoint.check_resumable(resumed, **flags, travelling=travelling)


# --- 8. bounded settings, one-line errors, tracebacks for bugs --------------------------------

BOUNDS = [
    ("training.threads=-1", "training.threads must be >= 0"),
    ("training.eval_batch_size=0", "training.eval_batch_size must be >= 1"),
    ("training.weight_decay=-0.1", "training.weight_decay must be >= 0"),
    ("training.seed=-1", "training.seed must be >= 0"),
    ("training.lr=nan", "training.lr must be a finite number"),
    ("federation.timeout=inf", "federation.timeout must be a finite number"),
    ("data.max_train_examples=-1", "data.max_train_examples must be >= 0"),
    ("data.max_test_examples=-5", "data.max_test_examples must be >= 0"),
    ("data.classes_per_client=0", "data.classes_per_client must be >= 1"),
    ("adapter.bottleneck=10000000", "adapter.bottleneck must be >= 1 and <= 4096"),
    ("adapter.rank=100000", "adapter.rank must be >= 1 and <= 1024"),
    ("lora.rank=100000000", "lora.rank must be >= 1 and <= 4096"),
    ("model.max_length=100000000", "model.max_length must be >= 2 and <= 32768"),
    ("privacy.delta=2", "privacy.delta must be > 0 and < 1"),
    ('adapter.targets=["ok$", "(unclosed"]', "adapter.targets[1] is not a valid regex"),
    ('method.name="fedtt+"\nfedtt.policy="sometimes"', "fedtt.policy must be fixed, round-robin"),
    ('method.name="fedtt++"', "method.name must be one of fedtt, fedtt+, lora, ffa-lora"),
]


@pytest.mark.parametrize("sets, message", BOUNDS)
def test_settings_out_of_bounds_name_the_key(sets, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("+", r"\+")):
        load_config(None, sets.split("\n"))


@pytest.mark.parametrize("sets, message", BOUNDS)
def test_settings_out_of_bounds_are_one_line_from_the_cli(tmp_path, capsys, sets, message):
    args = ["run", "--quiet", "--out", str(tmp_path / "run")]
    for s in sets.split("\n"):
        args += ["--set", s]
    assert main(args) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "run").exists()


def test_one_line_errors_for_paths_and_arguments(tmp_path, capsys, finished):
    (tmp_path / "file").write_text("keep me")
    cases = [
        (["run", "--config", str(tmp_path)], "is a directory"),
        (["plan", "--num-labels", "0"], "--num-labels must be >= 2"),
        (["plan", "--methods", "fedtt,fedtt++"], "unknown fedtt++"),
        (["plan", "--model", "arch:bogus"], "unknown architecture preset 'arch:bogus'"),
        (["export", str(finished), "--out", str(tmp_path / "file")], "is a file"),
        (["report", str(finished), "--plots", str(tmp_path / "file")], "is a file"),
        (["run", "--resume", str(finished), "--overwrite"], "leave out"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("fedtt: error: ") and needle in err, args
    assert (tmp_path / "file").read_text() == "keep me"


MANIFESTS = {
    "not JSON": (lambda m: "{", "not valid JSON"),
    "not an object": (lambda m: "[]", "not a JSON object"),
    "no label names": (lambda m: {k: v for k, v in m.items() if k != "label_names"},
                       "label_names is missing"),
    "one label": (lambda m: {**m, "label_names": ["only"]}, "two or more"),
    "unknown format": (lambda m: {**m, "format": "zip"}, "format must be"),
    "max_length text": (lambda m: {**m, "max_length": "64"}, "max_length"),
    "config not TOML": (lambda m: {**m, "config": "[model"}, "not valid TOML"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, finished):
    return export_run(finished, tmp_path_factory.mktemp("export") / "model")


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_a_corrupt_export_manifest_is_one_line(tmp_path, capsys, exported, case):
    model = shutil.copytree(exported, tmp_path / "model")
    path = model / "fedtt_export.json"
    change, needle = MANIFESTS[case]
    new = change(json.loads(path.read_text()))
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    assert main(["predict", str(model), "a text"]) == 2
    one_error_line(capsys, needle)


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ValueError("a bug, not the user's mistake")

    monkeypatch.setattr(cli, "cmd_config", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["config"])


# --- 9. a label column of a single class ------------------------------------------------------

SINGLE_CLASS = {
    "d.csv": ("text,label\nnice film,pos\ngreat,pos\nsuperb,pos\n", "'pos'"),
    "d.jsonl": ("".join(json.dumps({"text": f"t{i}", "label": 1}) + "\n" for i in range(5)),
                "'1'"),
    "d.tsv": ("text\tlabel\na\t 3\nb\t3\nc\t3\n", "'3'"),
}


@pytest.mark.parametrize("name", list(SINGLE_CLASS))
def test_a_single_class_label_column_is_refused(tmp_path, capsys, name):
    content, found = SINGLE_CLASS[name]
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=f"label column 'label' holds a single class, {found}"):
        load_user_data(path)
    args = ["run", "--quiet", "--out", str(tmp_path / "run"),
            "--set", f"data.task={json.dumps(str(path))}", "--set", 'model.name="arch:tiny-llama"']
    assert main(args) == 2
    one_error_line(capsys, str(path), "single class", found)


def test_a_single_class_training_file_is_refused_whatever_the_test_file(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,x\n")
    (tmp_path / "test.csv").write_text("text,label\nc,x\nd,y\n")
    with pytest.raises(DataError, match="train.csv: label column 'label' holds a single class"):
        load_user_data(tmp_path / "train.csv", test_path=tmp_path / "test.csv")
