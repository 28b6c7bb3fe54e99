"""Secure aggregation: SecAgg+ (Bell et al., CCS 2020) over fedtt's packed update, built
from Flower's own primitives; no cryptography of fedtt's own.

Each round with `federation.secure_aggregation`, the strategy (`strategy.py`) runs four
stages with the clients it sampled, as Flower's SecAgg+ workflow and `secaggplus_mod` do:

1. `query.secagg_keys`: every client makes two fresh EC key pairs (Flower's
   `generate_key_pairs`): one to encrypt share packets, one whose ECDH secrets seed the
   pairwise masks. It replies with both public keys.
2. `query.secagg_shares`: the server sends every client the public keys of all who answered
   (set P). A client draws a 32-byte self-mask seed b, splits b and its masking private key
   into |P| Shamir shares with threshold t (Flower's `create_shares`), and encrypts each other
   member's packet with their shared key (`generate_shared_key`, `encrypt`,
   `share_keys_plaintext_concat`). The server only routes the ciphertexts.
3. `train`: the train message also carries the packets addressed to that client (from the
   set U of clients that finished stage 2). The client decrypts and checks them, trains, and
   replies with its masked update: the *update* (trained minus what it was sent) over the
   round's trained tensors, clipped to `[-secagg_clip, secagg_clip]` per value and to
   `federation.max_update_norm`, multiplied by its weight, followed by the weight, its
   weighted loss and its count of clipped values; quantized to signed fixed point with
   `secagg_bits` bits; plus the self mask PRG(b) and, for every other member j of U,
   +-PRG(s_ij); all modulo 2^k. Under local DP every weight is 1 and no loss travels.
4. `query.secagg_unmask`: the server tells the clients whose masked vector arrived (S) which
   members of U dropped out (U - S). Each returns its shares of b for S and of the masking
   key for U - S, never both for one node. From t shares per secret the server rebuilds the
   seeds (`combine_shares`), removes the self masks of S and the pairwise masks between S and
   the dropped clients, and learns only the sum. It survives any dropout that leaves t clients.

Numbers: values are signed fixed point, value / range * 2^(bits-1), rounded to nearest
(deterministic, so a run is reproducible and the sum is exact); the modulus is 2^k with
k = bits + ceil(log2 |P|) + 1, so the sum of |P| values cannot wrap. Masked vectors travel as
uint64 (uint32 when k <= 32). The aggregate differs from plain FedAvg by at most
|S| * range / 2^bits / (sum of weights) per value (`error_bound`).

PRG: Flower's `pseudo_rand_gen` folds its seed to 32 bits (numpy's RandomState), which a
curious server could search exhaustively. The masks here are the AES-256-CTR keystream (the
`cryptography` package, which Flower's primitives use) keyed by the full 32-byte seed.

What this protects: the server (honest but curious, as in SecAgg+) sees each client's
update only masked; with fewer than t colluding clients it learns the sum and nothing more.
It cannot check an individual update; see docs/robustness.md.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedtt.federated import payload, wire

KEYS, SHARES, UNMASK = "query.secagg_keys", "query.secagg_shares", "query.secagg_unmask"
KINDS = {KEYS: "secagg-keys", SHARES: "secagg-shares", UNMASK: "secagg-unmask"}  # ledger
RECORD = "secagg"  # the train message's record of share packets
STATE = "fedtt.secagg"  # a client's secrets for the round in progress (context.state)
LOSS_RANGE = 100.0  # weighted training loss travels masked, clipped to [0, this]
MAX_KEY_BYTES = 1024  # a PEM public key of SECP384R1 is 215 bytes


class ProtocolError(ValueError):
    """A secure-aggregation message that breaks the protocol; the message says how."""


@dataclass(frozen=True)
class Settings:
    """One run's secure-aggregation parameters (`federation.secagg_*`)."""

    threshold: float = 0.5
    clip: float = 1.0
    bits: int = 40
    max_update_norm: float = 0.0  # a client bounds its own update's L2 norm (0: no bound)

    def threshold_of(self, n: int) -> int:
        """t for n share holders: more than `threshold` of them (default: a majority), and
        at least 2, so no single reply is ever unmasked."""
        return min(n, max(2, math.floor(self.threshold * n) + 1))

    def modulus_bits(self, n: int) -> int:
        """k: the sum of n values of `bits` signed bits cannot wrap modulo 2^k."""
        return self.bits + max(1, math.ceil(math.log2(max(n, 1)))) + 1

    def dtype(self, n: int) -> np.dtype:
        return np.dtype(np.uint32 if self.modulus_bits(n) <= 32 else np.uint64)

    def extras(self, private: bool) -> int:
        """Values after the update: weight, (weighted loss,) clipped count."""
        return 2 if private else 3


