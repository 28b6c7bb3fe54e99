"""The Flower strategy every method shares: a FedAvg subclass with fedtt's narrow hooks.

- Sampling: every client each round (cross-silo) or a seeded sample (cross-device).
- Download: versioned sync. Each global tensor remembers the round it last changed; a stateful
  client receives only tensors newer than the global it holds, a stateless one all of them.
- Upload: the method decides which tensors train this round (FedTT+: its core mask), sent to
  clients as a list of names; replies must carry exactly those.
- Aggregation: the method's own (`Method.aggregate`), merged into the full global record.
- Ledger: one row per travelling tensor per client per round per direction, sent or not.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import WARNING

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedtt.methods import Method

LedgerSink = Callable[[list[dict]], None]


class FedTTStrategy(FedAvg):
    """Sampling, versioned sync, method-driven aggregation and an exact byte ledger."""

    def __init__(self, method: Method, initial: dict[str, torch.Tensor], *, stateful: bool,
                 num_clients: int, clients_per_round: int, seed: int, client_eval: bool,
                 ledger: LedgerSink, wait_seconds: float = 600.0) -> None:
        super().__init__(min_available_nodes=num_clients)
        self.client_eval = client_eval
        self.method = method
        self.sent = list(initial)
        self.global_state = {n: t.detach().clone() for n, t in initial.items()}
        self.version = dict.fromkeys(self.sent, 0)
        self._arrays: dict[str, Array] = {}  # serialised once per version, shared by messages
        self.held: dict[int, int] = {}  # node -> global version it holds (stateful clients)
        self.stateful, self.num_clients = stateful, num_clients
        self.clients_per_round = clients_per_round
        self.rng = random.Random(seed)
        self.ledger = ledger
        self.wait_seconds = wait_seconds
        self.round_train: list[str] = []
        self.sampled: list[int] = []
        self.pending: dict[int, list[dict]] = {}
        self.stats: dict[int, dict] = {}

    # --- helpers ---------------------------------------------------------------------------
    def _array(self, name: str) -> Array:
        if name not in self._arrays:
            self._arrays[name] = Array.from_torch_tensor(self.global_state[name])
        return self._arrays[name]

    def global_record(self) -> ArrayRecord:
        return ArrayRecord(array_dict={n: self._array(n) for n in self.sent})

    def _nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.wait_seconds
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.num_clients or time.monotonic() > deadline:
                return nodes
            time.sleep(0.5)

    def _payload(self, node: int, server_round: int, kind: str) -> ArrayRecord:
        """The tensors `node` lacks; records their download ledger rows as pending."""
        held = self.held.get(node) if self.stateful else None
        names = [n for n in self.sent if held is None or self.version[n] > held]
        chosen = set(names)
        rows = [_row(server_round, "down", kind, n, self.global_state[n], n in chosen)
                for n in self.sent]
        self.pending.setdefault(node, []).extend(rows)
        if self.stateful:
            self.held[node] = server_round - 1 if kind == "train" else server_round
        stats = self.stats.setdefault(server_round, _empty_stats())
        stats["download_bytes"] += sum(r["bytes"] for r in rows)
        return ArrayRecord(array_dict={n: self._array(n) for n in names})

    def _flush(self, node: int, client: int | None) -> None:
        rows = self.pending.pop(node, [])
        for r in rows:
            r["client"] = client
        if rows:
            self.ledger(rows)

    # --- Flower hooks ----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = self._nodes(grid)
        if len(nodes) < self.clients_per_round:
            log(WARNING, "only %d of %d clients available", len(nodes), self.clients_per_round)
        k = min(self.clients_per_round, len(nodes))
        self.sampled = nodes if k == len(nodes) else sorted(self.rng.sample(nodes, k))
        self.round_train = self.method.round_names(server_round, self.sent)
        self.stats[server_round] = _empty_stats()
        self.stats[server_round]["started"] = time.perf_counter()
        messages = []
        for node in self.sampled:
            cfg = ConfigRecord({**dict(config), "server-round": server_round,
                                "train": list(self.round_train), "stateful": self.stateful})
            content = RecordDict({"arrays": self._payload(node, server_round, "train"),
                                  "config": cfg})
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node, group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats[server_round]
        accepted: list[tuple[dict[str, torch.Tensor], float]] = []
        losses, seconds = [], []
        expected = list(self.round_train)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                stats["failed"].append({"node": node, "reason": msg.error.reason})
                self._flush(node, None)
                continue
            metrics = msg.content["metrics"]
            client = int(metrics["partition-id"])
            self._flush(node, client)
            state = msg.content["arrays"].to_torch_state_dict()
            if list(state) != expected:
                stats["failed"].append({"node": node, "client": client,
                                        "reason": "reply does not carry this round's tensors"})
                continue
            self.ledger([_row(server_round, "up", "train", n, self.global_state[n], n in state,
                              client) for n in self.sent])
            stats["upload_bytes"] += sum(t.numel() * t.element_size() for t in state.values())
            stats["upload_wire_bytes"] += msg.content["arrays"].count_bytes()
            stats["clients"].append(client)
            accepted.append((state, float(metrics["num-examples"])))
            losses.append((float(metrics["train_loss"]), float(metrics["num-examples"])))
            seconds.append(float(metrics["train_seconds"]))
        stats["client_train_seconds"] = sum(seconds)
        if not accepted:
            log(WARNING, "round %d: no client update accepted; global model unchanged",
                server_round)
            return self.global_record(), None
        agg_start = time.perf_counter()
        new, method_metrics = self.method.aggregate(server_round, self.global_state, accepted)
        for name, value in new.items():
            self.global_state[name] = value
            self.version[name] = server_round
            self._arrays.pop(name, None)
        stats["aggregate_seconds"] = time.perf_counter() - agg_start
        total = sum(w for _, w in losses)
        stats["train_loss"] = sum(loss * w for loss, w in losses) / total
        stats.update(method_metrics)
        return self.global_record(), MetricRecord({"train_loss": stats["train_loss"],
                                                   **method_metrics})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.client_eval:
            return []
        messages = []
        for node in self.sampled:
            cfg = ConfigRecord({**dict(config), "server-round": server_round,
                                "stateful": self.stateful})
            content = RecordDict({"arrays": self._payload(node, server_round, "evaluate"),
                                  "config": cfg})
            messages.append(Message(content=content, message_type=MessageType.EVALUATE,
                                    dst_node_id=node, group_id=str(server_round)))
        return messages

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        sums: dict[str, float] = {}
        total = 0.0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self._flush(node, None)
                continue
            metrics = msg.content["metrics"]
            self._flush(node, int(metrics["partition-id"]))
            w = float(metrics["num-examples"])
            total += w
            for key, value in metrics.items():
                if key.startswith("local_"):
                    sums[key] = sums.get(key, 0.0) + float(value) * w
        if total == 0:
            return None
        result = {k: v / total for k, v in sums.items()}
        self.stats[server_round].update(result)
        return MetricRecord(result)


def _empty_stats() -> dict:
    return {"upload_bytes": 0, "download_bytes": 0, "upload_wire_bytes": 0, "clients": [],
            "failed": []}


def _row(server_round: int, direction: str, kind: str, name: str, tensor: torch.Tensor,
         sent: bool, client: int | None = None) -> dict:
    return {"round": server_round, "client": client, "direction": direction, "kind": kind,
            "name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).split(".")[-1],
            "bytes": tensor.numel() * tensor.element_size() if sent else 0, "sent": sent}
