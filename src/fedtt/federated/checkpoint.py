"""Server checkpoints: what `fedtt run --resume DIR` needs to continue a killed run exactly.

After every recorded round the ServerApp writes `DIR/checkpoint.safetensors` atomically (a
temporary file, then a rename). Tensors: the global tensors and, in-process, each simulated
client's stored tensors. JSON in the file's metadata: the round, each tensor's version, what
each client holds, the sampling RNG, how often each node was asked to train, the method's own
state (FedTT+'s policy) and the engine that wrote it (on the Deployment Engine the clients'
state lives on the SuperNodes and is not in the file). Nothing is pickled.

`load` checks the whole file against the run's config.toml and rounds.jsonl before it returns
anything, and changes nothing: a resume trims the recorded history only after that.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from fedtt.config import RunConfig, load_config
from fedtt.results import CHECKPOINT, check_history, write_tensors

REQUIRED = ("round", "version", "held", "node_client", "rng", "method", "client_rank",
            "epsilon", "clients")
ENGINES = ("in-process", "deployment")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says what is wrong."""


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
            "participations": strategy["participations"],
            "clients": {str(node): list(records) for node, records in clients.items()},
            "engine": engine}
    path = Path(run_dir) / CHECKPOINT
    write_tensors(path, tensors, metadata={"fedtt": json.dumps(meta)})
    return path


