"""The memory estimate refuses a scenario that cannot fit, unless forced, and never builds anything big."""

from __future__ import annotations

import time

import pytest

from fedsim import resources
from fedsim.errors import ScenarioError
from fedsim.models import build_model
from fedsim.scenario import load
from tests.conftest import SMALL

GiB = 2**30


def graph_scenario(num_clients: int, hidden: str = "[32]") -> str:
    """SMALL as a decentralized run (dfedavg on a ring) with the given size."""
    text = (
        SMALL.replace('name = "fedavg"', 'name = "dfedavg"')
        .replace("clients_per_round = 4\n", "")
        .replace("num_clients = 12", f"num_clients = {num_clients}")
        .replace("hidden = [32]", f"hidden = {hidden}")
    )
    return text + '\n[topology]\nname = "ring"\n'


def spec_of(write_scenario, text: str, name: str = "scenario.toml"):
    (spec,) = load(write_scenario(text, name))
    return spec


def test_huge_decentralized_scenario_is_refused_unless_forced(write_scenario):
    spec = spec_of(write_scenario, graph_scenario(10_000_000, "[1000, 1000]"))
    start = time.perf_counter()
    with pytest.raises(ScenarioError) as info:
        resources.check(spec, force=False, available=64 * GiB)
    assert time.perf_counter() - start < 5, "the estimate must not build the data or the models"
    message = str(info.value)
    assert "GiB" in message and "--force" in message
    assert "needs about " in message and " GiB but the machine has 64.0 GiB available; use --force to run anyway" in message
    assert info.value.file == spec.source
    assert info.value.key == "data.num_clients"
    assert "\n" not in message
    # 10 million nodes, each keeping ~4 copies of a 1.07M-parameter MLP: over a hundred terabytes
    assert resources.estimate(spec)["total"] > 100 * 2**40
    parts = resources.check(spec, force=True, available=64 * GiB)
    assert parts["total"] > 64 * GiB


def test_huge_model_names_the_model(write_scenario):
    spec = spec_of(write_scenario, SMALL.replace("hidden = [32]", "hidden = [1000000000000000000000000]"))
    with pytest.raises(ScenarioError) as info:
        resources.check(spec, force=False, available=64 * GiB)
    assert info.value.key == "model"


def test_small_scenario_passes(write_scenario):
    spec = spec_of(write_scenario, SMALL)
    parts = resources.check(spec, force=False, available=4 * GiB)
    assert 0 < parts["total"] < 1 * GiB
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    # and with the machine's own MemAvailable
    resources.check(spec, force=False)


def test_mem_available_reads_proc_meminfo():
    available = resources.mem_available()
    if available is None:
        pytest.skip("no /proc/meminfo here")
    assert available > 64 * 2**20


def test_estimate_grows_with_num_clients_for_decentralized_methods(write_scenario):
    totals = [
        resources.estimate(spec_of(write_scenario, graph_scenario(n), f"g{n}.toml"))
        for n in (10, 1_000, 100_000)
    ]
    assert totals[0]["clients"] < totals[1]["clients"] < totals[2]["clients"]
    assert totals[0]["total"] < totals[1]["total"] < totals[2]["total"]
    # one model copy per node at least: the node stack alone is n * model
    assert totals[2]["clients"] >= 100_000 * totals[2]["model"]


def test_server_state_follows_the_cohort_not_the_federation(write_scenario):
    small = resources.estimate(spec_of(write_scenario, SMALL, "a.toml"))
    more = SMALL.replace("num_clients = 12", "num_clients = 1200")
    large = resources.estimate(spec_of(write_scenario, more, "b.toml"))
    assert small["clients"] == large["clients"]  # same clients_per_round
    assert small["data"] < large["data"]  # synthetic data grows with the federation


def test_model_size_matches_a_built_model(write_scenario):
    for name, options, shape in [
        ("mlp", {"hidden": [32, 7]}, (60,)),
        ("logreg", {}, (1, 28, 28)),
        ("cnn", {"channels": [4, 8], "hidden": 16}, (1, 28, 28)),
    ]:
        model = build_model(name, options, shape, 10, 0)
        real = sum(p.numel() * p.element_size() for p in model.parameters())
        assert resources._model_bytes(name, options, shape, 10, 0) == real, name
        assert resources._meta_bytes(name, options, shape, 10, 0) == real, name


