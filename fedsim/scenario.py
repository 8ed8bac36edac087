"""Scenario files: TOML in, a validated and fully resolved description of one or more runs out.

Validation is pydantic's, with `extra="forbid"` everywhere so that a misspelt key is an error rather
than a silently ignored setting. Plugins (algorithms, aggregators, models, topologies) bring their
own schema: an algorithm's config class, or the type hints of a factory's keyword arguments. Every
failure becomes one `ScenarioError` naming the file, the dotted key and what was expected.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import itertools
import math
import tomllib
import typing
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import registry
from .errors import FedsimError, ScenarioError, UnknownNameError
from .limits import MAX_RUNS, MAX_SCENARIO_BYTES, MAX_TOML_DEPTH, depth
from .paths import name_problem


class Section(BaseModel):
    """Base of every scenario table: strict types, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DataConfig(Section):
    dataset: str = "synthetic"
    num_clients: int = Field(32, ge=1)
    # auto: natural where the data set has its own clients, else dirichlet
    partition: Literal["auto", "natural", "iid", "dirichlet", "dirichlet_sizes", "label_quantity", "shards",
                       "quantity"] = "auto"
    alpha: float = Field(0.5, gt=0)
    size_alpha: float = Field(1.0, gt=0)  # dirichlet_sizes: Dir concentration of client sizes
    classes_per_client: int = Field(2, ge=1)  # label_quantity: k classes per client (NIID-Bench #C=k)
    shards_per_client: int = Field(2, ge=1)
    quantity_sigma: float = Field(1.0, ge=0)
    min_examples: int = Field(2, ge=1)
    samples_per_client: int = Field(200, ge=1)
    synthetic_alpha: float = Field(0.5, ge=0)
    synthetic_beta: float = Field(0.5, ge=0)
    test_size: int = Field(2000, ge=1)
    data_dir: str | None = None
    lazy: bool | None = None  # synthetic: generate clients on demand (default: above 5 M examples)
    client_test_fraction: float = Field(0.0, ge=0, lt=1)  # each client's held-out share (per-client accuracy)


class Distribution(Section):
    """A per-client quantity drawn once from the seed: fixed, or from a named distribution."""

    dist: Literal["fixed", "uniform", "normal", "lognormal", "exponential"] = "fixed"
    mean: float = Field(0.05, gt=0)
    sigma: float = Field(0.0, ge=0)
    low: float | None = Field(None, gt=0)
    high: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "Distribution":
        if self.dist == "uniform":
            if self.low is None or self.high is None or self.low >= self.high:
                raise ValueError("a uniform distribution needs 0 < low < high")
        return self


class LinkConfig(Section):
    """Per-client link: a number for every client, or a distribution drawn once per client."""

    bandwidth_mbps: Annotated[float, Field(gt=0)] | Distribution = 20.0
    latency_ms: Annotated[float, Field(ge=0)] | Distribution = 30.0


class FailuresConfig(Section):
    """Churn and failures, usable by every method. Times are simulated seconds; `*_round` is the
    same for round-based methods. Which nodes fail is drawn from the run's seed."""

    crash_fraction: float = Field(0.0, ge=0, le=1)
    crash_at: float | None = Field(None, ge=0)
    crash_round: int | None = Field(None, ge=1)
    leave_fraction: float = Field(0.0, ge=0, le=1)  # graceful: the node announces it is leaving
    leave_at: float | None = Field(None, ge=0)
    leave_round: int | None = Field(None, ge=1)
    join_fraction: float = Field(0.0, ge=0, le=1)  # absent at the start, join later
    join_at: float | None = Field(None, ge=0)
    join_round: int | None = Field(None, ge=1)
    churn_fraction: float = Field(0.0, ge=0, le=1)  # alternate up and down
    mean_up: float = Field(60.0, gt=0)
    mean_down: float = Field(20.0, gt=0)
    message_loss: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _when(self) -> "FailuresConfig":
        for kind in ("crash", "leave", "join"):
            if getattr(self, f"{kind}_fraction") > 0 and getattr(self, f"{kind}_at") is None and getattr(self, f"{kind}_round") is None:
                raise ValueError(f"{kind}_fraction needs {kind}_at (simulated seconds) or {kind}_round")
        return self


