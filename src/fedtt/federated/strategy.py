"""The Flower strategy every method shares: a FedAvg subclass with fedtt's narrow hooks.

- Sampling: every client each round (cross-silo) or a seeded sample (cross-device).
- Download: versioned sync. Each global tensor remembers the round it last changed; a stateful
  client receives only tensors newer than the global it holds, a stateless one all of them.
- Upload: the method decides which tensors train this round (FedTT+: its core mask), sent to
  clients as a bit mask over the travelling tensors; replies must carry exactly those.
- Aggregation: the method's own (`Method.aggregate`), merged into the full global record.
- Per-client TT ranks (fedtt, exact aggregation): a client below the global rank declares its
  rank in each reply; from then on it gets each TT layer's TT-SVD rounding to that rank.
- Precision: tensors travel in `federation.precision`; the global master stays float32.
- Packing: what a message carries travels as one array, with a bit mask of which tensors it
  holds (`payload.py`): Flower's framing per tensor would otherwise outweigh small TT cores.
- Ledger: one row per travelling tensor per client per round per direction, sent or not, with
  its payload bytes (the client's rank, the wire precision), and one row per message, both
  ways, with Flower's bytes for the whole message (`wire_bytes`: what crosses the wire).
- Local DP: replies carry no row counts and weigh the same; with a target epsilon only
  clients with rounds of budget left are sampled, so budget never stops a run.
- Untrusted replies: exactly one accepted reply per sampled node per round, answering the
  message sent to it; validated (`validate.py`) before aggregation, tensors and metrics alike;
  each update clipped to a multiple of the round's median update norm (and any fixed bound);
  example counts checked against the partitions where known and each weight share capped;
  failures, rejections and missing replies are recorded; below `min_replies` the round is
  retried, then the run stops with the global model unchanged.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedtt import tt
from fedtt.federated import payload, secagg, wire
from fedtt.federated.safeguards import RoundFailed, Safeguards, capped_shares
from fedtt.federated.secure_rounds import SecureRounds
from fedtt.federated.validate import (
    Rejected,
    ReplyRules,
    check_evaluate_reply,
    check_train_reply,
    clip_update,
    update_norm,
)
from fedtt.methods import Method, core_groups, largest_core_rank
from fedtt.results import RoundRecord, ledger_row

LedgerSink = Callable[[list[dict]], None]
NODE_UNAVAILABLE = ErrorCode.NODE_UNAVAILABLE  # Flower's reply for a node that is gone


class FedTTStrategy(SecureRounds, FedAvg):
    """Sampling, versioned sync, method-driven aggregation and an exact byte ledger."""

    def __init__(self, method: Method, initial: dict[str, torch.Tensor], *, stateful: bool,
                 num_clients: int, clients_per_round: int, seed: int, client_eval: bool,
                 ledger: LedgerSink, guard: Safeguards, wait_seconds: float = 600.0,
                 precision: str = "float32", private: bool = False,
                 max_participations: int | None = None,
                 secure: secagg.Settings | None = None) -> None:
        super().__init__(min_available_nodes=num_clients)
        # Secure aggregation (`secagg.py`): replies are masked, only their sum is unmasked.
        self.secure = secure
        self._packets: dict[int, ConfigRecord] = {}  # node -> its share packets this round
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
        # Packed once per (tensor set, TT rank) and version, shared by every message sending it.
        self._packed: dict[tuple[tuple[str, ...], int | None], ArrayRecord] = {}
        # Per-client TT ranks: clients below the global rank declare theirs in each reply
        # and get each TT layer rounded to it (TT-SVD, computed once per rank and version).
        self.groups = core_groups(self.sent)
        self.core_layer = {c: layer for layer, cores in self.groups.items() for c in cores}
        self.full_rank = largest_core_rank(self.global_state)
        self.accepts_ranks = method.accepts_client_ranks
        self.client_rank: dict[int, int] = {}
        self.epsilon: dict[int, float] = {}  # client -> epsilon it last reported (local DP)
        self._rounded: dict[int, dict[str, torch.Tensor]] = {}
        self.held: dict[int, int] = {}  # node -> global version it holds (stateful clients)
        self._will_hold: dict[int, int] = {}  # ... once its reply proves it got the payload
        self.stateful, self.num_clients = stateful, num_clients
        self.clients_per_round = clients_per_round
        # Local DP: replies carry no row counts and weigh the same; a target epsilon allows
        # each client `max_participations` rounds, and only clients with rounds left are asked.
        self.private = private
        self.max_participations = max_participations
        self.participations: dict[int, int] = {}  # node -> train messages sent to it
        self.rng = random.Random(seed)
        self.ledger = ledger
        self.wait_seconds = wait_seconds
        self.round_train: list[str] = []
        self.sampled: list[int] = []
        self.outbox: dict[int, Message] = {}  # node -> the train message last sent to it
        self.unavailable: set[int] = set()  # nodes Flower reported gone this round
        self._waited = False
        self.accepted_nodes: set[int] = set()  # nodes whose reply this round was accepted
        self.pending: dict[int, list[dict]] = {}
        self.stats: dict[int, RoundRecord] = {}  # by round

    # --- helpers ---------------------------------------------------------------------------
    def _record(self, names: Sequence[str], rank: int | None = None) -> ArrayRecord:
        """`names` (global tensors, at TT rank `rank`) packed for the wire."""
        key = (tuple(names), rank)
        if key not in self._packed:
            self._packed[key] = payload.pack([self._tensor(n, rank) for n in names],
                                             self.precision)
        return self._packed[key]

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
            raise Rejected(f"{self.method.name} does not accept per-client TT ranks (fedtt "
                           "with fedtt.aggregation = 'exact' does)")
        if isinstance(value, bool) or value not in range(1, self.full_rank + 1):
            raise Rejected(f"tt-rank {value!r} is not an integer in [1, {self.full_rank}]")
        return int(value) if value < self.full_rank else None

    def global_record(self) -> ArrayRecord:
        return self._record(self.sent)

    def _nodes(self, grid: Grid) -> list[int]:
        """The nodes online: before the first round, waiting up to `wait_seconds` for all
        of them; later, those Flower still lists (a dead node does not stall a round)."""
        deadline = time.monotonic() + (0.0 if self._waited else self.wait_seconds)
        self._waited = True
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.num_clients or time.monotonic() > deadline:
                return nodes
            time.sleep(0.5)

    def _payload(self, node: int, server_round: int, kind: str
                 ) -> tuple[ArrayRecord, bytes, int | None]:
        """The tensors `node` lacks, packed, their mask and TT rank; records their download
        ledger rows as pending."""
        held = self.held.get(node) if self.stateful else None
        names = [n for n in self.sent if held is None or self.version[n] > held]
        chosen, rank = set(names), self.client_rank.get(node)
        rows = [self._row(server_round, "down", kind, n, n in chosen, tensor=self._tensor(n, rank))
                for n in self.sent]
        self.pending.setdefault(node, []).extend(rows)
        if self.stateful:
            self._will_hold[node] = server_round - 1 if kind == "train" else server_round
        self._stats(server_round).download_bytes += sum(r["bytes"] for r in rows)
        return self._record(names, rank), payload.mask_of(self.sent, chosen), rank

    def _message(self, node: int, server_round: int, kind: str, content: RecordDict
                 ) -> Message:
        """A message to `node`; its wire bytes go to the ledger with the node's other rows."""
        msg = Message(content=content, message_type=kind, dst_node_id=node,
                      group_id=str(server_round))
        size = payload.message_bytes(msg)
        self.pending.setdefault(node, []).append(
            self._message_row(server_round, "down", kind.split(".")[-1], size))
        self._stats(server_round).download_wire_bytes += size
        return msg

    def _stats(self, server_round: int) -> RoundRecord:
        """The round's record, begun by the first message of the round."""
        if server_round not in self.stats:
            self.stats[server_round] = RoundRecord(round=server_round, method=self.method.name)
        return self.stats[server_round]

    def _message_row(self, server_round: int, direction: str, kind: str, size: int,
                     client: int | None = None, **extra: object) -> dict:
        """A ledger row for one whole message: Flower's bytes for it (`wire_bytes`)."""
        return ledger_row(server_round, direction, kind, dtype=self.precision, client=client,
                          wire_bytes=size, **extra)

    def _row(self, server_round: int, direction: str, kind: str, name: str, sent: bool,
             client: int | None = None, tensor: torch.Tensor | None = None) -> dict:
        """A ledger row: the tensor's bytes at the wire precision, 0 if not sent."""
        tensor = self.global_state[name] if tensor is None else tensor
        return ledger_row(server_round, direction, kind, dtype=self.precision, client=client,
                          name=name, shape=list(tensor.shape), sent=sent,
                          payload_bytes=(tensor.numel() * wire.itemsize(self.precision)
                                         if sent else 0))

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
                "participations": dict(self.participations), "method": self.method.state()}

    def load_state(self, state: dict, *, clients_kept_state: bool) -> None:
        """Restore `state()`. Without the clients' own state (fresh SuperNodes, with new node
        ids) nothing keyed by node carries over: everything is sent again once, and each
        node's partition and TT rank are learnt anew from its replies."""
        self.global_state = {n: state["global"][n].clone() for n in self.sent}  # (its order)
        self.version = dict(state["version"])
        kept = clients_kept_state
        self.held = dict(state["held"]) if kept else {}
        self.node_client = dict(state["node_client"]) if kept else {}
        self.client_rank = dict(state["client_rank"]) if kept else {}
        self.epsilon = dict(state["epsilon"])
        self.participations = dict(state.get("participations", {}))
        self.rng.setstate(state["rng"])
        self.method.load_state(state["method"])
        self._packed.clear()
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
            if self.secure:
                self.secure_train(server_round, grid, timeout)
            else:
                replies = grid.send_and_receive(
                    self.configure_train(server_round, self.global_record(), ConfigRecord(),
                                         grid), timeout=timeout)
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
        self._sample(server_round, config, grid)
        return [self._train_message(node, server_round) for node in self.sampled]

    def _sample(self, server_round: int, config: ConfigRecord, grid: Grid) -> None:
        """Begin a round: sample its clients and name the tensors they train."""
        nodes = self._nodes(grid)
        if len(nodes) < self.clients_per_round:
            log(WARNING, "only %d of %d clients available", len(nodes), self.clients_per_round)
        self.stats.pop(server_round, None)
        self._stats(server_round)
        self.outbox, self.accepted_nodes, self.unavailable = {}, set(), set()
        if self.max_participations is not None:  # a target epsilon: only clients with budget
            nodes = [n for n in nodes
                     if self.participations.get(n, 0) < self.max_participations]
        k = min(self.clients_per_round, len(nodes))
        self.sampled = nodes if k == len(nodes) else sorted(self.rng.sample(nodes, k))
        chosen = set(self.method.round_names(server_round, self.sent))
        self.round_train = [n for n in self.sent if n in chosen]
        self._grid, self._config = grid, config

    def out_of_budget(self) -> int:
        """Clients that have used every round their target epsilon allows."""
        if self.max_participations is None:
            return 0
        return sum(n >= self.max_participations for n in self.participations.values())

    def _train_message(self, node: int, server_round: int) -> Message:
        arrays, mask, rank = self._payload(node, server_round, "train")
        cfg = ConfigRecord({**dict(self._config), **payload.train_config(
            server_round, payload.mask_of(self.sent, self.round_train), mask, self.stateful,
            rank)})
        self.participations[node] = self.participations.get(node, 0) + 1
        content = RecordDict({"arrays": arrays, "config": cfg})
        if node in self._packets:
            content[secagg.RECORD] = self._packets[node]
        self.outbox[node] = self._message(node, server_round, MessageType.TRAIN, content)
        return self.outbox[node]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats[server_round]
        if not self.sampled and self.max_participations is not None:
            log(WARNING, "round %d: every client has spent its privacy budget; the global "
                "model stays as it is", server_round)
            return self.global_record(), MetricRecord({})
        needed = self.guard.min_replies
        if self.max_participations is not None:  # fewer clients have budget left
            needed = min(needed, len(self.sampled))
        accepted = self._screen(server_round, list(replies), self.sampled)
        retries = 0
        while len(accepted) < needed and retries < self.guard.round_retries:
            retries += 1
            answered = {a.node for a in accepted}
            again = [n for n in self.sampled if n not in answered and n not in self.unavailable]
            log(WARNING, "round %d: %d valid replies, %d needed; asking %d clients again",
                server_round, len(accepted), needed, len(again))
            assert self._grid is not None
            more = self._grid.send_and_receive(
                [self._train_message(n, server_round) for n in again],
                timeout=self.guard.timeout)
            accepted += self._screen(server_round, list(more), again)
        stats.retries = retries
        stats.client_train_seconds = sum(a.metrics.get("train_seconds", 0.0)
                                            for a in accepted)
        if len(accepted) < needed:
            problems = "; ".join(f"client {f.get('client')}: {f['reason'].splitlines()[0]}"
                                 for f in stats.failed + stats.rejected)
            raise RoundFailed(server_round,
                f"round {server_round}: {len(accepted)} valid replies from "
                f"{len(self.sampled)} clients, fewer than federation.min_replies = "
                f"{self.guard.min_replies} after {retries} retries; the run stops and the "
                f"global model stays that of round {server_round - 1}. {problems}")
        agg_start = time.perf_counter()
        self._bound_updates(server_round, accepted)
        weights = capped_shares([a.examples for a in accepted], self.guard.max_weight_share)
        new, method_metrics = self.method.aggregate(
            server_round, self.global_state,
            [(a.tensors, w) for a, w in zip(accepted, weights, strict=True)])
        for name, value in new.items():
            self.global_state[name] = value
            self.version[name] = server_round
        self._packed.clear()
        self._rounded.clear()
        stats.aggregate_seconds = time.perf_counter() - agg_start
        losses = [(a.metrics["train_loss"], a.examples) for a in accepted
                  if "train_loss" in a.metrics]  # (DP clients do not report it)
        if losses:
            stats.train_loss = (sum(v * n for v, n in losses)
                                / sum(n for _, n in losses))
        stats.method_metrics.update(method_metrics)
        reply = dict(method_metrics)
        if losses:
            reply["train_loss"] = stats.train_loss
        return self.global_record(), MetricRecord(reply)

    def _bound_updates(self, server_round: int, accepted: list[Accepted]) -> None:
        """Clip each update (all its tensors together) to `max_update_norm` and to
        `update_norm_multiple` times the round's median update norm: one client's update,
        poisoned but finite, cannot outweigh the honest majority's."""
        norms = [update_norm(a.tensors, a.base) for a in accepted]
        bound = self.guard.max_update_norm or math.inf
        if self.guard.update_norm_multiple > 0 and len(accepted) >= 3:
            bound = min(bound, self.guard.update_norm_multiple * statistics.median(norms))
        stats = self.stats[server_round]
        stats.update_norms = {str(a.client): n for a, n in zip(accepted, norms, strict=True)}
        clipped = []
        for a, norm in zip(accepted, norms, strict=True):
            if norm > bound:
                a.tensors, _ = clip_update(a.tensors, a.base, bound)
                clipped.append(a.client)
        if clipped:
            stats.clipped = clipped
            log(WARNING, "round %d: clipped the updates of clients %s to norm %.4g",
                server_round, clipped, bound)

    def _screen(self, server_round: int, replies: list[Message],
                asked: list[int], masked: tuple[int, np.dtype, int] | None = None
                ) -> list[Accepted]:
        """Validate replies; record failures, rejections and the ledger; keep the good ones.
        `masked` (secure aggregation): replies carry masked vectors of (length, dtype,
        modulus bits) instead of tensors."""
        stats = self.stats[server_round]

        def rules_at(rank: int | None) -> ReplyRules:
            return ReplyRules(expected={n: self._tensor(n, rank) for n in self.round_train},
                              num_partitions=self.num_clients,
                              max_examples=self.guard.max_examples,
                              max_abs_value=self.guard.max_abs_value, precision=self.precision,
                              counts=not self.private)

        accepted, answered = [], set()
        for msg in replies:
            size = payload.message_bytes(msg)
            stats.upload_wire_bytes += size
            node, unsolicited = self._addressee(msg)
            if unsolicited:
                self._reject(server_round, node, unsolicited, size)
                continue
            answered.add(node)
            if msg.has_error():
                if msg.error.code == NODE_UNAVAILABLE:
                    self.unavailable.add(node)
                self._fail(server_round, node, f"client error: {msg.error.reason}")
                self.ledger([self._message_row(server_round, "up", "train", size,
                                               self.node_client.get(node))])
                continue
            vector = None
            try:
                rank = self._declared_rank(msg)
                rules = rules_at(rank)
                if masked is None:
                    tensors, examples, client, metrics = check_train_reply(msg.content, rules)
                else:
                    vector, client, metrics = self._check_masked(msg.content, masked)
                    tensors, examples = {}, 1.0
                self._check_identity(node, client, examples)
            except Rejected as exc:
                self._reject(server_round, node, str(exc), size)
                continue
            self.accepted_nodes.add(node)
            self.node_client[node] = client
            if rank is not None:
                self.client_rank[node] = rank
            if "epsilon" in metrics:
                self.epsilon[client] = metrics["epsilon"]
            self._delivered(node)
            self._flush(node, client)
            if masked is None:
                rows = [self._row(server_round, "up", "train", n, n in tensors, client,
                                  tensor=tensors.get(n)) for n in self.sent]
                stats.upload_bytes += sum(t.numel() for t in tensors.values()) * wire.itemsize(
                    self.precision)
            else:  # the round's tensors at the masked width
                rows = self._masked_rows(server_round, client, masked[1])
                stats.upload_bytes += sum(r["bytes"] for r in rows)
            self.ledger(rows + [self._message_row(server_round, "up", "train", size, client)])
            stats.clients.append(client)
            accepted.append(Accepted(node, client, tensors, examples, metrics, rules.expected,
                                     vector))
        for node in asked:
            if node not in answered:
                self._fail(server_round, node, "no reply before the timeout (dropped out or hung)")
        return accepted

    def _addressee(self, msg: Message) -> tuple[int, str | None]:
        """The node a reply answers for (the one its message was sent to: Flower's own error
        replies for a node come from the SuperLink), and why it is refused, if it is: one
        accepted reply per sampled node per round, to the message last sent to it."""
        sender = msg.metadata.src_node_id
        asked = {m.metadata.message_id: n for n, m in self.outbox.items()}
        node = asked.get(msg.metadata.reply_to_message_id)
        if node is None:
            return sender, ("reply to a message this round did not send it (replayed or "
                            "stale)" if sender in self.outbox else
                            "reply from a node that was not asked this round")
        if sender != node and not msg.has_error():
            return sender, f"reply from node {sender} to the message sent to node {node}"
        if node in self.accepted_nodes:
            return node, "second reply from a node this round"
        return node, None

    def _check_identity(self, node: int, client: int, examples: float) -> None:
        """A node keeps one partition id, no two nodes share one, and a client claims no
        more rows than it has where the server knows (in-process); Rejected if not."""
        known = self.node_client.get(node)
        if known is not None and known != client:
            raise Rejected(f"partition-id {client} from the node that was client {known}")
        owner = next((n for n, c in self.node_client.items() if c == client and n != node),
                     None)
        if owner is not None:
            raise Rejected(f"partition-id {client} already belongs to node {owner}")
        bound = (self.guard.client_examples or {}).get(client)
        if bound is not None and examples > bound:
            raise Rejected(f"num-examples {examples:g} is more than client {client}'s "
                           f"{bound} rows")

    def _reject(self, server_round: int, node: int, reason: str, size: int) -> None:
        client = self.node_client.get(node)
        log(WARNING, "round %d: rejected reply from node %d (client %s): %s", server_round,
            node, client, reason)
        self.stats[server_round].rejected.append(
            {"client": client, "node": node, "reason": reason})
        self._flush(node, client)
        self.ledger([self._message_row(server_round, "up", "train", size, client,
                                       rejected=reason)])

    def _fail(self, server_round: int, node: int, reason: str) -> None:
        client = self.node_client.get(node)
        log(WARNING, "round %d: node %d (client %s) failed: %s", server_round, node, client,
            reason.splitlines()[0])
        self.stats[server_round].failed.append({"client": client, "node": node,
                                                   "reason": reason})
        self._flush(node, client)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.client_eval:
            return []
        messages = []
        for node in self.sampled:
            packed, mask, rank = self._payload(node, server_round, "evaluate")
            cfg = ConfigRecord({**dict(config), "server-round": server_round, "arrays": mask,
                                "rank": rank or 0, "stateful": self.stateful})
            messages.append(self._message(node, server_round, MessageType.EVALUATE,
                                          RecordDict({"arrays": packed, "config": cfg})))
        return messages

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        sums: dict[str, float] = {}
        total = 0.0
        stats = self.stats[server_round]
        for msg in replies:
            node = msg.metadata.src_node_id
            size = payload.message_bytes(msg)
            stats.upload_wire_bytes += size
            client = self.node_client.get(node)
            self._flush(node, client)
            self.ledger([self._message_row(server_round, "up", "evaluate", size, client)])
            if msg.has_error():
                continue
            try:
                w, local = check_evaluate_reply(msg.content, self.guard.max_eval_examples)
            except Rejected as exc:  # an untrusted reply: no usable metrics
                stats.rejected.append({"client": client, "node": node, "kind": "evaluate",
                                          "reason": str(exc)})
                continue
            self._delivered(node)
            total += w
            for key, value in local.items():
                sums[key] = sums.get(key, 0.0) + value * w
        if total == 0:
            return None
        result = {k: v / total for k, v in sums.items()}
        stats.update(result)  # local_accuracy, ... (EVALUATE_METRICS)
        return MetricRecord(result)


@dataclass
class Accepted:
    node: int
    client: int
    tensors: dict[str, torch.Tensor]
    examples: float
    metrics: dict[str, float]
    base: Mapping[str, torch.Tensor]  # the tensors the client was sent (its update's origin)
    vector: np.ndarray | None = None  # secure aggregation: the masked update, nothing else
