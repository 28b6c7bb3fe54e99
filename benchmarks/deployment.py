"""Benchmark: fedtt on Flower's Deployment Engine (127.0.0.1) against the in-process runtime.

For each case (model, isolation) it runs a SuperLink and 2 SuperNodes through
`fedtt.federated.deploy.LocalDeployment` and reports: wall time of the run, seconds per round,
how many times a process built the model (`warm`: SuperNodes with `--isolation process` and
one fedtt ClientApp worker each; `cold`: Flower's default `--isolation subprocess`, a fresh
`flwr-clientapp` process per message), Flower's traffic figures against the byte ledger, and
whether the metrics equal an in-process run of the same config (`Runtime.train_client` seeds
dropout per client and round, so they should, MiniLM included). Workload: FedTT, synthetic
task (96 train / 64 test rows), iid, 2 clients, 4 local steps of batch 8, 3 rounds,
`training.threads = 1` in every process.

Writes benchmarks/results/deployment.json.
Run: python benchmarks/deployment.py [--cases tiny:warm,tiny:cold,minilm:warm] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import run_child

from fedtt.config import load_config
from fedtt.federated.deploy import (
    LocalDeployment,
    fedtt_run_config,
    read_build_log,
    traffic_report,
    write_app_dir,
)
from fedtt.results import read_rounds

MODELS = {"tiny": "arch:tiny-llama", "minilm": "minilm"}
COMPARED = ["accuracy", "loss", "upload_bytes", "download_bytes", "train_loss"]


def settings(model: str, rounds: int, out: str) -> dict:
    return {"model.name": MODELS[model], "model.max_length": 32, "data.task": "synthetic",
            "data.partition": "iid", "data.max_train_examples": 96,
            "data.max_test_examples": 64, "federation.num_clients": 2,
            "federation.rounds": rounds, "training.local_steps": 4, "training.batch_size": 8,
            "training.lr": 0.01, "training.threads": 1, "output.plots": False,
            "output.dir": out}


def run_case(model: str, isolation: str, rounds: int, tmp: Path) -> dict:
    sets = settings(model, rounds, str(tmp / f"{model}-{isolation}"))
    cfg = load_config(None, values=sets)
    builds = tmp / f"{model}-{isolation}-builds.jsonl"
    app = write_app_dir(tmp / f"{model}-{isolation}-app", fedtt_run_config(cfg))
    start = time.perf_counter()
    with LocalDeployment(tmp / f"{model}-{isolation}-deploy", 2,
                         warm=isolation == "warm", build_log=builds) as dep:
        up = time.perf_counter() - start
        result = dep.run(app, timeout=600)
        workers = [p.pid for p in dep.processes if p.name.startswith("clientapp")]
    total = time.perf_counter() - start
    rounds_rows = read_rounds(cfg.output.dir)
    built = read_build_log(builds)
    ref = run_child({**sets, "output.dir": str(tmp / f"{model}-{isolation}-inprocess")})
    pairs = list(zip(rounds_rows, ref["rounds"], strict=True))
    diff = {k: max(abs((a.get(k) or 0) - (b.get(k) or 0)) for a, b in pairs) for k in COMPARED}
    return {
        "model": MODELS[model], "isolation": isolation, "rounds": rounds,
        "status": result.status, "startup_s": up, "run_s": result.seconds, "total_s": total,
        "round_s": [r["seconds"] for r in rounds_rows if r["round"] > 0],
        "client_train_s": [r["client_train_seconds"] for r in rounds_rows if r["round"] > 0],
        "model_builds": len(built), "build_processes": len({b["pid"] for b in built}),
        "build_s": [round(b["seconds"], 3) for b in built],
        "clientapp_worker_pids": workers,
        "flower_compute_time": result.listing.get("compute-time", {}),
        "traffic": traffic_report(cfg.output.dir, result),
        "inprocess_wall_s": ref["wall_s"],
        "inprocess_round_s": [r["seconds"] for r in ref["rounds"] if r["round"] > 0],
        "round_ratio_vs_inprocess": statistics.median(
            r["seconds"] for r in rounds_rows if r["round"] > 0) / statistics.median(
            r["seconds"] for r in ref["rounds"] if r["round"] > 0),
        "metrics_equal_inprocess": not any(diff.values()),
        "max_abs_diff_vs_inprocess": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="tiny:warm,tiny:cold,minilm:warm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out",
                        default=str(Path(__file__).parent / "results" / "deployment.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = {"benchmark": "deployment", "cpu_count": os.cpu_count(),
              "goal": "warm round time <= 1.5x in-process", "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            model, isolation = case.split(":")
            res = run_case(model, isolation, args.rounds, Path(tmp))
            report["cases"].append(res)
            t = res["traffic"]
            print(f"{model:>6} {isolation:<4} run {res['run_s']:6.1f} s, rounds "
                  f"{[round(s, 1) for s in res['round_s']]} s, {res['model_builds']} model "
                  f"builds in {res['build_processes']} processes, Flower "
                  f"{t['flower']['total_bytes']} B / ledger wire "
                  f"{t['ledger']['total_wire_bytes']} B "
                  f"= x{t['overhead_ratio']:.2f}, round time "
                  f"{res['round_ratio_vs_inprocess']:.1f}x in-process (goal <= 1.5), "
                  "equal to in-process: "
                  f"{res['metrics_equal_inprocess']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
