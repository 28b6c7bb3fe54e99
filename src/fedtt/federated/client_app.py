"""fedtt's Flower ClientApp: load the received tensors, train locally, reply with the update.

A message carries the tensors this client lacks, packed (`payload.py`), and its config names
the tensors to train and upload this round as a mask over the travelling tensors (for FedTT+
that is the server's core mask). A stateful client (cross-silo) keeps the global tensors it
has received in `context.state`, so the server only sends what changed; a stateless one
(cross-device) keeps nothing but local-only tensors.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtt import privacy
from fedtt.federated import payload, secagg, wire
from fedtt.federated.runtime import INPROCESS_KEY, Runtime, get_runtime

STATE_GLOBAL = "fedtt.global"  # global tensors as last received (stateful clients)
STATE_LOCAL = "fedtt.local"  # tensors that never leave the client (keep-local head)
STATE_PRIVACY = "fedtt.privacy"  # DP-SGD steps this client has taken (its accounting)

app = ClientApp()


def _restore(rt: Runtime, message: Message, context: Context) -> None:
    """Put this client's view of the model into the shared backbone.

    The message's packed payload holds the tensors its config's "arrays" mask names, at the
    TT rank its config names (the server learns a client's rank from its replies); a
    stateful client keeps what it received, as received, and restores the rest from that
    store.
    """
    config = message.content["config"]
    names = payload.select(rt.sent, config["arrays"])
    received = payload.unpack(message.content["arrays"],
                              rt.layout(names, int(config["rank"]) or None))
    stateful = bool(config["stateful"])
    state = dict(rt.initial)
    for key in ((STATE_GLOBAL,) if stateful else ()) + (STATE_LOCAL,):
        if key in context.state:
            stored = context.state[key]
            state.update({n: wire.from_array(a) for n, a in stored.items()
                          if n not in received})
    state.update(received)
    rt.load(state)
    if stateful:
        store = context.state.get(STATE_GLOBAL) or ArrayRecord()
        for name, tensor in received.items():
            store[name] = wire.to_array(tensor)
        context.state[STATE_GLOBAL] = store


def _runtime(context: Context) -> Runtime:
    """This process's Runtime. A SuperNode runs on its own device: node config `device`
    (auto, cpu, cuda, cuda:N; default auto). In-process clients share the server's backbone,
    on training.device."""
    device = context.node_config.get("device")
    if device is None and not context.run_config.get(INPROCESS_KEY):
        device = "auto"
    return get_runtime(context.run_config, None if device is None else str(device))


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def client_rank(rt: Runtime, context: Context) -> int | None:
    """This client's TT rank: node config `tt-rank`, else the one the method's config gives
    its partition (`Method.client_rank`); None when it trains at the model's own rank."""
    if "tt-rank" in context.node_config:
        rank = int(context.node_config["tt-rank"])
    else:
        rank = rt.method.client_rank(_partition(context))
    if rank is None:
        return None
    if not 1 <= rank <= rt.cfg.adapter.rank:
        raise ValueError(f"tt-rank {rank} outside 1..adapter.rank = {rt.cfg.adapter.rank}")
    # At or above the largest rank the cores really have, it holds the whole adapter.
    return rank if rank < rt.tt_rank else None


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the tensors the config's "train" mask names; reply with them packed. Under local
    DP a reply holds only the noised tensors and public values (`privacy.py`)."""
    rt = _runtime(context)
    config = message.content["config"]
    names = payload.select(rt.sent, config["train"])
    pid = _partition(context)
    rank = client_rank(rt, context)
    dp = _privacy_check(rt, context, pid) if rt.cfg.privacy.enabled else {}
    masked = secagg.RECORD in message.content
    if rt.cfg.federation.secure_aggregation and not masked:
        raise secagg.ProtocolError("secure aggregation is on: this client sends no update "
                                   "unmasked")
    with rt.lock:
        _restore(rt, message, context)
        if rank:
            rt.fit_rank(rank)
        base = rt.snapshot(names) if masked else None
        start = time.perf_counter()
        loss, examples = rt.train_client(pid, int(config["server-round"]), names, rank)
        if dp:
            context.state[STATE_PRIVACY] = wire.to_record({"steps": torch.tensor([dp["dp_steps"]])})
        seconds = time.perf_counter() - start
        if rt.local_only:
            context.state[STATE_LOCAL] = wire.to_record(rt.snapshot(rt.local_only))
        trained = rt.snapshot(names)
        if rank:
            trained = rt.at_rank(trained, rank)
        if masked:  # the weighted update (and count, loss) travel masked: secagg.py
            arrays = _masked(rt, message, context, trained, base, names, examples, loss, dp)
        else:
            arrays = payload.pack([trained[n] for n in names], rt.cfg.federation.precision)
    metrics: dict = {"partition-id": pid}
    if not dp:  # the row count, raw loss and timing of private rows would leave un-noised
        metrics.update({"train_seconds": seconds} if masked else
                       {"num-examples": examples, "train_loss": loss, "train_seconds": seconds})
    if rank:
        metrics["tt-rank"] = rank
    metrics.update(dp)
    reply = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=message)


def _masked(rt: Runtime, message: Message, context: Context, trained: dict, base: dict,
            names: list[str], examples: int, loss: float, dp: dict) -> ArrayRecord:
    """The reply's array under secure aggregation: the update (trained minus received),
    weighted by the example count over the public `weight-scale` (1 under local DP), masked."""
    delta = torch.cat([(trained[n].double() - base[n].double()).reshape(-1) for n in names])
    record = message.content[secagg.RECORD]
    weight = 1.0 if dp else min(1.0, examples / float(record["weight-scale"]))
    return secagg.client_mask(context, record, secagg.settings_of(rt.cfg.federation),
                              delta.numpy(), weight, None if dp else loss)


@app.query("secagg_keys")
def secagg_keys(message: Message, context: Context) -> Message:
    """Secure aggregation, stage 1: this round's public keys (`secagg.py`)."""
    return secagg.client_keys(message, context)


@app.query("secagg_shares")
def secagg_shares(message: Message, context: Context) -> Message:
    """Secure aggregation, stage 2: encrypted shares of this round's mask secrets."""
    return secagg.client_shares(message, context,
                                secagg.settings_of(_runtime(context).cfg.federation))


@app.query("secagg_unmask")
def secagg_unmask(message: Message, context: Context) -> Message:
    """Secure aggregation, stage 4: shares that remove the masks of the round's sum."""
    return secagg.client_unmask(message, context,
                                secagg.settings_of(_runtime(context).cfg.federation))


def _privacy_check(rt: Runtime, context: Context, pid: int) -> dict:
    """This round's accounting: the client's steps and epsilon once it has trained, or
    BudgetSpent (the client refuses to train) if that would pass its target epsilon. Both
    are functions of the public plan and how often the client has trained."""
    p, t = rt.cfg.privacy, rt.cfg.training
    plan = rt.privacy_plan
    done = 0
    if STATE_PRIVACY in context.state:
        done = int(wire.from_record(context.state[STATE_PRIVACY])["steps"][0])
    steps = done + t.local_steps
    eps = privacy.epsilon(plan.noise_multiplier, plan.rate, steps, p.delta, p.accountant)
    if p.epsilon > 0 and eps > p.epsilon:
        spent = privacy.epsilon(plan.noise_multiplier, plan.rate, done, p.delta, p.accountant)
        raise privacy.BudgetSpent(
            f"client {pid} stops training: {t.local_steps} more DP-SGD steps would take its "
            f"epsilon from {spent:.3f} to {eps:.3f}, past the target {p.epsilon:g} "
            f"(delta {p.delta:g})")
    return {"epsilon": eps, "dp_steps": steps}


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    rt = _runtime(context)
    pid = _partition(context)
    rank = client_rank(rt, context)
    with rt.lock:
        _restore(rt, message, context)
        if rank:
            rt.fit_rank(rank)
        metrics, examples = rt.evaluate_client(pid)
    reply = RecordDict({"metrics": MetricRecord({
        "num-examples": examples, "partition-id": pid,
        **{f"local_{k}": v for k, v in metrics.items()}})})
    return Message(reply, reply_to=message)
