"""`fedtt deploy` as a function: one fedtt run on a fresh `LocalDeployment`, start to summary.

`run_deployed` is the Deployment Engine's counterpart of `fedtt.federated.inprocess.run_inprocess`:
it starts a SuperLink and one SuperNode per client in a temporary directory, runs the config
there, stops everything again, and adds Flower's traffic figures to summary.json.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtt.federated.deploy.appdir import fedtt_run_config, write_app_dir
from fedtt.federated.deploy.local import LocalDeployment, RunResult
from fedtt.federated.deploy.traffic import traffic_report
from fedtt.results import add_to_summary, read_summary

if TYPE_CHECKING:
    from fedtt.config import RunConfig

COMPLETED = "finished:completed"  # Flower's status of a run that ended normally


@dataclass
class DeployedRun:
    """A finished deployed run: Flower's figures for it and fedtt's summary of it."""

    result: RunResult
    out_dir: Path  # the run directory (`output.dir`, absolute)
    summary: dict[str, Any] | None  # summary.json with `flower_traffic`; None if none written

    @property
    def completed(self) -> bool:
        return self.result.status == COMPLETED


def run_deployed(cfg: RunConfig, *, resume: bool = False, secure: bool = True,
                 timeout: float = 3600.0,
                 on_start: Callable[[LocalDeployment], None] | None = None) -> DeployedRun:
    """Run a whole federation on Flower's Deployment Engine on this machine (or, with
    `resume`, continue the one whose checkpoint is in `cfg.output.dir` on fresh SuperNodes).

    `secure` serves everything over TLS with SuperNode authentication; else plain HTTP.
    `on_start` is called with the deployment once its SuperNodes are online, before the run
    is submitted. A run still going after `timeout` seconds raises `DeploymentTimeout`;
    SIGTERM or SIGINT raise `Interrupted`. Either way every process is stopped first.
    """
    run_config: dict[str, Any] = dict(fedtt_run_config(cfg))
    if resume:
        run_config["fedtt-resume"] = True
    with tempfile.TemporaryDirectory(prefix="fedtt-deploy-") as work:
        with LocalDeployment(work, num_nodes=cfg.federation.num_clients, tls=secure,
                             node_auth=secure) as deployment:
            if on_start is not None:
                on_start(deployment)
            app = write_app_dir(Path(work) / "app", run_config)
            result = deployment.run(app, timeout=timeout)
    out = Path(cfg.output.dir).absolute()
    if read_summary(out) is None:
        return DeployedRun(result, out, None)
    return DeployedRun(result, out,
                       add_to_summary(out, flower_traffic=traffic_report(out, result)))
