"""Benchmark: causal-LM training steps at LLM scale, fedtt vs lora vs ffa-lora.

A step is a forward pass with labels = input ids (Hugging Face's shifted next-token loss), the
backward pass and an AdamW step on the method's adapter tensors only (TT cores and biases;
LoRA's A and B; FFA-LoRA's B), every backbone tensor frozen. fedtt's adapters here train no
norms (adapter.train_norms = false), so each method trains its adapters alone.

CPU (always): SmolLM2-135M (the bundled `smollm2`, 30 layers, hidden 576); offline without
its package in the cache, `arch:smollm2-135m` (the same dimensions, random weights) stands in
and the JSON says so. float32, batch --cpu-batch x --cpu-seq tokens. The methods' steps are
interleaved (one step of each in turn) so machine noise hits every method alike; medians of
--steps steps after warm-up, as ratios to lora. Peak RSS per method comes from a fresh child
process per method (build, then warm-up + the same steps): the kernel's peak-RSS mark is reset
after the build (Linux clear_refs), so the ratio compares training peaks, not loading.

CUDA (when torch sees a GPU; otherwise skipped with a line saying so): LLaMA-architecture
models of 1B (`arch:llama-1b`) and 7B (`arch:llama-2-7b`) dimensions with random weights
drawn on the GPU, bfloat16 backbone, float32 adapters under autocast, batch 8 x 512: median
step time and peak GPU memory per method, then one federated round of 2 clients in-process
(fedtt, the same backbone dtype, `training.device = cuda`). Every GPU case runs in a child
process with a time limit, and the JSON is rewritten after each case, so it is written even
if a case fails or the time budget (--budget seconds, default 540) runs out.

Writes benchmarks/results/llm.json (or --out).
Run: python benchmarks/llm.py [--steps 10] [--cpu-batch 4] [--cpu-seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402
from _common import cuda_times, interleaved_times  # noqa: E402

from fedtt.adapters import AdapterConfig  # noqa: E402
from fedtt.devices import Compute, float32_trainables  # noqa: E402
from fedtt.methods import make_method  # noqa: E402
from fedtt.models import load_model  # noqa: E402
from fedtt.results import versions  # noqa: E402

METHODS = ["fedtt", "lora", "ffa-lora"]
GPU_MODELS = ["arch:llama-1b", "arch:llama-2-7b"]
CPU_STANDIN = "arch:smollm2-135m"


def cpu_model_spec() -> tuple[str, str]:
    """("smollm2", "") when the bundled SmolLM2-135M loads offline, else the stand-in preset
    and why."""
    try:
        from fedtt.models import smollm2_dir

        smollm2_dir()
        return "smollm2", ""
    except Exception as exc:  # noqa: BLE001 - any failure means: not available offline
        return CPU_STANDIN, (f"SmolLM2-135M is not available offline ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}); {CPU_STANDIN} (its "
                             "dimensions, random weights) stands in")


def build(spec: str, method: str, compute: Compute) -> torch.nn.Module:
    """The causal LM `spec` on `compute`, frozen, with `method`'s adapters (float32)."""
    device = None if compute.device.type == "cpu" else compute.device
    model = load_model(spec, 2, meta=False, dtype=compute.dtype, device=device, causal=True)
    m = make_method(method, AdapterConfig(train_norms=False))
    model = m.build(model, seed=0)
    float32_trainables(model, m.owns)
    return model.train()


def make_step(model: torch.nn.Module, batch: dict, compute: Compute):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        with compute.autocast():
            loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()
        return float(loss.detach())
    return step, sum(p.numel() for p in params)


def make_batch(vocab: int, batch_size: int, seq: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch_size, seq), generator=gen)
    return {"input_ids": ids.to(device),
            "attention_mask": torch.ones(batch_size, seq, dtype=torch.long, device=device)}


def vocab_of(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().num_embeddings)


# --- CPU -----------------------------------------------------------------------------------
def cpu_times(spec: str, batch_size: int, seq: int, steps: int, warmup: int) -> dict:
    """Interleaved step times of every method in this process."""
    compute = Compute()
    models = {m: build(spec, m, compute) for m in METHODS}
    batch = make_batch(vocab_of(models["lora"]), batch_size, seq, compute.device)
    steppers = {m: make_step(models[m], batch, compute) for m in METHODS}
    times = interleaved_times({m: s[0] for m, s in steppers.items()}, steps, warmup)
    return {m: {"median_s": statistics.median(ts), "all_s": ts,
                "trainable_params": steppers[m][1]} for m, ts in times.items()}


