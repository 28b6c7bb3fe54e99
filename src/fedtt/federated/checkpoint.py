"""Server checkpoints: what `fedtt run --resume DIR` needs to continue a killed run exactly.

After every recorded round the ServerApp writes `DIR/checkpoint.safetensors` atomically (a
temporary file, then a rename). Tensors: the global tensors and, in-process, each simulated
client's stored tensors. JSON in the file's metadata: the round, each tensor's version, what
each client holds, the sampling RNG, the method's own state (FedTT+'s policy) and the engine
that wrote it (on the Deployment Engine the clients' state lives on the SuperNodes and is not
in the file). Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT = "checkpoint.safetensors"


def save(run_dir: str | Path, server_round: int, strategy: dict,
         clients: dict[int, dict[str, dict[str, torch.Tensor]]] | None) -> Path:
    """Write the checkpoint of `server_round` (`strategy` as `FedTTStrategy.state()`);
    `clients` is the simulated clients' state in-process, None on the Deployment Engine."""
    engine = "in-process" if clients is not None else "deployment"
    clients = clients or {}
    tensors = {f"global/{n}": t.contiguous() for n, t in strategy["global"].items()}
    for node, records in clients.items():
        for key, record in records.items():
            tensors.update({f"client/{node}/{key}/{n}": t.contiguous() for n, t in record.items()})
    version, state, gauss = strategy["rng"]
    meta = {"round": server_round, "version": strategy["version"],
            "held": strategy["held"], "node_client": strategy["node_client"],
            "rng": [version, list(state), gauss], "method": strategy["method"],
            "client_rank": strategy["client_rank"], "epsilon": strategy["epsilon"],
            "clients": {str(node): list(records) for node, records in clients.items()},
            "engine": engine}
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"fedtt": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load(run_dir: str | Path) -> dict:
    """{"round", "strategy" (as `FedTTStrategy.state()`), "clients" (None when the run was
    on the Deployment Engine)} from a run directory."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no {CHECKPOINT}: nothing to resume (a run "
                                "writes one after every round)")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fedtt"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    clients: dict[int, dict[str, dict[str, torch.Tensor]]] = {
        int(node): {key: {} for key in keys} for node, keys in meta["clients"].items()}
    strategy = {"global": {}, "version": meta["version"],
                "held": {int(k): v for k, v in meta["held"].items()},
                "node_client": {int(k): v for k, v in meta["node_client"].items()},
                "rng": (meta["rng"][0], tuple(meta["rng"][1]), meta["rng"][2]),
                "client_rank": {int(k): v for k, v in meta["client_rank"].items()},
                "epsilon": {int(k): v for k, v in meta["epsilon"].items()},
                "method": meta["method"]}
    for key, tensor in tensors.items():
        kind, rest = key.split("/", 1)
        if kind == "global":
            strategy["global"][rest] = tensor
        else:
            node, record, name = rest.split("/", 2)
            clients[int(node)][record][name] = tensor
    # (Checkpoints older than the "engine" key: one without client state came from a
    # deployment, or from stateless clients, for which a resync changes nothing.)
    engine = meta.get("engine", "in-process" if meta["clients"] else "deployment")
    kept = engine == "in-process"
    return {"round": meta["round"], "strategy": strategy, "clients": clients if kept else None}


def check_resumable(resumed: dict, *, restores_clients: bool, private: bool,
                    local_only: bool) -> None:
    """Refuse a resume that would lose client state the run depends on: DP step counts (a
    client would forget what it spent) and tensors that never leave a client."""
    if restores_clients:
        return
    why = ("the run uses local DP, and each client's step count (its privacy accounting) "
           "lives with the client" if private else
           "some trained tensors never leave the clients (adapter.head = 'keep-local')"
           if local_only else None)
    if why:
        raise ValueError(f"cannot resume round {resumed['round'] + 1} without the clients' own "
                         f"state: {why}, and it is not in the checkpoint (runs on the "
                         "Deployment Engine keep it on the SuperNodes). Start the run again.")
