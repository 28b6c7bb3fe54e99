"""The long-lived ClientApp worker: one process serving every ClientApp task of a SuperNode.

In flwr 1.41 a `flwr-clientapp` process handles exactly one message and exits, and the stock
SuperExec (`--isolation subprocess`, or a separately started `flower-superexec` with
`--isolation process`) launches one per message, so every round would rebuild the model in a
fresh process. `serve_clientapps` takes the SuperExec's place for a SuperNode started with
`--isolation process`: one long-lived process acquires each ClientApp task from the
SuperNode's Runtime API and runs it in-process, so `get_runtime` builds the model once per
SuperNode and reuses it every round. It reuses flwr's own task helpers (pull the task input,
push the reply and the context), which the exact `flwr==1.41.0` pin keeps stable.

    python -m fedtt.federated.deploy.worker clientapp-worker \
        --runtime-api-address 127.0.0.1:PORT \
        --insecure            # or --root-certificates ca.pem when the Runtime API uses TLS
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def serve_clientapps(runtime_api_address: str, *, insecure: bool = True,
                     root_certificates: str | Path | None = None, poll_interval: float = 0.1,
                     stop: threading.Event | None = None, max_tasks: int | None = None) -> int:
    """Run every ClientApp task of a SuperNode (`--isolation process`) in this process.

    Does what `flower-superexec` + one `flwr-clientapp` per message do, minus the process
    per message: acquire a task token, pull the message and context, call the ClientApp
    (loaded once per app bundle, so module state such as fedtt's runtime cache survives),
    push the reply and the updated context. Returns the number of tasks run.
    """
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    certs = Path(root_certificates).read_bytes() if root_certificates else None
    if certs is not None:
        insecure = False
    stop = stop or threading.Event()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certs,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    apps: dict[str, Any] = {}

    def client_app_for(run: Any, fab: Any) -> Any:
        if fab.hash_str not in apps:
            install_from_fab(fab.content, skip_prompt=True)
            apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return apps[fab.hash_str]

    done = 0
    try:
        while not stop.is_set() and (max_tasks is None or done < max_tasks):
            res = client.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                _run_task(runtime_api_address, res.token, insecure, certs, client_app_for)
                done += 1
                continue
            stop.wait(poll_interval)
    finally:
        client.close()
    return done


def _run_task(address: str, token: str, insecure: bool, certs: bytes | None,
              client_app_for: Any) -> None:
    """One ClientApp task, as `flwr-clientapp` runs it, without exiting the process."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certs,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        reply = client_app_for(run, fab)(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # the node answers with an Error, as flwr-clientapp does
        code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(exc, LoadClientAppError)
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
        details = f"{type(exc)}:<'{exc}'>"
        log(logging.ERROR, "ClientApp raised an exception", exc_info=exc)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=status,
                             details=details)
            heartbeat.stop()
            client.close()


def _watch_parent(pid: int, stop: threading.Event) -> None:
    def watch() -> None:
        while not stop.is_set():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)  # the SuperNode is gone: nothing left to serve
            stop.wait(1.0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtt.federated.deploy.worker")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("clientapp-worker",
                            help="serve a SuperNode's ClientApp tasks in one process")
    worker.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, host:port (its --port)")
    tls = worker.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    tls.add_argument("--root-certificates", help="CA certificate (PEM) of the Runtime API")
    worker.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    worker.add_argument("--poll-interval", type=float, default=0.1)
    worker.add_argument("--preload", action="append", default=[], metavar="MODULE",
                        help="import MODULE before serving (e.g. the ClientApp's module, so "
                             "its imports are not paid inside the first round)")
    args = parser.parse_args(argv)
    for module in args.preload:
        importlib.import_module(module)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.parent_pid:
        _watch_parent(args.parent_pid, stop)
    serve_clientapps(args.runtime_api_address, insecure=args.insecure,
                     root_certificates=args.root_certificates,
                     poll_interval=args.poll_interval, stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
