"""An aggregation rule plugs in by each of the three routes and runs from a scenario."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
import torch

from fedsim import registry
from fedsim.cli import main
from fedsim.testing import check_aggregator
from tests.conftest import SMALL

PLUGIN = '''
import torch
from fedsim import Aggregator, register_aggregator


class HalfStep(Aggregator):
    """Moves the global model halfway to the clients' plain mean."""

    def __init__(self, step: float = 0.5):
        self.step = step

    def __call__(self, global_params, batch, *, round):
        return {k: (1 - self.step) * global_params[k] + self.step * v.mean(0) for k, v in batch.params.items()}

{register}
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("fedsim_test_plugin")]:
        del sys.modules[name]


def run_with(tmp_path, write_scenario, aggregator: str) -> dict:
    path = write_scenario(SMALL + f'\n[aggregator]\nname = "{aggregator}"\nstep = 0.25\n')
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    return json.loads((tmp_path / "out" / "small" / "summary.json").read_text())


def test_decorator_route(plugin_dir, write_scenario):
    (plugin_dir / "fedsim_test_plugin_a.py").write_text(PLUGIN.replace("{register}", 'register_aggregator("half_step")(HalfStep)'))
    __import__("fedsim_test_plugin_a")
    try:
        assert "half_step" in registry.aggregators.names()
        summary = run_with(plugin_dir, write_scenario, "half_step")
        assert summary["final_accuracy"] > 0
    finally:
        registry.aggregators._items.pop("half_step", None)


def test_module_path_route(plugin_dir, write_scenario):
    (plugin_dir / "fedsim_test_plugin_b.py").write_text(PLUGIN.replace("{register}", ""))
    summary = run_with(plugin_dir, write_scenario, "fedsim_test_plugin_b:HalfStep")
    assert summary["rounds"] == 4


def test_entry_point_route(plugin_dir, write_scenario, monkeypatch):
    (plugin_dir / "fedsim_test_plugin_c.py").write_text(PLUGIN.replace("{register}", ""))
    dist = plugin_dir / "fedsim_test_plugin_c-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fedsim-test-plugin-c\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fedsim.aggregators]\nhalf_step_ep = fedsim_test_plugin_c:HalfStep\n")
    monkeypatch.setattr(registry.aggregators, "_entry_points_loaded", False)
    try:
        assert "half_step_ep" in registry.aggregators.names()
        summary = run_with(plugin_dir, write_scenario, "half_step_ep")
        assert summary["rounds"] == 4
    finally:
        registry.aggregators._items.pop("half_step_ep", None)


def test_unknown_plugin_option_is_rejected(plugin_dir, write_scenario, capsys):
    (plugin_dir / "fedsim_test_plugin_d.py").write_text(PLUGIN.replace("{register}", ""))
    path = write_scenario(SMALL + '\n[aggregator]\nname = "fedsim_test_plugin_d:HalfStep"\nstride = 2\n')
    assert main(["validate", str(path)]) == 2
    assert "aggregator.stride: unknown key (accepted: step)" in capsys.readouterr().err


def test_example_rules_conform_and_run_end_to_end(tmp_path, monkeypatch):
    from examples.robust_rules import CoordinateMedian, TrimmedMean

    check_aggregator(CoordinateMedian())
    check_aggregator(TrimmedMean(trim=0.2))
    assert main(["run", "examples/robust.toml", "--out", str(tmp_path), "--no-progress",
                 "--set", "rounds=10", "--set", "system.executor=\"inline\""]) == 0
    df = pd.read_csv(tmp_path / "trimmed-mean" / "metrics.csv")
    assert df["test_accuracy"].iloc[-1] > df["test_accuracy"].iloc[0] + 0.15


def test_trimmed_mean_ignores_an_outlier():
    from examples.robust_rules import TrimmedMean

    params = {"w": torch.tensor([[1.0], [1.1], [0.9], [1.0], [1000.0]])}
    from fedsim import UpdateBatch

    batch = UpdateBatch(params, torch.ones(5, dtype=torch.int64), torch.arange(5), torch.zeros(5, dtype=torch.int64))
    out = TrimmedMean(trim=0.2)({"w": torch.zeros(1)}, batch, round=1)
    assert abs(float(out["w"]) - 1.0) < 0.1


def test_list_imports_a_plugin_to_show_its_keys(plugin_dir, capsys):
    (plugin_dir / "fedsim_test_plugin_list.py").write_text(
        "from fedsim import register_topology\n"
        "import networkx as nx\n"
        "@register_topology('fedsim_test_listed_ring')\n"
        "def listed(n: int, *, skip: int = 3):\n"
        "    '''A ring with chords every `skip` nodes.'''\n"
        "    return nx.cycle_graph(n)\n"
    )
    assert main(["list", "topologies", "fedsim_test_listed_ring", "--plugin", "fedsim_test_plugin_list"]) == 0
    out = capsys.readouterr().out
    assert "A ring with chords" in out and "skip = 3" in out
    assert main(["list", "topologies", "--plugin", "fedsim_test_no_such_module"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plugin: cannot import plug-in module 'fedsim_test_no_such_module'" in err[0]