def _status_mb(field: str) -> float | None:
    """A `VmHWM`/`VmRSS` line of /proc/self/status in MB (None where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_child(spec: str, method: str, batch_size: int, seq: int, steps: int) -> dict:
    """Build one method's model and run `steps` steps in this (fresh) process: the peak RSS
    of the whole process (loading included) and, where the kernel lets the mark be reset
    after the build, the peak RSS while training."""
    import gc

    compute = Compute()
    model = build(spec, method, compute)
    step, _ = make_step(model, make_batch(vocab_of(model), batch_size, seq, compute.device),
                        compute)
    gc.collect()
    out = {"rss_after_build_mb": _status_mb("VmRSS")}
    reset = _reset_peak()
    for _ in range(steps):
        step()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if reset:
        out["train_peak_rss_mb"] = _status_mb("VmHWM")
    return out


def run_self(args: list[str], timeout: float) -> dict:
    """This script with `args` in a fresh process; the last line of its stdout as JSON."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         timeout=max(timeout, 1))
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip()[-1500:] or f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- CUDA ----------------------------------------------------------------------------------
def gpu_case(spec: str, method: str, steps: int, warmup: int) -> dict:
    """Median step time and peak GPU memory of one method on one model (this process)."""
    compute = Compute(torch.device("cuda"), torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = build(spec, method, compute)
    torch.cuda.synchronize()
    built = time.perf_counter() - start
    weights = torch.cuda.memory_allocated() / 2**30
    step, trainable = make_step(model, make_batch(vocab_of(model), 8, 512, compute.device),
                                compute)
    times = cuda_times(step, steps, warmup)
    return {"median_s": statistics.median(times), "all_s": times,
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
            "model_gpu_mem_gb": weights, "build_s": built, "trainable_params": trainable}


def gpu_round(spec: str) -> dict:
    """One in-process federated round of 2 clients on the GPU (fedtt, bf16 backbone)."""
    from fedtt.config import from_flat
    from fedtt.federated.inprocess import run_inprocess

    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_flat({
            "model.name": spec, "model.dtype": "bfloat16", "model.max_length": 512,
            "training.device": "cuda", "method.name": "fedtt", "data.task": "synthetic",
            "data.partition": "iid", "data.max_train_examples": 64,
            "data.max_test_examples": 32, "federation.num_clients": 2,
            "federation.rounds": 1, "training.local_steps": 2, "training.batch_size": 8,
            "output.plots": False, "output.dir": f"{tmp}/run"})
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        summary = run_inprocess(cfg, quiet=True)
        wall = time.perf_counter() - start
        rounds = [json.loads(x) for x in
                  (Path(cfg.output.dir) / "rounds.jsonl").read_text().splitlines()]
    last = rounds[-1]
    return {"wall_s": wall, "status": summary["status"],
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
            "client_train_seconds": last.get("client_train_seconds"),
            "round_seconds": last.get("seconds"), "accuracy": last.get("accuracy"),
            "upload_wire_bytes": last.get("upload_wire_bytes")}


def child_main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "cpu":
        spec, method, b, s, steps = argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5])
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        result = cpu_child(spec, method, b, s, steps)
    elif kind == "gpu":
        result = gpu_case(argv[1], argv[2], int(argv[3]), int(argv[4]))
    else:
        result = gpu_round(argv[1])
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cpu-batch", type=int, default=4)
    parser.add_argument("--cpu-seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gpu-steps", type=int, default=10)
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds for the whole benchmark; GPU cases past it are skipped")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "llm.json"))
    args = parser.parse_args()
    began = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"benchmark": "llm", "step": "causal-LM loss (labels = input ids), "
                    "backward, AdamW on the adapter tensors only",
                    "methods": METHODS,
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                    "versions": versions()}

    def write() -> None:
        report["wall_s"] = time.perf_counter() - began
        out.write_text(json.dumps(report, indent=2) + "\n")

    if not args.skip_cpu:
        torch.set_num_threads(args.threads)
        spec, note = cpu_model_spec()
        cpu: dict = {"model": spec, "dtype": "float32", "batch": args.cpu_batch,
                     "tokens": args.cpu_seq, "threads": args.threads, "steps": args.steps,
                     "warmup": args.warmup}
        if note:
            cpu["note"] = note
            print(note)
        report["cpu"] = cpu
        try:
            cpu["methods"] = cpu_times(spec, args.cpu_batch, args.cpu_seq, args.steps,
                                       args.warmup)
            lora = cpu["methods"]["lora"]["median_s"]
            for row in cpu["methods"].values():
                row["time_ratio_to_lora"] = row["median_s"] / lora
        except Exception as exc:  # noqa: BLE001 - record it, carry on
            cpu["error"] = f"{type(exc).__name__}: {exc}"
        write()
        for m in METHODS:
            try:
                rss = run_self(["--child", "cpu", spec, m, str(args.cpu_batch),
                                str(args.cpu_seq), str(args.warmup + args.steps)],
                               timeout=1800)
                cpu.setdefault("methods", {}).setdefault(m, {}).update(rss)
            except Exception as exc:  # noqa: BLE001
                cpu.setdefault("methods", {}).setdefault(m, {})["rss_error"] = str(exc)[-500:]
        # The training peak when the kernel could reset the mark, else the process's peak
        # (which loading may dominate).
        key = ("train_peak_rss_mb" if all("train_peak_rss_mb" in r for r in
                                          cpu.get("methods", {}).values()) else "peak_rss_mb")
        cpu["rss_ratio_of"] = key
        lora_rss = cpu.get("methods", {}).get("lora", {}).get(key)
        for row in cpu.get("methods", {}).values():
            if lora_rss and key in row:
                row["rss_ratio_to_lora"] = row[key] / lora_rss
        write()
        for m, row in cpu.get("methods", {}).items():
            print(f"cpu {m:<9} {row.get('median_s', float('nan')) * 1000:9.1f} ms "
                  f"({row.get('time_ratio_to_lora', float('nan')):.3f}x lora)  peak RSS "
                  f"{row.get(cpu['rss_ratio_of'], float('nan')):8.1f} MB "
                  f"({row.get('rss_ratio_to_lora', float('nan')):.3f}x lora)")

    if not torch.cuda.is_available():
        line = "CUDA: skipped (torch sees no CUDA device here)"
        report["gpu"] = {"skipped": line}
        print(line)
        write()
        print(f"wrote {out}")
        return
    gpu: dict = {"device": torch.cuda.get_device_name(0), "dtype": "bfloat16", "batch": 8,
                 "tokens": 512, "steps": args.gpu_steps, "warmup": args.warmup}
    report["gpu"] = gpu
    cases = [("gpu", spec, m) for spec in GPU_MODELS for m in METHODS]
    cases += [("round", spec, "fedtt") for spec in GPU_MODELS]
    for kind, spec, method in cases:
        row = gpu.setdefault(spec, {})
        key = method if kind == "gpu" else "federated_round"
        left = args.budget - (time.perf_counter() - began)
        if left < 20:
            row[key] = {"skipped": f"time budget of {args.budget:.0f} s spent"}
            write()
            continue
        argv = (["--child", "gpu", spec, method, str(args.gpu_steps), str(args.warmup)]
                if kind == "gpu" else ["--child", "round", spec])
        try:
            row[key] = run_self(argv, timeout=left - 5)
        except subprocess.TimeoutExpired:
            row[key] = {"error": f"timed out after {left - 5:.0f} s"}
        except Exception as exc:  # noqa: BLE001
            row[key] = {"error": str(exc)[-800:]}
        write()
        print(f"gpu {spec} {key}: {json.dumps(row[key])[:300]}")
    for spec in GPU_MODELS:
        lora = gpu.get(spec, {}).get("lora", {})
        for m in METHODS:
            r = gpu.get(spec, {}).get(m, {})
            if "median_s" in r and "median_s" in lora:
                r["time_ratio_to_lora"] = r["median_s"] / lora["median_s"]
                r["mem_ratio_to_lora"] = r["peak_gpu_mem_gb"] / lora["peak_gpu_mem_gb"]
    write()
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
