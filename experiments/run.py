"""Run every experiment config under experiments/ and write results/<name>.json and docs/results.md.

    python experiments/run.py                      # tune, run everything, write the report
    python experiments/run.py --only 'cross-silo/movie-reviews-*' --seeds 0
    python experiments/run.py --report             # only redraw docs/results.md from results/

Each `experiments/<group>/<name>.toml` is a complete `fedtt run` config; this script runs it
once per seed (`fedtt run --config FILE --set training.seed=S`) into
`runs/experiments/<group>/<name>/seed<S>/`. A finished seed is never run twice, so a killed
invocation continues where it stopped. A config that sets no `training.lr` gets its method's
rate from a small grid (`LR_GRID`) tuned first on `TUNE_CONFIG` with a seed outside the grid.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import subprocess
import sys
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
LR_GRID = (2e-3, 5e-3, 1e-2)
TUNE_SEED = 100
TUNE_CONFIG = "cross-silo/movie-reviews-{method}-iid"
SEEDS = (0, 1, 2)
GROUP_ORDER = ("cross-silo", "cross-device", "decoder", "heterogeneity", "precision",
               "privacy", "ablation")


# --- configs and jobs ------------------------------------------------------------------------
def configs(only: list[str]) -> list[str]:
    """Names `group/name` of the experiment configs, optionally filtered by globs."""
    names = sorted(str(p.relative_to(EXPERIMENTS).with_suffix(""))
                   for p in EXPERIMENTS.glob("*/*.toml"))
    if only:
        names = [n for n in names if any(fnmatch.fnmatch(n, g) for g in only)]
    return sorted(names, key=lambda n: (_group_rank(n), n))


def _group_rank(name: str) -> int:
    group = name.split("/")[0]
    return GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)


def load(name: str) -> dict:
    return tomllib.loads((EXPERIMENTS / f"{name}.toml").read_text())


def run_dir(name: str, seed: int, tag: str = "") -> Path:
    return RUNS / f"{name}{tag}" / f"seed{seed}"


def finished(out: Path) -> bool:
    path = out / "summary.json"
    return path.exists() and json.loads(path.read_text()).get("status") == "completed"


def run_jobs(jobs: list[tuple[str, Path, list[str]]], workers: int) -> list[str]:
    """Run `fedtt run` jobs (config name, output dir, overrides), `workers` at a time, each
    on one thread; returns the names of failed jobs (their log is next to their run dir)."""
    todo = [j for j in jobs if not finished(j[1])]
    failed: list[str] = []
    running: list[tuple[subprocess.Popen, tuple, object]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    bar = tqdm(total=len(todo), desc="runs", unit="run")
    while todo or running:
        while todo and len(running) < workers:
            name, out, sets = job = todo.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = open(out.parent / f"{out.name}.log", "w")
            cmd = [sys.executable, "-m", "fedtt.cli", "run", "--quiet", "--config",
                   str(EXPERIMENTS / f"{name}.toml"), "--out", str(out)]
            for s in sets:
                cmd += ["--set", s]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env=env), job, log))
        time.sleep(1.0)
        for entry in list(running):
            proc, job, log = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            log.close()
            bar.update(1)
            if proc.returncode != 0 or not finished(job[1]):
                failed.append(f"{job[0]} ({job[1].name}, exit {proc.returncode})")
                tqdm.write(f"FAILED {job[0]} {job[1].name}: see {job[1]}.log")
    bar.close()
    return failed


# --- learning-rate tuning ----------------------------------------------------------------------
def tune(methods: list[str], workers: int) -> tuple[dict[str, float], list[str]]:
    """Pick each method's rate from LR_GRID by final accuracy on TUNE_CONFIG, seed TUNE_SEED."""
    jobs = []
    for method in methods:
        name = TUNE_CONFIG.format(method=method.replace("+", "plus"))
        for lr in LR_GRID:
            jobs.append((name, run_dir(name, TUNE_SEED, f"-lr{lr:g}"),
                         [f"training.seed={TUNE_SEED}", f"training.lr={lr}"]))
    failed = run_jobs(jobs, workers)
    table: dict[str, dict[str, float]] = {}
    for (_, out, _), method in zip(jobs, [m for m in methods for _ in LR_GRID], strict=True):
        if finished(out):
            acc = json.loads((out / "summary.json").read_text())["final_accuracy"]
            table.setdefault(method, {})[out.parent.name.rsplit("-lr", 1)[1]] = acc
    chosen = {m: float(max(accs, key=accs.get)) for m, accs in table.items()}
    RESULTS.mkdir(exist_ok=True)
    _write(RESULTS / "lr-tuning.json", {
        "config": TUNE_CONFIG, "seed": TUNE_SEED, "grid": list(LR_GRID),
        "final_accuracy": table, "chosen": chosen})
    return chosen, failed


