"""Fuzzing the front door: malformed scenario, topology and data files end as one line, exit 2.

Every generated case is invalid *by construction* (or valid by construction, and then must give
exit 0): a mutation is only generated where the schema says for certain what the outcome is, and
the key the message must name is known from the mutation itself, never read back from fedsim.

Families (scenario files, through `fedsim validate`): wrong types, out-of-range numbers (negative,
zero, huge, NaN, infinite), missing required keys, unknown keys, tables replaced by values, unknown
names and module paths, clients_per_round against num_clients, malformed sweeps, broken TOML,
unreadable files (a directory, invalid UTF-8, missing, symlink loops, ...), deep nesting and bad
`--set` overrides. Then graph files for `[topology] name = "from_file"` and Fashion-MNIST IDX files,
through `fedsim run` with the inline executor.

The inputs that once crashed fedsim are kept in FOUND_BUGS and checked one by one by
`test_found_bug_stays_fixed`; the generators stay inside the depth and character ranges they used
when the bugs were open.

Each family (and sub-family) is its own pytest parameter with its own number of examples, so every
one gets its share. The case counts per family are printed on the terminal after the module's tests
(even with output captured), and `test_total_generated_cases` checks the floor of 300.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import math
import re
import tempfile
import tomllib
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedsim import paths, registry
from fedsim.cli import main
from tests.conftest import SMALL

# Examples per fuzzer. The issue asks for at least 300 generated cases in the default run; the
# scenario fuzzer alone has that many, and each test asserts its own count.
# Families are fuzzed one by one (a pytest parameter each) so that every one gets its share.
SCENARIO_EXAMPLES_SINGLE = 30  # 8 families with one kind of mutation: 240 files
SCENARIO_EXAMPLES_SUB = 8  # 27 sub-families (sweeps, TOML, unreadable, nesting): 216 files
OVERRIDE_EXAMPLES = 10  # 6 kinds of --set
TOPOLOGY_EXAMPLES = 5  # 18 kinds of graph file or [topology] table
DATA_EXAMPLES = 5  # 16 kinds of IDX file
MIN_TOTAL = 300

FUZZ = dict(
    deadline=None,
    derandomize=True,  # the same cases on every machine and every run: CI is reproducible
    database=None,
    suppress_health_check=list(HealthCheck),
)

COUNTS: Counter[str] = Counter()

# Inputs that crash fedsim (a traceback) or break the one-line contract, found by this fuzzer.
# id -> (what happens, argv after "validate FILE", scenario text).
FOUND_BUGS: dict[str, tuple[str, list[str], str]] = {
    "relative-module": (
        "TypeError from importlib: a plugin name whose module part starts with '.'",
        [], SMALL.replace('name = "fedavg"', 'name = ".x:y"'),
    ),
    "empty-module": (
        "ValueError: Empty module name: a plugin name ':Name'",
        [], SMALL.replace('name = "fedavg"', 'name = ":y"'),
    ),
    "module-not-a-plugin": (
        "TypeError from inspect.signature: a model (or aggregator, topology) path to a module or a constant",
        [], SMALL.replace('name = "mlp"\nhidden = [32]', 'name = "os:path"'),
    ),
    "deep-arrays": (
        "RecursionError in tomllib: arrays nested 1,000 deep",
        [], "x = " + "[" * 1000 + "]" * 1000 + "\n",
    ),
    "deep-inline-tables": (
        "RecursionError in tomllib: inline tables nested 1,000 deep",
        [], "x = " + "{a = " * 1000 + "1" + "}" * 1000 + "\n",
    ),
    "deep-dotted-key": (
        "RecursionError in repr() of the offending input: a dotted key 1,000 parts long",
        [], SMALL + "\n" + ".".join(["x"] * 1000) + " = 1\n",
    ),
    "newline-in-name": (
        "two lines on stderr: an unknown plugin name is printed raw, newline included",
        [], SMALL.replace('name = "fedavg"', 'name = "fed\\navg"'),
    ),
    "set-comment-key": (
        "ValueError (not enough values to unpack) from --set '#x=1'",
        ["--set", "#x=1"], SMALL,
    ),
    "set-newline-key": (
        "two lines on stderr: the --set message repeats a key with a newline in it raw",
        ["--set", "a\nb=1"], SMALL,
    ),
    "set-two-tables": (
        "ValueError (too many values to unpack) from a --set key that holds two TOML tables",
        ["--set", "[t]\n[u]\nb=1"], SMALL,
    ),
    "local-steps-unbounded": (
        "validate accepts local_steps = -3 for dfedavg (DFedAvgConfig redeclares `local_steps: int | None = 5`, "
        "dropping LocalSGDConfig's ge=1; same in dpsgd, dfedsam, gossip, modest, fedasync, fedbuff); "
        "`fedsim run` then dies with ValueError: the clock cannot go back (0 steps: a false divergence, exit 3)",
        [], SMALL.replace('name = "fedavg"', 'name = "dfedavg"').replace("clients_per_round = 4", "local_steps = -3")
        + '\n[topology]\nname = "ring"\n',
    ),
    "aggregator-extra-key": (
        "validate accepts an unknown [aggregator] key for 'fedavg' (WeightedMean's object.__init__ "
        "signature has *args, **kwargs); `fedsim run` then dies with TypeError: WeightedMean() takes no arguments",
        [], SMALL + '\n[aggregator]\nname = "fedavg"\nx_typo = 1\n',
    ),
}

# Nesting depth the main fuzz stays under (deeper is an open bug above).
DEEP_OK = 120


# ---------------------------------------------------------------------------------------------
# base scenarios: each validates as is (test_bases_are_valid)


def _base(text: str, **changes: Any) -> dict[str, Any]:
    raw = tomllib.loads(text)
    for path, value in changes.items():
        set_path(raw, path.replace("__", "."), value)
    return raw


def set_path(d: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value


def get_path(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        d = d[part]
    return d


def del_path(d: dict[str, Any], path: str) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        d = d[part]
    del d[parts[-1]]


BASES: dict[str, dict[str, Any]] = {
    "small": _base(SMALL),
    "graph": _base(
        SMALL,
        algorithm={"name": "dfedavg", "lr": 0.1, "batch_size": 16, "local_steps": 2, "gossip_steps": 1},
        topology={"name": "torus", "rows": 3, "mixing": "max_degree"},
    ),
    "full": _base(
        SMALL,
        eval_every=2,
        target_accuracy=0.6,
        data__partition="dirichlet",
        data__alpha=0.3,
        data__min_examples=2,
        algorithm__momentum=0.5,
        algorithm__lr_decay=0.99,
        algorithm__weight_decay=1e-4,
        algorithm__local_epochs=1.0,
        aggregator={"name": "fedavg"},
        system={
            "executor": "inline", "workers": 2, "threads_per_worker": 1,
            "compute": {"dist": "uniform", "low": 0.01, "high": 0.1},
            "link": {"bandwidth_mbps": 10.0, "latency_ms": 20.0},
            "failures": {"crash_fraction": 0.25, "crash_round": 2, "message_loss": 0.1},
        },
    ),
    "sweep": _base(SMALL, sweep={"seed": [0, 1], "algorithm.lr": [0.05, 0.1]}),
    "async": _base(
        SMALL, algorithm={"name": "fedbuff", "lr": 0.1, "batch_size": 16, "buffer_size": 3, "server_lr": 1.0},
    ),
}


@dataclass(frozen=True)
class Kind:
    """What validation accepts at a key, as far as this fuzzer relies on it."""

    type: str  # int | float | str | name | literal | posint_list | union_float
    lo: float | None = None
    lo_open: bool = False
    hi: float | None = None
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    registry: str | None = None
    checked_range: bool = True  # False: only the type is checked by `validate`
    reported: str | None = None  # the key the message names, when not the path itself (unions)

    def in_range(self, v: float) -> bool:
        if isinstance(v, float) and math.isnan(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True


INT1 = Kind("int", lo=1)
POS = Kind("float", lo=0, lo_open=True)
NONNEG = Kind("float", lo=0)
UNIT = Kind("float", lo=0, hi=1)
COMPUTE = "system.compute"  # a number or a Distribution table: errors inside name the union

KINDS: dict[str, Kind] = {
    "name": Kind("str"),
    "seed": Kind("int", lo=0, hi=2**63 - 1),
    "rounds": INT1,
    "eval_every": INT1,
    "target_accuracy": Kind("float", lo=0, lo_open=True, hi=1),
    "data.dataset": Kind("name", registry="datasets"),
    "data.num_clients": INT1,
    "data.samples_per_client": INT1,
    "data.test_size": INT1,
    "data.min_examples": INT1,
    "data.partition": Kind("literal", choices=("iid", "dirichlet", "shards", "quantity", "natural")),
    "data.alpha": POS,
    "model.name": Kind("name", registry="models"),
    "model.hidden": Kind("posint_list"),
    "algorithm.name": Kind("name", registry="algorithms"),
    "algorithm.clients_per_round": INT1,
    "algorithm.lr": POS,
    "algorithm.batch_size": INT1,
    # dfedavg (like dpsgd, dfedsam, gossip, modest, fedasync, fedbuff) redeclares local_steps without
    # its bound: FOUND_BUGS["local-steps-unbounded"]; make this INT1 once that is fixed
    "algorithm.local_steps": Kind("int", checked_range=False),
    "algorithm.local_epochs": POS,
    "algorithm.gossip_steps": INT1,
    "algorithm.momentum": Kind("float", lo=0, hi=1, hi_open=True),
    "algorithm.lr_decay": Kind("float", lo=0, lo_open=True, hi=1),
    "algorithm.weight_decay": NONNEG,
    "algorithm.buffer_size": INT1,  # <= num_clients is checked when the run starts, not here
    "algorithm.server_lr": POS,
    "aggregator.name": Kind("name", registry="aggregators"),
    "topology.name": Kind("name", registry="topologies"),
    "topology.mixing": Kind("literal", choices=("metropolis_hastings", "uniform", "max_degree")),
    "topology.rows": Kind("int", checked_range=False),  # the torus checks rows when it is built
    "system.executor": Kind("literal", choices=("inline", "ray")),
    "system.workers": INT1,
    "system.threads_per_worker": INT1,
    "system.compute.dist": Kind("literal", choices=("fixed", "uniform", "normal", "lognormal", "exponential"), reported=COMPUTE),
    "system.compute.low": Kind("float", lo=0, lo_open=True, reported=COMPUTE),
    "system.compute.high": Kind("float", lo=0, lo_open=True, reported=COMPUTE),
    "system.link.bandwidth_mbps": Kind("union_float", lo=0, lo_open=True),
    "system.link.latency_ms": Kind("union_float", lo=0),
    "system.failures.crash_fraction": UNIT,
    "system.failures.crash_round": INT1,
    "system.failures.message_loss": Kind("float", lo=0, hi=1, hi_open=True),
}
# keys with a cross-key upper bound: excluded from "huge is valid"
CROSS_CHECKED = {"algorithm.clients_per_round", "system.compute.low", "system.compute.high"}


def leaves(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in d.items():
        path = f"{prefix}{key}"
        if path == "sweep":
            continue
        if isinstance(value, dict):
            out += leaves(value, path + ".")
        else:
            out.append(path)
    return out


def mutable(raw: dict[str, Any]) -> list[str]:
    """Leaves a mutation may change: not those a [sweep] overrides."""
    swept = raw.get("sweep") if isinstance(raw.get("sweep"), dict) else {}
    return [p for p in leaves(raw) if p not in swept]


def tables(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.append(path)
            if path != "sweep":
                out += tables(value, path + ".")
    return out


def reported(path: str) -> str:
    kind = KINDS[path]
    return kind.reported or path


# ---------------------------------------------------------------------------------------------
# cases and the check every case goes through


@dataclass
class Case:
    family: str
    content: str | bytes | None  # the file's content (None: see `path_kind`)
    key: str | None = None  # the key the message must name (None: a file-level problem)
    words: str | None = None  # words the message must contain
    valid: bool = False  # valid by construction: exit 0 and nothing on stderr
    preflight: bool = False  # valid, but `validate` may refuse it as `run` would (memory, partition, graph)
    path_kind: str = "file"
    extra: tuple[str, ...] = ()  # more argv (--set ...)


# a pydantic union tag after the key: `system.compute.constrained-float`
_TAG = r"(?:\.(?:[a-z]+(?:-[a-z]+)+(?:\[[^\]]*\])?|[A-Z]\w*))?"


def names_key(line: str, key: str) -> bool:
    # or the key inside it that is wrong, when the key holds a table (`system.compute.dist`)
    return re.search(rf": {re.escape(key)}(?:\.[a-z_]+)?{_TAG}: ", line) is not None


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except (Exception, SystemExit):
        raise AssertionError(f"fedsim {argv!r} raised instead of printing one line:\n{traceback.format_exc()}") from None
    return code, out.getvalue(), err.getvalue()


def show(content: str | bytes | None) -> str:
    if content is None:
        return "<no file>"
    text = content.decode("utf-8", "backslashreplace") if isinstance(content, bytes) else content
    return text if len(text) < 3000 else text[:3000] + "..."


def check_outcome(case: Case, code: int, out: str, err: str, names: list[str]) -> None:
    """Exit 2 and one line naming the files in `names` and the case's key; exit 0 when valid."""
    context = f"[{case.family}] expected key {case.key!r}\n--- input ---\n{show(case.content)}\n--- stderr ---\n{err}"
    assert "Traceback" not in err, context
    if case.valid and not (case.preflight and code == 2):
        assert code == 0 and err == "", context
        return
    assert code == 2, context
    lines = err.split("\n")
    assert len(lines) == 2 and lines[1] == "" and "\r" not in err, "not exactly one line\n" + context
    line = lines[0]
    assert line.startswith("fedsim: error: "), context
    for name in names:
        assert name in line, f"{name} not named\n{context}"
    if case.key is not None:
        assert names_key(line, case.key), context
    if case.preflight:  # the memory estimate, or a partition or graph that cannot be built
        assert "use --force to run anyway" in line or re.search(r": (data\.partition|data|topology)(\.\w+)?: ", line), context
    if case.words is not None:
        assert case.words in line, context


