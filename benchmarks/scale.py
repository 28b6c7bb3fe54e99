"""Benchmark: peak memory of cross-device runs as the number of clients M grows.

The same tiny model, the same data (4,000 synthetic rows) and the same work per round (10
clients sampled, 3 rounds), split across M = 10, 100 and 1,000 clients. Each run is a fresh
process; its peak RSS is read from the kernel. Goal: the 1,000-client run stays within a small
constant of the 10-client run (clients are stateless; the model exists once).

Writes benchmarks/results/scale.json.  Run: python benchmarks/scale.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _common import run_child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in (10, 100, 1000):
            peaks, walls = [], []
            for r in range(args.repeats):
                res = run_child({
                    "model.name": "arch:tiny-llama", "model.max_length": 16,
                    "data.task": "synthetic", "data.partition": "iid",
                    "data.max_train_examples": 4000, "data.max_test_examples": 64,
                    "federation.mode": "cross-device", "federation.num_clients": m,
                    "federation.clients_per_round": 10, "federation.rounds": 3,
                    "training.local_steps": 2, "training.batch_size": 8,
                    "output.plots": False, "output.dir": f"{tmp}/m{m}-{r}"})
                peaks.append(res["peak_rss_mb"])
                walls.append(res["wall_s"])
            rows[m] = {"peak_rss_mb_median": statistics.median(peaks), "peak_rss_mb": peaks,
                       "wall_s_median": statistics.median(walls)}
            print(f"M={m:>5}: peak RSS {rows[m]['peak_rss_mb_median']:.0f} MB, "
                  f"{rows[m]['wall_s_median']:.1f} s", flush=True)
    ratio = rows[1000]["peak_rss_mb_median"] / rows[10]["peak_rss_mb_median"]
    report = {"benchmark": "scale", "clients_per_round": 10, "rounds": 3, "rows": 4000,
              "runs": rows, "ratio_1000_vs_10": ratio,
              "extra_mb_1000_vs_10": rows[1000]["peak_rss_mb_median"]
              - rows[10]["peak_rss_mb_median"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"peak RSS 1,000 vs 10 clients: {ratio:.3f}x -> wrote {args.out}")


if __name__ == "__main__":
    main()
