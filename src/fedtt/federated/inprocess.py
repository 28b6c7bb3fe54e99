"""Run the unchanged ServerApp and ClientApp in one process, without Ray or a network.

`InProcessGrid` implements Flower's `Grid` by calling the ClientApp synchronously for each
message, with one `Context` per simulated node (its partition id and its small state). The
model lives once in the process (see `runtime.py`), so memory does not grow with clients.
This touches one Flower internal, `TaskIdentity` (the pin on flwr keeps it stable; a test
covers it). Calls run on a worker thread so that a client that hangs past the timeout can be
abandoned (with its thread); the shared model is guarded by `Runtime.lock`.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from tqdm.auto import tqdm

from fedtt.config import RunConfig, to_toml
from fedtt.federated import server_app, wire
from fedtt.federated.client_app import app as default_client_app
from fedtt.federated.runtime import CONFIG_KEY, INPROCESS_KEY

SERVER_NODE_ID = 1  # Flower's SUPERLINK_NODE_ID
RUN_ID = 1
CLIENT_ERROR = 3  # an Error code for "the ClientApp raised"


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process."""

    def __init__(self, client_app: ClientApp, run_config: dict, num_nodes: int,
                 progress: bool = False) -> None:
        self.client_app = client_app
        self.contexts = {
            SERVER_NODE_ID + 1 + i: Context(
                run_id=RUN_ID, node_id=SERVER_NODE_ID + 1 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(), run_config=run_config)
            for i in range(num_nodes)}
        self.progress = progress
        self._pending: dict[str, Message] = {}
        self._run = None
        # One long-lived worker thread runs the client calls (a new thread per call would
        # give each its own malloc arena, and memory would grow by the activations of one
        # training step per call).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="client")

    def client_states(self) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
        """Every simulated client's stored tensors (for checkpoints)."""
        return {node: {key: wire.from_record(record) for key, record in ctx.state.items()
                       if isinstance(record, ArrayRecord)}
                for node, ctx in self.contexts.items()}

    def load_client_states(self, states: dict[int, dict[str, dict[str, torch.Tensor]]]) -> None:
        for node, records in states.items():
            for key, tensors in records.items():
                self.contexts[node].state[key] = wire.to_record(tensors)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = msg.object_id  # as Flower's own link state does (so ids have its length)
            msg.metadata.__dict__["_message_id"] = mid
            self._pending[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._deliver(list(message_ids), timeout=None)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._deliver(list(self.push_messages(messages)), timeout)

    def _deliver(self, ids: list[str], timeout: float | None) -> list[Message]:
        """Call the ClientApp for each message in turn; each call gets `timeout` seconds.

        A call that overruns is abandoned: its node sends no reply (as a hung or dropped
        SuperNode would not), and whatever it returns later is discarded.
        """
        replies = []
        kind = self._pending[ids[0]].metadata.message_type if ids else ""
        bar = tqdm(total=len(ids), desc=f"  {kind} clients", leave=False,
                   disable=not self.progress, file=sys.stderr)
        for mid in ids:
            msg = self._pending.pop(mid)
            reply = self._call(msg, timeout)
            if reply is not None:
                replies.append(reply)
            bar.update(1)
        bar.close()
        return replies

    def _call(self, msg: Message, timeout: float | None) -> Message | None:
        context = self.contexts[msg.metadata.dst_node_id]

        def work() -> Message:
            try:
                return self.client_app(msg, context)
            except Exception as exc:  # a failing client must not end the run
                reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
                return Message(Error(code=CLIENT_ERROR, reason=reason), reply_to=msg)

        future = self._worker.submit(work)
        try:
            return future.result(timeout)
        except FutureTimeout:
            # Abandon the hung call with its thread; later calls get a fresh one.
            self._worker.shutdown(wait=False)
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="client")
            return None


def act_as_server() -> None:
    """Give this process the identity Flower's `Message` reads when the server creates one."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = SERVER_NODE_ID


def run_inprocess(cfg: RunConfig, *, quiet: bool = False, verbose: bool = False,
                  client_app: ClientApp | None = None, resume: bool = False) -> dict:
    """Run a whole federation in this process (or, with `resume`, continue the one whose
    checkpoint is in `cfg.output.dir`); returns the run summary."""
    act_as_server()
    show = not quiet and sys.stderr.isatty()
    run_config = {CONFIG_KEY: to_toml(cfg), "fedtt-progress": show, "fedtt-resume": resume,
                  INPROCESS_KEY: True}
    grid = InProcessGrid(client_app or default_client_app, run_config,
                         cfg.federation.num_clients, progress=show)
    context = Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={},
                      state=RecordDict(), run_config=run_config)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        return server_app.run(grid, context, clients=grid)
    finally:
        flwr_logger.setLevel(level)