def run_fuzz(check: Any, strategy: st.SearchStrategy[Any], examples: int, test: str) -> None:
    """Run `check` on `examples` cases drawn from `strategy` (fewer where hypothesis finds fewer
    distinct ones: a few families are small and finite)."""
    before = total(test)
    settings(max_examples=examples, **FUZZ)(given(strategy)(check))()
    assert total(test) > before


def count(test: str, family: str) -> None:
    COUNTS[f"{test}:{family}"] += 1
    event(family)


def total(test: str) -> int:
    return sum(n for k, n in COUNTS.items() if k.startswith(test + ":"))


@pytest.fixture(scope="module", autouse=True)
def print_counts(request):
    yield
    if not COUNTS:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    by_test: dict[str, list[str]] = {}
    for key, n in sorted(COUNTS.items()):
        test, family = key.split(":", 1)
        by_test.setdefault(test, []).append(f"{family} {n}")
    lines = [f"fuzz cases: {sum(COUNTS.values())} in all"]
    lines += [f"  {test}: {total(test)} ({', '.join(parts)})" for test, parts in by_test.items()]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
        else:  # pragma: no cover
            print("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# value strategies

TOML_KEY = st.from_regex(r"x_[a-z0-9_]{0,10}", fullmatch=True)
texts = st.text(max_size=12)
any_float = st.floats(allow_nan=True, allow_infinity=True)
small_ints = st.integers(-5, 5)
toml_dates = st.one_of(st.dates(), st.times(), st.datetimes())
extra_tables = st.dictionaries(TOML_KEY, small_ints, min_size=1, max_size=2)  # never a valid table here
scalars = st.one_of(st.integers(), any_float, texts, st.booleans(), toml_dates)
toml_values = st.one_of(scalars, st.lists(small_ints, max_size=3), extra_tables)
non_tables = st.one_of(
    st.integers(), any_float, texts, st.booleans(), toml_dates, st.lists(small_ints, max_size=3),
    st.lists(st.fixed_dictionaries({"x_a": small_ints}), min_size=1, max_size=2),  # an array of tables
)


def wrong_type(kind: Kind) -> st.SearchStrategy[Any]:
    """Values of a type that the key never accepts."""
    lists = st.lists(small_ints, max_size=3)
    if kind.type == "int":
        return st.one_of(texts, any_float, st.booleans(), lists, extra_tables, toml_dates)
    if kind.type in ("float", "union_float"):  # an int is a valid float; a table is a Distribution
        return st.one_of(texts, st.booleans(), lists, extra_tables, toml_dates)
    if kind.type in ("str", "name", "literal"):
        return st.one_of(st.integers(), any_float, st.booleans(), lists, extra_tables, toml_dates)
    if kind.type == "posint_list":
        bad_item = st.one_of(st.integers(max_value=0), texts, any_float, st.booleans())
        bad_list = st.tuples(st.lists(st.integers(1, 64), max_size=2), bad_item, st.lists(st.integers(1, 64), max_size=2)).map(
            lambda t: [*t[0], t[1], *t[2]]
        )
        return st.one_of(st.integers(), any_float, st.booleans(), texts.filter(bool), extra_tables, toml_dates, bad_list)
    raise AssertionError(kind)


def out_of_range(kind: Kind) -> st.SearchStrategy[Any]:
    """Numbers of the right type outside the key's bounds: negative, zero, huge, NaN, infinite."""
    if kind.type == "int":
        return st.integers(max_value=int(kind.lo) - 1)
    return st.one_of(
        any_float,
        st.integers(min_value=-(10**30), max_value=10**30),
        st.sampled_from([0, 0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 10**400]),
    ).filter(lambda v: not (isinstance(v, (int, float)) and abs(v) < 1e300 and kind.in_range(v)))


def bounded(path: str) -> bool:
    kind = KINDS[path]
    return kind.checked_range and (kind.lo is not None or kind.hi is not None) and kind.type in ("int", "float", "union_float")


def unknown_name(kind: Kind) -> st.SearchStrategy[str]:
    """A name that no registry (or literal) holds: plain, or a module path that does not import."""
    forbidden = "\n\r"  # FOUND_BUGS["newline-in-name"]
    plain = st.text(max_size=16).filter(lambda s: not any(c in s for c in forbidden) and ":" not in s)
    if kind.type == "literal":
        return plain.filter(lambda s: s not in kind.choices)
    known = set(getattr(registry, kind.registry).names())
    token = st.from_regex(r"[a-z0-9_]{1,8}", fullmatch=True)
    # module paths that cannot import; never '.x:Name' or ':Name' (FOUND_BUGS "relative-module",
    # "empty-module") nor an importable object that is no plugin ("module-not-a-plugin")
    return st.one_of(
        plain.filter(lambda s: s not in known),
        st.builds(lambda a, b: f"zz_no_such_module_{a}:{b}", token, token),
        st.builds(lambda a, b: f"zz_no_such_package_{a}.{b}:Thing", token, token),
        st.builds(lambda a: f"fedsim.errors:zz_{a}", token),  # a module that imports, a name it lacks
    )


# ---------------------------------------------------------------------------------------------
# scenario families: each draws a base, mutates it and says what the message must name

base_names = st.sampled_from(sorted(BASES))


@st.composite
def a_base(draw) -> dict[str, Any]:
    """A copy of a base scenario with a random (valid) run name and seed, so that even the
    families with few mutations see many distinct files."""
    raw = copy.deepcopy(BASES[draw(base_names)])
    raw["name"] = draw(st.text(max_size=10).filter(lambda name: paths.name_problem(name) is None))  # (bad names: test_hostile)
    raw["seed"] = draw(st.integers(0, 2**63 - 1))
    return raw


def dump(raw: dict[str, Any]) -> str:
    return tomli_w.dumps(raw)


@st.composite
def wrong_types(draw) -> Case:
    raw = draw(a_base())
    path = draw(st.sampled_from(mutable(raw)))
    set_path(raw, path, draw(wrong_type(KINDS[path])))
    return Case("wrong_type", dump(raw), key=reported(path))


@st.composite
def out_of_ranges(draw) -> Case:
    raw = draw(a_base())
    path = draw(st.sampled_from([p for p in mutable(raw) if bounded(p)]))
    set_path(raw, path, draw(out_of_range(KINDS[path])))
    return Case("out_of_range", dump(raw), key=reported(path))


@st.composite
def huge_but_valid(draw) -> Case:
    """Huge values where no upper bound exists: the schema accepts them, so `validate` gives exit 0,
    or refuses them with the one line `run` would print before starting (the memory estimate, a
    partition or a graph that cannot be made that large)."""
    raw = draw(a_base())
    paths = [
        p for p in mutable(raw)
        if KINDS[p].type in ("int", "float") and KINDS[p].hi is None and p not in CROSS_CHECKED
    ]
    path = draw(st.sampled_from(paths))
    if KINDS[path].type == "int":
        value: Any = draw(st.integers(min_value=2**31, max_value=10**40))
    else:
        value = draw(st.sampled_from([1e308, 1e30]))
    set_path(raw, path, value)
    return Case("huge_valid", dump(raw), valid=True, preflight=True)


@st.composite
def missing_keys(draw) -> Case:
    raw = draw(a_base())
    options = [(f"{t}.name", f"{t}.name") for t in ("model", "algorithm", "topology", "aggregator") if t in raw]
    if "topology" in raw:
        options.append(("topology", "topology"))  # a graph method without its graph
    if raw.get("system", {}).get("failures", {}).get("crash_fraction", 0) > 0:
        options.append(("system.failures.crash_round", "system.failures"))
    if "compute" in raw.get("system", {}):
        options += [("system.compute.low", COMPUTE), ("system.compute.high", COMPUTE)]
    path, key = draw(st.sampled_from(options))
    del_path(raw, path)
    return Case("missing_key", dump(raw), key=key)


@st.composite
def extra_keys(draw) -> Case:
    raw = draw(a_base())
    # not [aggregator]: FOUND_BUGS["aggregator-extra-key"]
    candidates = [""] + [t for t in tables(raw) if t not in ("sweep", "aggregator")]
    table = draw(st.sampled_from(candidates))
    key = draw(TOML_KEY)
    value = draw(toml_values)
    if table:
        get_path(raw, table)[key] = value
    else:
        raw[key] = value
    expected = COMPUTE if table == COMPUTE else (f"{table}.{key}" if table else key)
    return Case("extra_key", dump(raw), key=expected)


@st.composite
def tables_as_values(draw) -> Case:
    raw = draw(a_base())
    table = draw(st.sampled_from([t for t in tables(raw) if t != COMPUTE]))  # compute may be a number
    set_path(raw, table, draw(non_tables))
    return Case("table_as_value", dump(raw), key=table)


@st.composite
def unknown_names(draw) -> Case:
    raw = draw(a_base())
    path = draw(st.sampled_from([p for p in mutable(raw) if KINDS[p].type in ("name", "literal")]))
    set_path(raw, path, draw(unknown_name(KINDS[path])))
    return Case("unknown_name", dump(raw), key=reported(path))


@st.composite
def too_many_clients_per_round(draw) -> Case:
    raw = copy.deepcopy(BASES[draw(st.sampled_from([n for n in sorted(BASES) if "clients_per_round" in BASES[n]["algorithm"]]))])
    n, per_round = raw["data"]["num_clients"], raw["algorithm"]["clients_per_round"]
    if draw(st.booleans()):
        raw["algorithm"]["clients_per_round"] = draw(st.integers(min_value=n + 1, max_value=10**30))
    else:
        raw["data"]["num_clients"] = draw(st.integers(min_value=1, max_value=per_round - 1))
    return Case("clients_per_round", dump(raw), key="algorithm.clients_per_round")


SWEEP_HOWS = ["empty_table", "not_table", "empty_list", "not_list", "self", "case_not_table", "bad_point", "through_value"]


@st.composite
def bad_sweeps(draw, how: str | None = None) -> Case:
    raw = draw(a_base())
    sweep = raw.setdefault("sweep", {"seed": [0, 1]})
    swept = draw(st.sampled_from(sorted(sweep)))
    how = how or draw(st.sampled_from(SWEEP_HOWS))
    if how == "empty_table":
        raw["sweep"] = {}
        key = "sweep"
    elif how == "not_table":
        raw["sweep"] = draw(non_tables)
        key = "sweep"
    elif how == "empty_list":
        sweep[swept] = []
        key = f"sweep.{swept}"
    elif how == "not_list":
        sweep[swept] = draw(st.one_of(scalars, extra_tables))
        key = f"sweep.{swept}"
    elif how == "self":
        target = draw(st.sampled_from(["sweep", "sweep.seed", "sweep.x_a"]))
        sweep[target] = [1]
        key = f"sweep.{target}"
    elif how == "case_not_table":
        good = draw(st.integers(0, 2))
        bad = draw(st.lists(st.one_of(scalars, st.lists(small_ints, max_size=2)), min_size=1, max_size=2))
        sweep["cases"] = [{"label": f"c{i}"} for i in range(good)] + bad
        key = f"sweep.cases[{good}]"
    elif how == "bad_point":
        path = draw(st.sampled_from([p for p in mutable(raw) if not KINDS[p].reported and KINDS[p].type != "union_float"]))
        kind = KINDS[path]
        strategies = [wrong_type(kind)]
        if bounded(path):
            strategies.append(out_of_range(kind))
        if kind.type in ("name", "literal"):
            strategies.append(unknown_name(kind))
        bad = draw(st.one_of(strategies))
        sweep[path] = [get_path(raw, path), bad]
        key = path
    else:  # a dotted key that runs through a value: "rounds.x" when rounds = 4
        path = draw(st.sampled_from(mutable(raw)))
        sweep[f"{path}.x_a"] = [1]
        key = path
    return Case(f"sweep_{how}", dump(raw), key=key)


_CONTROL = [chr(c) for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]]
# each of these is invalid TOML whatever precedes it (at the start of a line)
_BROKEN_LINES = [
    'x_a = "abc', "x_a = 'abc", "x_a = [1, 2", "x_a = {a = 1", "[x_a", "[[x_a]", "x_a =", "= 1",
    "x_a = 1 2", "x_a = tru", "x_a = 1__2", "x_a = 0x", "x_a = 1979-13-45", "x_a = .5", "x_a = +",
    "x_a = [1,,2]", "x_a = {a = 1,}", 'x_a = """abc', "x_a = 'a\nb'", "x_a.=1", "x_a = 1\nx_a = 2",
]


