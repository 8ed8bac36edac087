"""Shared fixtures: one Ray session for the whole test run, and small scenario files."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

SMALL = """
name = "small"
seed = 3
rounds = 4

[data]
dataset = "synthetic"
num_clients = 12
samples_per_client = 60
test_size = 400

[model]
name = "mlp"
hidden = [32]

[algorithm]
name = "fedavg"
clients_per_round = 4
lr = 0.1
batch_size = 16

[system]
executor = "inline"
"""


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run end-to-end checks marked slow")


def pytest_collection_modifyitems(config, items):
    """Keep a plain `pytest` fast; `make test` (and so CI) passes --run-slow and runs everything."""
    if config.getoption("--run-slow") or os.environ.get("FEDSIM_SLOW") == "1":
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Tests neither read nor write the user's ~/.cache/fedsim (calibrated training paths,
    pretrained weights): one cache for the session, shared by the runs it compares."""
    if "FEDSIM_CACHE" not in os.environ:
        os.environ["FEDSIM_CACHE"] = str(tmp_path_factory.mktemp("fedsim-cache"))
    yield


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once, in-process, dashboard off; every Ray test shares it."""
    import ray

    from fedsim.executor import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def write_scenario(tmp_path: Path):
    """Write a scenario file from TOML text (default: a small FedAvg run) and return its path."""

    def write(text: str = SMALL, name: str = "scenario.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write
