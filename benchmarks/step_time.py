"""Benchmark: median training-step time per method, as a ratio to the frozen backbone.

CPU (always): the bundled MiniLM, batch 32 x 64 tokens, 2 threads. "frozen" trains only the
classification head (the least a step can cost); fedtt, lora and ffa-lora train their own
tensors. Steps are interleaved across methods (one step of each in turn) so machine noise
hits every method alike; the median of `--steps` steps after warm-up is reported.

GPU (when CUDA is available): LLaMA-architecture models with random weights (1B and 7B
dimensions, bf16, batch 8 x 512 tokens): median step time and peak GPU memory per method.

Writes benchmarks/results/step_time.json (or --out).
Run: python benchmarks/step_time.py [--steps 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import cuda_times, interleaved_times  # noqa: E402

from fedtt.adapters import AdapterConfig  # noqa: E402
from fedtt.methods import make_method  # noqa: E402
from fedtt.methods.base import HEAD_PARAM  # noqa: E402
from fedtt.models import load_model  # noqa: E402
from fedtt.results import versions  # noqa: E402

METHODS = ["frozen", "fedtt", "lora", "ffa-lora"]


def build(spec: str, method: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    if spec.startswith("arch:"):
        model = load_model(spec, 2, meta=False)
    else:
        model = load_model(spec, 2)
    if method == "frozen":
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            p.requires_grad_(bool(HEAD_PARAM.search(name)))
    else:
        model = make_method(method, AdapterConfig()).build(model)
    return model.to(device=device, dtype=dtype).train()


def make_step(model, batch, labels):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def measure(spec: str, methods: list[str], batch_size: int, seq: int, steps: int, warmup: int,
            device: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    vocab = 1000 if spec.startswith("arch:") else 30000
    batch = {"input_ids": torch.randint(3, vocab, (batch_size, seq), generator=gen).to(device),
             "attention_mask": torch.ones(batch_size, seq, dtype=torch.long, device=device)}
    labels = torch.randint(0, 2, (batch_size,), generator=gen).to(device)
    results = {}
    if device == "cuda":  # one model at a time on the GPU: they do not all fit at 7B
        for method in methods:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model = build(spec, method, device, dtype)
            times = cuda_times(make_step(model, batch, labels), steps, warmup)
            results[method] = {"median_s": statistics.median(times),
                               "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
            del model
        return results
    steppers = {m: make_step(build(spec, m, device, dtype), batch, labels) for m in methods}
    times = interleaved_times(steppers, steps, warmup)
    return {m: {"median_s": statistics.median(ts), "all_s": ts} for m, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_time.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cpu = measure(args.model, METHODS, 32, 64, args.steps, args.warmup, "cpu", torch.float32)
    frozen = cpu["frozen"]["median_s"]
    for row in cpu.values():
        row["ratio_to_frozen"] = row["median_s"] / frozen
    report = {
        "benchmark": "step_time", "model": args.model, "batch": 32, "tokens": 64, "threads": 2,
        "steps": args.steps, "cpu": cpu,
        "fedtt_vs_lora": cpu["fedtt"]["median_s"] / cpu["lora"]["median_s"],
        "goal": "fedtt within 1.10x of lora",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": versions(),
    }
    report["goal_met"] = report["fedtt_vs_lora"] <= 1.10
    if torch.cuda.is_available():
        report["gpu"] = {"device": torch.cuda.get_device_name(0)}
        for spec in ("arch:llama-1b", "arch:llama-2-7b"):
            report["gpu"][spec] = measure(spec, METHODS, 8, 512, args.steps, args.warmup, "cuda",
                                          torch.bfloat16)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for m, row in cpu.items():
        print(f"{m:<9} {row['median_s'] * 1000:8.1f} ms  {row['ratio_to_frozen']:.2f}x frozen")
    print(f"fedtt / lora = {report['fedtt_vs_lora']:.3f} (goal <= 1.10) -> wrote {out}")


if __name__ == "__main__":
    main()