TOML_HOWS = ["control_char", "duplicate_key", "duplicate_header", "broken_line", "truncated"]


@st.composite
def broken_toml(draw, how: str | None = None) -> Case:
    text = dump(draw(a_base()))
    how = how or draw(st.sampled_from(TOML_HOWS))
    lines = text.split("\n")
    if how == "control_char":
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.sampled_from(_CONTROL)) + text[pos:]
    elif how == "duplicate_key":
        candidates = [i for i, line in enumerate(lines) if re.match(r'^[A-Za-z0-9_"-][^=]* = ', line)]
        i = draw(st.sampled_from(candidates))
        lines.insert(i + 1, lines[i])
        text = "\n".join(lines)
    elif how == "duplicate_header":
        headers = [line for line in lines if re.fullmatch(r"\[[^\[\]]+\]", line)]
        text = text + "\n" + draw(st.sampled_from(headers)) + "\n"
    elif how == "broken_line":
        i = draw(st.integers(0, len(lines)))
        lines.insert(i, draw(st.sampled_from(_BROKEN_LINES)))
        text = "\n".join(lines)
    else:
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + "\n" + draw(st.sampled_from(_BROKEN_LINES)) + "\n"
    return Case(f"toml_{how}", text, words="not valid TOML")


# byte sequences that are never valid UTF-8
_BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xf4\x90\x80\x80"]