class SystemConfig(Section):
    executor: Literal["auto", "inline", "ray"] = "auto"  # auto: inline unless more workers pay (executor_choice)
    workers: int | None = Field(None, ge=1)
    clients_per_actor: int | None = Field(None, ge=1)
    address: str | None = None
    threads_per_worker: int = Field(1, ge=1)
    vectorize: bool | None = None  # train cohorts as one batched computation; None = where supported
    chunk_size: int = Field(64, ge=1)  # clients per vectorised batch
    device: Literal["auto", "cpu", "cuda"] = "auto"  # vectorised training on a GPU when there is one
    compute: Annotated[float, Field(gt=0)] | Distribution = Distribution()
    compute_jitter: float = Field(0.0, ge=0)  # lognormal sigma of a per-job slow-down or speed-up
    trace: str | None = None  # CSV: client, step_time[, bandwidth_mbps, latency_ms]; overrides draws
    link: LinkConfig = LinkConfig()
    failures: FailuresConfig = FailuresConfig()
    on_client_error: Literal["stop", "drop"] = "stop"  # drop: the client's job counts as a failure
    on_divergence: Literal["stop", "drop"] = "stop"  # drop: non-finite updates are discarded
    divergence_factor: float = Field(100.0, gt=1)  # test loss above this x the initial one diverged


class TrackingConfig(Section):
    """Where evaluation rows, the resolved scenario and the plots are sent besides the run folder."""

    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    experiment: str | None = None  # MLflow experiment / W&B project (default: the scenario's name)
    mlflow_uri: str | None = None  # default: a file store in OUT/mlruns
    wandb_mode: Literal["offline", "online"] = "offline"


class PluginsConfig(Section):
    """Modules imported before anything is looked up, so that the names they register work."""

    modules: list[str] = []


class NamedSection(BaseModel):
    """A table whose other keys belong to the named plugin, validated against its own schema."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    name: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TopologyConfig(NamedSection):
    mixing: str = "metropolis_hastings"
    time_varying: bool = False  # draw a fresh graph every round (random factories only)


class Scenario(Section):
    name: str = "run"
    seed: int = Field(0, ge=0, lt=2**63)
    rounds: int = Field(10, ge=1)
    eval_every: int = Field(1, ge=1)
    sim_time_budget: float | None = Field(None, gt=0)  # stop once simulated time reaches this
    target_accuracy: float | None = Field(None, gt=0, le=1)  # summary: time and bytes to reach it
    checkpoint_every: int = Field(10, ge=0)  # evaluations between checkpoints; 0 = never
    data: DataConfig = DataConfig()
    model: NamedSection = NamedSection(name="mlp")
    topology: TopologyConfig | None = None
    algorithm: NamedSection = NamedSection(name="fedavg")
    aggregator: NamedSection | None = None
    server_optimizer: NamedSection | None = None  # how the server steps after the rule (FedOpt)
    adversary: dict[str, Any] | None = None  # Byzantine clients (fedsim.adversary.AdversaryConfig)
    privacy: dict[str, Any] | None = None  # DP-FedAvg or local DP-SGD (fedsim.privacy.PrivacyConfig)
    compression: dict[str, Any] | None = None  # compressed uploads (fedsim.compression.CompressionConfig)
    system: SystemConfig = SystemConfig()
    tracking: TrackingConfig | None = None
    plugins: PluginsConfig | None = None
    sweep: dict[str, list[Any]] | None = None


class AlgorithmConfig(Section):
    """Base of every algorithm's `[algorithm]` schema; subclasses add the method's settings.

    `needs_topology` tells validation whether the method runs on a graph (a `[topology]` table is
    then required) or with a central server (the table is then an error); `accepts_aggregator`
    whether a scenario's `[aggregator]` rule can replace the method's merge.
    """

    needs_topology: ClassVar[bool] = False
    # False where the method's merge step is the method itself (Ferret, FlexLoRA, LoRA-FAIR):
    # a scenario's [aggregator] is then refused by `validate` and `run` alike
    accepts_aggregator: ClassVar[bool] = True
    name: str

    def smallest_merge(self) -> tuple[int, str, str] | None:
        """(size, key, why): how many updates the method's smallest merge holds when every client
        answers, the key that sets it and a phrase saying so, so that a rule needing more (Krum's
        2f + 3) is refused at validate rather than mid-run. None: the method does not say (graph
        methods, whose neighbourhoods are checked on the built graph; methods that wait until
        they hold enough updates)."""
        per_round = getattr(self, "clients_per_round", None)
        if not isinstance(per_round, int):
            return None
        return per_round, "algorithm.clients_per_round", f"algorithm.clients_per_round = {per_round}"


@dataclass(frozen=True)
class AlgorithmSpec:
    """What the registry stores for an algorithm: its schema and the function that builds it."""

    build: Callable[..., Any]
    config: type[AlgorithmConfig]
    needs_topology: bool


@dataclass(frozen=True)
class RunSpec:
    """One fully validated run: the scenario, its parsed algorithm config and where it came from."""

    scenario: Scenario
    algorithm: AlgorithmSpec
    algorithm_config: AlgorithmConfig
    source: str
    swept: dict[str, Any]

    @property
    def run_name(self) -> str:
        if not self.swept:
            return self.scenario.name
        parts = [f"{_label(key)}={_short(value)}" for key, value in self.swept.items()]
        return f"{self.scenario.name}-" + "-".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The resolved scenario, sweep removed: running this dict again reproduces the run."""
        data = self.scenario.model_dump(mode="json", exclude={"sweep"}, exclude_none=True)
        data["algorithm"] = self.algorithm_config.model_dump(mode="json", exclude_none=True)
        return data


