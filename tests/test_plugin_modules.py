"""`--plugin MODULE` and `[plugins] modules = [...]`: a module imported first, so that the names it
registers (README route 2) work from a scenario; standard-library modules are refused."""

from __future__ import annotations

import sys
import tomllib

import pytest

from fedsim import registry
from fedsim.cli import main
from tests.conftest import SMALL

RULES = '''
from fedsim import Aggregator, register_aggregator


@register_aggregator("{name}")
class CoordinateMedian(Aggregator):
    def __call__(self, global_params, batch, *, round):
        return {{k: t.median(dim=0).values for k, t in batch.params.items()}}
'''

MODEL = '''
from torch import nn
from fedsim import register_model


@register_model("{name}")
def tiny(input_shape, num_classes, *, width: int = 8):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(), nn.Linear(width, num_classes))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Write a plug-in module in a fresh working directory; forget it (and what it registered) after."""
    monkeypatch.chdir(tmp_path)
    written = []

    def write(module: str, text: str) -> str:
        (tmp_path / f"{module}.py").write_text(text)
        written.append(module)
        return module

    yield write
    for module in written:
        sys.modules.pop(module, None)
    for reg in (registry.aggregators, registry.models):
        for name in [n for n in reg._items if n.startswith("plugtest_")]:
            del reg._items[name]
    sys.path[:] = [p for p in sys.path if p != str(tmp_path)]


def test_plugin_flag_makes_a_registered_name_work(plugin, tmp_path, capsys):
    module = plugin("plugtest_rules_a", RULES.format(name="plugtest_median"))
    (tmp_path / "s.toml").write_text(SMALL + '\n[aggregator]\nname = "plugtest_median"\n')
    assert main(["validate", "s.toml"]) == 2  # without the module, the name is unknown
    assert "unknown aggregator 'plugtest_median'" in capsys.readouterr().err
    assert main(["validate", "s.toml", "--plugin", module]) == 0
    assert main(["run", "s.toml", "--plugin", module, "--out", "out", "--no-progress"]) == 0
    resolved = tomllib.loads((tmp_path / "out" / "small" / "scenario.toml").read_text())
    assert resolved["plugins"]["modules"] == [module]  # recorded, so --resume imports it again
    assert resolved["aggregator"]["name"] == "plugtest_median"


def test_plugins_table_in_a_scenario(plugin, tmp_path):
    module = plugin("plugtest_rules_b", RULES.format(name="plugtest_median_b"))
    (tmp_path / "s.toml").write_text(SMALL + f'\n[plugins]\nmodules = ["{module}"]\n'
                                     '\n[aggregator]\nname = "plugtest_median_b"\n')
    assert main(["run", "s.toml", "--out", "out", "--no-progress"]) == 0
    assert "plugtest_median_b" in registry.aggregators.names()


@pytest.mark.parametrize("how", ["flag", "table"])
@pytest.mark.parametrize("module", ["this", "os.path", "subprocess"])
def test_standard_library_modules_are_refused(tmp_path, monkeypatch, capsys, how, module):
    monkeypatch.chdir(tmp_path)
    before = "this" in sys.modules
    text = SMALL + (f'\n[plugins]\nmodules = ["{module}"]\n' if how == "table" else "")
    (tmp_path / "s.toml").write_text(text)
    args = ["--plugin", module] if how == "flag" else []
    assert main(["validate", "s.toml", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    top = module.split(".")[0]
    assert len(err) == 1
    assert err[0].startswith("fedsim: error: s.toml: plugins.modules: ")
    assert f"names the standard library module '{top}'" in err[0]
    assert ("this" in sys.modules) == before  # refused before anything was imported


def test_a_module_that_fails_to_import_is_one_line(plugin, tmp_path, capsys):
    module = plugin("plugtest_broken", "raise RuntimeError('needs a licence key')\n")
    (tmp_path / "s.toml").write_text(SMALL)
    assert main(["run", "s.toml", "--plugin", module, "--out", "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedsim: error: s.toml: plugins.modules: cannot import plug-in module 'plugtest_broken': "
                   "RuntimeError('needs a licence key')"]
    assert main(["validate", "s.toml", "--plugin", "no_such_module_anywhere"]) == 2
    assert "cannot import plug-in module 'no_such_module_anywhere'" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_workers_import_the_plugins_too(ray_session, plugin, tmp_path):
    """A registered model is built inside the Ray actors: they import the plug-in module as well."""
    module = plugin("plugtest_model", MODEL.format(name="plugtest_tiny"))
    text = SMALL.replace('name = "mlp"\nhidden = [32]', 'name = "plugtest_tiny"\nwidth = 6')
    (tmp_path / "s.toml").write_text(text.replace('executor = "inline"', 'executor = "ray"\nworkers = 1'))
    assert main(["run", "s.toml", "--plugin", module, "--out", "ray", "--no-progress"]) == 0
    (tmp_path / "i.toml").write_text(text)  # the same curves inline
    assert main(["run", "i.toml", "--plugin", module, "--out", "inline", "--no-progress"]) == 0
    import pandas as pd

    ray_rows = pd.read_csv(tmp_path / "ray" / "small" / "metrics.csv").drop(columns="wall_time")
    inline_rows = pd.read_csv(tmp_path / "inline" / "small" / "metrics.csv").drop(columns="wall_time")
    pd.testing.assert_frame_equal(ray_rows, inline_rows, check_exact=True)