UNREADABLE_HOWS = ["directory", "missing", "broken_link", "link_loop", "through_file", "long_name", "invalid_utf8", "utf16"]


@st.composite
def unreadable(draw, how: str | None = None) -> Case:
    text = dump(draw(a_base()))
    how = how or draw(st.sampled_from(UNREADABLE_HOWS))
    if how == "invalid_utf8":
        data = text.encode()
        pos = draw(st.integers(0, len(data)))
        return Case("unreadable_invalid_utf8", data[:pos] + draw(st.sampled_from(_BAD_UTF8)) + data[pos:], words="cannot read")
    if how == "utf16":
        return Case("unreadable_utf16", text.encode("utf-16"), words="cannot read")
    words = "file not found" if how in ("missing", "broken_link") else "cannot read"
    return Case(f"unreadable_{how}", text, words=words, path_kind=how)


DEEP_HOWS = ["array_value", "array_extra", "inline_table", "table_header", "dotted_key", "sweep_key"]


@st.composite
def deep_nesting(draw, how: str | None = None) -> Case:
    depth = draw(st.integers(1, DEEP_OK))
    raw = draw(a_base())
    how = how or draw(st.sampled_from(DEEP_HOWS))
    if how == "array_value":  # a key that takes a number, string or list gets deeply nested arrays
        path = draw(st.sampled_from(mutable(raw)))
        nested: Any = 1
        for _ in range(depth + (1 if path == "model.hidden" else 0)):
            nested = [nested]
        set_path(raw, path, nested)
        return Case("deep_array_value", dump(raw), key=reported(path))
    table = draw(st.sampled_from(["", "data", "algorithm", "system"]))
    where = f"{table}." if table else ""
    if how == "array_extra":
        line = "x_deep = " + "[" * depth + "1" + "]" * depth
    elif how == "inline_table":
        line = "x_deep = " + "{a = " * depth + "1" + "}" * depth
    elif how == "dotted_key":
        line = "x_deep." + ".".join(["a"] * depth) + " = 1"
    elif how == "table_header":
        text = dump(raw) + "\n[" + where + "x_deep." + ".".join(["a"] * depth) + "]\nv = 1\n"
        return Case("deep_table_header", text, key=where + "x_deep")
    else:
        raw.setdefault("sweep", {})[where + "x_deep." + ".".join(["a"] * depth)] = [1]
        return Case("deep_sweep_key", dump(raw), key=where + "x_deep")
    # a key = value line belongs to the table above it: put it where it lands in `table`
    if table:
        text = dump(raw) + f"\n[{table}]\n{line}\n" if table not in raw else _insert_in_table(raw, table, line)
    else:
        text = line + "\n" + dump(raw)
    return Case(f"deep_{how}", text, key=where + "x_deep")


