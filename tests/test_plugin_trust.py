"""A scenario names code only through routes that cannot reach arbitrary callables (issue: a
scenario alone ran `os.system`). Each case checks that nothing was called, not just the exit code."""

from __future__ import annotations

import sys

import pytest

from fedsim.cli import main
from tests.conftest import SMALL

# Standard-library callables a hostile scenario might name, with keys that would be their arguments.
STDLIB_TARGETS = [
    ("aggregator", "os:system", 'command = "touch {marker}"'),
    ("aggregator", "subprocess:run", 'args = ["touch", "{marker}"]'),
    ("aggregator", "builtins:exec", 'source = "open(\'{marker}\', \'w\')"'),
    ("aggregator", "pathlib:Path", 'x = "{marker}"'),
    ("model", "shutil:rmtree", 'path = "{marker}"'),
    ("topology", "os.path:join", 'a = "{marker}"'),
    ("algorithm", "os:system", ""),
]


@pytest.mark.parametrize("table,target,keys", STDLIB_TARGETS)
@pytest.mark.parametrize("command", ["run", "validate"])
def test_standard_library_callables_are_refused(tmp_path, write_scenario, capsys, table, target, keys, command):
    marker = tmp_path / "pwned"
    body = SMALL
    if table == "aggregator":
        body += f'\n[aggregator]\nname = "{target}"\n{keys.format(marker=marker)}\n'
    elif table == "model":
        body = body.replace('name = "mlp"\nhidden = [32]', f'name = "{target}"\n{keys.format(marker=marker)}')
    elif table == "topology":
        body += f'\n[topology]\nname = "{target}"\n{keys.format(marker=marker)}\n'
    else:
        body = body.replace('name = "fedavg"', f'name = "{target}"')
    path = write_scenario(body)
    args = [command, str(path)] + (["--out", str(tmp_path / "out"), "--no-progress"] if command == "run" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "standard library" in err, err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_undeclared_third_party_callable_is_refused_before_it_is_called(tmp_path, write_scenario, capsys, monkeypatch):
    """An importable object that is not a fedsim plug-in (no registration, no base class) is an
    error, and it is never called with the table's keys."""
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "called"
    (tmp_path / "fedsim_test_untrusted.py").write_text(
        "import pathlib\n"
        "class Rule:\n"
        "    def __init__(self, **kw):\n"
        f"        pathlib.Path({str(marker)!r}).write_text('x')\n"
        "    def __call__(self, g, b, *, round):\n"
        "        return g\n"
        "def build(cfg, ctx):\n"
        f"    pathlib.Path({str(marker)!r}).write_text('x')\n"
    )
    try:
        for body in (SMALL + '\n[aggregator]\nname = "fedsim_test_untrusted:Rule"\n',
                     SMALL.replace('name = "fedavg"', 'name = "fedsim_test_untrusted:build"')):
            path = write_scenario(body)
            assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert "is not a fedsim" in err and err.count("\n") == 1, err
            assert not marker.exists()
    finally:
        sys.modules.pop("fedsim_test_untrusted", None)


def test_declared_plugins_still_resolve(tmp_path, monkeypatch):
    """The trust check keeps the documented routes: a registered object, an Aggregator subclass and
    an algorithm build function typed with an AlgorithmConfig."""
    from fedsim import registry

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fedsim_test_declared.py").write_text(
        "from fedsim import Aggregator, AlgorithmConfig, register_model\n"
        "class Sub(Aggregator):\n"
        "    def __call__(self, g, b, *, round):\n        return g\n"
        "class Cfg(AlgorithmConfig):\n    pass\n"
        "def build(cfg: Cfg, ctx):\n    return None\n"
        "@register_model('fedsim_test_declared_model')\n"
        "def model(shape, classes, seed):\n    return None\n"
    )
    try:
        import fedsim_test_declared as mod

        assert registry.aggregators.get("fedsim_test_declared:Sub") is mod.Sub
        assert registry.algorithms.get("fedsim_test_declared:build") is mod.build
        assert registry.models.get("fedsim_test_declared:model") is mod.model
        with pytest.raises(Exception, match="is not a fedsim model"):
            registry.models.get("fedsim_test_declared:Cfg")
    finally:
        sys.modules.pop("fedsim_test_declared", None)
        registry.models._items.pop("fedsim_test_declared_model", None)
