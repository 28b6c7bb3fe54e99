"""Shared test setup: offline, quiet, a small thread count and a fixed seed. Tests that need a
private cache or Flower home set FEDTT_CACHE or FLWR_HOME themselves; the others share
~/.cache/fedtt, which its file lock keeps safe."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A run with `training.threads` sets torch's process-wide thread count, and float sums
    depend on it: no test leaves it changed for the next."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