def _insert_in_table(raw: dict[str, Any], table: str, line: str) -> str:
    """The TOML text of `raw` with `line` as the first line of [table]."""
    text = dump(raw)
    header = f"[{table}]\n"
    assert header in text, (table, text)
    return text.replace(header, header + line + "\n", 1)


SCENARIO_FAMILIES = {
    "wrong_type": wrong_types(),
    "out_of_range": out_of_ranges(),
    "huge_valid": huge_but_valid(),
    "missing_key": missing_keys(),
    "extra_key": extra_keys(),
    "table_as_value": tables_as_values(),
    "unknown_name": unknown_names(),
    "clients_per_round": too_many_clients_per_round(),
    **{f"sweep_{how}": bad_sweeps(how) for how in SWEEP_HOWS},
    **{f"toml_{how}": broken_toml(how) for how in TOML_HOWS},
    **{f"unreadable_{how}": unreadable(how) for how in UNREADABLE_HOWS},
    **{f"deep_{how}": deep_nesting(how) for how in DEEP_HOWS},
}
# the families above with one mutation each get more cases than the sub-families
SINGLE = {"wrong_type", "out_of_range", "huge_valid", "missing_key", "extra_key", "table_as_value", "unknown_name", "clients_per_round"}


def materialise(case: Case, root: Path) -> Path:
    """Write the case's file (or make the odd path it asks for) and return the path to pass."""
    path = root / "scenario.toml"
    if case.path_kind == "file":
        if isinstance(case.content, bytes):
            path.write_bytes(case.content)
        else:
            path.write_text(case.content, encoding="utf-8", newline="")
    elif case.path_kind == "directory":
        path.mkdir()
    elif case.path_kind == "missing":
        pass
    elif case.path_kind == "broken_link":
        path.symlink_to(root / "nowhere.toml")
    elif case.path_kind == "link_loop":
        path.symlink_to(path)
    elif case.path_kind == "through_file":
        path.write_text(case.content)
        path = path / "scenario.toml"
    elif case.path_kind == "long_name":
        path = root / ("s" * 300 + ".toml")
    else:
        raise AssertionError(case.path_kind)
    return path


def validate_case(case: Case) -> None:
    count("scenarios", case.family)
    with tempfile.TemporaryDirectory() as tmp:
        path = materialise(case, Path(tmp))
        code, out, err = run_cli(["validate", str(path), *case.extra])
        check_outcome(case, code, out, err, [str(path)])
        if case.valid and code == 0:
            assert out.startswith(f"{path}: ok"), out


def test_bases_are_valid(tmp_path):
    """The mutations start from scenarios that validate, and every key in them has a known kind."""
    for name, raw in BASES.items():
        for path in leaves(raw):
            assert path in KINDS, f"{name}: no Kind for {path}"
        path = tmp_path / f"{name}.toml"
        path.write_text(dump(raw))
        code, out, err = run_cli(["validate", str(path)])
        assert code == 0 and err == "", (name, err)
        assert "TOML" not in name
        tomllib.loads(path.read_text())


@pytest.mark.parametrize("family", sorted(SCENARIO_FAMILIES))
def test_fuzzed_scenarios_give_one_line_and_exit_2(family):
    """One hypothesis run per family, so that each gets its share of the cases."""
    examples = SCENARIO_EXAMPLES_SINGLE if family in SINGLE else SCENARIO_EXAMPLES_SUB
    run_fuzz(validate_case, SCENARIO_FAMILIES[family], examples, "scenarios")


# ---------------------------------------------------------------------------------------------
# --set overrides


SET_HOWS = ["wrong_type", "out_of_range", "unknown_key", "through_value", "bad_key", "no_equals"]


@st.composite
def bad_overrides(draw, how: str | None = None) -> Case:
    raw = draw(a_base())
    how = how or draw(st.sampled_from(SET_HOWS))
    if how in ("wrong_type", "out_of_range"):
        pool = [p for p in mutable(raw) if not KINDS[p].reported and (how == "wrong_type" or bounded(p))]
        path = draw(st.sampled_from(pool))
        kind = KINDS[path]
        value = draw(wrong_type(kind) if how == "wrong_type" else out_of_range(kind))
        literal = _inline(value)
        return Case(f"set_{how}", dump(raw), key=reported(path), extra=("--set", f"{path}={literal}"))
    if how == "unknown_key":
        table = draw(st.sampled_from(["", "data", "algorithm", "model", "system"]))
        key = draw(TOML_KEY)
        full = f"{table}.{key}" if table else key
        return Case("set_unknown_key", dump(raw), key=full, extra=("--set", f"{full}=1"))
    if how == "through_value":
        path = draw(st.sampled_from(mutable(raw)))
        return Case("set_through_value", dump(raw), key=path, extra=("--set", f"{path}.x_a=1"))
    if how == "bad_key":  # never a TOML key (nor '#...', two tables or a newline: FOUND_BUGS "set-*")
        key = draw(st.sampled_from(["", ".", "a..b", ".a", "a.", "a b", "[a", "a]", '"a', "a.\"b", "{a}", "'a", "[a]"]))
        value = draw(st.sampled_from(["1", "x", ""]))
        return Case("set_bad_key", dump(raw), words="--set expects key=value", extra=("--set", f"{key}={value}"))
    key = draw(st.sampled_from(mutable(raw)))
    return Case("set_no_equals", dump(raw), words="--set expects key=value", extra=("--set", key))