def algorithm_spec(obj: Any) -> AlgorithmSpec:
    """Turn a registered algorithm (an `AlgorithmSpec` or a build function) into its spec.

    A build function declares its schema by the annotation of its first parameter, so a user's
    algorithm needs no extra boilerplate to be validated like a built-in one.
    """
    if isinstance(obj, AlgorithmSpec):
        return obj
    config = declared_config(obj)
    if config is None:
        name = getattr(obj, "__name__", repr(obj))
        raise ScenarioError(f"algorithm {name}: first parameter must be annotated with an AlgorithmConfig subclass")
    return AlgorithmSpec(build=obj, config=config, needs_topology=config.needs_topology)


def declared_config(obj: Any) -> type[AlgorithmConfig] | None:
    """The `AlgorithmConfig` subclass a build function's first parameter is annotated with, if any.

    Read from the signature alone, never by calling `obj`: the registry uses it to decide whether a
    `module:Name` from a scenario is an algorithm at all.
    """
    if not inspect.isfunction(obj):
        return None
    params = list(inspect.signature(obj).parameters.values())
    config = params[0].annotation if params else None
    if isinstance(config, str):  # postponed annotations: resolve this one name in the plugin's module
        config = obj.__globals__.get(config) if config.isidentifier() else None
    if isinstance(config, type) and issubclass(config, AlgorithmConfig):
        return config
    return None


# ---------------------------------------------------------------------------------------------
# loading


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, plugins: tuple[str, ...] | list[str] = (),
         max_runs: int | None = MAX_RUNS) -> list[RunSpec]:
    """Read, override, expand and validate a scenario file: one RunSpec per sweep point.

    A sweep of more than `max_runs` points is refused before it is expanded (None: no limit)."""
    return load_raw(read_toml(path), str(path), overrides, plugins=plugins, copy_raw=False, max_runs=max_runs)


def loads(text: str, source: str = "<scenario text>", overrides: list[str] | tuple[str, ...] = (),
          *, plugins: tuple[str, ...] | list[str] = (), max_runs: int | None = MAX_RUNS) -> list[RunSpec]:
    """Like `load`, from TOML text (a notebook cell's triple-quoted string)."""
    if len(text) > MAX_SCENARIO_BYTES:
        raise ScenarioError(f"larger than {MAX_SCENARIO_BYTES // 2**20} MiB: not a scenario", file=source)
    raw = _parse(text, source)
    return load_raw(raw, source, overrides, plugins=plugins, copy_raw=False, max_runs=max_runs)


def load_raw(raw: Mapping[str, Any], source: str = "<scenario dict>", overrides: Any = (),
             *, plugins: tuple[str, ...] | list[str] = (), copy_raw: bool = True,
             max_runs: int | None = MAX_RUNS) -> list[RunSpec]:
    """Override, expand and validate a scenario given as a dict (never modified).

    `overrides` are `--set` strings (`"algorithm.lr=0.1"`) or a dict of dotted keys to values
    (`{"algorithm.lr": 0.1}`); `plugins` are module names added to `[plugins] modules`, so that
    the resolved scenario.toml records them and `--resume` imports them again.
    """
    return expand(prepare_raw(raw, source, overrides, plugins=plugins, copy_raw=copy_raw), source, max_runs=max_runs)


