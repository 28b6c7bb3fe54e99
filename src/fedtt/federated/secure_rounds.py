"""The secure-aggregation rounds of `FedTTStrategy` (a mixin it inherits): keys, shares, the
masked train message and unmasking, driven by the strategy with the protocol pieces of
`secagg.py`. Kept apart so the strategy file holds the plain round and this one the
protocol; they share the strategy's sampling, ledger and reply screening."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedtt.federated import payload, secagg
from fedtt.federated.safeguards import RoundFailed
from fedtt.federated.validate import Rejected, check_masked_metrics
from fedtt.results import ledger_row


class SecureRounds:
    """Secure aggregation's rounds; mixed into `FedTTStrategy`, whose state it uses."""

    secure: secagg.Settings | None
    _packets: dict[int, ConfigRecord]
    stats: dict[int, Any]
    sampled: list[int]

    def secure_train(self, server_round: int, grid: Grid, timeout: float) -> None:
        """A training round under secure aggregation: keys, shares, masked training and
        unmasking (`secagg.py`). The global moves by the weighted mean of the surviving
        clients' updates, their unmasked sum being all the server learns of them."""
        sa = self.secure
        assert sa is not None
        self._sample(server_round, ConfigRecord(), grid)
        stats = self.stats[server_round]
        if not self.sampled and self.max_participations is not None:
            log(WARNING, "round %d: every client has spent its privacy budget; the global "
                "model stays as it is", server_round)
            return
        started = time.perf_counter()
        stats.secagg = {"threshold": 0, "dropped": [], "wire_bytes": 0, "seconds": 0.0}
        needed = self.guard.min_replies
        if self.max_participations is not None:
            needed = min(needed, len(self.sampled))
        keys = self._stage(server_round, grid, secagg.KEYS,
                           {n: secagg.keys_content(server_round) for n in self.sampled},
                           timeout, lambda node, content: secagg.check_keys(content))
        members = sorted(keys)  # P: those whose public keys arrived
        t = sa.threshold_of(len(members))
        stats.secagg["threshold"] = t
        needed = max(needed, t, 2)
        self._require(server_round, len(members), needed, "sent their keys")
        content = secagg.shares_content(server_round, keys)
        packets = self._stage(server_round, grid, secagg.SHARES, dict.fromkeys(members, content),
                              timeout, lambda node, c: secagg.check_shares(c, node, members))
        joined = sorted(packets)  # U: those whose shares went out; each masks against the rest
        self._require(server_round, len(joined), needed, "shared their keys")
        self._packets = {}
        for node in joined:
            record = secagg.train_record(node, {s: packets[s] for s in joined})
            record["weight-scale"] = self.guard.max_examples
            self._packets[node] = record
        messages = [self._train_message(node, server_round) for node in joined]
        self._packets = {}
        stages = time.perf_counter() - started
        replies = grid.send_and_receive(messages, timeout=timeout)
        numel = sum(self.global_state[n].numel() for n in self.round_train)
        k, dtype = sa.modulus_bits(len(members)), sa.dtype(len(members))
        accepted = self._screen(server_round, list(replies), joined,
                                masked=(numel + sa.extras(self.private), dtype, k))
        stats.client_train_seconds = sum(a.metrics.get("train_seconds", 0.0) for a in accepted)
        survivors = [a.node for a in accepted]
        dropped = [n for n in joined if n not in set(survivors)]
        stats.secagg["dropped"] = [self.node_client.get(n) for n in dropped]
        self._require(server_round, len(survivors), needed, "sent a masked update")
        started = time.perf_counter()
        shares = self._stage(server_round, grid, secagg.UNMASK,
                             {n: secagg.unmask_content(server_round, survivors, dropped)
                              for n in survivors},
                             timeout, lambda node, content: secagg.check_unmask(content))
        for node in joined:
            self._flush(node, self.node_client.get(node))
        self._require(server_round, len(shares), t, "sent their unmasking shares")
        agg_start = time.perf_counter()
        try:
            total = secagg.unmask({a.node: a.vector for a in accepted}, dropped,
                                  list(shares.values()), {n: keys[n][1] for n in members}, t, k)
        except ValueError as exc:  # ProtocolError, or shares that do not combine
            raise RoundFailed(server_round, f"round {server_round}: secure aggregation could "
                              f"not unmask the sum ({exc}); the run stops and the global "
                              f"model stays that of round {server_round - 1}") from None
        summed, weight, loss, clipped = secagg.decode(total, sa, numel, self.private, k)
        stats.secagg.update({"weight": weight, "clipped_values": clipped,
                             "error_bound": secagg.error_bound(sa, len(survivors), weight)
                             if weight > 0 else None})
        mean = self._check_aggregate(server_round, summed, weight, clipped, len(survivors))
        if mean is not None:
            new, _ = self.method.aggregate(server_round, self.global_state, [(mean, 1.0)])
            for name, value in new.items():  # (per-client metrics such as aggregation_gap
                self.global_state[name] = value  # need each client's tensors: none logged)
                self.version[name] = server_round
            self._packed.clear()
            self._rounded.clear()
            if loss is not None:
                stats.train_loss = loss / weight
        stats.aggregate_seconds = time.perf_counter() - agg_start
        stats.secagg["seconds"] = stages + time.perf_counter() - started

    def _stage(self, server_round: int, grid: Grid, kind: str, contents: Mapping[int, RecordDict],
               timeout: float, check: Callable[[int, RecordDict], object]) -> dict[int, object]:
        """Send one secure-aggregation stage's messages; {node: check(node, reply content)}
        for the valid replies. Failures and rejections are recorded as for training; every
        message goes to the ledger under the stage's kind, its bytes to the round's."""
        stats, label = self.stats[server_round], secagg.KINDS[kind]
        sent = {}
        for node, content in contents.items():
            msg = Message(content=content, message_type=kind, dst_node_id=node,
                          group_id=str(server_round))
            size = payload.message_bytes(msg)
            self.pending.setdefault(node, []).append(
                self._message_row(server_round, "down", label, size))
            stats.download_wire_bytes += size
            stats.secagg["wire_bytes"] += size
            sent[node] = msg
        replies = grid.send_and_receive(list(sent.values()), timeout=timeout)
        asked = {m.metadata.message_id: n for n, m in sent.items()}
        got: dict[int, object] = {}
        answered = set()
        for msg in replies:
            size = payload.message_bytes(msg)
            stats.upload_wire_bytes += size
            stats.secagg["wire_bytes"] += size
            node = asked.get(msg.metadata.reply_to_message_id)
            sender = msg.metadata.src_node_id
            if node is None or node in answered or (sender != node and not msg.has_error()):
                reason = f"{label}: reply out of place (not the one answer of a node asked)"
                stats.rejected.append({"client": self.node_client.get(sender), "node": sender,
                                       "reason": reason})
                self.ledger([self._message_row(server_round, "up", label, size,
                                               self.node_client.get(sender), rejected=reason)])
                continue
            answered.add(node)
            self.pending.setdefault(node, []).append(
                self._message_row(server_round, "up", label, size))
            if msg.has_error():
                self._fail(server_round, node, f"{label}: client error: {msg.error.reason}")
                continue
            try:
                got[node] = check(node, msg.content)
            except secagg.ProtocolError as exc:
                reason = f"{label}: {exc}"
                stats.rejected.append({"client": self.node_client.get(node), "node": node,
                                       "reason": reason})
                self.pending[node][-1]["rejected"] = reason
                self._flush(node, self.node_client.get(node))
        for node in sent:
            if node not in answered:
                self._fail(server_round, node,
                           f"{label}: no reply before the timeout (dropped out or hung)")
        return got

    def _require(self, server_round: int, count: int, needed: int, what: str) -> None:
        """Stop the run (RoundFailed) when fewer than `needed` clients `what`."""
        if count >= needed:
            return
        record = self.stats[server_round]
        problems = "; ".join(f"client {f.get('client')}: {f['reason'].splitlines()[0]}"
                             for f in record.failed + record.rejected)
        raise RoundFailed(server_round,
            f"round {server_round}: only {count} clients {what}, fewer than the {needed} "
            "secure aggregation needs (its threshold and federation.min_replies); the run "
            f"stops and the global model stays that of round {server_round - 1}. {problems}")

    def _check_masked(self, content: RecordDict, masked: tuple[int, np.dtype, int]
                      ) -> tuple[np.ndarray, int, dict[str, float]]:
        """(masked vector, partition id, metrics) of a masked train reply, else Rejected."""
        try:
            vector = secagg.check_masked(content, *masked)
        except secagg.ProtocolError as exc:
            raise Rejected(str(exc)) from None
        client, metrics = check_masked_metrics(content, self.num_clients)
        return vector, client, metrics

    def _masked_rows(self, server_round: int, client: int, dtype: np.dtype) -> list[dict]:
        """Upload ledger rows of a masked reply: each trained tensor at the masked width."""
        chosen = set(self.round_train)
        return [ledger_row(server_round, "up", "train", dtype=dtype.name, client=client,
                           name=n, shape=list(self.global_state[n].shape), sent=n in chosen,
                           payload_bytes=(self.global_state[n].numel() * dtype.itemsize
                                          if n in chosen else 0))
                for n in self.sent]

    def _check_aggregate(self, server_round: int, summed: np.ndarray, weight: float,
                         clipped: int, survivors: int) -> dict[str, torch.Tensor] | None:
        """The new values of the round's tensors (the global plus the weighted mean update),
        if the unmasked aggregate passes what the server can still check: a weight in
        (0, survivors], a clipped count in range, finite values within each client's clip
        range, the update norm within `max_update_norm`, the result within
        `max_abs_value`. Otherwise None (the global stays), with the reason recorded."""
        sa = self.secure
        assert sa is not None
        slack = 1e-6
        numel = summed.size
        reason = None
        if not (0 < weight <= survivors * (1 + slack)):
            reason = f"the weights sum to {weight:.6g}, outside (0, {survivors}]"
        elif not 0 <= clipped <= numel * survivors:
            reason = f"{clipped} values clipped, outside [0, {numel * survivors}]"
        else:
            mean = summed / weight
            norm = float(np.linalg.norm(mean))
            if not np.isfinite(mean).all() or float(np.abs(mean).max(initial=0.0)) > \
                    sa.clip * (1 + slack) + secagg.error_bound(sa, survivors, weight):
                reason = f"the mean update leaves the clip range [-{sa.clip:g}, {sa.clip:g}]"
            elif self.guard.max_update_norm and norm > self.guard.max_update_norm * (1 + slack):
                reason = (f"the mean update's norm {norm:.4g} exceeds "
                          f"federation.max_update_norm = {self.guard.max_update_norm:g}")
        if reason is None:
            out, offset = {}, 0
            for n in self.round_train:
                ref = self.global_state[n]
                part = torch.from_numpy(mean[offset:offset + ref.numel()].copy())
                out[n] = (ref.double() + part.reshape(ref.shape)).to(ref.dtype)
                offset += ref.numel()
            worst = max((float(v.abs().max()) for v in out.values() if v.numel()), default=0.0)
            if worst <= self.guard.max_abs_value:
                return out
            reason = f"the aggregate holds |value| {worst:.3g} > {self.guard.max_abs_value:g}"
        reason = f"secure aggregate refused: {reason}; the global stays as it was"
        log(WARNING, "round %d: %s", server_round, reason)
        self.stats[server_round].rejected.append({"client": None, "node": None,
                                                  "reason": reason})
        return None
