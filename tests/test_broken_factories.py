"""A topology, model or algorithm plug-in that raises or returns the wrong thing is named in one
line (exit code 1), with no traceback and no run folder left behind; `validate` says the same."""

from __future__ import annotations

import math

import pytest
from torch import nn

from fedsim import LocalSGDConfig, register_algorithm, register_dataset, register_model, register_topology
from fedsim.cli import main
from tests.conftest import SMALL


@register_topology("test_raising_topology")
def _raising_topology(n: int) -> None:
    raise RuntimeError("topology boom")


@register_model("test_raising_model")
def _raising_model(input_shape, num_classes):
    raise RuntimeError("model boom")


@register_model("test_string_model")
def _string_model(input_shape, num_classes):
    return "not a module"


@register_model("test_narrow_model")
def _narrow_model(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 3))


@register_algorithm("test_raising_build")
def _raising_build(cfg: LocalSGDConfig, ctx):
    raise RuntimeError("build boom")


@register_dataset("test_raising_data")
def _raising_data(cfg, seed):
    raise RuntimeError("data boom")


DPSGD = SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "dpsgd"')
CASES = {
    "topology raises": (DPSGD.replace("[system]", '[topology]\nname = "test_raising_topology"\n\n[system]'),
                        "topology 'test_raising_topology' raised RuntimeError('topology boom') building a graph of 12 nodes"),
    "model raises": (SMALL.replace('name = "mlp"\nhidden = [32]', 'name = "test_raising_model"'),
                     "model 'test_raising_model' raised RuntimeError('model boom') when built for inputs (60,)"),
    "model is no module": (SMALL.replace('name = "mlp"\nhidden = [32]', 'name = "test_string_model"'),
                           "model 'test_string_model' returned a str, not a torch.nn.Module"),
    "model too narrow": (SMALL.replace('name = "mlp"\nhidden = [32]', 'name = "test_narrow_model"'),
                         "model 'test_narrow_model' returned shape (1, 3) for one example; expected a tensor of shape "
                         "(1, 10): one logit per class"),
    "data set raises": (SMALL.replace('dataset = "synthetic"', 'dataset = "test_raising_data"'),
                        "data set loader 'test_raising_data' raised RuntimeError('data boom')"),
    "build raises": (SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "test_raising_build"'),
                     "algorithm 'test_raising_build' raised RuntimeError('build boom') while building its flow"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_factory_is_one_line_naming_it(case, write_scenario, tmp_path, capsys):
    text, message = CASES[case]
    path = write_scenario(text)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(path) in err[0], err
    assert "Traceback" not in err[0]
    assert not (out / "small").exists()  # refused before it started: nothing left behind


@pytest.mark.parametrize("case", ["topology raises", "model raises", "model is no module", "model too narrow"])
def test_validate_names_a_broken_factory_as_run_would(case, write_scenario, capsys):
    text, message = CASES[case]  # validate saying ok means run starts: it builds what run builds
    path = write_scenario(text)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("case", ["model too narrow", "model raises"])
def test_validate_checks_a_large_model_on_the_meta_device(case, write_scenario, capsys, monkeypatch):
    from fedsim import preflight

    import fedsim.models as models

    built = []  # the device of every model run on one example
    original = models.output_of_one
    monkeypatch.setattr(models, "output_of_one", lambda m, *a: built.append(next(m.parameters()).device.type) or original(m, *a))
    monkeypatch.setattr(preflight, "_REAL_CHECK_BYTES", 0)  # every model counts as large
    monkeypatch.setattr(preflight, "_MODELS_CHECKED", set())
    text, message = CASES[case]
    assert main(["validate", str(write_scenario(text))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    if case == "model too narrow":
        assert built == ["meta"]  # nothing allocated