def load(run_dir: str | Path) -> dict:
    """{"round", "strategy" (as `FedTTStrategy.state()`), "clients" (None when the run was
    on the Deployment Engine)} from a run directory, checked in full first: the file's
    structure, every metadata value's type and range (the round against the run's config and
    its recorded rounds), tensor names against the metadata, every tensor finite. A problem
    raises `CheckpointError` naming it; nothing in the directory is changed either way."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no {CHECKPOINT}: nothing to resume (a run "
                                "writes one after every round)")
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"{run_dir} has no config.toml to check {CHECKPOINT} against")
    cfg = load_config(run_dir / "config.toml")
    try:
        return _parse(*_read(path), cfg, run_dir)
    except CheckpointError as exc:
        raise CheckpointError(f"{path} cannot be resumed from: {exc}") from None


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("fedtt")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"not a readable safetensors file ({exc})") from None
    try:
        meta = json.loads(text) if text is not None else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"its fedtt metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError("it holds no fedtt metadata (a JSON object)")
    return meta, tensors


def _parse(meta: dict, tensors: dict[str, torch.Tensor], cfg: RunConfig, run_dir: Path) -> dict:
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise CheckpointError(f"its metadata lacks {', '.join(missing)}")
    fed = cfg.federation
    last = _int(meta["round"], "round", 0, fed.rounds)
    try:
        check_history(run_dir, last)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    records = _keyed(meta, "clients", _record_names)
    engine = meta.get("engine", "in-process" if records else "deployment")
    if engine not in ENGINES:
        raise CheckpointError(f"engine must be in-process or deployment, got {engine!r}")
    global_, clients = _tensors(tensors, records)
    version = meta["version"]
    if not isinstance(version, dict) or set(version) != set(global_):
        raise CheckpointError(f"version must name exactly its {len(global_)} global tensors")
    epsilon = _keyed(meta, "epsilon", _epsilon)
    if any(not 0 <= c < fed.num_clients for c in epsilon):
        raise CheckpointError(f"epsilon names clients outside 0..{fed.num_clients - 1}")
    strategy = {
        "global": global_,
        "version": {n: _int(v, f"version[{n}]", 0, last) for n, v in version.items()},
        "held": _keyed(meta, "held", lambda v, what: _int(v, what, 0, last)),
        "node_client": _keyed(meta, "node_client",
                              lambda v, what: _int(v, what, 0, fed.num_clients - 1)),
        "rng": _rng(meta["rng"]),
        "client_rank": _keyed(meta, "client_rank",
                              lambda v, what: _int(v, what, 1, cfg.adapter.rank)),
        "epsilon": epsilon,
        "participations": _keyed(meta, "participations", lambda v, what: _int(v, what, 0)),
        "method": _method_state(meta["method"], cfg)}
    return {"round": last, "strategy": strategy,
            "clients": clients if engine == "in-process" else None}


def _int(value: Any, what: str, lo: int, hi: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, int) or value < lo
            or (hi is not None and value > hi)):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise CheckpointError(f"{what} must be an integer {bounds}, got {value!r}")
    return value


def _epsilon(value: Any, what: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value < 0):
        raise CheckpointError(f"{what} must be a finite number >= 0, got {value!r}")
    return value


def _record_names(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise CheckpointError(f"{what} must be a list of record names, got {value!r}")
    return value


def _keyed(meta: Mapping, key: str, check: Callable[[Any, str], Any]) -> dict[int, Any]:
    """meta[key] (absent: empty), a JSON object keyed by integers as text, each value checked."""
    table = meta.get(key, {})
    if not isinstance(table, dict):
        raise CheckpointError(f"{key} must be a JSON object, got {table!r}")
    out = {}
    for k, value in table.items():
        if not k.isdecimal():
            raise CheckpointError(f"{key} has a key {k!r} that is not an integer")
        out[int(k)] = check(value, f"{key}[{k}]")
    return out


def _rng(value: Any) -> tuple:
    try:
        version, state, gauss = value
        if not (gauss is None or isinstance(gauss, float)):
            raise TypeError(f"gauss_next {gauss!r}")
        rng = (version, tuple(state), gauss)
        random.Random().setstate(rng)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"rng is not a state of Python's random generator ({exc})") \
            from None
    return rng


def _method_state(state: Any, cfg: RunConfig) -> dict:
    """The method's own state, if the run's method can load it and its numbers are finite."""
    try:
        if not isinstance(state, dict) or not _finite(state):
            raise TypeError("not a JSON object of finite numbers")
        cfg.make_method().load_state(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"method is no state {cfg.method.name} can load ({exc})") \
            from None
    return state


def _finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def _tensors(tensors: dict[str, torch.Tensor], records: dict[int, list[str]]
             ) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, dict[str, torch.Tensor]]]]:
    """The global tensors and each client's records, every tensor finite, every client tensor
    in a record the metadata lists, one named like a global tensor no larger than it."""
    global_: dict[str, torch.Tensor] = {}
    clients: dict[int, dict[str, dict[str, torch.Tensor]]] = {
        node: {record: {} for record in names} for node, names in records.items()}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"tensor {key} holds NaN or infinite values")
        kind, _, rest = key.partition("/")
        if kind == "global" and rest:
            if not tensor.is_floating_point():
                raise CheckpointError(f"global tensor {rest} is {tensor.dtype}, not floating")
            global_[rest] = tensor
            continue
        node, _, rest = rest.partition("/")
        record, _, name = rest.partition("/")
        held = clients.get(int(node)) if kind == "client" and node.isdecimal() else None
        if held is None or record not in held or not name:
            raise CheckpointError(f"tensor {key} is neither global nor in a client record "
                                  "its metadata lists")
        held[record][name] = tensor
    for node, named in clients.items():
        for record, values in named.items():
            for name, tensor in values.items():
                full = global_.get(name)
                if full is not None and (tensor.dim() != full.dim() or any(
                        a > b for a, b in zip(tensor.shape, full.shape, strict=True))):
                    raise CheckpointError(
                        f"client {node}'s {record} tensor {name} of shape "
                        f"{list(tensor.shape)} does not fit the global {list(full.shape)}")
    return global_, clients


def check_resumable(resumed: dict, *, restores_clients: bool, private: bool,
                    local_only: bool,
                    travelling: Mapping[str, torch.Tensor] | None = None) -> None:
    """Refuse (`CheckpointError`) a resume whose global tensors are not the run's
    `travelling` tensors (names, shapes, dtypes; when given), or that would lose client state
    the run depends on: DP step counts (a client would forget what it spent) and tensors that
    never leave a client."""
    if travelling is not None:
        _check_layout(resumed["strategy"]["global"], travelling)
    if restores_clients:
        return
    why = ("the run uses local DP, and each client's step count (its privacy accounting) "
           "lives with the client" if private else
           "some trained tensors never leave the clients (adapter.head = 'keep-local')"
           if local_only else None)
    if why:
        raise CheckpointError(f"cannot resume round {resumed['round'] + 1} without the "
                              f"clients' own state: {why}, and it is not in the checkpoint "
                              "(runs on the Deployment Engine keep it on the SuperNodes). "
                              "Start the run again.")


def _check_layout(saved: Mapping[str, torch.Tensor],
                  travelling: Mapping[str, torch.Tensor]) -> None:
    missing = [n for n in travelling if n not in saved]
    unknown = [n for n in saved if n not in travelling]
    if missing or unknown:
        raise CheckpointError(f"the checkpoint's global tensors are not this run's: missing "
                              f"{missing[:3]}, unknown {unknown[:3]}")
    for name, want in travelling.items():
        got = saved[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"the checkpoint's global tensor {name} is {got.dtype} {list(got.shape)}, "
                f"this run's is {want.dtype} {list(want.shape)}")
