"""Benchmark: what secure aggregation costs per round, in bytes and seconds, against plain
FedAvg.

Workload: the bundled MiniLM, movie reviews, cross-silo, FedTT and LoRA, 3 and 10 clients,
2 rounds of 2 local steps (batch 8), each run with `federation.secure_aggregation` off and
on. Per round: wire bytes both ways (Flower's count of every message, the protocol's three
extra exchanges and the masked uploads at their quantized width included), the protocol's
own share of them, seconds per round excluding server evaluation, the protocol's seconds,
and how far the secure global lies from the plain one after round 1 against the
quantization bound.

Writes benchmarks/results/secagg.json.
Run: python benchmarks/secagg.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from _common import run_child
from safetensors.torch import load_file


def per_round(res: dict) -> dict:
    rows = [r for r in res["rounds"] if r["round"] > 0]
    n = len(rows)
    out = {
        "upload_wire_bytes": sum(r["upload_wire_bytes"] for r in rows) / n,
        "download_wire_bytes": sum(r["download_wire_bytes"] for r in rows) / n,
        "seconds_excl_eval": sum(r["seconds"] - r["eval_seconds"] for r in rows) / n,
        "client_train_seconds": sum(r["client_train_seconds"] for r in rows) / n,
        "final_accuracy": res["summary"]["final_accuracy"],
    }
    out["wire_bytes"] = out["upload_wire_bytes"] + out["download_wire_bytes"]
    if rows[0].get("secagg"):
        out["protocol_wire_bytes"] = sum(r["secagg"]["wire_bytes"] for r in rows) / n
        out["protocol_seconds"] = sum(r["secagg"]["seconds"] for r in rows) / n
        out["error_bound"] = max(r["secagg"]["error_bound"] for r in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "secagg.json"))
    args = parser.parse_args()
    report = {"benchmark": "secagg", "model": "minilm", "task": "movie-reviews",
              "mode": "cross-silo", "rounds": 2, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("fedtt", "lora"):
            for n in (3, 10):
                row = {}
                for secure in (False, True):
                    out = f"{tmp}/{method}-{n}-{secure}"
                    res = run_child({
                        "method.name": method, "data.partition": "iid",
                        "data.max_train_examples": 2000, "data.max_test_examples": 64,
                        "federation.num_clients": n, "federation.rounds": 2,
                        "federation.update_norm_multiple": 0.0,
                        "federation.secure_aggregation": secure,
                        "training.local_steps": 2, "training.batch_size": 8,
                        "training.threads": 2, "output.plots": False, "output.dir": out})
                    row["secure" if secure else "plain"] = per_round(res)
                    row.setdefault("globals", {})[secure] = out
                plain = load_file(Path(row["globals"][False]) / "global.safetensors")
                secure = load_file(Path(row["globals"][True]) / "global.safetensors")
                del row["globals"]
                row["max_abs_global_difference"] = max(
                    float((secure[k] - plain[k]).abs().max()) for k in plain)
                row["max_abs_global_value"] = max(float(t.abs().max()) for t in plain.values())
                p, s = row["plain"], row["secure"]
                row["wire_bytes_ratio"] = s["wire_bytes"] / p["wire_bytes"]
                row["seconds_ratio"] = s["seconds_excl_eval"] / p["seconds_excl_eval"]
                report["runs"][f"{method}/{n}"] = row
                print(f"{method:<6} {n:>3} clients: {p['wire_bytes'] / 1e6:.3f} -> "
                      f"{s['wire_bytes'] / 1e6:.3f} MB/round (x{row['wire_bytes_ratio']:.2f}, "
                      f"protocol {s['protocol_wire_bytes'] / 1e6:.3f} MB), "
                      f"{p['seconds_excl_eval']:.2f} -> {s['seconds_excl_eval']:.2f} s/round "
                      f"(protocol {s['protocol_seconds']:.3f} s); global differs by "
                      f"{row['max_abs_global_difference']:.2g}", flush=True)
    report["torch_threads"] = torch.get_num_threads()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
