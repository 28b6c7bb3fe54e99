"""The evidence behind docs/results.md, run by one resumable script.

    python experiments/run.py                        # select rates, run every cell, report
    python experiments/run.py --only 'c3-*/*' --workers 1
    python experiments/run.py --commit               # git-commit each record as it lands
    python experiments/run.py --report               # only redraw docs/results.md

Each `experiments/<group>/<name>.toml` is a complete `fedtt run` config plus an optional
`[evidence]` table that this script reads and strips:

- `select`: the config (group/name) whose validation accuracy chooses this cell's learning
  rate (default: the cell itself). A cell that sets `training.lr` is not tuned.
- `seeds`: how many seeds to run (default `len(SEEDS)`).
- `grid`: the learning rates to try first (default `LR_GRID`).

A causal-LM cell (`data.kind`, or a built-in generative task such as sharegpt) is chosen and
reported by held-out loss (lower is better) instead of accuracy.

Protocol: every config holds out `data.val_fraction` of its training rows (seeded) as a
validation split. The rate is chosen from `LR_GRID` by the score of one run per rate with
`SELECT_SEED` (a seed no reported run uses); when the best rate sits at an edge of the grid,
the grid is extended by the next factor of two on that side (up to `MAX_EXTENSIONS` times).
The score of a run is the mean of its last two evaluations, validation accuracy for choosing
and test accuracy for reporting; the test split is never used to choose anything.

Every finished run leaves a record, `results/<group>/<name>/seed<S>.json` (selection runs:
`results/select/<group>/<name>/lr<rate>.json`); a record that exists is never run again, so
an interrupted invocation, or one on a fresh machine with no `runs/`, continues from what is
committed. Runs go to `runs/experiments/` (not committed); a run the interruption killed
part-way continues from its checkpoint there (`fedtt run --resume`, which equals an
uninterrupted run) when it is still there and of the same config, seed and rate.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
RESULTS = ROOT / "results"
RUNS = ROOT / "runs" / "experiments"
DOC = ROOT / "docs" / "results.md"
IMG = ROOT / "docs" / "img"
LR_GRID = (2e-3, 5e-3, 1e-2, 2e-2)
MAX_EXTENSIONS = 2
SELECT_SEED = 100
SEEDS = (0, 1, 2, 3)
KEEP = ("round", "accuracy", "loss", "macro_f1", "perplexity", "val_accuracy", "val_loss",
        "val_perplexity", "upload_bytes",
        "download_bytes", "cumulative_bytes", "upload_wire_bytes", "download_wire_bytes",
        "cumulative_wire_bytes", "clients", "epsilon", "train_loss", "aggregation_gap",
        "clients_out_of_budget", "clipped", "failed", "rejected", "seconds")


# --- configs -----------------------------------------------------------------------------------
def configs(only: list[str]) -> list[str]:
    """Names `group/name` of the experiment configs, optionally filtered by globs."""
    names = sorted(str(p.relative_to(EXPERIMENTS).with_suffix(""))
                   for p in EXPERIMENTS.glob("*/*.toml"))
    return [n for n in names if not only or any(fnmatch.fnmatch(n, g) for g in only)]


def load(name: str) -> dict:
    """A config as written, `[evidence]` table included."""
    return tomllib.loads((EXPERIMENTS / f"{name}.toml").read_text())


def evidence(name: str) -> dict:
    return load(name).get("evidence", {})


def selects(name: str) -> str | None:
    """The config whose selection runs choose `name`'s rate (None: the config sets its own)."""
    if load(name).get("training", {}).get("lr") is not None:
        return None
    return evidence(name).get("select", name)


def fedtt_toml(name: str) -> str:
    """The config without the `[evidence]` table (what `fedtt run --config` reads)."""
    from fedtt.config import toml_value

    lines = []
    for section, values in load(name).items():
        if section == "evidence":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def generative(config: dict) -> bool:
    """Whether a config (as written) is a causal-LM run."""
    from fedtt.config import RunConfig, apply, task_kind

    data = {k: v for k, v in config.get("data", {}).items()}
    return task_kind(apply(RunConfig(), {"data": data})) == "causal-lm"


def selection_score(rec: dict) -> float | None:
    """How a selection run ranks (higher is better): validation accuracy, or minus the
    validation loss for a causal-LM run."""
    if generative(rec["config"]):
        loss = score(rec["rounds"], "val_loss")
        return None if loss is None else -loss
    return score(rec["rounds"], "val_accuracy")


