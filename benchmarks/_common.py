"""Helpers shared by the benchmarks: run one in-process federation in a fresh child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