# --- collecting --------------------------------------------------------------------------------
def collect(name: str, seeds: list[int], lr: float | None) -> dict | None:
    """results/<name>.json from the finished seeds of one config (None if none finished)."""
    runs = []
    for seed in seeds:
        out = run_dir(name, seed)
        if not finished(out):
            continue
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines() if x]
        keep = ("round", "accuracy", "macro_f1", "loss", "upload_bytes", "download_bytes",
                "cumulative_bytes", "clients", "epsilon", "seconds")
        runs.append({"seed": seed, "summary": {k: v for k, v in summary.items()
                                              if k != "versions"},
                     "versions": summary.get("versions", {}),
                     "rounds": [{k: r.get(k) for k in keep} for r in rows],
                     "upload_breakdown": _breakdown(out),
                     "client_upload_bytes": _client_uploads(out),
                     # training rows per client and label (the partition depends on the seed)
                     "client_label_counts": json.loads(
                         (out / "label_counts.json").read_text())["counts"]})
    if not runs:
        return None
    cfg = load(name)
    finals = [r["summary"]["final_accuracy"] for r in runs]
    counts = json.loads((run_dir(name, runs[0]["seed"]) / "label_counts.json").read_text())
    per_label = [sum(col) for col in zip(*counts["counts"], strict=True)]
    per_client = [statistics.mean(r["upload_bytes"] / max(len(r["clients"]), 1)
                                  for r in run["rounds"] if r["round"] > 0 and r["clients"])
                  for run in runs]
    result = {
        "name": name, "group": name.split("/")[0], "config": cfg,
        "lr": lr if lr is not None else cfg.get("training", {}).get("lr"),
        "method": cfg.get("method", {}).get("name", "fedtt"),
        "seeds": [r["seed"] for r in runs],
        "final_accuracy_mean": statistics.mean(finals),
        "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "final_macro_f1_mean": statistics.mean(r["summary"]["final_macro_f1"] for r in runs),
        "upload_bytes_per_client_round": statistics.mean(per_client),
        "total_bytes_mean": statistics.mean(r["summary"]["total_bytes"] for r in runs),
        "wall_seconds_mean": statistics.mean(r["summary"]["wall_seconds"] for r in runs),
        "majority_share": max(per_label) / sum(per_label),  # of the training labels
        "runs": runs,
    }
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, result)
    return result


def _breakdown(out: Path) -> dict[str, int]:
    """Upload bytes of the first client in round 1, by kind of tensor."""
    first: dict[str, int] = {}
    client = None
    for line in (out / "ledger.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["round"] != 1 or row["direction"] != "up" or not row.get("sent", True):
            continue
        client = row["client"] if client is None else client
        if row["client"] == client:
            kind = _kind(row["name"])
            first[kind] = first.get(kind, 0) + row["bytes"]
    return first


def _client_uploads(out: Path) -> dict[str, float]:
    """Mean upload bytes per round of each client (by partition id)."""
    totals: dict[str, float] = {}
    rounds: dict[str, set] = {}
    for line in (out / "ledger.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["direction"] == "up" and row["client"] is not None:
            key = str(row["client"])
            totals[key] = totals.get(key, 0) + row["bytes"]
            rounds.setdefault(key, set()).add(row["round"])
    return {k: totals[k] / len(rounds[k]) for k in sorted(totals, key=int)}


def _kind(name: str) -> str:
    if "lora_" in name:
        return "LoRA factors"
    if "core_" in name:
        return "TT cores"
    if "tt_" in name and "bias" in name:
        return "adapter biases"
    if "norm" in name.lower():
        return "norms"
    return "head"


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# --- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[],
                        help="glob over group/name, e.g. 'cross-silo/*' (repeatable)")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--report", action="store_true", help="only write docs/results.md")
    args = parser.parse_args(argv)
    if not args.report:
        seeds = [int(s) for s in args.seeds.split(",")]
        names = configs(args.only)
        if not names:
            parser.error(f"no experiment config matches {args.only}")
        started = time.time()
        # Tune for every method any config leaves untuned (finished runs are not redone),
        # so that lr-tuning.json always covers them all.
        untuned = sorted({load(n).get("method", {}).get("name", "fedtt") for n in configs([])
                          if "lr" not in load(n).get("training", {})})
        chosen, failed = tune(untuned, args.workers) if untuned else ({}, [])
        jobs = []
        for seed in seeds:  # every config's first seed before any config's second
            for name in names:
                method = load(name).get("method", {}).get("name", "fedtt")
                sets = [f"training.seed={seed}"]
                if "lr" not in load(name).get("training", {}):
                    if method not in chosen:
                        failed.append(f"{name}: no tuned learning rate for {method}")
                        continue
                    sets.append(f"training.lr={chosen[method]}")
                jobs.append((name, run_dir(name, seed), sets))
        failed += run_jobs(jobs, args.workers)
        _log_session(started, len(jobs), args.workers, args.only)
        if failed:
            print("failed:\n  " + "\n  ".join(failed), file=sys.stderr)
    collect_all(list(SEEDS))  # every finished seed, whichever invocation ran it
    sys.path.insert(0, str(EXPERIMENTS))
    from report import write_report

    write_report(RESULTS, DOC, IMG)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0 if args.report or not failed else 1


def collect_all(seeds: list[int]) -> None:
    """results/<name>.json for every config with finished runs under runs/experiments."""
    tuning = RESULTS / "lr-tuning.json"
    chosen = json.loads(tuning.read_text())["chosen"] if tuning.exists() else {}
    for name in configs([]):
        cfg = load(name)
        tuned = None if "lr" in cfg.get("training", {}) else chosen.get(
            cfg.get("method", {}).get("name", "fedtt"))
        collect(name, seeds, tuned)


def _log_session(started: float, jobs: int, workers: int, only: list[str]) -> None:
    path = RESULTS / "sessions.json"
    sessions = json.loads(path.read_text())["sessions"] if path.exists() else []
    sessions.append({"started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
                     "elapsed_seconds": round(time.time() - started, 1), "jobs_planned": jobs,
                     "workers": workers, "only": only, "cpus": os.cpu_count()})
    _write(path, {"sessions": sessions})


if __name__ == "__main__":
    sys.exit(main())