def prepare_raw(raw: Mapping[str, Any], source: str = "<scenario dict>", overrides: Any = (),
                *, plugins: tuple[str, ...] | list[str] = (), copy_raw: bool = True) -> dict[str, Any]:
    """The scenario's table with the overrides and plug-in modules applied: what `load_raw`
    expands (and what a sweep keeps in OUT/<name>.sweep.toml so that --resume can finish it)."""
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"expected a table (a dict) of scenario keys, got {type(raw).__name__}", file=source)
    if copy_raw:  # the caller's dict (a notebook's) is never modified
        _check_depth(raw, source)
        try:
            raw = copy.deepcopy(dict(raw))
        except RecursionError:
            raise ScenarioError("not a scenario: tables nested too deeply", file=source) from None
    else:
        raw = dict(raw)
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for item in items:
        if isinstance(item, str):
            key, value = parse_override(item, source)
        else:
            key, value = item
        set_dotted(raw, key, value, source)
    if plugins:
        table = raw.setdefault("plugins", {})
        if not isinstance(table, dict):
            raise ScenarioError("expected a table", file=source, key="plugins")
        listed = table.get("modules", [])
        if not isinstance(listed, list):
            raise ScenarioError("expected a list of module names", file=source, key="plugins.modules")
        table["modules"] = listed + [m for m in plugins if m not in listed]
    return raw


def _import_plugins(raw: Mapping[str, Any], source: str) -> None:
    """Import `[plugins] modules` before anything is validated: the names they register must be
    known when the scenario's tables are checked."""
    table = raw.get("plugins")
    if table is None:
        return
    if not isinstance(table, dict):
        raise ScenarioError("expected a table", file=source, key="plugins")
    modules = table.get("modules", [])
    if not isinstance(modules, list):
        raise ScenarioError("expected a list of module names", file=source, key="plugins.modules")
    from .plugins import import_modules

    try:
        import_modules(modules)
    except FedsimError as exc:
        raise exc.located(file=source, key="plugins.modules") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SCENARIO_BYTES + 1)
        if len(data) > MAX_SCENARIO_BYTES:
            raise ScenarioError(f"larger than {MAX_SCENARIO_BYTES // 2**20} MiB: not a scenario file", file=source)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ScenarioError("file not found", file=source) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ScenarioError(f"cannot read the file ({exc.__class__.__name__})", file=source) from None
    return _parse(text, source)