def test_fashion_mnist_data_is_counted_from_its_known_size(write_scenario):
    text = SMALL.replace('dataset = "synthetic"', 'dataset = "fashion_mnist"').replace(
        'name = "mlp"\nhidden = [32]', 'name = "logreg"'
    )
    parts = resources.estimate(spec_of(write_scenario, text))
    one_copy = 60_000 * (784 * 4 + 8)
    assert parts["data"] >= one_copy
    assert parts["model"] == (784 * 10 + 10) * 4


def test_ray_executor_counts_the_object_store(write_scenario):
    inline = resources.estimate(spec_of(write_scenario, SMALL, "i.toml"))
    ray_text = SMALL.replace('executor = "inline"', 'executor = "ray"\nworkers = 3')
    ray = resources.estimate(spec_of(write_scenario, ray_text, "r.toml"))
    assert inline["object_store"] == 0 and ray["object_store"] > 0
    # inline, the worker shares the driver's process; each Ray actor is a process of its own
    assert ray["workers"] == 3 * (inline["workers"] + resources._PROCESS)
    assert inline["driver"] == ray["driver"] >= resources._PROCESS
    # the command line's --executor / --workers win over [system]
    spec = spec_of(write_scenario, ray_text, "o.toml")
    assert resources.estimate(spec, executor="inline") == inline
    assert resources.estimate(spec, workers=6)["workers"] == 6 * (inline["workers"] + resources._PROCESS)


def _raw(**data):
    cohort = min(50, data.get("num_clients", 50))
    return {
        "name": "m",
        "data": {"dataset": "synthetic", "test_size": 1000, **data},
        "model": {"name": "logreg"},
        "algorithm": {"name": "fedavg", "clients_per_round": cohort, "lr": 0.05},
        "system": {"executor": "inline"},
    }


def test_lazy_data_costs_its_test_set_and_cache_not_the_federation():
    from fedsim.scenario import validate

    million = resources.estimate(validate(_raw(num_clients=1_000_000, samples_per_client=50), "m", {}))
    ten = resources.estimate(validate(_raw(num_clients=10_000_000, samples_per_client=50), "m", {}))
    assert million["data"] == ten["data"] < 20 * 2**20  # held-out set and the client cache only
    assert ten["bookkeeping"] == 10 * million["bookkeeping"]  # per-client arrays still grow
    # benchmarks/scale.py's million-client run fits a small machine without --force
    assert million["total"] < 1 * GiB
    resources.check(validate(_raw(num_clients=1_000_000, samples_per_client=50), "m", {}), force=False, available=2 * GiB)
    eager = resources.estimate(validate(_raw(num_clients=100_000, samples_per_client=40), "m", {}))
    assert eager["data"] > 2 * 100_000 * 40 * (60 * 4 + 8)  # materialised: pool and client-ordered copy


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    {"name": "small", "raw": {**_raw(num_clients=12, samples_per_client=60), "model": {"name": "mlp", "hidden": [32]}}},
    {"name": "eager", "raw": _raw(num_clients=20_000, samples_per_client=100)},  # 2 M examples, materialised
    {"name": "lazy", "raw": {**_raw(num_clients=300_000, samples_per_client=50, lazy=True)}},
    {"name": "ring", "raw": {**_raw(num_clients=3000, samples_per_client=20), "topology": {"name": "ring"},
                             "algorithm": {"name": "dpsgd", "lr": 0.05, "eval_nodes": 8}}},
    {"name": "shakespeare", "raw": {**_raw(num_clients=16), "data": {"dataset": "shakespeare", "num_clients": 16, "test_size": 500},
                                    "model": {"name": "char_lstm", "hidden": 32}}},
], ids=lambda c: c["name"])
def test_estimate_is_within_2x_of_the_measured_peak(case):
    """The estimate against the peak resident set of a fresh process that builds the run, trains
    two rounds and evaluates (benchmarks/memory_estimate.py does the same for every shipped
    scenario and benchmark)."""
    from benchmarks.memory_estimate import measure

    m = measure(case, rounds=2, timeout=600)
    assert 0.5 <= m["ratio"] <= 2.0, (case["name"], m["estimate"]["total"] / GiB, m["peak"] / GiB)
