"""Helpers shared by the benchmarks: run one in-process federation in a fresh child process;
time training steps (interleaved on CPU, synchronised on CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

CHILD = r"""
import json, resource, sys, time
from fedtt.config import load_config
from fedtt.federated.inprocess import run_inprocess
from fedtt.results import read_rounds
sets = json.loads(sys.argv[1])
cfg = load_config(None, values=sets)
start = time.perf_counter()
summary = run_inprocess(cfg, quiet=True)
rounds = read_rounds(cfg.output.dir)
print(json.dumps({"wall_s": time.perf_counter() - start, "summary": summary, "rounds": rounds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(sets: dict) -> dict:
    """Run a federation with these `section.key` settings in a new Python process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               FLWR_TELEMETRY_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sets)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved_times(steppers: dict[str, Callable[[], object]], steps: int,
                      warmup: int) -> dict[str, list[float]]:
    """Seconds of each stepper's steps after `warmup`, one step of each in turn, so a slow
    spell of the machine falls on every method alike."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for i in range(warmup + steps):
        for name, step in steppers.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def cuda_times(step: Callable[[], object], steps: int, warmup: int) -> list[float]:
    """Seconds of each step after `warmup`, the GPU synchronised around each."""
    import torch

    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times