def settings_of(fed) -> Settings:
    """The Settings of a `FederationConfig`."""
    return Settings(threshold=fed.secagg_threshold, clip=fed.secagg_clip,
                    bits=fed.secagg_bits, max_update_norm=fed.max_update_norm)


# --- numbers -----------------------------------------------------------------------------
def _mask(k: int) -> np.uint64:
    return np.uint64((1 << k) - 1)


def quantize(values: np.ndarray, ranges: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Signed fixed point modulo 2^k: round(clip(v, -r, r) / r * 2^(bits-1)), as uint64."""
    scaled = np.clip(values, -ranges, ranges) / ranges * float(2 ** (bits - 1))
    return np.rint(scaled).astype(np.int64).view(np.uint64) & _mask(k)


def dequantize(total: np.ndarray, ranges: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The float64 values of a sum of `quantize`d vectors (taken modulo 2^k, signed)."""
    shift = np.uint64(64 - k)  # move bit k-1 to the sign bit, then shift back (signed)
    signed = ((total.astype(np.uint64) & _mask(k)) << shift).view(np.int64) >> shift.astype(
        np.int64)
    return signed.astype(np.float64) * ranges / float(2 ** (bits - 1))


def prg(seed: bytes, n: int, k: int) -> np.ndarray:
    """n uniform values modulo 2^k: the AES-256-CTR keystream of a 32-byte seed."""
    if len(seed) != 32:
        raise ProtocolError(f"mask seed of {len(seed)} bytes, 32 expected")
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(
        bytes(8 * n))
    return np.frombuffer(stream, dtype=np.uint64) & _mask(k)


def _pair_seed(private: bytes, public: bytes) -> bytes:
    """The 32-byte secret two clients share (ECDH + HKDF, Flower's `generate_shared_key`)."""
    key = generate_shared_key(bytes_to_private_key(private), bytes_to_public_key(public))
    return base64.urlsafe_b64decode(key)


def ranges_for(numel: int, clip: float, private: bool) -> np.ndarray:
    """Each value's range: the update's, then weight, (weighted loss,) clipped count."""
    extra = [1.0] + ([] if private else [LOSS_RANGE]) + [float(max(numel, 1))]
    return np.concatenate([np.full(numel, clip, dtype=np.float64), np.array(extra)])


def error_bound(settings: Settings, survivors: int, weight: float) -> float:
    """Largest difference, per value, between the unmasked mean update and the exact one."""
    return survivors * settings.clip / 2 ** (settings.bits - 1) / 2 / weight


# --- client side -------------------------------------------------------------------------
def _state(context) -> ConfigRecord:
    if STATE not in context.state:
        raise ProtocolError("no secure-aggregation round in progress on this client")
    return context.state[STATE]


def _node_ids(text: str) -> list[int]:
    """Node ids travel as one comma-separated string (Flower's node ids are uint64, and an
    empty list has no type on the wire)."""
    return [int(v) for v in str(text).split(",") if v]


def _ids_text(nodes: Sequence[int]) -> str:
    return ",".join(str(int(n)) for n in nodes)


def client_keys(message: Message, context) -> Message:
    """Stage 1: fresh key pairs for this round; reply with the public halves."""
    sk_enc, pk_enc = generate_key_pairs()
    sk_mask, pk_mask = generate_key_pairs()
    rnd = int(message.content["config"]["server-round"])
    pk1, pk2 = public_key_to_bytes(pk_enc), public_key_to_bytes(pk_mask)
    context.state[STATE] = ConfigRecord({
        "round": rnd, "node": str(context.node_id), "sk-enc": private_key_to_bytes(sk_enc),
        "sk-mask": private_key_to_bytes(sk_mask), "pk-enc": pk1, "pk-mask": pk2})
    return Message(RecordDict({"keys": ConfigRecord({"pk-enc": pk1, "pk-mask": pk2})}),
                   reply_to=message)


def client_shares(message: Message, context, settings: Settings) -> Message:
    """Stage 2: share the self-mask seed and the masking key among every member of P."""
    st = _state(context)
    cfg = message.content["config"]
    if int(cfg["server-round"]) != int(st["round"]):
        raise ProtocolError("share request for another round than the keys")
    nodes = _node_ids(cfg["nodes"])
    pk_enc, pk_mask = list(cfg["pk-enc"]), list(cfg["pk-mask"])
    me = int(st["node"])
    if not len(nodes) == len(set(nodes)) == len(pk_enc) == len(pk_mask) or me not in nodes:
        raise ProtocolError("malformed member list")
    if len(set(pk_enc) | set(pk_mask)) != 2 * len(nodes):
        raise ProtocolError("some public keys are identical")
    mine = nodes.index(me)
    if pk_enc[mine] != st["pk-enc"] or pk_mask[mine] != st["pk-mask"]:
        raise ProtocolError("this client's public keys are listed wrongly")
    t = settings.threshold_of(len(nodes))
    if len(nodes) < 2:
        raise ProtocolError("fewer than two members: a sum of one is no secret")
    seed = os.urandom(32)
    seed_shares = create_shares(seed, t, len(nodes))
    key_shares = create_shares(bytes(st["sk-mask"]), t, len(nodes))
    sk_enc = bytes_to_private_key(bytes(st["sk-enc"]))
    dsts, cts = [], []
    for i, node in enumerate(nodes):
        if node == me:
            continue
        key = generate_shared_key(sk_enc, bytes_to_public_key(pk_enc[i]))
        cts.append(encrypt(key, share_keys_plaintext_concat(me, node, seed_shares[i],
                                                            key_shares[i])))
        dsts.append(node)
    st["nodes"], st["pk-enc-list"], st["pk-mask-list"] = _ids_text(nodes), pk_enc, pk_mask
    st["seed"] = seed
    st["held"] = _ids_text([me])  # members whose shares this client holds, and the shares
    st["seed-shares"], st["key-shares"] = [seed_shares[mine]], [key_shares[mine]]
    return Message(RecordDict({"shares": ConfigRecord({"dst": _ids_text(dsts), "ct": cts})}),
                   reply_to=message)


def client_mask(context, record: ConfigRecord, settings: Settings, delta: np.ndarray,
                weight: float, loss: float | None) -> ArrayRecord:
    """Stage 3: check the share packets received, then mask this client's weighted,
    clipped, quantized update; the reply's one packed array."""
    st = _state(context)
    me = int(st["node"])
    nodes = _node_ids(st["nodes"])
    sk_enc = bytes_to_private_key(bytes(st["sk-enc"]))
    pk_enc = dict(zip(nodes, st["pk-enc-list"], strict=True))
    pk_mask = dict(zip(nodes, st["pk-mask-list"], strict=True))
    srcs = _node_ids(record["src"])
    if len(set(srcs)) != len(srcs) or not set(srcs) <= set(nodes) - {me}:
        raise ProtocolError("share packets from nodes outside this round's members")
    t = settings.threshold_of(len(nodes))
    if len(srcs) + 1 < t:
        raise ProtocolError(f"{len(srcs) + 1} members left, fewer than the threshold {t}")
    held = _node_ids(st["held"])
    seed_sh, key_sh = list(st["seed-shares"]), list(st["key-shares"])
    for src, ct in zip(srcs, record["ct"], strict=True):
        key = generate_shared_key(sk_enc, bytes_to_public_key(pk_enc[src]))
        actual, dst, seed_share, key_share = share_keys_plaintext_separate(decrypt(key, ct))
        if actual != src or dst != me:
            raise ProtocolError(f"a share packet from {actual} to {dst} arrived as {src}->{me}")
        held.append(src)
        seed_sh.append(seed_share)
        key_sh.append(key_share)
    st["held"], st["seed-shares"], st["key-shares"] = _ids_text(held), seed_sh, key_sh
    st["members"] = _ids_text([me, *srcs])  # U, as this client saw it

    # Bound the update before it is masked: per value, then its L2 norm.
    delta = np.asarray(delta, dtype=np.float64)
    clipped = int((np.abs(delta) > settings.clip).sum())
    delta = np.clip(delta, -settings.clip, settings.clip)
    norm = float(np.linalg.norm(delta))
    if settings.max_update_norm > 0 and norm > settings.max_update_norm:
        delta = delta * (settings.max_update_norm / norm)
    private = loss is None
    extra = [weight] + ([] if private else [weight * min(max(loss, 0.0), LOSS_RANGE)])
    values = np.concatenate([delta * weight, np.array(extra + [float(clipped)])])
    k = settings.modulus_bits(len(nodes))
    q = quantize(values, ranges_for(delta.size, settings.clip, private), settings.bits, k)
    q = q + prg(bytes(st["seed"]), q.size, k)
    sk_mask = bytes(st["sk-mask"])
    for src in srcs:
        pair = prg(_pair_seed(sk_mask, pk_mask[src]), q.size, k)
        q = q + pair if me > src else q - pair  # uint64 wraps modulo 2^64, a multiple of 2^k
    q &= _mask(k)
    return ArrayRecord(array_dict={
        payload.PACKED: wire.numpy_to_array(q.astype(settings.dtype(len(nodes))))})


def client_unmask(message: Message, context, settings: Settings) -> Message:
    """Stage 4: shares of the self-mask seeds of the survivors and of the masking keys of the
    dropped, never both for one node; the round's secrets are forgotten afterwards."""
    st = _state(context)
    cfg = message.content["config"]
    active, dropped = _node_ids(cfg["active"]), _node_ids(cfg["dropped"])
    members = set(_node_ids(st["members"])) if "members" in st else set()
    t = settings.threshold_of(len(_node_ids(st["nodes"])))
    if int(cfg["server-round"]) != int(st["round"]) or int(st["node"]) not in active:
        raise ProtocolError("unmask request for another round, or without this client")
    if set(active) & set(dropped) or not set(active) | set(dropped) <= members:
        raise ProtocolError("a node both active and dropped, or not a member")
    if len(active) < t:
        raise ProtocolError(f"{len(active)} survivors, fewer than the threshold {t}")
    index = {n: i for i, n in enumerate(_node_ids(st["held"]))}
    shares = ([st["seed-shares"][index[n]] for n in active if n in index]
              + [st["key-shares"][index[n]] for n in dropped if n in index])
    nodes = [n for n in active if n in index] + [n for n in dropped if n in index]
    del context.state[STATE]
    return Message(RecordDict({"unmask": ConfigRecord({"nodes": _ids_text(nodes),
                                                       "shares": shares})}),
                   reply_to=message)


# --- server side -------------------------------------------------------------------------
def keys_content(server_round: int) -> RecordDict:
    return RecordDict({"config": ConfigRecord({"server-round": server_round})})


def check_keys(content: RecordDict) -> tuple[bytes, bytes]:
    """(encryption, masking) public keys of a stage-1 reply; ProtocolError if malformed."""
    rec = _config(content, "keys")
    keys = rec.get("pk-enc"), rec.get("pk-mask")
    if not all(isinstance(k, bytes) and 0 < len(k) <= MAX_KEY_BYTES for k in keys):
        raise ProtocolError("public keys missing or not bytes of a plausible length")
    return keys  # type: ignore[return-value]


def shares_content(server_round: int, keys: Mapping[int, tuple[bytes, bytes]]) -> RecordDict:
    nodes = sorted(keys)
    return RecordDict({"config": ConfigRecord({
        "server-round": server_round, "nodes": _ids_text(nodes),
        "pk-enc": [keys[n][0] for n in nodes], "pk-mask": [keys[n][1] for n in nodes]})})


def check_shares(content: RecordDict, sender: int, members: Sequence[int]
                 ) -> dict[int, bytes]:
    """dst -> ciphertext of a stage-2 reply: one packet for every other member."""
    rec = _config(content, "shares")
    try:
        dsts, cts = _node_ids(rec["dst"]), list(rec["ct"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("share packets malformed") from None
    if sorted(dsts) != sorted(set(members) - {sender}) or len(cts) != len(dsts) \
            or not all(isinstance(c, bytes) for c in cts):
        raise ProtocolError("share packets do not address every other member once")
    return dict(zip(dsts, cts, strict=True))


def train_record(node: int, packets: Mapping[int, Mapping[int, bytes]]) -> ConfigRecord:
    """The share packets addressed to `node`, from every other member of U."""
    srcs = sorted(s for s in packets if s != node)
    return ConfigRecord({"src": _ids_text(srcs), "ct": [packets[s][node] for s in srcs]})


def check_masked(content: RecordDict, length: int, dtype: np.dtype, k: int) -> np.ndarray:
    """The masked vector of a train reply: exactly `length` values of `dtype` below 2^k."""
    try:
        array = payload.packed_array(content["arrays"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"wrong tensors: {exc}") from None
    if array.dtype != dtype.name or tuple(array.shape) != (length,):
        raise ProtocolError(f"masked vector {array.dtype} {tuple(array.shape)}, expected "
                            f"{dtype.name} ({length},)")
    if len(array.data) > length * dtype.itemsize + 256:
        raise ProtocolError("masked vector longer than its plan")
    try:
        values = wire.numpy_from_array(array).astype(np.uint64)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    if values.size and int(values.max()) >> k:
        raise ProtocolError(f"masked values of more than {k} bits")
    return values


def unmask_content(server_round: int, active: Sequence[int], dropped: Sequence[int]
                   ) -> RecordDict:
    return RecordDict({"config": ConfigRecord({
        "server-round": server_round, "active": _ids_text(active),
        "dropped": _ids_text(dropped)})})


def check_unmask(content: RecordDict) -> dict[int, bytes]:
    rec = _config(content, "unmask")
    try:
        nodes, shares = _node_ids(rec["nodes"]), list(rec["shares"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("unmask reply malformed") from None
    if len(nodes) != len(shares) or not all(isinstance(s, bytes) for s in shares):
        raise ProtocolError("unmask reply malformed")
    return dict(zip(nodes, shares, strict=True))


def unmask(masked: Mapping[int, np.ndarray], dropped: Sequence[int],
           shares: Sequence[Mapping[int, bytes]], mask_keys: Mapping[int, bytes],
           threshold: int, k: int) -> np.ndarray:
    """The sum (modulo 2^k) of the survivors' quantized vectors: their masked vectors minus
    their self masks, with the pairwise masks they share with dropped clients removed."""
    def rebuild(node: int) -> bytes:
        held = [s[node] for s in shares if node in s]
        if len(held) < threshold:
            raise ProtocolError(f"{len(held)} shares of node {node}'s secret, {threshold} "
                                "needed")
        return combine_shares(held[:threshold])

    n = next(iter(masked.values())).size
    total = np.zeros(n, dtype=np.uint64)
    for vector in masked.values():
        total += vector
    for node in masked:
        total -= prg(rebuild(node), n, k)
    for gone in dropped:
        sk = rebuild(gone)
        for node in masked:
            pair = prg(_pair_seed(sk, mask_keys[node]), n, k)
            total = total - pair if node > gone else total + pair  # undo what `node` added
    return total & _mask(k)


def decode(total: np.ndarray, settings: Settings, numel: int, private: bool, k: int
           ) -> tuple[np.ndarray, float, float | None, int]:
    """(sum of the weighted updates, sum of weights, weighted loss sum or None, values
    clipped) of an unmasked sum."""
    values = dequantize(total, ranges_for(numel, settings.clip, private), settings.bits, k)
    loss = None if private else float(values[numel + 1])
    return values[:numel], float(values[numel]), loss, int(round(values[-1]))


def _config(content: RecordDict, key: str) -> ConfigRecord:
    try:
        rec = content[key]
    except (KeyError, TypeError):
        raise ProtocolError(f"reply has no {key!r} record") from None
    if not isinstance(rec, ConfigRecord):
        raise ProtocolError(f"reply's {key!r} is not a ConfigRecord")
    return rec


def metrics_of(content: RecordDict) -> MetricRecord:
    rec = content["metrics"]
    if not isinstance(rec, MetricRecord):
        raise ProtocolError("reply's 'metrics' is not a MetricRecord")
    return rec


# --- cost (fedtt plan) -----------------------------------------------------------------------
def simulate(clients: int, numel: int, settings: Settings, private: bool = False,
             dropped: int = 0) -> dict:
    """One round of the protocol among `clients` in-memory clients with updates of `numel`
    values, `dropped` of them leaving after sharing their keys: one client's bytes on the
    wire per stage (Flower's count, `payload.message_bytes`) and the seconds of one client's
    protocol work and of the server's unmasking, on this machine."""
    import time
    from types import SimpleNamespace

    def sent(content: RecordDict, kind: str, node: int) -> Message:
        msg = Message(content=content, message_type=kind, dst_node_id=node, group_id="1")
        msg.metadata.__dict__["_message_id"] = msg.object_id  # as a grid's push sets it
        return msg

    nodes = list(range(2, clients + 2))
    ctx = {n: SimpleNamespace(node_id=n, state=RecordDict()) for n in nodes}
    me = nodes[0]
    cost: dict = {"clients": clients, "values": numel}
    tick = time.perf_counter()
    down = {n: sent(keys_content(1), KEYS, n) for n in nodes}
    up = {n: client_keys(down[n], ctx[n]) for n in nodes}
    cost["keys"] = (payload.message_bytes(up[me]), payload.message_bytes(down[me]))
    keys = {n: check_keys(up[n].content) for n in nodes}
    content = shares_content(1, keys)
    down = {n: sent(content, SHARES, n) for n in nodes}
    up = {n: client_shares(down[n], ctx[n], settings) for n in nodes}
    cost["shares"] = (payload.message_bytes(up[me]), payload.message_bytes(down[me]))
    packets = {n: check_shares(up[n].content, n, nodes) for n in nodes}
    survivors = nodes[:clients - dropped]
    rng = np.random.default_rng(0)
    masked, extra = {}, 0
    k = settings.modulus_bits(clients)
    for n in survivors:
        record = train_record(n, packets)
        record["weight-scale"] = 1000
        if n == me:
            bare = sent(RecordDict(), MessageType.TRAIN, n)
            extra = payload.message_bytes(sent(RecordDict({RECORD: record}), MessageType.TRAIN,
                                               n)) - payload.message_bytes(bare)
        arrays = client_mask(ctx[n], record, settings, rng.normal(0, 1e-3, numel), 0.3,
                             None if private else 0.5)
        masked[n] = check_masked(RecordDict({"arrays": arrays}),
                                 numel + settings.extras(private), settings.dtype(clients), k)
        if n == me:
            reply = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
                {"partition-id": 0, "train_seconds": 1.0})}), reply_to=bare)
            cost["masked_reply"] = payload.message_bytes(reply)
    cost["train_extra_download"] = extra
    content = unmask_content(1, survivors, nodes[len(survivors):])
    down = {n: sent(content, UNMASK, n) for n in survivors}
    up = {n: client_unmask(down[n], ctx[n], settings) for n in survivors}
    cost["unmask"] = (payload.message_bytes(up[me]), payload.message_bytes(down[me]))
    cost["client_seconds"] = (time.perf_counter() - tick) / clients
    tick = time.perf_counter()
    unmask(masked, nodes[len(survivors):], [check_unmask(u.content) for u in up.values()],
           {n: keys[n][1] for n in nodes}, settings.threshold_of(clients), k)
    cost["server_seconds"] = time.perf_counter() - tick
    stages = ("keys", "shares", "unmask")
    cost["stage_upload_wire_bytes"] = sum(cost[s][0] for s in stages)
    cost["stage_download_wire_bytes"] = sum(cost[s][1] for s in stages) + extra
    for s in stages:
        cost[s] = {"upload_wire_bytes": cost[s][0], "download_wire_bytes": cost[s][1]}
    return cost
