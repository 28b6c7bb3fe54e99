"""Benchmark: the README's main job, `fedtt run` with the default config, timed as a user runs it.

Runs `fedtt run --quiet --out DIR` in a fresh process under `/usr/bin/time -v` (wall clock and
peak RSS from the kernel), then records them with the run's summary and its test accuracy
after each round. Goals: under 10 minutes on 2 cores, printing the final accuracy and MB sent
beside LoRA's (issues 4 and 16); learning steadily on its IID split (issue 16).

Writes benchmarks/results/default_run.json.  Run: python benchmarks/default_run.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "default_run.json"))
    args = parser.parse_args()
    timer = shutil.which("time") or "/usr/bin/time"
    fedtt = str(Path(sys.executable).with_name("fedtt"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               FLWR_TELEMETRY_ENABLED="0")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        proc = subprocess.run([timer, "-v", fedtt, "run", "--quiet", "--out", str(run_dir)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        summary = json.loads((run_dir / "summary.json").read_text())
        rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()
                  if line]
    curve = [round(r["accuracy"], 3) for r in rounds if r.get("accuracy") is not None]
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", proc.stderr).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    printed = proc.stdout.strip().splitlines()[-1]
    result = {"benchmark": "default_run", "command": "/usr/bin/time -v fedtt run",
              "wall_clock": wall, "peak_rss_kb": rss, "cpus": os.cpu_count(),
              "printed": printed, "accuracy_by_round": curve, "summary": summary}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"fedtt run: {wall} wall, peak RSS {rss / 1e6:.2f} GB; it printed: {printed}")


if __name__ == "__main__":
    main()