def _parse(text: str, source: str) -> dict[str, Any]:
    """TOML text as a table, or one line saying why it is not a scenario."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"not valid TOML: {exc}", file=source) from None
    except RecursionError:
        raise ScenarioError("not a scenario: values nested too deeply to read", file=source) from None
    _check_depth(raw, source)
    return raw


def _check_depth(value: Any, source: str, what: str = "tables and arrays") -> None:
    if depth(value) > MAX_TOML_DEPTH:
        raise ScenarioError(f"not a scenario: {what} nested more than {MAX_TOML_DEPTH} deep", file=source)


def parse_override(item: str, source: str) -> tuple[list[str], Any]:
    """`key.path=value`: the key in TOML's dotted-key syntax (quoted parts allowed, as in
    `sweep."topology.name"=[...]`); the value read as TOML when it is one, else as a bare string
    (`--set topology.name=ring`)."""
    key, sep, text = item.partition("=")
    try:
        node: Any = tomllib.loads(f"{key} = 0")
    except (tomllib.TOMLDecodeError, RecursionError):
        raise ScenarioError(f"--set expects key=value with a TOML key, got '{item}'", file=source) from None
    if not sep:
        raise ScenarioError(f"--set expects key=value, got '{item}'", file=source)
    path: list[str] = []
    while isinstance(node, dict):
        if len(node) != 1:  # '[t]' headers or comments: not one dotted key
            raise ScenarioError(f"--set expects key=value with one dotted key, got '{item}'", file=source)
        ((part, node),) = node.items()
        path.append(part)
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    except RecursionError:
        raise ScenarioError(f"--set value nested too deeply to read: '{_clip(item)}'", file=source) from None
    _check_depth(value, source, "the --set value's tables and arrays")
    return path, value


def set_dotted(raw: dict[str, Any], key: str | list[str], value: Any, source: str) -> None:
    parts = key.split(".") if isinstance(key, str) else key
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ScenarioError("is not a table", file=source, key=".".join(parts[: i + 1]))
        node = child
    node[parts[-1]] = value


def merge_dotted(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Like `set_dotted`, but a table merges (recursively) into the table already there: a sweep
    over `algorithm = [{name = "fedavg"}, {name = "fedcompass", q_max = 50}]` keeps the shared
    keys of the file's [algorithm] table and adds each point's own."""
    parts = key.split(".")
    node: Any = raw
    for part in parts:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(value, dict) and isinstance(node, dict):
        value = deep_merge(node, value)
    set_dotted(raw, key, value, source)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def expand(raw: dict[str, Any], source: str, *, max_runs: int | None = MAX_RUNS) -> list[RunSpec]:
    """The cartesian product of the `[sweep]` lists, each point validated on its own.

    `cases = [{...}, {...}]` is a list of whole-scenario overrides (each merged into the file, an
    optional `label` naming it), for comparisons whose points differ in several keys at once, such
    as a server method against a graph method that needs a [topology]. The number of points is
    counted (and refused beyond `max_runs`) before anything is expanded.
    """
    skipped = _PLUGINS_OFF.get()
    if skipped is not None:
        modules = raw.get("plugins", {}).get("modules") if isinstance(raw.get("plugins"), dict) else None
        if modules:
            skipped.append(f"plugins.modules = {modules!r}")
        return _expand(raw, source, max_runs)
    _import_plugins(raw, source)
    return _expand(raw, source, max_runs)


def _expand(raw: dict[str, Any], source: str, max_runs: int | None) -> list[RunSpec]:
    sweep = raw.get("sweep")
    if sweep is None:
        return [validate(raw, source, {})]
    if not isinstance(sweep, dict) or not sweep:
        raise ScenarioError("expected a table of key = [values] with at least one key", file=source, key="sweep")
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ScenarioError("expected a non-empty list of values", file=source, key=f"sweep.{key}")
        if key.split(".")[0] == "sweep":
            raise ScenarioError("a sweep cannot sweep itself", file=source, key=f"sweep.{key}")
    for i, case in enumerate(sweep.get("cases", [])):
        if not isinstance(case, dict):
            raise ScenarioError("expected a table of overrides", file=source, key=f"sweep.cases[{i}]")
    count = math.prod(len(values) for values in sweep.values())
    if max_runs is not None and count > max_runs:
        sizes = " x ".join(str(len(values)) for values in sweep.values())
        raise ScenarioError(f"{count:,} runs ({sizes}) is more than the limit of {max_runs:,}; "
                            "raise it with --max-runs N if you mean it", file=source, key="sweep")
    base = {k: v for k, v in raw.items() if k != "sweep"}
    specs = []
    for combo in itertools.product(*sweep.values()):
        point = copy.deepcopy(base)
        swept = dict(zip(sweep, combo))
        for key, value in swept.items():
            if key == "cases":
                case = dict(value)
                swept[key] = str(case.pop("label", _short(case.get("algorithm", case))))
                point = deep_merge(point, case)
            else:
                merge_dotted(point, key, value, source)
        specs.append(validate(point, source, swept))
    names = [spec.run_name for spec in specs]
    if len(set(names)) != len(names):
        raise ScenarioError("two sweep points give the same run name (give cases a label)", file=source, key="sweep")
    return specs


def validate(raw: Mapping[str, Any], source: str, swept: dict[str, Any], algorithm: AlgorithmSpec | None = None) -> RunSpec:
    """One run's spec. `algorithm` stands in for the registry's entry for `[algorithm] name`, so that
    `fedsim.testing.check_flow` can check a build function that is not registered."""
    scenario = _model(Scenario, raw, source, "")
    try:
        found = algorithm or _known(registry.algorithms, scenario.algorithm.name, "algorithm.name")
        spec = _UNCHECKED_ALGORITHM if found is _UNCHECKED else algorithm_spec(found)
        algorithm_config = _model(spec.config, raw.get("algorithm", {"name": scenario.algorithm.name}), source, "algorithm.")
        _check_plugins(scenario)
        if found is not _UNCHECKED:
            _check_consistency(scenario, spec, algorithm_config)
    except FedsimError as exc:
        raise exc.located(file=source) from None
    run = RunSpec(scenario, spec, algorithm_config, source, swept)
    problem = name_problem(run.run_name)
    if problem is not None:
        shown = run.run_name if len(run.run_name) <= 60 else run.run_name[:57] + "..."
        raise ScenarioError(f"run folder name {shown!r} {problem}", file=source, key="sweep" if swept and
                            name_problem(scenario.name) is None else "name")
    return run