def _inline(value: Any) -> str:
    """A one-line TOML literal (tomli_w spreads arrays over lines)."""
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_inline(v)}" for k, v in value.items()) + "}"
    return tomli_w.dumps({"v": value}).partition("v = ")[2].strip()


def override_case(case: Case) -> None:
    count("overrides", case.family)
    with tempfile.TemporaryDirectory() as tmp:
        path = materialise(case, Path(tmp))
        code, out, err = run_cli(["validate", str(path), *case.extra])
        check_outcome(case, code, out, err, [str(path)])


@pytest.mark.parametrize("how", SET_HOWS)
def test_fuzzed_overrides_give_one_line_and_exit_2(how):
    run_fuzz(override_case, bad_overrides(how), OVERRIDE_EXAMPLES, "overrides")


# ---------------------------------------------------------------------------------------------
# topology files: [topology] name = "from_file", through `fedsim run` (inline, dfedavg)

N_NODES = 6
RING_EDGES = [(i, (i + 1) % N_NODES) for i in range(N_NODES)]


def graph_scenario(graph_path: str | None, **topology: Any) -> str:
    raw = _base(
        SMALL,
        rounds=1,
        data={"dataset": "synthetic", "num_clients": N_NODES, "samples_per_client": 20, "test_size": 50},
        model={"name": "mlp", "hidden": [8]},
        algorithm={"name": "dfedavg", "lr": 0.1, "batch_size": 8, "local_steps": 1},
        topology={"name": "from_file", **({"path": graph_path} if graph_path is not None else {}), **topology},
    )
    return dump(raw)


def edge_list(edges: list[tuple[Any, Any]]) -> str:
    return "# a ring\n\n" + "".join(f"{u} {v}\n" for u, v in edges) + "# end\n"


GRAPHML_HEAD = '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">\n'


def graphml(nodes: list[str], edges: list[tuple[str, str]], keys: str = "", extra: str = "") -> str:
    body = "".join(f'<node id="{n}"/>\n' for n in nodes) + "".join(f'<edge source="{u}" target="{v}"/>\n' for u, v in edges)
    return GRAPHML_HEAD + keys + '<graph id="G" edgedefault="undirected">\n' + body + extra + "</graph>\n</graphml>\n"


RING_GRAPHML = graphml([f"n{i}" for i in range(N_NODES)], [(f"n{u}", f"n{v}") for u, v in RING_EDGES])

# GraphML that is well-formed XML but not a usable graph, each always refused
_GRAPHML_SEMANTIC = {
    "undefined_key": RING_GRAPHML.replace('<node id="n0"/>', '<node id="n0"><data key="d9">1</data></node>'),
    "bad_int": graphml(
        [f"n{i}" for i in range(N_NODES)], [(f"n{u}", f"n{v}") for u, v in RING_EDGES],
        keys='<key id="d0" for="node" attr.name="w" attr.type="int"/>\n',
    ).replace('<node id="n0"/>', '<node id="n0"><data key="d0">abc</data></node>'),
    "bad_type": graphml([f"n{i}" for i in range(N_NODES)], [(f"n{u}", f"n{v}") for u, v in RING_EDGES],
                        keys='<key id="d0" for="node" attr.name="w" attr.type="complex"/>\n'),
    "hyperedge": graphml([f"n{i}" for i in range(N_NODES)], [(f"n{u}", f"n{v}") for u, v in RING_EDGES],
                         extra='<hyperedge><endpoint node="n0"/></hyperedge>\n'),
    "no_graph": GRAPHML_HEAD + "</graphml>\n",
    "not_graphml": "<a><b/></a>\n",
    "edge_to_unknown_node": graphml([f"n{i}" for i in range(N_NODES)], [(f"n{u}", f"n{v}") for u, v in RING_EDGES] + [("n0", "n77")]),
}


@dataclass
class GraphCase:
    family: str
    content: str | bytes | None  # the graph file's content
    graph_name: str = "g.txt"
    file_mode: str = "file"  # file | directory | missing
    options: dict[str, Any] | None = None  # [topology] keys instead of path = the graph file
    key: str = "topology"
    names_graph: bool = True  # whether the message must name the graph file


EDGE_HOWS = ["bad_line", "self_loop", "extra_node", "missing_node", "disconnected", "empty", "invalid_utf8", "directory", "missing"]
GRAPHML_HOWS = ["truncated", "injected", "self_loop", "extra_node", "garbage", *sorted(_GRAPHML_SEMANTIC)]
TOPOLOGY_KEY_HOWS = ["path_type", "no_path", "extra_key"]
GRAPH_HOWS = [f"edges:{h}" for h in EDGE_HOWS] + [f"graphml:{h}" for h in GRAPHML_HOWS] + [f"scenario:{h}" for h in TOPOLOGY_KEY_HOWS]


@st.composite
def bad_graph_files(draw, which: str | None = None) -> GraphCase:
    kind, _, how = (which or draw(st.sampled_from(GRAPH_HOWS))).partition(":")
    token = st.from_regex(r"[A-Za-z0-9_.:-]{1,6}", fullmatch=True)
    if kind == "edges":
        lines = edge_list(RING_EDGES).split("\n")
        if how == "bad_line":
            n_tokens = draw(st.sampled_from([1, 3, 4, 5]))
            lines.insert(draw(st.integers(0, len(lines))), " ".join(draw(st.lists(token, min_size=n_tokens, max_size=n_tokens))))
        elif how == "self_loop":
            t = draw(st.one_of(token, st.integers(0, N_NODES - 1).map(str)))
            lines.insert(draw(st.integers(0, len(lines))), f"{t} {t}")
        elif how == "extra_node":
            new = "new_" + draw(st.from_regex(r"[a-z0-9]{1,4}", fullmatch=True))
            lines.insert(draw(st.integers(0, len(lines))), f"{draw(st.integers(0, N_NODES - 1))} {new}")
        elif how == "missing_node":
            k = str(draw(st.integers(0, N_NODES - 1)))
            lines = [line for line in lines if k not in line.split()]
        elif how == "disconnected":  # every node still has an edge: the graph, not the file, is wrong
            drop = draw(st.sampled_from([(i, j) for i in range(N_NODES) for j in range(i + 2, N_NODES) if (i, j) != (0, N_NODES - 1)]))
            lines = edge_list([e for i, e in enumerate(RING_EDGES) if i not in drop]).split("\n")
            return GraphCase("edges_disconnected", "\n".join(lines), names_graph=False)
        elif how == "empty":
            lines = draw(st.sampled_from([[""], ["# nothing here", ""], ["", "   ", "# x", ""]]))
        elif how == "invalid_utf8":
            data = "\n".join(lines).encode()
            pos = draw(st.integers(0, len(data)))
            return GraphCase("edges_invalid_utf8", data[:pos] + draw(st.sampled_from(_BAD_UTF8)) + data[pos:])
        else:
            return GraphCase(f"edges_{how}", None, file_mode=how)
        return GraphCase(f"edges_{how}", "\n".join(lines))
    if kind == "graphml":
        text = RING_GRAPHML
        end = len(text.rstrip())
        if how == "truncated":  # a proper prefix never closes the root element
            text = text[: draw(st.integers(0, end - 1))]
        elif how == "injected":  # no comments, CDATA or processing instructions: '<' or '&' always breaks it
            pos = draw(st.integers(0, end))
            text = text[:pos] + draw(st.sampled_from(["<", "&", "<<", "&amp"])) + text[pos:]
        elif how == "self_loop":
            n = draw(st.integers(0, N_NODES - 1))
            text = text.replace("</graph>", f'<edge source="n{n}" target="n{n}"/>\n</graph>')
        elif how == "extra_node":
            text = text.replace("</graph>", f'<node id="new_{draw(st.integers(0, 99))}"/>\n</graph>')
        elif how == "garbage":
            text = draw(st.text(st.characters(codec="utf-8", exclude_characters="<"), max_size=40))
        else:  # well-formed XML, not a usable graph
            return GraphCase(f"graphml_{how}", _GRAPHML_SEMANTIC[how], graph_name="g.graphml")
        return GraphCase(f"graphml_{how}", text, graph_name="g.graphml")
    # the scenario's own [topology] keys, with a good graph file beside it
    if how == "path_type":
        value = draw(st.one_of(st.integers(), st.booleans(), st.lists(small_ints, max_size=2), toml_dates))
        return GraphCase("topology_path_type", RING_GRAPHML, "g.graphml", options={"path": value}, key="topology.path", names_graph=False)
    if how == "no_path":
        return GraphCase("topology_no_path", RING_GRAPHML, "g.graphml", options={}, names_graph=False)
    extra = draw(TOML_KEY)
    return GraphCase("topology_extra_key", RING_GRAPHML, "g.graphml", options={"path": None, extra: 1}, key=f"topology.{extra}", names_graph=False)


