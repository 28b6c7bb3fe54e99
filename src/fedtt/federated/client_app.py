"""fedtt's Flower ClientApp: load the received tensors, train locally, reply with the update.

A message carries the tensors this client lacks, and its config names the tensors to train
and upload this round (for FedTT+ that is the server's core mask). A stateful client
(cross-silo) keeps the global tensors it has received in `context.state`, so the server only
sends what changed; a stateless one (cross-device) keeps nothing but local-only tensors.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtt.federated import wire
from fedtt.federated.runtime import Runtime, get_runtime

STATE_GLOBAL = "fedtt.global"  # global tensors as last received (stateful clients)
STATE_LOCAL = "fedtt.local"  # tensors that never leave the client (keep-local head)

app = ClientApp()


def _restore(rt: Runtime, message: Message, context: Context) -> None:
    """Put this client's view of the model into the shared backbone.

    Received arrays are kept as they came (no re-serialisation) in the stateful client's
    store; only stored tensors that were not just received are decoded.
    """
    arrays: ArrayRecord = message.content["arrays"]
    stateful = bool(message.content["config"]["stateful"])
    state = dict(rt.initial)
    for key in ((STATE_GLOBAL,) if stateful else ()) + (STATE_LOCAL,):
        if key in context.state:
            stored = context.state[key]
            state.update({n: wire.from_array(a) for n, a in stored.items()
                          if n not in arrays})
    state.update(wire.from_record(arrays))
    rt.load(state)
    if stateful:
        store = context.state.get(STATE_GLOBAL) or ArrayRecord()
        for name, array in arrays.items():
            store[name] = array
        context.state[STATE_GLOBAL] = store


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.train()
def train(message: Message, context: Context) -> Message:
    rt = get_runtime(context.run_config)
    config = message.content["config"]
    names = list(config["train"])
    pid = _partition(context)
    with rt.lock:
        _restore(rt, message, context)
        start = time.perf_counter()
        loss, examples = rt.train_client(pid, int(config["server-round"]), names)
        seconds = time.perf_counter() - start
        if rt.local_only:
            context.state[STATE_LOCAL] = wire.to_record(rt.snapshot(rt.local_only))
        trained = wire.to_record(rt.snapshot(names), rt.cfg.federation.precision)
    reply = RecordDict({
        "arrays": trained,
        "metrics": MetricRecord({"num-examples": examples, "train_loss": loss,
                                 "partition-id": pid, "train_seconds": seconds}),
    })
    return Message(reply, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    rt = get_runtime(context.run_config)
    pid = _partition(context)
    with rt.lock:
        _restore(rt, message, context)
        metrics, examples = rt.evaluate_client(pid)
    reply = RecordDict({"metrics": MetricRecord({
        "num-examples": examples, "partition-id": pid,
        **{f"local_{k}": v for k, v in metrics.items()}})})
    return Message(reply, reply_to=message)
