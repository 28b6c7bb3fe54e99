"""The Flower strategy every method shares: a FedAvg subclass with fedtt's narrow hooks.

- Sampling: every client each round (cross-silo) or a seeded sample (cross-device).
- Download: versioned sync. Each global tensor remembers the round it last changed; a stateful
  client receives only tensors newer than the global it holds, a stateless one all of them.
- Upload: the method decides which tensors train this round (FedTT+: its core mask), sent to
  clients as a list of names; replies must carry exactly those.
- Aggregation: the method's own (`Method.aggregate`), merged into the full global record.
- Per-client TT ranks (fedtt, exact aggregation): a client below the global rank declares its
  rank in each reply; from then on it gets each TT layer's TT-SVD rounding to that rank.
- Precision: tensors travel in `federation.precision`; the global master stays float32.
- Ledger: one row per travelling tensor per client per round per direction, sent or not, with
  the bytes actually sent (the client's rank, the wire precision).
- Untrusted replies: validated (`validate.py`) before aggregation; failures, rejections and
  missing replies are recorded; below `min_replies` the round is retried, then the run stops
  with the global model unchanged.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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

from fedtt import tt
from fedtt.federated import wire
from fedtt.federated.validate import Rejected, ReplyRules, check_train_reply, clip_update
from fedtt.methods import Method, core_groups, largest_core_rank

LedgerSink = Callable[[list[dict]], None]


class FedTTStrategy(FedAvg):
    """Sampling, versioned sync, method-driven aggregation and an exact byte ledger."""

    def __init__(self, method: Method, initial: dict[str, torch.Tensor], *, stateful: bool,
                 num_clients: int, clients_per_round: int, seed: int, client_eval: bool,
                 ledger: LedgerSink, guard: Safeguards, wait_seconds: float = 600.0,
                 precision: str = "float32") -> None:
        super().__init__(min_available_nodes=num_clients)
        self.client_eval = client_eval
        self.guard = guard
        self.node_client: dict[int, int] = {}  # learnt from valid replies, for the ledger
        self._grid: Grid | None = None
        self._config = ConfigRecord()
        self.method = method
        self.precision = precision
        self.sent = list(initial)
        self.global_state = {n: t.detach().clone() for n, t in initial.items()}
        self.version = dict.fromkeys(self.sent, 0)
        # Serialised once per version (and TT rank), shared by every message that sends it.
        self._arrays: dict[tuple[str, int | None], Array] = {}
        # Per-client TT ranks: clients below the global rank declare theirs in each reply
        # and get each TT layer rounded to it (TT-SVD, computed once per rank and version).
        self.groups = core_groups(self.sent)
        self.core_layer = {c: layer for layer, cores in self.groups.items() for c in cores}
        self.full_rank = largest_core_rank(self.global_state)
        self.accepts_ranks = method.name == "fedtt" and method.cfg.aggregation == "exact"
        self.client_rank: dict[int, int] = {}
        self.epsilon: dict[int, float] = {}  # client -> epsilon it last reported (local DP)
        self._rounded: dict[int, dict[str, torch.Tensor]] = {}
        self.held: dict[int, int] = {}  # node -> global version it holds (stateful clients)
        self._will_hold: dict[int, int] = {}  # ... once its reply proves it got the payload
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
    def _array(self, name: str, rank: int | None = None) -> Array:
        key = (name, rank if name in self.core_layer else None)
        if key not in self._arrays:
            self._arrays[key] = wire.to_array(self._tensor(name, rank), self.precision)
        return self._arrays[key]

    def _tensor(self, name: str, rank: int | None) -> torch.Tensor:
        """A global tensor as a client of TT rank `rank` gets it (None: the global rank)."""
        if rank is None or name not in self.core_layer:
            return self.global_state[name]
        if rank not in self._rounded:
            rounded = {}
            for cores in self.groups.values():
                values = tt.slice_cores(
                    tt.round_cores([self.global_state[c] for c in cores], rank), rank)
                rounded.update({c: v.contiguous() for c, v in zip(cores, values, strict=True)})
            self._rounded[rank] = rounded
        return self._rounded[rank][name]

    def _declared_rank(self, msg: Message) -> int | None:
        """The TT rank a reply declares (None: the global rank); Rejected if not allowed."""
        try:
            value = msg.content["metrics"].get("tt-rank")
        except Exception:  # malformed: check_train_reply names the problem
            return None
        if value is None:
            return None
        if not self.accepts_ranks:
            raise Rejected("per-client TT ranks need method fedtt with aggregation 'exact'")
        if isinstance(value, bool) or value not in range(1, self.full_rank + 1):
            raise Rejected(f"tt-rank {value!r} is not an integer in [1, {self.full_rank}]")
        return int(value) if value < self.full_rank else None

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
        chosen, rank = set(names), self.client_rank.get(node)
        rows = [self._row(server_round, "down", kind, n, n in chosen, tensor=self._tensor(n, rank))
                for n in self.sent]
        self.pending.setdefault(node, []).extend(rows)
        if self.stateful:
            self._will_hold[node] = server_round - 1 if kind == "train" else server_round
        stats = self.stats.setdefault(server_round, _empty_stats())
        stats["download_bytes"] += sum(r["bytes"] for r in rows)
        return ArrayRecord(array_dict={n: self._array(n, rank) for n in names})

    def _row(self, server_round: int, direction: str, kind: str, name: str, sent: bool,
             client: int | None = None, tensor: torch.Tensor | None = None) -> dict:
        """A ledger row: the tensor's bytes at the wire precision, 0 if not sent."""
        tensor = self.global_state[name] if tensor is None else tensor
        return {"round": server_round, "client": client, "direction": direction, "kind": kind,
                "name": name, "shape": list(tensor.shape), "dtype": self.precision,
                "bytes": tensor.numel() * wire.itemsize(self.precision) if sent else 0,
                "sent": sent}

    def _delivered(self, node: int) -> None:
        """A valid reply proves the node got its payload: it now holds that version."""
        if node in self._will_hold:
            self.held[node] = self._will_hold.pop(node)

    def _flush(self, node: int, client: int | None) -> None:
        rows = self.pending.pop(node, [])
        for r in rows:
            r["client"] = client
        if rows:
            self.ledger(rows)

    # --- resumable state -------------------------------------------------------------------
    def state(self) -> dict:
        """What a resumed run needs to continue exactly (see `checkpoint.py`)."""
        return {"global": {n: t.clone() for n, t in self.global_state.items()},
                "version": dict(self.version), "held": dict(self.held),
                "node_client": dict(self.node_client), "rng": self.rng.getstate(),
                "client_rank": dict(self.client_rank), "epsilon": dict(self.epsilon),
                "method": self.method.state()}

    def load_state(self, state: dict, *, clients_kept_state: bool) -> None:
        """Restore `state()`; without the clients' own state, resend everything once."""
        self.global_state = {n: state["global"][n].clone() for n in self.sent}  # (its order)
        self.version = dict(state["version"])
        self.held = dict(state["held"]) if clients_kept_state else {}
        self.node_client = dict(state["node_client"])
        self.client_rank = dict(state["client_rank"])
        self.epsilon = dict(state["epsilon"])
        self.rng.setstate(state["rng"])
        self.method.load_state(state["method"])
        self._arrays.clear()
        self._rounded.clear()

    def run_rounds(self, grid: Grid, *, first_round: int, num_rounds: int, timeout: float,
                   evaluate_fn: Callable[[int], None],
                   after_round: Callable[[int], None]) -> None:
        """Flower's `Strategy.start` loop, hook for hook, from `first_round` (0: evaluate the
        initial model first; a resumed run starts past its checkpoint), with `after_round`
        called once a round is recorded."""
        for server_round in range(first_round, num_rounds + 1):
            if server_round == 0:
                evaluate_fn(0)
                after_round(0)
                continue
            replies = grid.send_and_receive(
                self.configure_train(server_round, self.global_record(), ConfigRecord(), grid),
                timeout=timeout)
            self.aggregate_train(server_round, replies)
            replies = grid.send_and_receive(
                self.configure_evaluate(server_round, self.global_record(), ConfigRecord(),
                                        grid), timeout=timeout)
            self.aggregate_evaluate(server_round, replies)
            evaluate_fn(server_round)
            after_round(server_round)

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
        self._grid, self._config = grid, config
        return [self._train_message(node, server_round) for node in self.sampled]

    def _train_message(self, node: int, server_round: int) -> Message:
        cfg = ConfigRecord({**dict(self._config), "server-round": server_round,
                            "train": list(self.round_train), "stateful": self.stateful})
        content = RecordDict({"arrays": self._payload(node, server_round, "train"),
                              "config": cfg})
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node,
                       group_id=str(server_round))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats[server_round]
        accepted = self._screen(server_round, list(replies), self.sampled)
        retries = 0
        while len(accepted) < self.guard.min_replies and retries < self.guard.round_retries:
            retries += 1
            answered = {a.node for a in accepted}
            again = [n for n in self.sampled if n not in answered]
            log(WARNING, "round %d: %d valid replies, %d needed; asking %d clients again",
                server_round, len(accepted), self.guard.min_replies, len(again))
            assert self._grid is not None
            more = self._grid.send_and_receive(
                [self._train_message(n, server_round) for n in again],
                timeout=self.guard.timeout)
            accepted += self._screen(server_round, list(more), again)
        stats["retries"] = retries
        stats["client_train_seconds"] = sum(a.metrics.get("train_seconds", 0.0)
                                            for a in accepted)
        if len(accepted) < self.guard.min_replies:
            problems = "; ".join(f"client {f.get('client')}: {f['reason'].splitlines()[0]}"
                                 for f in stats["failed"] + stats["rejected"])
            raise RoundFailed(server_round,
                f"round {server_round}: {len(accepted)} valid replies from "
                f"{len(self.sampled)} clients, fewer than federation.min_replies = "
                f"{self.guard.min_replies} after {retries} retries; the run stops and the "
                f"global model stays that of round {server_round - 1}. {problems}")
        agg_start = time.perf_counter()
        new, method_metrics = self.method.aggregate(
            server_round, self.global_state, [(a.tensors, a.examples) for a in accepted])
        for name, value in new.items():
            self.global_state[name] = value
            self.version[name] = server_round
        self._arrays = {k: a for k, a in self._arrays.items() if k[0] not in new}
        self._rounded.clear()
        stats["aggregate_seconds"] = time.perf_counter() - agg_start
        losses = [(a.metrics["train_loss"], a.examples) for a in accepted
                  if "train_loss" in a.metrics]  # (DP clients do not report it)
        if losses:
            stats["train_loss"] = (sum(v * n for v, n in losses)
                                   / sum(n for _, n in losses))
        stats.update(method_metrics)
        reply = dict(method_metrics)
        if losses:
            reply["train_loss"] = stats["train_loss"]
        return self.global_record(), MetricRecord(reply)

    def _screen(self, server_round: int, replies: list[Message],
                asked: list[int]) -> list[Accepted]:
        """Validate replies; record failures, rejections and the ledger; keep the good ones."""
        stats = self.stats[server_round]

        def rules_at(rank: int | None) -> ReplyRules:
            return ReplyRules(expected={n: self._tensor(n, rank) for n in self.round_train},
                              num_partitions=self.num_clients,
                              max_examples=self.guard.max_examples,
                              max_abs_value=self.guard.max_abs_value, precision=self.precision)

        accepted, answered = [], set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error():
                self._fail(server_round, node, f"client error: {msg.error.reason}")
                continue
            try:
                rank = self._declared_rank(msg)
                rules = rules_at(rank)
                tensors, examples, client, metrics = check_train_reply(msg.content, rules)
            except Rejected as exc:
                client = self.node_client.get(node)
                log(WARNING, "round %d: rejected reply from node %d (client %s): %s",
                    server_round, node, client, exc)
                stats["rejected"].append({"client": client, "node": node, "reason": str(exc)})
                self._flush(node, client)
                self.ledger([{"round": server_round, "client": client, "direction": "up",
                              "kind": "train", "name": None, "shape": None, "dtype": None,
                              "bytes": _wire_bytes(msg), "sent": True, "rejected": str(exc)}])
                continue
            self.node_client[node] = client
            if rank is not None:
                self.client_rank[node] = rank
            if "epsilon" in metrics:
                self.epsilon[client] = metrics["epsilon"]
            self._delivered(node)
            self._flush(node, client)
            if self.guard.max_update_norm > 0:
                tensors, norm = clip_update(tensors, rules.expected, self.guard.max_update_norm)
                stats.setdefault("update_norms", {})[str(client)] = norm
            self.ledger([self._row(server_round, "up", "train", n, n in tensors, client,
                                   tensor=tensors.get(n)) for n in self.sent])
            stats["upload_bytes"] += sum(t.numel() for t in tensors.values()) * wire.itemsize(
                self.precision)
            stats["upload_wire_bytes"] += msg.content["arrays"].count_bytes()
            stats["clients"].append(client)
            accepted.append(Accepted(node, client, tensors, examples, metrics))
        for node in asked:
            if node not in answered:
                self._fail(server_round, node, "no reply before the timeout (dropped out or hung)")
        return accepted

    def _fail(self, server_round: int, node: int, reason: str) -> None:
        client = self.node_client.get(node)
        log(WARNING, "round %d: node %d (client %s) failed: %s", server_round, node, client,
            reason.splitlines()[0])
        self.stats[server_round]["failed"].append({"client": client, "node": node,
                                                   "reason": reason})
        self._flush(node, client)

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
                self._flush(node, self.node_client.get(node))
                continue
            self._flush(node, self.node_client.get(node))
            try:
                metrics = msg.content["metrics"]
                w = float(metrics["num-examples"])
                local = {k: float(v) for k, v in metrics.items() if k.startswith("local_")}
            except Exception:  # an untrusted reply: no usable metrics, skip it
                continue
            if not (w > 0 and all(map(math.isfinite, [w, *local.values()]))):
                continue
            self._delivered(node)
            total += w
            for key, value in local.items():
                sums[key] = sums.get(key, 0.0) + value * w
        if total == 0:
            return None
        result = {k: v / total for k, v in sums.items()}
        self.stats[server_round].update(result)
        return MetricRecord(result)


@dataclass(frozen=True)
class Safeguards:
    """How the server treats untrusted and unreliable clients (see `validate.py`)."""

    min_replies: int = 1
    round_retries: int = 1
    timeout: float = 600.0
    max_update_norm: float = 0.0
    max_abs_value: float = 1e4
    max_examples: int = 10**9


@dataclass
class Accepted:
    node: int
    client: int
    tensors: dict[str, torch.Tensor]
    examples: float
    metrics: dict[str, float]


class RoundFailed(RuntimeError):
    """Too few valid replies in a round, even after retries; the run stops."""

    def __init__(self, server_round: int, message: str) -> None:
        super().__init__(message)
        self.server_round = server_round


def _wire_bytes(msg: Message) -> int:
    try:
        return int(msg.content["arrays"].count_bytes())
    except Exception:  # a reply malformed enough to have no countable arrays
        return 0


def _empty_stats() -> dict:
    return {"upload_bytes": 0, "download_bytes": 0, "upload_wire_bytes": 0, "clients": [],
            "failed": [], "rejected": [], "started": time.perf_counter()}



