"""The coordinator owns a run: it builds the pieces a scenario names, drives the algorithm's rounds,
and records curves, a summary and a plot in the run's folder.

The simulation's state (clock, ledger, generators) lives in the `RunContext` passed down to the
algorithm; no module-level state is read or written, so two runs in one process cannot interfere.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Protocol

import networkx as nx
import numpy as np
import tomli_w
from torch import nn
from . import __version__, checkpoint, tracking, vectorized
from .client_state import ClientStates, StatefulExecutor
from .aggregation import Aggregator, ServerOptimizer, build_aggregator, combine
from .clock import Clock
from .data import FederatedData, build_federated_data
from .data.heterogeneity import heterogeneity
from .errors import FedsimError, ScenarioError, StalledError
from .executor import Executor, InlineExecutor, RayExecutor, WorkerSpec
from .failures import FailureModel
from .history import History
from .ledger import Ledger
from .models import build_model
from .network import Network
from .params import Params, UpdateBatch
from .plotting import plot_run
from .progress import Progress
from .scenario import RunSpec, label
from .seeding import generator
from .system import SystemModel
from .training import ClientResult, Trainer, evaluate, get_params, torch_threads


# A run whose simulated clock has not moved for this many consecutive rounds has stalled: nothing
# is in flight any more, so every later round would be a no-op with a frozen curve.
STALL_ROUNDS = 10


class Flow(Protocol):
    """What an algorithm's build function returns: a state machine advanced one round at a time."""

    def step(self, round: int) -> dict[str, float]: ...

    def evaluate(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class RunOptions:
    """Command-line settings that override the scenario's [system] table for this invocation."""

    executor: str | None = None
    workers: int | None = None
    address: str | None = None
    progress: bool = True
    position: tuple[int, int] | None = None  # (i, n): the i-th of a sweep's n runs, for the progress bar


class RunContext:
    """The services an algorithm builds on: data, model, executors, clock, ledger, generators."""

    def __init__(self, spec: RunSpec, options: RunOptions = RunOptions()):
        s = spec.scenario
        self.spec = spec
        self.seed = s.seed
        self.options = options
        self.data: FederatedData = _located(lambda: build_federated_data(s.data, s.seed), spec, "data")
        shape = self.data.feature_shape
        self.model: nn.Module = _located(
            lambda: build_model(s.model.name, s.model.options(), shape, self.data.num_classes, s.seed), spec, "model"
        )
        self.init_params: Params = get_params(self.model)
        self.system = SystemModel.from_config(s.system, self.data.num_clients, s.seed)
        self.clock = Clock()
        self.ledger = Ledger(self.data.num_clients)
        self.failures = FailureModel(s.system.failures, self.data.num_clients, s.seed)
        self.net = Network(self.system, self.failures, self.ledger, s.seed)
        self.first_bad: tuple[int, int] | None = None  # (client, round) of the first non-finite update
        self.dropped_updates = 0
        self._aggregator: Aggregator | None = None
        self.rule_used = False  # whether the flow asked for the configured rule (see `rule`)
        if s.aggregator is not None:
            agg = s.aggregator
            self._aggregator = _located(lambda: build_aggregator(agg.name, agg.options()), spec, "aggregator")
        self.server_optimizer: ServerOptimizer | None = None
        self.batch_hooks: list[Callable[[UpdateBatch, Params, int], UpdateBatch]] = []
        self.attackers = np.zeros(0, dtype=np.int64)
        if s.adversary is not None:
            self._add_adversary(spec)
        if s.server_optimizer is not None:
            from .scenario import server_optimizer_config

            self.server_optimizer = server_optimizer_config(s, spec.source).build()
        self.graph: nx.Graph | None = None
        if s.topology is not None:
            from .topologies import build

            topo = s.topology
            # A seed in [topology] wins; otherwise random graphs derive theirs from the run's seed.
            options = {"seed": int(self.generator("topology").integers(2**31)), **topo.options()}
            self.graph = _located(lambda: build(topo.name, self.data.num_clients, **options), spec, "topology")
        self._executors: list[Executor] = []
        self._said_sequential = False
        self.client_states = ClientStates()
        self._choice: Any = None  # the executor `auto` chose, decided once per run

    @property
    def aggregator(self) -> Aggregator | None:
        """The scenario's `[aggregator]` rule, or None; prefer `rule(default)`."""
        self.rule_used = True
        return self._aggregator

    def rule(self, default: Aggregator) -> Aggregator:
        """The rule a merge point uses: the scenario's `[aggregator]` when it has one, else the
        method's own `default`. A method that never asks cannot honour `[aggregator]`, and the run
        says so instead of ignoring it."""
        self.rule_used = True
        return self._aggregator if self._aggregator is not None else default

    def _add_adversary(self, spec: RunSpec) -> None:
        """Attackers chosen once from the seed; their rows of every merge point's batch are
        replaced by what `behaviour` sends (label flipping acts on their data instead)."""
        from .adversary import attacker_mask, choose_attackers, corrupt
        from .scenario import adversary_config

        cfg = adversary_config(spec.scenario, spec.source)
        self.attackers = choose_attackers(self.data.num_clients, cfg.fraction, self.generator("adversary"))
        if cfg.behaviour == "label_flip":
            return

        def attack(batch: UpdateBatch, global_params: Params, round: int) -> UpdateBatch:
            bad = attacker_mask(batch.client_ids, self.attackers)
            if not bool(bad.any()):
                return batch
            reference = None if batch.relative else global_params
            rng = self.generator("adversary.round", round, int(batch.client_ids[0]) + 1)
            return replace(batch, params=corrupt(batch.params, bad, ~bad, reference, cfg, rng))

        self.batch_hooks.append(attack)

    def combine(self, rule: Aggregator, global_params: Params, batch: UpdateBatch, *, round: int, where: str) -> Params:
        """Every merge point's way in: the engine's view of the batch (attackers' rows replaced,
        where the scenario has an adversary) goes to the rule, whose answer is checked
        (`fedsim.combine`)."""
        for hook in self.batch_hooks:
            batch = hook(batch, global_params, round)
        return combine(rule, global_params, batch, round=round, where=where)

    def server_step(self, params: Params, combined: Params, *, round: int) -> Params:
        """How the server moves from `params` towards what the rule `combined`: to it exactly by
        default, or a step of the scenario's server optimiser on the pseudo-gradient."""
        if self.server_optimizer is None:
            return combined
        return self.server_optimizer.step(params, combined, round=round)

    def generator(self, purpose: str, *ids: int) -> np.random.Generator:
        return generator(self.seed, purpose, *ids)

    def executor(self, trainer: Trainer) -> Executor:
        """An executor whose workers hold this run's data and model and train with `trainer`."""
        s = self.spec.scenario
        from .plugins import module_dirs as plugin_dirs

        plugins = tuple(s.plugins.modules) if s.plugins else ()
        spec = WorkerSpec(
            s.model.name, s.model.options(), self.data.feature_shape, self.data.num_classes, s.seed,
            trainer, s.system.threads_per_worker, s.system.on_client_error, s.system.vectorize, s.system.chunk_size,
            s.system.device, plugins, plugin_dirs(plugins), self._flipped_labels(),
        )
        if s.system.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ScenarioError("expected a machine with a CUDA GPU (or device = \"auto\")", key="system.device",
                                    file=self.spec.source)
        choice = self.executor_choice()
        executor: Executor
        if choice.kind == "inline":
            executor = InlineExecutor(self.data, spec)
        else:
            executor = RayExecutor(
                self.data, spec,
                workers=choice.workers,
                clients_per_actor=s.system.clients_per_actor,
                address=self.options.address or s.system.address,
            )
        self._executors.append(executor)
        if spec.vectorize is not False and not self._said_sequential and vectorized.plan(self.model, trainer) is None:
            self._said_sequential = True
            reason = "the model has buffers" if list(self.model.buffers()) else f"{type(trainer).__name__} has no vectorised form"
            print(f"fedsim: clients train one after another ({reason})")
        return StatefulExecutor(executor, self.client_states)

    def _flipped_labels(self) -> tuple[int, ...]:
        """Clients that train on flipped labels (an `[adversary]` with behaviour = "label_flip")."""
        s = self.spec.scenario
        if s.adversary is None or s.adversary.get("behaviour") != "label_flip":
            return ()
        return tuple(int(c) for c in self.attackers)

    def executor_choice(self) -> Any:
        """Inline or Ray for this run; `auto` is decided (and said, in one line) on first use."""
        if self._choice is None:
            from .executor_choice import choose

            o = self.options
            self._choice = choose(
                self.spec, o.executor, o.workers, o.address, num_params=sum(p.numel() for p in self.init_params.values()),
                mean_examples=float(np.mean(self.data.num_examples())), num_clients=self.data.num_clients,
            )
            if (o.executor or self.spec.scenario.system.executor) == "auto":
                print(self._choice.line(), file=sys.stderr)
        return self._choice

    def evaluate(self, params: Params) -> tuple[float, float]:
        """Test accuracy and loss of `params`, computed with the workers' fixed thread count."""
        with torch_threads(self.spec.scenario.system.threads_per_worker):
            return evaluate(self.model, params, self.data.x_test, self.data.y_test)

    def screen(self, results: list[ClientResult], round: int) -> list[ClientResult]:
        """The results a flow may use: jobs that failed and (with on_divergence = "drop")
        non-finite updates are removed and counted; otherwise the first bad one is remembered and
        reported at the next evaluation."""
        kept = [r for r in results if not r.metrics.get("failed")]
        bad = [r for r in kept if r.metrics.get("nonfinite")]
        if not bad:
            return kept
        if self.spec.scenario.system.on_divergence == "drop":
            self.dropped_updates += len(bad)
            return [r for r in kept if not r.metrics.get("nonfinite")]
        self.first_bad = self.first_bad or (bad[0].client_id, round)
        return kept

    def state(self) -> dict[str, Any]:
        """The simulation state the context owns, for checkpoints."""
        return {"now": self.clock.now, "net": self.net.state(), "dropped_updates": self.dropped_updates,
                "client_states": self.client_states.states,
                "server_optimizer": checkpoint.capture(self.server_optimizer) if self.server_optimizer else None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.clock.now = state["now"]
        self.net.load_state(state["net"])
        self.dropped_updates = state["dropped_updates"]
        self.client_states.states = state["client_states"]
        if self.server_optimizer is not None:
            checkpoint.restore(self.server_optimizer, state["server_optimizer"])

    def close(self) -> None:
        for executor in self._executors:
            executor.close()
        self._executors.clear()


def _located(build: Any, spec: RunSpec, key: str) -> Any:
    try:
        return build()
    except FedsimError as exc:
        raise exc.located(file=spec.source, key=key) from None


def run(
    spec: RunSpec, out: str | Path = "runs", options: RunOptions = RunOptions(), *, run_dir: Path | None = None,
    resume: bool = False,
) -> Path:
    """Simulate one run; returns its folder (metrics.csv, summary.json, convergence.png, scenario.toml).

    With `resume`, the run continues from `run_dir/checkpoint.pt`: rows written after that
    checkpoint are dropped and recomputed, so the curves equal those of an uninterrupted run.
    """
    s = spec.scenario
    run_dir = run_dir or Path(out) / spec.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    saved = checkpoint.load(ckpt_path) if resume else None
    if saved is not None:
        spec = replace(spec, swept=checkpoint.decode(saved["swept"]))
    else:
        write_resolved_scenario(spec, run_dir / "scenario.toml")
    rows = checkpoint.decode(saved["history"]) if saved is not None else []
    start = time.perf_counter() - (rows[-1]["wall_time"] if rows else 0.0)
    history = History(run_dir / "metrics.csv", rows)
    ctx = RunContext(spec, options)
    trackers = tracking.open_trackers(spec, run_dir, rows)  # none without a [tracking] table
    history.observers += trackers
    completed = False
    # Server-side tensor work (aggregation, mixing, evaluation) runs with the fixed thread count
    # too: idle OpenMP threads spin for a while after each op, which on a small machine steals the
    # cores the actors are training on.
    with torch_threads(s.system.threads_per_worker):
        try:
            flow: Flow = spec.algorithm.build(spec.algorithm_config, ctx)
            if s.checkpoint_every:  # a flow that no checkpoint could save is refused now, not mid-run
                checkpoint.require_state(flow, spec.algorithm_config.name)
            if s.aggregator is not None and not ctx.rule_used:
                raise ScenarioError(f"algorithm '{spec.algorithm_config.name}' has no merge step that a rule can "
                                    "replace: remove the [aggregator] table", key="aggregator")
            first = 1
            if saved is not None:
                checkpoint.restore(flow, saved["flow"])
                ctx.load_state(checkpoint.decode(saved["ctx"]))
                first = int(saved["round"]) + 1
            else:
                _record(history, ctx, flow, 0, {}, start)
            bar = Progress(spec.run_name, s.rounds, first - 1, enabled=options.progress, position=options.position)
            frozen_since: int | None = None  # first round of the current run of rounds the clock did not move in
            stalled = False
            with bar:
                for r in range(first, s.rounds + 1):
                    before = ctx.clock.now
                    train_metrics = flow.step(r)
                    frozen_since = (frozen_since or r) if ctx.clock.now == before else None
                    # a clock that never moved (a flow that does not simulate time) is not a stall
                    stalled = frozen_since is not None and r - frozen_since + 1 >= STALL_ROUNDS and ctx.clock.now > 0
                    out_of_time = s.sim_time_budget is not None and ctx.clock.now >= s.sim_time_budget
                    if r % s.eval_every == 0 or r == s.rounds or out_of_time or stalled:
                        row = _record(history, ctx, flow, r, train_metrics, start)
                        bar.evaluated(row)
                        evaluations = len(history.rows) - 1
                        if s.checkpoint_every and evaluations % s.checkpoint_every == 0:
                            save_checkpoint(ckpt_path, spec, ctx, flow, history, r)
                    bar.advance()
                    if out_of_time or stalled:
                        break
            completed = True
        except FedsimError as exc:
            raise exc.located(file=spec.source) from None
        finally:
            ctx.close()
            if not completed:
                tracking.finish_trackers(trackers, run_dir, failed=True)
    stalled_since = frozen_since if stalled else None
    write_summary(history, ctx, run_dir / "summary.json", time.perf_counter() - start, stalled_since=stalled_since)
    plot_run(history.frame(), run_dir / "convergence.png", title=spec.run_name)
    tracking.finish_trackers(trackers, run_dir)
    ckpt_path.unlink(missing_ok=True)  # only a run that stopped early needs one
    if stalled_since is not None:
        raise StalledError(f"run {spec.run_name} stalled: the simulated clock stayed at {ctx.clock.now:.6g} s from round "
                           f"{stalled_since} to {r}; stopped there (summary.json: stalled), rows kept", file=spec.source)
    return run_dir


def save_checkpoint(path: Path, spec: RunSpec, ctx: RunContext, flow: Flow, history: History, r: int) -> None:
    checkpoint.save(path, {
        "round": r,
        "swept": checkpoint.encode(spec.swept),
        "history": checkpoint.encode(history.rows),
        "ctx": checkpoint.encode(ctx.state()),
        "flow": checkpoint.capture(flow),
    })


def resume(run_dir: str | Path, options: RunOptions = RunOptions()) -> Path:
    """Continue the run in `run_dir` from its last checkpoint (see `run`)."""
    from .errors import ScenarioError
    from .scenario import load

    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").is_file():
        raise ScenarioError("no checkpoint.pt to resume from (is this a run folder?)", file=str(run_dir))
    (spec,) = load(run_dir / "scenario.toml")
    return run(spec, run_dir.parent, options, run_dir=run_dir, resume=True)


def _record(history: History, ctx: RunContext, flow: Flow, r: int, train: dict[str, float], start: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "round": r,
        "sim_time": ctx.clock.now,
        "wall_time": time.perf_counter() - start,
        **flow.evaluate(),
        "train_loss": train.get("train_loss", float("nan")),
        "bytes_sent": ctx.ledger.total,
    }
    row.update({k: v for k, v in train.items() if k not in row})
    if ctx.spec.scenario.system.on_divergence == "drop":
        row["dropped_updates"] = ctx.dropped_updates
    history.append(row)
    check_divergence(ctx, history, r)
    return row


def check_divergence(ctx: RunContext, history: History, r: int) -> None:
    """Stop (exit code 3) when the model went non-finite or its test loss exploded."""
    from .errors import DivergenceError

    loss = history.rows[-1]["test_loss"]
    initial = history.rows[0]["test_loss"]
    if ctx.first_bad is not None:
        client, k = ctx.first_bad
        raise DivergenceError(f"diverged: client or node {client} sent a non-finite update in round {k} "
                              f"(seen at the evaluation of round {r}; on_divergence = \"drop\" discards such updates)",
                              key="system.on_divergence")
    if not math.isfinite(loss) or loss > ctx.spec.scenario.system.divergence_factor * initial:
        raise DivergenceError(f"diverged: test loss {loss:.4g} at round {r} (initial {initial:.4g}); "
                              "lower the learning rate", key="algorithm.lr")


def write_summary(
    history: History, ctx: RunContext, path: Path, wall: float, *, stalled_since: int | None = None
) -> dict[str, Any]:
    df = history.frame()
    best = int(df["test_accuracy"].idxmax())
    summary = {
        "name": ctx.spec.run_name,
        "swept": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in ctx.spec.swept.items()},
        "rounds": int(df["round"].iloc[-1]),
        "final_accuracy": float(df["test_accuracy"].iloc[-1]),
        "best_accuracy": float(df["test_accuracy"].iloc[best]),
        "best_round": int(df["round"].iloc[best]),
        "final_loss": float(df["test_loss"].iloc[-1]),
        "sim_time": float(ctx.clock.now),
        "wall_time": wall,
        "stalled": stalled_since is not None,
        **ctx.ledger.summary(),
        **(ctx.failures.summary() if ctx.failures.active else {}),
        **heterogeneity(ctx.data, ctx.seed),
    }
    if ctx.spec.scenario.adversary is not None:
        summary["attackers"] = [int(c) for c in ctx.attackers]
    if stalled_since is not None:
        summary["stalled_since_round"] = stalled_since
    target = ctx.spec.scenario.target_accuracy
    if target is not None:
        reached = df[df["test_accuracy"] >= target]
        first = reached.iloc[0] if len(reached) else None
        summary["target_accuracy"] = target
        summary["round_to_target"] = None if first is None else int(first["round"])
        summary["sim_time_to_target"] = None if first is None else float(first["sim_time"])
        summary["bytes_to_target"] = None if first is None else int(first["bytes_sent"])
    if ctx.clock.now > 0:
        idle = 1.0 - np.minimum(ctx.net.busy / ctx.clock.now, 1.0)
        summary["mean_idle_fraction"] = float(idle.mean())
        if len(idle) <= 1000:  # a list per client stays readable; beyond, the mean says enough
            summary["client_idle_fraction"] = [round(float(x), 4) for x in idle]
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_resolved_scenario(spec: RunSpec, path: Path) -> None:
    """The scenario as run, every default filled in, with the versions that ran it as comments."""
    import torch

    header = (
        f"# resolved by fedsim {__version__} (torch {torch.__version__}, ray {metadata.version('ray')})\n"
        f"# from {spec.source}" + (f" with {spec.swept}" if spec.swept else "") + f"; seed {spec.scenario.seed}\n"
    )
    path.write_text(header + tomli_w.dumps(spec.as_dict()))


def run_all(specs: list[RunSpec], out: str | Path = "runs", options: RunOptions = RunOptions()) -> list[Path]:
    """Run every sweep point in turn; `OUT/runs.csv` lists each run's folder and swept values.

    The index is rewritten after each run, so an interrupted sweep still lists the runs it finished.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    dirs = []
    for i, spec in enumerate(specs):
        run_dir = run(spec, out, replace(options, position=(i + 1, len(specs))))
        dirs.append(run_dir)
        rows.append({"run_dir": run_dir.name, **{k: label(v) for k, v in spec.swept.items()}})
        if any(s.swept for s in specs):
            import pandas as pd

            pd.DataFrame(rows).to_csv(out / "runs.csv", index=False)
    return dirs