def score(rounds: list[dict], key: str) -> float | None:
    """Mean of the last two evaluations of `key` (None before any)."""
    values = [r[key] for r in rounds if r.get(key) is not None]
    return sum(values[-2:]) / len(values[-2:]) if values else None


# --- records -----------------------------------------------------------------------------------
def record_path(name: str, seed: int | None = None, lr: float | None = None) -> Path:
    if lr is not None:
        return RESULTS / "select" / name / f"lr{lr:g}.json"
    return RESULTS / name / f"seed{seed}.json"


def read_record(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def make_record(name: str, out: Path, seed: int, lr: float) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines() if x]
    return {"name": name, "seed": seed, "lr": lr, "config": load(name),
            "summary": {k: v for k, v in summary.items() if k != "versions"},
            "versions": summary.get("versions", {}),
            "rounds": [{k: r.get(k) for k in KEEP if k in r} for r in rows],
            "label_counts": json.loads((out / "label_counts.json").read_text())["counts"],
            "generations": _last_generations(out)}


def _last_generations(out: Path) -> list[dict]:
    """The greedy outputs of a causal-LM run's last evaluation (none for classification)."""
    path = out / "generations.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return json.loads(lines[-1])["generations"] if lines else []


def write_record(path: Path, data: dict, commit: bool) -> None:
    from fedtt.results import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1) + "\n")
    if commit:
        rel = path.relative_to(ROOT)
        for _ in range(5):  # another git command may hold the index for a moment
            subprocess.run(["git", "add", str(rel)], cwd=ROOT, capture_output=True)
            done = subprocess.run(["git", "commit", "-q", "-m", f"Evidence: {rel}", "--",
                                   str(rel)], cwd=ROOT, capture_output=True)
            if done.returncode == 0:
                break
            time.sleep(2)


# --- running -----------------------------------------------------------------------------------
class Job:
    """One `fedtt run` of a config with a seed and a rate, and where its record goes."""

    def __init__(self, name: str, seed: int, lr: float, record: Path) -> None:
        self.name, self.seed, self.lr, self.record = name, seed, lr, record
        tag = record.relative_to(RESULTS).with_suffix("")
        self.out = RUNS / tag

    def command(self, config: Path) -> list[str]:
        """A fresh run; or, when this job's own run was killed part-way (an interrupted
        invocation), its continuation from the checkpoint, which equals an uninterrupted run."""
        if self.resumable(config):
            return [sys.executable, "-m", "fedtt.cli", "run", "--quiet", "--resume",
                    str(self.out)]
        return [sys.executable, "-m", "fedtt.cli", "run", "--quiet", "--config", str(config),
                "--out", str(self.out), "--overwrite",
                *[arg for value in self.settings() for arg in ("--set", value)]]

    def settings(self) -> list[str]:
        """The job's `--set` values over its config."""
        return [f"training.seed={self.seed}", f"training.lr={self.lr}"]

    def resumable(self, config: Path) -> bool:
        """Whether `self.out` holds an unfinished run of exactly this config, seed and rate."""
        from fedtt.config import load_config
        from fedtt.federated import checkpoint
        from fedtt.results import CHECKPOINT, read_summary

        if not (self.out / CHECKPOINT).exists():
            return False
        out = {"output.dir": str(self.out)}
        try:
            summary = read_summary(self.out)
            if summary is not None and summary.get("status") == "completed":
                return False
            same = load_config(self.out / "config.toml", values=out) == load_config(
                config, self.settings(), out)
            return same and checkpoint.load(self.out)["clients"] is not None
        except (OSError, ValueError):  # a damaged run directory or checkpoint: start afresh
            return False