def write_graph_case(case: GraphCase, root: Path) -> tuple[Path, Path]:
    """(scenario path, graph path) for a graph-file case."""
    graph = root / case.graph_name
    scenario = root / "scenario.toml"
    if case.file_mode == "directory":
        graph.mkdir()
    elif case.file_mode == "file":
        if isinstance(case.content, bytes):
            graph.write_bytes(case.content)
        else:
            graph.write_text(case.content, encoding="utf-8", newline="")
    if case.options is None:
        text = graph_scenario(str(graph))
    else:
        options = {k: (str(graph) if k == "path" and v is None else v) for k, v in case.options.items()}
        text = graph_scenario(None, **options)
    scenario.write_text(text)
    return scenario, graph


def topology_case(case: GraphCase) -> None:
    count("topology", case.family)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scenario, graph = write_graph_case(case, root)
        code, out, err = run_cli(["run", str(scenario), "--executor", "inline", "--out", str(root / "runs"), "--no-progress"])
        shown = Case(case.family, case.content if case.options is None else scenario.read_text(), key=case.key)
        check_outcome(shown, code, out, err, [str(scenario)] + ([str(graph)] if case.names_graph else []))


def test_graph_bases_run(tmp_path):
    """The unmutated edge list and GraphML are good graphs: the fuzz's mutations are what break them."""
    for name, text in (("g.txt", edge_list(RING_EDGES)), ("g.graphml", RING_GRAPHML)):
        graph = tmp_path / name
        graph.write_text(text)
        scenario = tmp_path / f"{name}.toml"
        scenario.write_text(graph_scenario(str(graph)))
        code, out, err = run_cli(["run", str(scenario), "--executor", "inline", "--out", str(tmp_path / f"runs-{name}"), "--no-progress"])
        assert code == 0 and err == "", err


@pytest.mark.parametrize("which", GRAPH_HOWS)
def test_fuzzed_topology_files_give_one_line_and_exit_2(which):
    run_fuzz(topology_case, bad_graph_files(which), TOPOLOGY_EXAMPLES, "topology")


# ---------------------------------------------------------------------------------------------
# data files: Fashion-MNIST IDX in a temporary data_dir, through `fedsim run`

FASHION = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
N_TRAIN, N_TEST = 40, 10
_VALID_CODES = {0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E}


def idx(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fashion_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(N_TEST) % 10).astype(np.uint8),
    }


def fashion_scenario(data_dir: Path) -> str:
    return dump(_base(
        SMALL,
        rounds=1,
        data={"dataset": "fashion_mnist", "data_dir": str(data_dir), "num_clients": 4, "partition": "iid"},
        model={"name": "logreg"},
        algorithm={"name": "fedavg", "clients_per_round": 2, "lr": 0.1, "batch_size": 8, "local_steps": 1},
    ))


@dataclass
class DataCase:
    family: str
    target: str  # which of FASHION
    raw: dict[str, bytes | None]  # file key -> gzip member content (None: special, see how)
    how: str = "gzip"  # gzip | plain (not compressed) | gz_bytes (raw holds the file bytes) | missing | directory
    names_file: bool = True  # whether the message names the IDX file


DATA_HOWS = [
    "truncated", "appended", "magic", "type_code", "type_size", "ndim0", "images_2d", "image_size",
    "labels_2d", "label_count", "label_range", "not_gzip", "gzip_truncated", "gzip_garbage", "missing", "directory",
]


@st.composite
def bad_data(draw, how: str | None = None) -> DataCase:
    arrays = fashion_arrays()
    raw: dict[str, bytes | None] = {k: idx(a) for k, a in arrays.items()}
    target = draw(st.sampled_from(sorted(FASHION)))
    data = bytearray(raw[target])
    images = target.startswith("x")
    how = how or draw(st.sampled_from(DATA_HOWS))
    family = f"idx_{how}"
    if how == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "appended":
        data += draw(st.binary(min_size=1, max_size=16))
    elif how == "magic":
        data[draw(st.integers(0, 1))] = draw(st.integers(1, 255))
    elif how == "type_code":
        data[2] = draw(st.integers(0, 255).filter(lambda c: c not in _VALID_CODES))
    elif how == "type_size":  # same bytes, declared as a wider type: the payload no longer fits
        data[2] = draw(st.sampled_from([0x0B, 0x0C, 0x0D, 0x0E] + ([0x09] if images else [])))
    elif how == "ndim0":
        data[3] = 0
    elif how in ("images_2d", "image_size", "labels_2d", "label_count", "label_range"):
        n = N_TRAIN if target.endswith("train") else N_TEST
        target = {"images_2d": "x", "image_size": "x"}.get(how, "y") + "_" + target.split("_")[1]
        a = arrays[target]
        if how == "images_2d":
            a = a.reshape(n, 28 * 28)
        elif how == "image_size":  # only one of the two image files: train and test disagree
            side = draw(st.integers(1, 40).filter(lambda s: s != 28))
            a = np.zeros((n, side, side), dtype=np.uint8)
        elif how == "labels_2d":
            a = a.reshape(n, 1)
        elif how == "label_count":
            a = np.arange(draw(st.integers(0, 2 * n).filter(lambda m: m != n))) % 10
        else:
            a = a.copy()
            a[draw(st.integers(0, n - 1))] = draw(st.integers(10, 255))
        data = bytearray(idx(a))
    raw[target] = bytes(data)
    mode = {"not_gzip": "plain", "missing": "missing", "directory": "directory"}.get(how, "gzip")
    if how == "gzip_truncated":
        whole = gzip.compress(raw[target], mtime=0)
        raw[target] = whole[: draw(st.integers(0, len(whole) - 1))]
        mode = "gz_bytes"
    elif how == "gzip_garbage":
        raw[target] = draw(st.binary(min_size=1, max_size=64).map(lambda b: b"\x00" + b))  # never gzip's 1f 8b
        mode = "gz_bytes"
    names_file = how not in ("image_size", "label_range")  # the DataPool checks see arrays, not files
    return DataCase(family, target, raw, mode, names_file)


