"""`fedtt plan`: what each method trains and sends per round, before running anything.

Counts come from building the real model with each method (architecture presets on the meta
device, so LLaMA-2-13B costs no memory) and asking the method which tensors travel: the same
code path the federated runtime uses, so the ledger of a run must agree with the plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from fedtt.adapters import AdapterConfig
from fedtt.federated.wire import PRECISIONS
from fedtt.methods import Method, MethodConfig, make_method
from fedtt.models import load_model


def tensor_bytes(model: nn.Module, names: Sequence[str],
                 precision: str = "float32") -> tuple[int, int]:
    """(parameter count, bytes on the wire at `precision`) of the named parameters."""
    params = dict(model.named_parameters())
    count = sum(params[n].numel() for n in names)
    return count, count * PRECISIONS[precision].itemsize


def round_sets(model: nn.Module, method: Method, server_round: int,
               stateful: bool = True) -> tuple[list[str], list[str]]:
    """(upload names, download names) for one client in `server_round` of a cross-silo run.

    Upload: what the method trains this round. Download: everything the client lacks. A
    stateful client (cross-silo) lacks only what the previous round's aggregation changed; a
    stateless one (cross-device), or any client in round 1, needs every travelling tensor.
    """
    sent = method.sent_names(model)
    upload = method.round_names(server_round, sent)
    if server_round == 1 or not stateful:
        return upload, list(sent)
    changed = set(method.round_names(server_round - 1, sent))
    return upload, [n for n in sent if n in changed]


def plan(model_spec: str, methods: Sequence[str], adapter: AdapterConfig | None = None,
         method_cfg: MethodConfig | None = None, *, num_labels: int = 2,
         server_round: int = 2, precision: str = "float32") -> dict:
    """Per-method trainable parameters and per-client bytes each way in `server_round`,
    with tensors on the wire at `precision`."""
    adapter = adapter or AdapterConfig()
    method_cfg = method_cfg or MethodConfig()
    out: dict = {"model": model_spec, "round": server_round, "precision": precision,
                 "methods": {}}
    for name in methods:
        cfg = dataclasses.replace(method_cfg, name=name)
        method = make_method(cfg, adapter)
        model = method.build(load_model(model_spec, num_labels), seed=0)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        up, down = round_sets(model, method, server_round)
        up_params, up_bytes = tensor_bytes(model, up, precision)
        down_params, down_bytes = tensor_bytes(model, down, precision)
        out["methods"][name] = {
            "trainable_params": trainable,
            "upload_params": up_params, "upload_bytes": up_bytes,
            "download_params": down_params, "download_bytes": down_bytes,
        }
    lora = out["methods"].get("lora")
    for row in out["methods"].values():
        row["upload_ratio_to_lora"] = (row["upload_bytes"] / lora["upload_bytes"]
                                       if lora else None)
    return out


def format_plan(result: dict) -> str:
    """A fixed-width table of `plan`'s result."""
    lines = [f"model: {result['model']}   (per client, round {result['round']}, cross-silo, "
             f"{result['precision']})",
             f"{'method':<10} {'trainable':>11} {'upload':>11} {'upload MB':>10} "
             f"{'download':>11} {'download MB':>11} {'up vs LoRA':>10}"]
    for name, r in result["methods"].items():
        ratio = r["upload_ratio_to_lora"]
        lines.append(
            f"{name:<10} {r['trainable_params']:>11,} {r['upload_params']:>11,} "
            f"{r['upload_bytes'] / 1e6:>10.3f} {r['download_params']:>11,} "
            f"{r['download_bytes'] / 1e6:>11.3f} "
            f"{'' if ratio is None else f'{ratio:.3f}x':>10}")
    return "\n".join(lines)
