"""fedtt's unchanged ServerApp and ClientApp on Flower's Deployment Engine.

One job per module:

- `certificates`: TLS certificates and SuperNode authentication keys.
- `appdir`: the Flower app directory `flwr run` submits, and the run config it carries.
- `processes`: ports, executables, signals, and finding a deployment's processes.
- `local`: `LocalDeployment`, a SuperLink and SuperNodes on 127.0.0.1 that always clean up.
- `traffic`: Flower's byte counts for a run against fedtt's ledger.
- `worker`: the long-lived ClientApp worker beside each SuperNode
  (`python -m fedtt.federated.deploy.worker clientapp-worker ...`).
- `runner`: `run_deployed`, the whole of `fedtt deploy` as a function.

The names below are re-exported here. The worker's are loaded on first use only, so that
`python -m fedtt.federated.deploy.worker` does not import its own module twice.
"""

from __future__ import annotations

from typing import Any

from fedtt.federated.deploy.appdir import (
    APP_NAME,
    APP_PUBLISHER,
    BUILD_LOG_ENV,
    CLIENTAPP,
    SERVERAPP,
    fedtt_run_config,
    read_build_log,
    write_app_dir,
)
from fedtt.federated.deploy.certificates import (
    Certificates,
    NodeKeys,
    make_node_keys,
    make_self_signed_certs,
)
from fedtt.federated.deploy.local import (
    CONNECTION,
    DEFAULT_ENV,
    DeploymentTimeout,
    Interrupted,
    LocalDeployment,
    RunResult,
)
from fedtt.federated.deploy.processes import MARKER, Process, free_port
from fedtt.federated.deploy.runner import DeployedRun, run_deployed
from fedtt.federated.deploy.traffic import traffic_report

__all__ = [
    "APP_NAME", "APP_PUBLISHER", "BUILD_LOG_ENV", "CLIENTAPP", "CONNECTION", "DEFAULT_ENV",
    "MARKER", "SERVERAPP", "Certificates", "DeployedRun", "DeploymentTimeout", "Interrupted",
    "LocalDeployment", "NodeKeys", "Process", "RunResult", "fedtt_run_config", "free_port",
    "make_node_keys", "make_self_signed_certs", "read_build_log", "run_deployed",
    "serve_clientapps", "traffic_report", "write_app_dir",
]


def __getattr__(name: str) -> Any:
    if name == "serve_clientapps":
        from fedtt.federated.deploy.worker import serve_clientapps

        return serve_clientapps
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
