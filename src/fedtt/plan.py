"""`fedtt plan`: what each method trains and sends per round, before running anything.

Counts come from building the real model with each method (architecture presets on the meta
device, so LLaMA-2-13B costs no memory) and asking the method which tensors travel: the same
code path the federated runtime uses, so the ledger of a run must agree with the plan. Wire
bytes come from building the round's train message and its reply as the runtime does (one
packed array each, `federated/payload.py`) and counting them as Flower sends them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from torch import nn

from fedtt.adapters import AdapterConfig
from fedtt.config import RunConfig, task_kind
from fedtt.federated import payload
from fedtt.federated.wire import PRECISIONS
from fedtt.methods import Method
from fedtt.models import load_model

BASELINE = "lora"  # what `upload_ratio_to_lora` and `fedtt run`'s last line compare with


def tensor_bytes(model: nn.Module, names: Sequence[str],
                 precision: str = "float32") -> tuple[int, int]:
    """(parameter count, bytes on the wire at `precision`) of the named parameters."""
    params = dict(model.named_parameters())
    count = sum(params[n].numel() for n in names)
    return count, count * PRECISIONS[precision].itemsize


def round_sets(model: nn.Module, method: Method, server_round: int,
               stateful: bool = True) -> tuple[list[str], list[str], bool]:
    """(upload names, download names, upper bound?) for one client in `server_round`.

    Upload: what the method trains this round. Download: everything the client lacks. A
    stateful client (cross-silo) lacks only what the previous round's aggregation changed; a
    stateless one (cross-device), or any client in round 1, needs every travelling tensor.
    Where the method's choice depends on the training (FedTT+ adaptive, once every core has
    trained), the sets are upper bounds.
    """
    sent = method.sent_names(model)
    numel = {n: p.numel() for n, p in model.named_parameters() if n in set(sent)}
    upload, bound = method.planned_round_names(server_round, sent, numel)
    if server_round == 1 or not stateful:
        return upload, list(sent), bound
    changed, before = method.planned_round_names(server_round - 1, sent, numel)
    return upload, [n for n in sent if n in set(changed)], bound or before


def wire_bytes(model: nn.Module, sent: Sequence[str], upload: Sequence[str],
               download: Sequence[str], server_round: int,
               precision: str = "float32") -> tuple[int, int]:
    """(upload, download) bytes on the wire of one client's train message and reply."""
    from fedtt.federated.inprocess import act_as_server

    act_as_server()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)  # values as varied as real ones (no chunk repeats)

    def packed(names: Sequence[str]):
        return payload.pack([torch.randn(params[n].shape, generator=g) for n in names],
                            precision)

    down = Message(RecordDict({"arrays": packed(download), "config": payload.train_config(
        server_round, payload.mask_of(sent, upload), payload.mask_of(sent, download), True)}),
        message_type=MessageType.TRAIN, dst_node_id=2, group_id=str(server_round))
    down.metadata.__dict__["_message_id"] = down.object_id  # as a grid's push sets it
    metrics = MetricRecord({"partition-id": 0, "num-examples": 1000, "train_loss": 0.5,
                            "train_seconds": 1.0})
    up = Message(RecordDict({"arrays": packed(upload), "metrics": metrics}), reply_to=down)
    return payload.message_bytes(up), payload.message_bytes(down)


def plan(model_spec: str, methods: Sequence[str], adapter: AdapterConfig | None = None,
         run: RunConfig | None = None, *, num_labels: int = 2,
         server_round: int = 2, precision: str = "float32") -> dict:
    """Per-method trainable parameters and per-client bytes each way in `server_round`,
    with tensors on the wire at `precision`: tensor payload, and whole messages as Flower
    sends them (`*_wire_bytes`). Each method reads its section from `run` (default: the
    defaults) and the adapter settings from `adapter` (default: `run`'s)."""
    run = dataclasses.replace(run or RunConfig(), **({"adapter": adapter} if adapter else {}))
    out: dict = {"model": model_spec, "round": server_round, "precision": precision,
                 "methods": {}}
    for name in methods:
        method = run.make_method(name)
        model = method.build(_model(model_spec, num_labels, run), seed=0)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        up, down, bound = round_sets(model, method, server_round)
        up_params, up_bytes = tensor_bytes(model, up, precision)
        down_params, down_bytes = tensor_bytes(model, down, precision)
        up_wire, down_wire = wire_bytes(model, method.sent_names(model), up, down,
                                        server_round, precision)
        out["methods"][name] = {
            "trainable_params": trainable,
            "upload_params": up_params, "upload_bytes": up_bytes,
            "download_params": down_params, "download_bytes": down_bytes,
            "upload_wire_bytes": up_wire, "download_wire_bytes": down_wire,
            "upper_bound": bound,
        }
        if run.federation.secure_aggregation:
            out["methods"][name]["secagg"] = secagg_cost(run, up_params, down_wire)
    lora = out["methods"].get(BASELINE)
    for row in out["methods"].values():
        row["upload_ratio_to_lora"] = (row["upload_wire_bytes"] / lora["upload_wire_bytes"]
                                       if lora else None)
    return out


