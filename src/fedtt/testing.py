"""Test support, not product: fault injection for the tests and `benchmarks/robustness.py`.

Nothing in fedtt imports this module; it ships in the package only so that tests and benchmarks
can import it. It holds ways to spoil a valid client reply, for fuzzing the server's validation.

Each mutation takes a valid train reply's content and a `random.Random` and returns a
malformed `RecordDict` that a correct server must reject. `Harness` is a real FedTT strategy
on a tiny model with three nodes and round 1 configured, to send replies through.
`poisoning_app` is a ClientApp one of whose clients replies with well-formed poison.
"""

from __future__ import annotations

import functools
import io
import random
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtt.federated import payload

Mutation = Callable[[RecordDict, random.Random], RecordDict]


def _parts(content: RecordDict) -> tuple[dict[str, Array], dict]:
    arrays = dict(content["arrays"].items())
    metrics = dict(content["metrics"].items())
    return arrays, metrics


def _pack(arrays: dict[str, Array], metrics: dict) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord(array_dict=arrays), "metrics": MetricRecord(metrics)})


def _pick(arrays: dict[str, Array], rng: random.Random) -> str:
    return rng.choice(sorted(arrays))


def _with_array(content: RecordDict, rng: random.Random,
                change: Callable[[np.ndarray, random.Random], np.ndarray]) -> RecordDict:
    arrays, metrics = _parts(content)
    name = _pick(arrays, rng)
    arrays[name] = Array(change(arrays[name].numpy().copy(), rng))
    return _pack(arrays, metrics)


def drop_key(content: RecordDict, rng: random.Random) -> RecordDict:
    arrays, metrics = _parts(content)
    del arrays[_pick(arrays, rng)]
    return _pack(arrays, metrics)


def extra_key(content: RecordDict, rng: random.Random) -> RecordDict:
    arrays, metrics = _parts(content)
    arrays[f"backbone.layer.{rng.randrange(100)}.weight"] = Array(np.zeros(3, np.float32))
    return _pack(arrays, metrics)


def renamed_key(content: RecordDict, rng: random.Random) -> RecordDict:
    arrays, metrics = _parts(content)
    name = _pick(arrays, rng)
    arrays[name + "_x"] = arrays.pop(name)
    return _pack(arrays, metrics)


def wrong_shape(content: RecordDict, rng: random.Random) -> RecordDict:
    def change(a: np.ndarray, rng: random.Random) -> np.ndarray:
        flat = a.reshape(-1)
        return flat[: max(flat.size - rng.randint(1, 3), 0)] if rng.random() < 0.5 \
            else np.concatenate([flat, flat[:1]])
    return _with_array(content, rng, change)


def reshaped(content: RecordDict, rng: random.Random) -> RecordDict:
    """Same values, another shape: 2-D becomes 1-D, anything else a (1, n) row."""
    return _with_array(content, rng, lambda a, r: a.reshape(-1) if a.ndim == 2
                       else a.reshape(1, -1))


def wrong_dtype(content: RecordDict, rng: random.Random) -> RecordDict:
    dtype = rng.choice([np.float64, np.float16, np.int32, np.int64, np.bool_])
    return _with_array(content, rng, lambda a, r: a.astype(dtype))


def nan_or_inf(content: RecordDict, rng: random.Random) -> RecordDict:
    def change(a: np.ndarray, rng: random.Random) -> np.ndarray:
        a.reshape(-1)[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return a
    return _with_array(content, rng, change)


def huge_values(content: RecordDict, rng: random.Random) -> RecordDict:
    def change(a: np.ndarray, rng: random.Random) -> np.ndarray:
        a.reshape(-1)[rng.randrange(a.size)] = rng.choice([1e5, -1e9, 3e38])
        return a
    return _with_array(content, rng, change)


def _with_data(content: RecordDict, rng: random.Random,
               data: Callable[[Array, random.Random], bytes]) -> RecordDict:
    """Keep an array's announced dtype, shape and type; replace its bytes."""
    arrays, metrics = _parts(content)
    name = _pick(arrays, rng)
    a = arrays[name]
    arrays[name] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=data(a, rng))
    return _pack(arrays, metrics)


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def truncated_bytes(content: RecordDict, rng: random.Random) -> RecordDict:
    return _with_data(content, rng,
                      lambda a, r: a.data[:r.randrange(0, max(len(a.data) - 1, 1))])


def header_lies(content: RecordDict, rng: random.Random) -> RecordDict:
    """The Array says float32 of the right shape; the bytes hold float64."""
    return _with_data(content, rng, lambda a, r: _npy(np.zeros(a.shape, np.float64)))


def oversized_bytes(content: RecordDict, rng: random.Random) -> RecordDict:
    return _with_data(content, rng, lambda a, r: a.data + b"\0" * r.randint(1024, 1 << 20))