def _check_plugins(scenario: Scenario) -> None:
    _known(registry.datasets, scenario.data.dataset, "data.dataset")
    model = _known(registry.models, scenario.model.name, "model.name")
    if model is not _UNCHECKED:
        check_kwargs(model, scenario.model.options(), "model")
    if scenario.aggregator is not None:
        factory = _known(registry.aggregators, scenario.aggregator.name, "aggregator.name")
        if factory is not _UNCHECKED:
            check_kwargs(factory, scenario.aggregator.options(), "aggregator")
            from .aggregation import build_aggregator

            build_aggregator(scenario.aggregator.name, scenario.aggregator.options())  # its own checks too
    if scenario.server_optimizer is not None:
        server_optimizer_config(scenario, "")
    if scenario.adversary is not None:
        adversary_config(scenario, "")
    if scenario.privacy is not None:
        privacy_config(scenario, "")
    if scenario.compression is not None:
        compression_config(scenario, "")
    if scenario.topology is not None:
        from .topologies import MIXING_RULES

        factory = _known(registry.topologies, scenario.topology.name, "topology.name")
        if factory is not _UNCHECKED:
            check_kwargs(factory, scenario.topology.options(), "topology", skip=1)
        if scenario.topology.mixing not in MIXING_RULES:
            raise ScenarioError(f"expected one of {', '.join(MIXING_RULES)}, got {scenario.topology.mixing!r}", key="topology.mixing")


def server_optimizer_config(scenario: Scenario, source: str) -> Any:
    """The validated `[server_optimizer]` table (name, lr, momentum, beta1, beta2, tau)."""
    from .server_optim import ServerOptConfig

    table = scenario.server_optimizer
    return _model(ServerOptConfig, {"name": table.name, **table.options()}, source, "server_optimizer.")


def adversary_config(scenario: Scenario, source: str) -> Any:
    """The validated `[adversary]` table (fraction, behaviour and the behaviour's settings)."""
    from .adversary import AdversaryConfig

    return _model(AdversaryConfig, scenario.adversary, source, "adversary.")


def privacy_config(scenario: Scenario, source: str) -> Any:
    """The validated `[privacy]` table (DP-FedAvg at the server, or local DP-SGD)."""
    from .privacy import PrivacyConfig

    return _model(PrivacyConfig, scenario.privacy, source, "privacy.")


def compression_config(scenario: Scenario, source: str) -> Any:
    """The validated `[compression]` table (the upload compressor and error feedback)."""
    from .compression import CompressionConfig

    return _model(CompressionConfig, scenario.compression, source, "compression.")


def rule_min_clients(scenario: Scenario) -> tuple[int, str]:
    """The fewest updates the scenario's `[aggregator]` rule can merge (its `min_clients`, 1 for
    rules that do not say), and the rule named with its f for messages."""
    table = scenario.aggregator
    if table is None or (_PLUGINS_OFF.get() is not None and ":" in table.name):
        return 1, ""
    from .aggregation import build_aggregator

    try:
        need = getattr(build_aggregator(table.name, table.options()), "min_clients", 1)
    except FedsimError:  # an unknown or misconfigured rule is reported where rules are checked
        return 1, ""
    f = table.options().get("f")
    return (need if isinstance(need, int) else 1), table.name + (f" with f = {f}" if f is not None else "")


def _check_rule_fits(scenario: Scenario, config: AlgorithmConfig) -> None:
    """A rule that needs more updates per merge than the method's merge holds is bad input."""
    need, rule = rule_min_clients(scenario)
    if need <= 1 or config.needs_topology:
        return
    smallest = config.smallest_merge()
    if smallest is not None and smallest[0] < need:
        size, key, why = smallest
        raise ScenarioError(f"{rule} needs at least {need} updates per merge, but {why} "
                            f"gives {size}", key=key)