def secagg_cost(run: RunConfig, upload_values: int, download_wire: int) -> dict:
    """What secure aggregation costs one client per round: its messages of the protocol's
    four stages (keys, shares, the masked train reply at the quantized width, unmasking)
    built with real keys and counted as Flower sends them, and the seconds of one client's
    protocol work and of the server's unmasking for `clients_per_round` clients, measured on
    this machine (`secagg.simulate`)."""
    from fedtt.federated import secagg

    cost = secagg.simulate(run.clients_per_round(), upload_values,
                           secagg.settings_of(run.federation), private=run.privacy.enabled)
    return {"clients": cost["clients"],
            "upload_wire_bytes": cost["masked_reply"] + cost["stage_upload_wire_bytes"],
            "download_wire_bytes": download_wire + cost["stage_download_wire_bytes"],
            "masked_reply_wire_bytes": cost["masked_reply"],
            "stages": {s: cost[s] for s in ("keys", "shares", "unmask")},
            "train_extra_download_wire_bytes": cost["train_extra_download"],
            "client_seconds": cost["client_seconds"], "server_seconds": cost["server_seconds"]}


def _model(spec: str, num_labels: int, run: RunConfig):
    """The backbone a run of `run` trains, as `backbone.build_model` loads it: a causal LM
    without a new head for a causal-lm task or the verbalizer head, else a classifier."""
    generative = task_kind(run) == "causal-lm"
    return load_model(spec, num_labels, causal=generative or run.model.head == "verbalizer",
                      generative=generative)


def baseline_wire_bytes(cfg: RunConfig, rounds: Sequence[dict], num_labels: int,
                        baseline: str = BASELINE) -> int:
    """What `baseline` would have put on the wire for the same clients and rounds: each
    round's participants times one train message and its reply (`wire_bytes`, round 1 then
    round 2's size, which repeats for methods that train everything each round)."""
    method = cfg.make_method(baseline)
    model = method.build(_model(cfg.model.name, num_labels, cfg), seed=0)
    sent = method.sent_names(model)
    per_round = {}
    for r in (1, 2):
        up, down, _ = round_sets(model, method, r, cfg.federation.mode == "cross-silo")
        per_round[r] = sum(wire_bytes(model, sent, up, down, r, cfg.federation.precision))
    return sum(len(row["clients"]) * per_round[min(row["round"], 2)]
               for row in rounds if row["round"] > 0)


def format_plan(result: dict) -> str:
    """A fixed-width table of `plan`'s result (MB: whole messages on the wire)."""
    lines = [f"model: {result['model']}   (per client, round {result['round']}, cross-silo, "
             f"{result['precision']}; MB = bytes on the wire, params = tensor payload)",
             f"{'method':<10} {'trainable':>11} {'upload':>11} {'upload MB':>10} "
             f"{'download':>11} {'download MB':>11} {'up vs LoRA':>10}"]
    bounds = False
    for name, r in result["methods"].items():
        ratio = r["upload_ratio_to_lora"]
        upload = ("<=" if r["upper_bound"] else "") + f"{r['upload_params']:,}"
        bounds |= r["upper_bound"]
        lines.append(
            f"{name:<10} {r['trainable_params']:>11,} {upload:>11} "
            f"{r['upload_wire_bytes'] / 1e6:>10.3f} {r['download_params']:>11,} "
            f"{r['download_wire_bytes'] / 1e6:>11.3f} "
            f"{'' if ratio is None else f'{ratio:.3f}x':>10}")
    for name, r in result["methods"].items():
        sa = r.get("secagg")
        if sa:
            up, down = sa["upload_wire_bytes"], sa["download_wire_bytes"]
            lines.append(
                f"{name:<10} with secure aggregation ({sa['clients']} clients): upload "
                f"{up / 1e6:.3f} MB (x{up / r['upload_wire_bytes']:.2f}), download "
                f"{down / 1e6:.3f} MB (x{down / r['download_wire_bytes']:.2f}); protocol "
                f"{sa['client_seconds']:.3f} s per client, {sa['server_seconds']:.3f} s to unmask")
    if bounds:
        lines.append("<= upper bound: FedTT+ adaptive picks cores by their update norms once "
                     "each has trained; the largest is assumed")
    return "\n".join(lines)