def write_fashion(case: DataCase | None, root: Path) -> Path:
    data_dir = root / "fashion"
    data_dir.mkdir()
    raw = case.raw if case is not None else {k: idx(a) for k, a in fashion_arrays().items()}
    for key, name in FASHION.items():
        path = data_dir / name
        special = case.how if case is not None and key == case.target else "gzip"
        if special == "missing":
            continue
        if special == "directory":
            path.mkdir()
        elif special == "plain":
            path.write_bytes(raw[key])
        elif special == "gz_bytes":
            path.write_bytes(raw[key])
        else:
            path.write_bytes(gzip.compress(raw[key], mtime=0))
    return data_dir


def data_case(case: DataCase) -> None:
    count("data", case.family)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = write_fashion(case, root)
        scenario = root / "scenario.toml"
        scenario.write_text(fashion_scenario(data_dir))
        code, out, err = run_cli(["run", str(scenario), "--executor", "inline", "--out", str(root / "runs"), "--no-progress"])
        names = [str(scenario)] + ([FASHION[case.target]] if case.names_file else [])
        shown = Case(case.family, f"{case.target} ({FASHION[case.target]}): {case.how}", key="data")
        check_outcome(shown, code, out, err, names)


def test_fashion_base_runs(tmp_path):
    data_dir = write_fashion(None, tmp_path)
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(fashion_scenario(data_dir))
    code, out, err = run_cli(["run", str(scenario), "--executor", "inline", "--out", str(tmp_path / "runs"), "--no-progress"])
    assert code == 0 and err == "", err


@pytest.mark.parametrize("how", DATA_HOWS)
def test_fuzzed_data_files_give_one_line_and_exit_2(how):
    run_fuzz(data_case, bad_data(how), DATA_EXAMPLES, "data")


# ---------------------------------------------------------------------------------------------
# names and paths: a run folder's name comes from the scenario (`name`, `--set name=...`, sweep
# labels), and whatever it is, fedsim either refuses it in one line or writes under --out only

NAME_EXAMPLES = 40  # per route
NAME_RUN_EXAMPLES = 6  # names actually run (each writes a run folder)
NAME_MAX_BYTES = 200  # the README's limit on a run folder's name

awkward = st.sampled_from([
    "", " ", "\t", ".", "..", "...", "../x", "../../etc", "/abs", "/", "a/b", "a\\b", "\\", "\x00", "a\x00b", "a\nb",
    "\r", "\x7f", "x" * 200, "x" * 201, "é" * 100, "é" * 101, "ok-name", "名前", "-dash", ".hidden", "a=b,c", "~",
    "$HOME", "%s", "CON", "nul",
])
name_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
name_paths = st.lists(st.sampled_from(["..", ".", "x", "", "é", "\x00"]), min_size=1, max_size=5).map("/".join)
long_names = st.text(st.sampled_from("ab./é"), min_size=180, max_size=230)
names = st.one_of(awkward, name_text, name_paths, long_names)


def name_is_bad(name: str) -> bool:
    """The README's rule, restated here so that the oracle is not fedsim's own code."""
    return (
        not name.strip()
        or name in (".", "..")
        or any(ch in "/\\" or ord(ch) < 32 or ord(ch) == 127 for ch in name)
        or len(name.encode("utf-8")) > NAME_MAX_BYTES
    )


def name_case(route: str, name: str) -> None:
    count("names", route)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = _base(SMALL)
        extra: list[str] = []
        if route == "file":
            raw["name"] = name
        elif route == "set":
            extra = ["--set", "name=" + tomli_w.dumps({"v": name})[4:].strip()]
        else:  # a sweep label: sanitised into the run name, so it may never reach another folder
            raw["sweep"] = {"cases": [{"label": name}]}
        path = root / "scenario.toml"
        path.write_text(dump(raw))
        out = root / "out"
        code, _, err = run_cli(["validate", str(path), *extra])
        assert "Traceback" not in err and err.count("\n") == (0 if code == 0 else 1), err
        if route != "label":
            assert code == (2 if name_is_bad(name) else 0), (name, err)
            if code == 2:
                assert names_key(err.strip(), "name"), err
                return
        elif code == 2:
            assert names_key(err.strip(), "sweep"), err
            return
        from fedsim.scenario import load

        for spec in load(path, extra[1:]):
            assert not name_is_bad(spec.run_name)
            assert (out / spec.run_name).resolve().parent == out.resolve()


NAME_ROUTES = ["file", "set", "label"]


@pytest.mark.parametrize("route", NAME_ROUTES)
def test_fuzzed_names_are_refused_or_stay_under_out(route):
    run_fuzz(lambda name: name_case(route, name), names, NAME_EXAMPLES, "names")


def run_name_case(name: str) -> None:
    """`fedsim run` with the name: refused with nothing written, or one folder under --out."""
    count("names", "run")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = _base(SMALL, rounds=1)
        raw["name"] = name
        path = root / "scenario.toml"
        path.write_text(dump(raw))
        out = root / "a" / "out"
        code, _, err = run_cli(["run", str(path), "--out", str(out), "--no-progress"])
        written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p != path)
        if name_is_bad(name):
            assert code == 2 and err.count("\n") == 1 and written == [], (name, err, written)
        else:
            assert code == 0, (name, err)
            assert [p for p in written if not p.startswith(str(Path("a", "out")))] == ["a"]
            folders = [p for p in out.iterdir()]
            assert len(folders) == 1 and folders[0].name == name and (folders[0] / "summary.json").is_file()


def test_fuzzed_names_through_run_write_only_under_out():
    run_fuzz(run_name_case, st.one_of(awkward, name_text), NAME_RUN_EXAMPLES, "names")


def test_total_generated_cases():
    """Runs last in this module: the issue's floor of generated cases, over all fuzzers."""
    if len({k.split(":")[0] for k in COUNTS}) < 4 or total("scenarios") < 300:
        pytest.skip("not every fuzzer ran in this session (a selected subset)")
    assert sum(COUNTS.values()) >= MIN_TOTAL


# ---------------------------------------------------------------------------------------------
# inputs that once crashed fedsim: each now keeps the contract (one line, exit 2)


@pytest.mark.parametrize("bug", sorted(FOUND_BUGS))
def test_found_bug_stays_fixed(bug, tmp_path):
    description, extra, text = FOUND_BUGS[bug]
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    case = Case(f"found_bug:{bug}", text, extra=tuple(extra))
    code, out, err = run_cli(["validate", str(path), *extra])
    check_outcome(case, code, out, err, [str(path)])