def _check_consistency(scenario: Scenario, spec: AlgorithmSpec, config: AlgorithmConfig) -> None:
    n = scenario.data.num_clients
    if scenario.privacy is not None and scenario.privacy.get("mode", "server") == "server":
        if spec.needs_topology:
            raise ScenarioError(f"algorithm '{config.name}' has no server to clip and noise updates (DP-FedAvg): "
                                "use mode = \"local\" (DP-SGD) on a graph", key="privacy.mode")
        if scenario.aggregator is not None:
            raise ScenarioError("DP-FedAvg's merge is the clipped, noised mean of the updates: remove the "
                                "[aggregator] table (or use mode = \"local\")", key="aggregator")
    if scenario.compression is not None and spec.needs_topology and config.name != "choco":
        raise ScenarioError(f"graph method '{config.name}' gossips uncompressed models: compressed gossip is "
                            "algorithm.name = \"choco\" (CHOCO-SGD)", key="compression")
    per_round = getattr(config, "clients_per_round", None)
    if per_round is not None and per_round > n:
        raise ScenarioError(
            f"expected at most data.num_clients = {n}, got {per_round}", key="algorithm.clients_per_round"
        )
    _check_rule_fits(scenario, config)
    if scenario.server_optimizer is not None and (spec.needs_topology or not type(config).accepts_aggregator):
        raise ScenarioError(f"algorithm '{config.name}' has no global model for a server optimiser to step: "
                            "remove the [server_optimizer] table", key="server_optimizer")
    if scenario.aggregator is not None and not type(config).accepts_aggregator:
        raise ScenarioError(f"algorithm '{config.name}' has no merge step that a rule can replace: remove the "
                            "[aggregator] table", key="aggregator")
    if spec.needs_topology and scenario.topology is None:
        raise ScenarioError(f"algorithm '{config.name}' runs on a graph: add a [topology] table", key="topology")
    if not spec.needs_topology and scenario.topology is not None:
        raise ScenarioError(
            f"algorithm '{config.name}' uses a central server: remove the [topology] table", key="topology"
        )


def _known(reg: registry.Registry[Any], name: str, key: str) -> Any:
    skipped = _PLUGINS_OFF.get()
    if skipped is not None and ":" in name:
        skipped.append(f"{key} = {name!r}")
        return _UNCHECKED
    try:
        return reg.get(name)
    except UnknownNameError as exc:
        if skipped is not None and any(item.startswith("plugins.modules") for item in skipped):
            skipped.append(f"{key} = {name!r}")  # perhaps registered by a module not imported
            return _UNCHECKED
        raise exc.located(key=key) from None
    except FedsimError as exc:
        raise exc.located(key=key) from None


# `fedsim validate --no-plugins`: `module:Name` plug-ins are listed here instead of imported
_PLUGINS_OFF: ContextVar[list[str] | None] = ContextVar("fedsim_plugins_off", default=None)
_UNCHECKED: Any = object()


def unchecked_plugins(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                      plugins: tuple[str, ...] | list[str] = (),
                      max_runs: int | None = MAX_RUNS) -> tuple[list[RunSpec], list[str]]:
    """`load` without importing any plug-in code (`module:Name` names, `[plugins] modules`,
    `--plugin`): the specs, and the keys left unchecked for that reason."""
    skipped: list[str] = []
    token = _PLUGINS_OFF.set(skipped)
    try:
        specs = load(path, overrides, plugins=plugins, max_runs=max_runs)
    finally:
        _PLUGINS_OFF.reset(token)
    return specs, list(dict.fromkeys(skipped))


class _UncheckedAlgorithmConfig(AlgorithmConfig):
    """Stands in for a plug-in algorithm's schema that --no-plugins did not import."""

    model_config = ConfigDict(extra="allow")


_UNCHECKED_ALGORITHM = AlgorithmSpec(build=lambda cfg, ctx: None, config=_UncheckedAlgorithmConfig, needs_topology=False)


