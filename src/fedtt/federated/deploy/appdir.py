"""The Flower app directory that `flwr run` submits, and the run config it carries.

The directory holds one `pyproject.toml` whose components are fedtt's installed ServerApp and
ClientApp, so the bundle holds no code. `fedtt_run_config` turns a fedtt `RunConfig` into the
Flower run config both apps read it from. `read_build_log` reads the model builds that
`fedtt.federated.runtime.Runtime` records when `FEDTT_BUILD_LOG` names a file (tests and
benchmarks count them).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtt.config import toml_value

APP_NAME = "fedtt-deployment"
APP_PUBLISHER = "fedtt"
SERVERAPP = "fedtt.federated.server_app:app"
CLIENTAPP = "fedtt.federated.client_app:app"
# Environment variable naming a file where `Runtime` logs each model build (instrumentation).
# The same name as `Runtime.BUILD_LOG_ENV`, not imported from it: that module imports torch.
BUILD_LOG_ENV = "FEDTT_BUILD_LOG"


def fedtt_run_config(cfg: Any) -> dict[str, str]:
    """Flower run config carrying a fedtt RunConfig: its TOML text under `fedtt-config`.

    `output.dir` is made absolute first: the ServerApp runs in a process that the SuperLink
    starts, whose working directory is not the caller's.
    """
    from fedtt.config import to_toml
    from fedtt.federated.runtime import CONFIG_KEY

    cfg = copy.deepcopy(cfg)
    cfg.output.dir = str(Path(cfg.output.dir).absolute())
    return {CONFIG_KEY: to_toml(cfg)}


def write_app_dir(directory: str | Path, run_config: Mapping[str, Any]) -> Path:
    """Write a minimal Flower app directory: a `pyproject.toml` and nothing else.

    Its components are fedtt's installed apps, so the bundle holds no code. Flower requires
    `[project]` name and version, `[tool.flwr.app]` publisher and
    `[tool.flwr.app.components]` serverapp and clientapp. `run_config` becomes
    `[tool.flwr.app.config]`; a key with dots ("federation.rounds") is written quoted, so it
    stays one flat key, which fedtt reads as a `section.key` override. Only keys written here
    can be overridden with `flwr run --run-config`.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "[project]", f'name = "{APP_NAME}"', 'version = "1.0.0"',
        'description = "fedtt on the Flower Deployment Engine"', 'license = "Apache-2.0"', "",
        "[tool.flwr.app]", f'publisher = "{APP_PUBLISHER}"', "",
        "[tool.flwr.app.components]", f"serverapp = {toml_value(SERVERAPP)}",
        f"clientapp = {toml_value(CLIENTAPP)}", "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in run_config.items()]
    (out / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def read_build_log(path: str | Path) -> list[dict[str, Any]]:
    """The model builds logged to `path` (see `BUILD_LOG_ENV`), one dict per build:
    `{"pid", "start", "seconds"}`."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