def run_jobs(jobs: list[Job], workers: int, commit: bool) -> list[str]:
    """Run the jobs without a record, `workers` at a time on one thread each; write each
    finished one's record; return the failures (their logs lie beside their run dirs)."""
    todo = [j for j in jobs if not j.record.exists()]
    failed: list[str] = []
    running: list[tuple[subprocess.Popen, Job, object]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    configs_dir = Path(tempfile.mkdtemp(prefix="fedtt-evidence-"))
    bar = tqdm(total=len(todo), desc="runs", unit="run")
    while todo or running:
        while todo and len(running) < workers:
            job = todo.pop(0)
            config = configs_dir / f"{job.name.replace('/', '__')}.toml"
            config.write_text(fedtt_toml(job.name))
            job.out.parent.mkdir(parents=True, exist_ok=True)
            log = open(job.out.parent / f"{job.out.name}.log", "w")
            running.append((subprocess.Popen(job.command(config), stdout=log,
                                             stderr=subprocess.STDOUT, env=env), job, log))
        time.sleep(1.0)
        for entry in list(running):
            proc, job, log = entry
            if proc.poll() is not None:
                running.remove(entry)
                log.close()
                bar.update(1)
                summary = job.out / "summary.json"
                if proc.returncode == 0 and summary.exists() and json.loads(
                        summary.read_text())["status"] == "completed":
                    write_record(job.record, make_record(job.name, job.out, job.seed, job.lr),
                                 commit)
                else:
                    failed.append(f"{job.name} seed {job.seed} lr {job.lr:g} "
                                  f"(exit {proc.returncode}, log {job.out}.log)")
                    tqdm.write(f"FAILED {failed[-1]}")
    bar.close()
    return failed


def select_rates(names: list[str], workers: int,
                 commit: bool) -> tuple[dict[str, float | None], list[str]]:
    """The rate of each config in `names` chosen on validation (None where its runs failed).
    The grids of all configs run together, so no worker idles between configs."""
    grids = {name: list(evidence(name).get("grid", LR_GRID)) for name in names}
    rates: dict[str, float | None] = {}
    failed: list[str] = []
    for attempt in range(MAX_EXTENSIONS + 1):
        failed += run_jobs([Job(name, SELECT_SEED, lr, record_path(name, lr=lr))
                            for name, grid in grids.items() for lr in grid], workers, commit)
        for name, grid in list(grids.items()):
            tied = best_rates(selection_scores(name))
            if tied and attempt < MAX_EXTENSIONS and (min(grid) in tied or max(grid) in tied):
                low = min(grid) in tied  # a best rate at an edge, tied or not: look beyond it
                grid[:] = [min(grid) / 2] + grid if low else grid + [max(grid) * 2]
                continue
            rates[name] = tied[0] if tied else None  # ties go to the smaller rate
            del grids[name]
        if not grids:
            break
    return rates, failed


def best_rates(scores: dict[float, float]) -> list[float]:
    """The rates with the best score, smallest first. Scores are compared to 6 decimals: two
    runs right on the same rows of a split differ only by float rounding, and that is a tie."""
    if not scores:
        return []
    top = max(round(v, 6) for v in scores.values())
    return sorted(lr for lr, v in scores.items() if round(v, 6) == top)


def selection_scores(name: str) -> dict[float, float]:
    """Validation score of every finished selection run of `name`, by rate."""
    out = {}
    for path in sorted((RESULTS / "select" / name).glob("lr*.json")):
        rec = read_record(path)
        value = selection_score(rec)
        if value is not None:
            out[rec["lr"]] = value
    return out


# --- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[],
                        help="glob over group/name, e.g. 'c3-*/*' (repeatable)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--commit", action="store_true",
                        help="git-commit each record as it is written")
    parser.add_argument("--report", action="store_true", help="only write docs/results.md")
    args = parser.parse_args(argv)
    failed: list[str] = []
    if not args.report:
        names = configs(args.only)
        if not names:
            parser.error(f"no experiment config matches {args.only}")
        # every cell's rate first, then seeds
        to_select = dict.fromkeys(s for s in map(selects, names) if s is not None)
        rates, failed = select_rates(list(to_select), args.workers, args.commit)
        jobs = []
        for i in range(len(SEEDS)):  # every cell's first seed before any cell's second
            for name in names:
                if i >= evidence(name).get("seeds", len(SEEDS)):
                    continue
                lr = load(name).get("training", {}).get("lr") or rates.get(
                    evidence(name).get("select", name))
                if lr is None:
                    failed.append(f"{name}: no rate (its selection runs failed)")
                    continue
                jobs.append(Job(name, SEEDS[i], lr, record_path(name, SEEDS[i])))
        failed += run_jobs(jobs, args.workers, args.commit)
        if failed:
            print("failed:\n  " + "\n  ".join(sorted(set(failed))), file=sys.stderr)
    sys.path.insert(0, str(EXPERIMENTS))
    from report import write_report

    write_report(RESULTS, DOC, IMG)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