def pickled_payload(content: RecordDict, rng: random.Random) -> RecordDict:
    """An object array: loading it would need pickle, which must never happen."""
    return _with_data(content, rng,
                      lambda a, r: _npy(np.array([{"x": 1}], dtype=object), allow_pickle=True))


def empty_reply(content: RecordDict, rng: random.Random) -> RecordDict:
    return rng.choice([RecordDict({}), RecordDict({"metrics": MetricRecord({})}),
                       RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({})})])


def wrong_record_type(content: RecordDict, rng: random.Random) -> RecordDict:
    arrays, metrics = _parts(content)
    return RecordDict({"arrays": ArrayRecord(array_dict=arrays),
                       "metrics": ConfigRecord({k: str(v) for k, v in metrics.items()})})


def bad_example_count(content: RecordDict, rng: random.Random) -> RecordDict:
    arrays, metrics = _parts(content)
    metrics["num-examples"] = rng.choice([0, -5, 2.5, float("nan"), float("inf"), 10**15])
    return _pack(arrays, metrics)


def missing_example_count(content: RecordDict, rng: random.Random) -> RecordDict:
    arrays, metrics = _parts(content)
    del metrics["num-examples"]
    return _pack(arrays, metrics)


def bad_partition_id(content: RecordDict, rng: random.Random) -> RecordDict:
    arrays, metrics = _parts(content)
    metrics["partition-id"] = rng.choice([-1, 10**6, 0.5, float("nan")])
    return _pack(arrays, metrics)


def bad_metric(content: RecordDict, rng: random.Random) -> RecordDict:
    arrays, metrics = _parts(content)
    metrics["train_loss"] = rng.choice([float("nan"), float("inf")])
    return _pack(arrays, metrics)


MUTATIONS: dict[str, Mutation] = {f.__name__.replace("_", "-"): f for f in (
    drop_key, extra_key, renamed_key, wrong_shape, reshaped, wrong_dtype, nan_or_inf,
    huge_values, truncated_bytes, header_lies, oversized_bytes, pickled_payload, empty_reply,
    wrong_record_type, bad_example_count, missing_example_count, bad_partition_id, bad_metric)}


@functools.cache
def _initial_tensors() -> dict[str, torch.Tensor]:
    from fedtt.adapters import AdapterConfig
    from fedtt.methods import make_method
    from fedtt.models import load_model

    method = make_method("fedtt", AdapterConfig(init="gaussian"))
    model = method.build(load_model("arch:tiny-bert", 2), seed=0)
    sent = method.sent_names(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in sent}


class Harness:
    """A FedTT strategy on a tiny BERT, three nodes, round 1 configured; the ledger in `rows`."""

    def __init__(self) -> None:
        from fedtt.adapters import AdapterConfig
        from fedtt.federated.inprocess import InProcessGrid, act_as_server
        from fedtt.federated.safeguards import Safeguards
        from fedtt.federated.strategy import FedTTStrategy
        from fedtt.methods import make_method

        act_as_server()
        method = make_method("fedtt", AdapterConfig(init="gaussian"))
        self.rows: list[dict] = []
        self.strategy = FedTTStrategy(
            method, _initial_tensors(), stateful=True, num_clients=3, clients_per_round=3,
            seed=0, client_eval=False, ledger=self.rows.extend,
            guard=Safeguards(min_replies=1, round_retries=0, max_examples=1000))
        grid = InProcessGrid(ClientApp(), {}, 3)
        self.messages = list(self.strategy.configure_train(1, ArrayRecord(), ConfigRecord(),
                                                           grid))
        grid.push_messages(self.messages)  # gives them their ids, as Flower's grid does

    def reply(self, i: int, content: RecordDict) -> Message:
        """`content` as the reply of node i (partition i) to its round-1 message."""
        return Message(content, reply_to=self.messages[i])

    def valid(self, i: int, seed: int) -> RecordDict:
        """A well-formed reply of partition i: the global tensors plus seeded noise."""
        g = torch.Generator().manual_seed(seed)
        state = {n: t + 0.01 * torch.randn(t.shape, generator=g)
                 for n, t in self.strategy.global_state.items()}
        return RecordDict({"arrays": payload.pack(list(state.values())),
                           "metrics": MetricRecord({"num-examples": 10 + i, "partition-id": i,
                                                    "train_loss": 0.5, "train_seconds": 0.1})})


def poisoning_app(value: float = 5000.0, victim: int = 0) -> ClientApp:
    """fedtt's ClientApp, except that client `victim` replies with values of +-`value`
    (finite, well formed, random signs) instead of its update."""
    from fedtt.federated import client_app

    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        reply = client_app.train(message, context)
        if context.node_config["partition-id"] == victim:
            flat = payload.packed_array(reply.content["arrays"])
            g = torch.Generator().manual_seed(int(message.content["config"]["server-round"]))
            signs = torch.randint(0, 2, tuple(flat.shape), generator=g).float() * 2 - 1
            reply.content["arrays"] = payload.pack([signs * value])
        return reply

    return app