def check_kwargs(factory: Callable[..., Any], options: Mapping[str, Any], section: str, skip: int = 0) -> None:
    """Validate a plugin's scenario keys against the keyword parameters and hints of its factory."""
    if isinstance(factory, type) and factory.__init__ is object.__init__:
        params: list[inspect.Parameter] = []  # a class without a constructor takes no settings
        target: Any = factory
    else:
        target = factory.__init__ if isinstance(factory, type) else factory
        params = [p for p in inspect.signature(target).parameters.values() if p.name != "self"][skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable annotations: check the names only
        hints = {}
    for key, value in options.items():
        if key not in accepted:
            known = ", ".join(sorted(accepted)) or "none"
            raise ScenarioError(f"unknown key (accepted: {known})", key=f"{section}.{key}")
        hint = hints.get(key)
        if hint is not None:
            _check_type(value, hint, f"{section}.{key}")


def _check_type(value: Any, hint: Any, key: str) -> None:
    from pydantic import TypeAdapter

    try:
        TypeAdapter(hint).validate_python(value, strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ScenarioError(f"expected {_expected(err)}, got {_clip(repr(value))}", key=key) from None
    except Exception:  # an annotation pydantic cannot build a validator for: accept the value
        pass


def _model(cls: type[BaseModel], raw: Any, source: str, prefix: str) -> Any:
    try:
        return cls.model_validate(raw)
    except RecursionError:
        raise ScenarioError("not a scenario: tables nested too deeply", file=source) from None
    except ValidationError as exc:
        err = _relevant(exc.errors())
        key = _clip(prefix + ".".join(str(part) for part in err["loc"] if not _is_tag(part)), 80)
        got = _clip(_safe_repr(err.get("input")))
        if err["type"] == "extra_forbidden":
            names = _field_names(cls, err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ScenarioError(f"unknown key ({hint}accepted: {', '.join(names)})", file=source, key=key) from None
        if err["type"] == "missing":
            raise ScenarioError("missing required key", file=source, key=key) from None
        if err["type"] == "value_error":
            raise ScenarioError(err["msg"].removeprefix("Value error, "), file=source, key=key or None) from None
        raise ScenarioError(f"expected {_expected(err)}, got {got}", file=source, key=key) from None


def _relevant(errors: list[Any]) -> Any:
    """The error to report. A key that takes a number or a table (`compute = 0.05` or `compute =
    { dist = ... }`) gets one error per branch, the number's first; when the user wrote a table,
    the table's own error (an unknown key, a bad value inside it) is the one that helps."""
    first = errors[0]
    if isinstance(first.get("input"), dict):
        where = [p for p in first["loc"] if not _is_tag(p)]
        for err in errors[1:]:
            inside = [p for p in err["loc"] if not _is_tag(p)]
            if inside[: len(where)] == where and err["type"] not in ("model_type", "dict_type", "model_attributes_type"):
                return err
    return first


def _field_names(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys accepted by the (sub)table at `loc`, for an 'unknown key' message."""
    model: Any = cls
    for part in loc:
        if _is_tag(part):  # a union's branch, named after the model it tried: resolved below
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *typing.get_args(annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return sorted(model.model_fields)


_EXPECTED = {
    "greater_than": "a value > {gt}",
    "greater_than_equal": "a value >= {ge}",
    "less_than": "a value < {lt}",
    "less_than_equal": "a value <= {le}",
    "literal_error": "one of {expected}",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "int_from_float": "an integer",
    "too_short": "at least {min_length} item(s)",
}


def _expected(err: Mapping[str, Any]) -> str:
    template = _EXPECTED.get(err["type"])
    if template is None:
        return err["msg"][0].lower() + err["msg"][1:]
    return template.format(**err.get("ctx", {}))


def _label(key: str) -> str:
    """`algorithm.lr` -> `lr`, but `algorithm.name` -> `algorithm`: short and unambiguous."""
    if key == "cases":
        return "case"
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def _is_tag(part: Any) -> bool:
    """pydantic names the branch of a union in error locations ('constrained-float', 'Distribution'):
    not a key the user wrote."""
    return isinstance(part, str) and (part[:1].isupper() or "-" in part or "[" in part)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except RecursionError:
        return "a deeply nested value"


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def label(value: Any) -> str:
    """A swept value as runs.csv and run names show it: a table by its name, else its values."""
    if isinstance(value, dict):
        return str(value["name"]) if "name" in value else "-".join(map(str, value.values()))
    return str(value)


def _short(value: Any) -> str:
    return label(value).rsplit(":", 1)[-1].replace("/", "_").replace(" ", "")[:40]
