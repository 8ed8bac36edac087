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
import tomllib
import zlib
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Protocol

import networkx as nx
import numpy as np
import tomli_w
from torch import nn
from . import __version__, checkpoint, paths, runfolder, tracking
from .client_state import ClientStates, StatefulExecutor
from .aggregation import Aggregator, ServerOptimizer, build_aggregator, combine
from .clock import Clock
from .data import FederatedData, build_federated_data
from .data.heterogeneity import heterogeneity
from .errors import FedsimError, PluginError, ScenarioError, StalledError
from .executor import Executor, InlineExecutor, RayExecutor, WorkerSpec, local_ray_processes
from .failures import FailureModel
from .history import History
from .ledger import Ledger
from .models import build_model, check_outputs
from .network import QUEUE_WARNING, Network
from .params import Params, UpdateBatch
from .plotting import plot_run
from .progress import Progress
from .runfolder import RunFolderError, RunLock, RunsIndex
from .scenario import RunSpec, label
from .seeding import generator
from .stacked_linear import LinearStack
from .system import SystemModel
from .training import ClientResult, Trainer, correct_predictions, evaluate, get_params, torch_threads


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
        _located(lambda: check_outputs(self.model, s.model.name, self.data.x_test[:1], self.data.num_classes), spec, "model")
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
        self.privacy_config: Any = None  # [privacy], validated
        self.server_privacy: Any = None  # fedsim.privacy_engine.ServerPrivacy, once a server flow asks
        self.local_privacy: Any = None  # fedsim.privacy_engine.LocalPrivacy, once a trainer takes DP-SGD
        self.compression_config: Any = None  # [compression], validated
        self.upload_compression: Any = None  # fedsim.upload_compression.UploadCompression, once asked for
        self.compression_used = False  # whether the flow compressed what it sends (else the run is refused)
        if s.privacy is not None:
            from .scenario import privacy_config

            self.privacy_config = privacy_config(s, spec.source)
        if s.compression is not None:
            from .scenario import compression_config

            self.compression_config = compression_config(s, spec.source)
        self.graph: nx.Graph | None = None
        if s.topology is not None:
            from .topologies import build

            topo = s.topology
            # A seed in [topology] wins; otherwise random graphs derive theirs from the run's seed.
            options = {"seed": int(self.generator("topology").integers(2**31)), **topo.options()}
            self.graph = _located(lambda: build(topo.name, self.data.num_clients, **options), spec, "topology")
        self._executors: list[Executor] = []
        self.training_paths: list[dict[str, Any]] = []  # how each executor's clients trained (summary.json)
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
            # one stream per merge (its round and cohort), so that neighbourhoods sharing their
            # first member do not draw the same noise
            cohort = zlib.crc32(batch.client_ids.numpy().astype(np.int64).tobytes())
            rng = self.generator("adversary.round", round, cohort)
            return replace(batch, params=corrupt(batch.params, bad, ~bad, reference, cfg, rng))

        self.batch_hooks.append(attack)

    def dp_fedavg(self, clients_per_round: int) -> Any:
        """DP-FedAvg for a server flow that samples `clients_per_round` clients a round, when the
        scenario's `[privacy]` asks for it (mode = "server"), else None. A flow that never asks
        cannot honour the table, and the run is refused instead of running without privacy."""
        cfg = self.privacy_config
        if cfg is None or cfg.mode != "server":
            return None
        if self.server_privacy is None:
            from .privacy_engine import ServerPrivacy

            self.server_privacy = ServerPrivacy(cfg, self.data.num_clients, clients_per_round)
        return self.server_privacy

    def compressor(self) -> Any:
        """The scenario's `[compression]` compressor (`fedsim.compression`), or the identity; a
        flow that asks sends compressed messages and counts their real size."""
        from .compression import CompressionConfig, build_compressor

        self.compression_used = True
        return build_compressor(self.compression_config or CompressionConfig())

    def uploads(self) -> Any:
        """Upload compression with error feedback for server rounds and event-driven servers
        (`fedsim.upload_compression`), or None without a `[compression]` table."""
        if self.compression_config is None:
            return None
        self.compression_used = True
        if self.upload_compression is None:
            from .upload_compression import UploadCompression

            self.upload_compression = UploadCompression(self.compression_config)
        return self.upload_compression

    def epsilon(self) -> float | None:
        """The privacy spent so far at the scenario's delta (the worst client's, with local
        DP-SGD); None without `[privacy]`."""
        source = self.server_privacy or self.local_privacy
        return None if source is None else source.epsilon()

    def _private_trainer(self, trainer: Trainer) -> Trainer:
        """The trainer with local DP-SGD (per-example clipping and noise) when `[privacy]` has
        mode = "local"; plain local SGD only, since a term added to the loss or a trainer of its
        own would see the data outside the clipped gradient."""
        from dataclasses import replace as with_changes

        from .training import SGDTrainer, adds_to_loss

        cfg = self.privacy_config
        if cfg is None or cfg.mode != "local":
            return trainer
        name = self.spec.algorithm_config.name
        if type(trainer) is not SGDTrainer or adds_to_loss(trainer.objective) or trainer.sam_rho > 0:
            raise ScenarioError(f"local DP-SGD clips per-example gradients of plain local SGD; algorithm '{name}' "
                                f"trains with {type(trainer).__name__}"
                                + (" and a term of its own in the loss" if type(trainer) is SGDTrainer else ""),
                                key="privacy.mode", file=self.spec.source)
        if self.local_privacy is None:
            from .privacy_engine import LocalPrivacy

            self.local_privacy = LocalPrivacy(cfg, self.data.num_examples(), trainer.batch_size)
        return with_changes(trainer, dp_clip=cfg.clip_norm, dp_noise=cfg.noise_multiplier)

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

    def use_server_optimizer(self, default: ServerOptimizer) -> ServerOptimizer:
        """The server optimiser `server_step` applies: the scenario's `[server_optimizer]` when it
        has one, else the method's own `default` (FedAdam's Adam, SCAFFOLD's global step size).
        Call it while building the flow, so that a checkpoint restores its state."""
        if self.server_optimizer is None:
            self.server_optimizer = default
        return self.server_optimizer

    def client_accuracy(self, models: Params | Callable[[int], Params]) -> dict[str, float]:
        """Mean, 10th percentile and worst accuracy over every client's own held-out examples
        (`[data] client_test_fraction`), of one model for all (a global method's) or of the model
        `models(client)` each client would use (a personalised method's); {} without those data."""
        from .personal import summarize_client_accuracy

        data = self.data
        if not getattr(data, "has_client_tests", False):
            return {}
        with torch_threads(self.spec.scenario.system.threads_per_worker):
            if isinstance(models, dict):  # one pass over every client's examples, then per client
                correct = correct_predictions(self.model, models, data.client_x_test, data.client_y_test)
                counts = np.add.reduceat(correct, data.client_test_offsets[:-1])
                accuracy = counts / np.diff(data.client_test_offsets)
            else:
                accuracy = np.array([evaluate(self.model, models(c), *data.client_test(c))[0] for c in range(data.num_clients)])
        return summarize_client_accuracy(accuracy)

    def generator(self, purpose: str, *ids: int) -> np.random.Generator:
        return generator(self.seed, purpose, *ids)

    def executor(self, trainer: Trainer) -> Executor:
        """An executor whose workers hold this run's data and model and train with `trainer`."""
        s = self.spec.scenario
        from .plugins import module_dirs as plugin_dirs

        trainer = self._private_trainer(trainer)

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
        self._executors.append(executor)  # it says, once, how its clients train (vectorised or not, why)
        stateful = StatefulExecutor(executor, self.client_states)
        if self.local_privacy is not None and getattr(trainer, "dp_clip", None) is not None:
            from .privacy_engine import CountingExecutor

            return CountingExecutor(stateful, self.local_privacy)  # type: ignore[return-value]
        return stateful

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
                stacked=LinearStack.of(self.model, tuple(self.data.feature_shape)) is not None,
            )
            if (o.executor or self.spec.scenario.system.executor) == "auto":
                print(f"fedsim: {self._choice.line()}", file=sys.stderr)
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
                "server_optimizer": checkpoint.capture(self.server_optimizer) if self.server_optimizer else None,
                **{key: part.state_dict() for key, part in self._extra_state().items()}}

    def _extra_state(self) -> dict[str, Any]:
        """Engine parts with state of their own: privacy accounting, error memories."""
        parts = {"server_privacy": self.server_privacy, "local_privacy": self.local_privacy,
                 "upload_compression": self.upload_compression}
        return {key: part for key, part in parts.items() if part is not None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.clock.now = state["now"]
        self.net.load_state(state["net"])
        self.dropped_updates = state["dropped_updates"]
        self.client_states.states = state["client_states"]
        if self.server_optimizer is not None:
            checkpoint.restore(self.server_optimizer, state["server_optimizer"])
        for key, part in self._extra_state().items():
            part.load_state_dict(state[key])

    def close(self) -> None:
        self.training_paths += [e.path.as_dict() for e in self._executors if getattr(e, "path", None) is not None]
        for executor in self._executors:
            executor.close()
        self._executors.clear()


def _built_flow(spec: RunSpec, ctx: RunContext) -> Flow:
    """The algorithm's flow; an exception its build function raises (a plugin's bug) becomes one
    line naming the algorithm (exit code 1), not a traceback."""
    try:
        return spec.algorithm.build(spec.algorithm_config, ctx)
    except (FedsimError, AssertionError):  # (fedsim.testing.check_flow's verdicts are assertions)
        raise
    except Exception as exc:
        raise PluginError(f"algorithm '{spec.algorithm_config.name}' raised {exc!r} while building its flow",
                          key="algorithm.name") from exc


def _located(build: Any, spec: RunSpec, key: str) -> Any:
    try:
        return build()
    except FedsimError as exc:
        raise exc.located(file=spec.source, key=key) from None


def run(
    spec: RunSpec, out: str | Path = "runs", options: RunOptions = RunOptions(), *, run_dir: Path | None = None,
    resume: bool = False, report: Callable[[str], None] | None = None,
) -> Path:
    """Simulate one run; returns its folder (metrics.csv, summary.json, convergence.png, scenario.toml).

    With `resume`, the run continues from `run_dir/checkpoint.pt`: rows written after that
    checkpoint are dropped and recomputed, so the curves equal those of an uninterrupted run.

    The folder (`out/<run name>`, checked to lie under `out`) is locked while the run writes to it.
    Nothing but the lock is written until the data, model and executors are built, and a run
    refused before it starts (exit code 2) leaves the folder as it found it: one it created is
    removed again. Files of an earlier run in the folder are replaced only here, so callers decide
    whether that may happen (`run_all` skips finished runs unless asked to re-run them).
    """
    if run_dir is None:
        run_dir = paths.inside(paths.make_out(out), spec.run_name)
    run_dir = Path(run_dir)
    lock = RunLock(run_dir).acquire()
    started = False
    try:
        result = _run_locked(spec, run_dir, options, resume, lock, report)
        started = True
        return result
    except BaseException as exc:
        started = started or getattr(exc, "_fedsim_started", False)
        if not started:
            lock.abandon()
        raise
    finally:
        lock.release()


def _run_locked(spec: RunSpec, run_dir: Path, options: RunOptions, resume: bool, lock: RunLock,
                report: Callable[[str], None] | None) -> Path:
    s = spec.scenario
    ckpt_path = run_dir / "checkpoint.pt"
    saved = None
    if resume:
        saved, scenario_id = checkpoint.read(ckpt_path)
        if scenario_id not in (runfolder.scenario_hash(runfolder.folder_scenario(run_dir)), "") or \
                scenario_id != scenario_hash(spec):
            raise checkpoint.CheckpointError("belongs to another scenario than the scenario.toml beside it (edited "
                                             "after the run started?); restore that file, or start over with --rerun",
                                             file=str(ckpt_path))
        try:
            spec = replace(spec, swept=checkpoint.decode(saved["swept"]))
            rows = _saved_rows(saved["history"])
            ctx_state = checkpoint.decode(saved["ctx"])
            first = int(saved["round"]) + 1
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise TypeError("history is not a list of rows")
        except Exception as exc:
            raise _bad_checkpoint(ckpt_path, exc) from None
    else:
        rows = []
    start = time.perf_counter() - (rows[-1].get("wall_time", 0.0) if rows else 0.0)
    ctx = RunContext(spec, options)
    trackers: list[Any] = []
    completed = False
    # Server-side tensor work (aggregation, mixing, evaluation) runs with the fixed thread count
    # too: idle OpenMP threads spin for a while after each op, which on a small machine steals the
    # cores the actors are training on.
    started = False
    stalled, frozen_since = False, None
    with torch_threads(s.system.threads_per_worker):
        try:
            flow: Flow = _built_flow(spec, ctx)
            if s.checkpoint_every:  # a flow that no checkpoint could save is refused now, not mid-run
                checkpoint.require_state(flow, spec.algorithm_config.name)
            name = spec.algorithm_config.name
            if ctx.privacy_config is not None and ctx.privacy_config.mode == "server" and ctx.server_privacy is None:
                raise ScenarioError(f"algorithm '{name}' has no server round that DP-FedAvg can clip and noise "
                                    "(it supports fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, ...): "
                                    "remove [privacy] or use mode = \"local\"", key="privacy.mode")
            if ctx.compression_config is not None and not ctx.compression_used:
                raise ScenarioError(f"algorithm '{name}' sends messages that [compression] cannot compress "
                                    "(it supports fedavg-style server rounds, fedasync, fedbuff, fedcompass and "
                                    "choco): remove the table",
                                    key="compression")
            if s.aggregator is not None and not ctx.rule_used:
                raise ScenarioError(f"algorithm '{spec.algorithm_config.name}' has no merge step that a rule can "
                                    "replace: remove the [aggregator] table", key="aggregator")
            lock.record_ray(local_ray_processes())
            if saved is not None:
                try:
                    checkpoint.restore(flow, saved["flow"])
                    ctx.load_state(ctx_state)
                except Exception as exc:
                    raise _bad_checkpoint(ckpt_path, exc) from None
            resolved = resolved_scenario_text(spec)
            scenario_id = scenario_hash(spec)
            with paths.writing(run_dir, started=False):
                if saved is None:
                    for name in ("checkpoint.pt", "summary.json", "convergence.png"):  # an earlier run's
                        (run_dir / name).unlink(missing_ok=True)
                    paths.write_atomic(run_dir / "scenario.toml", resolved)
                history = History(run_dir / "metrics.csv", rows)
                trackers = tracking.open_trackers(spec, run_dir, rows)  # none without a [tracking] table
                history.observers += trackers
                if saved is None:
                    _record(history, ctx, flow, 0, {}, start)
            started = True
            with paths.writing(run_dir / "metrics.csv", started=True, run_dir=run_dir):
                if saved is None:
                    first = 1
                bar = Progress(spec.run_name, s.rounds, first - 1, enabled=options.progress, position=options.position)
                frozen_since = None  # the first round of the current run of rounds the clock did not move in
                pending = _Pending(history, bar)  # an evaluation overlapping the next round's training
                queue_said = ctx.net.longest_queue[0] >= QUEUE_WARNING  # (a resumed run said it before)
                with bar, pending:
                    for r in range(first, s.rounds + 1):
                        before = ctx.clock.now
                        try:
                            train_metrics = flow.step(r)
                        finally:
                            pending.finish()  # the previous round's row goes first, as without overlap
                        if not queue_said and ctx.net.longest_queue[0] >= QUEUE_WARNING:
                            queue_said = True
                            (report or _stderr)(_queue_line(ctx.net.longest_queue, r))
                        frozen_since = (frozen_since or r) if ctx.clock.now == before else None
                        # a clock that never moved (a flow that does not simulate time) is not a stall
                        stalled = frozen_since is not None and r - frozen_since + 1 >= STALL_ROUNDS and ctx.clock.now > 0
                        out_of_time = s.sim_time_budget is not None and ctx.clock.now >= s.sim_time_budget
                        if r % s.eval_every == 0 or r == s.rounds or out_of_time or stalled:
                            evaluations = len(history.rows)  # once this row is in
                            checkpoint_now = bool(s.checkpoint_every) and evaluations % s.checkpoint_every == 0
                            snapshot = getattr(flow, "evaluation", None)
                            job = snapshot() if snapshot is not None else None
                            if job is not None and not checkpoint_now and r < s.rounds and not (out_of_time or stalled):
                                pending.start(job, _row_start(ctx, r, train_metrics, start))
                            else:
                                row = _record(history, ctx, flow, r, train_metrics, start)
                                bar.evaluated(row)
                                if checkpoint_now:
                                    with paths.writing(ckpt_path, started=True, run_dir=run_dir):
                                        save_checkpoint(ckpt_path, spec, ctx, flow, history, r, scenario_id)
                        bar.advance()
                        if out_of_time or stalled:
                            break
            completed = True
        except BaseException as exc:
            if started:
                try:
                    exc._fedsim_started = True  # type: ignore[attr-defined]
                except AttributeError:  # pragma: no cover
                    pass
            if isinstance(exc, FedsimError):
                raise exc.located(file=spec.source) from None
            raise
        finally:
            ctx.close()
            if not completed:
                tracking.finish_trackers(trackers, run_dir, failed=True)
    # The summary is written last but one: a folder with summary.json and no checkpoint.pt is a
    # finished run (runfolder.inspect), so the summary must not appear before the plot is done,
    # and the checkpoint goes only once the summary is safely on disk.
    stalled_since = frozen_since if stalled else None
    with paths.writing(run_dir, started=True, run_dir=run_dir):
        plot_run(history.frame(), run_dir / "convergence.png", title=spec.run_name)
        write_summary(history, ctx, run_dir / "summary.json", time.perf_counter() - start, stalled_since=stalled_since)
        tracking.finish_trackers(trackers, run_dir)  # (they send summary.json too)
        ckpt_path.unlink(missing_ok=True)  # only a run that stopped early needs one
    if stalled_since is not None:
        error = StalledError(f"run {spec.run_name} stalled: the simulated clock stayed at {ctx.clock.now:.6g} s from "
                             f"round {stalled_since} to {r}; stopped there (summary.json: stalled), rows kept",
                             file=spec.source)
        error._fedsim_started = True  # type: ignore[attr-defined]  # (the folder holds a run: keep it)
        raise error
    return run_dir


def _bad_checkpoint(path: Path, exc: Exception) -> FedsimError:
    """A checkpoint whose checksum matched but whose content is not a run's state: crafted, or
    written by an incompatible fedsim."""
    return checkpoint.CheckpointError(f"does not hold this run's state ({exc.__class__.__name__}); "
                                      "start over with --rerun", file=str(path))


def save_checkpoint(path: Path, spec: RunSpec, ctx: RunContext, flow: Flow, history: History, r: int,
                    scenario_id: str = "") -> None:
    checkpoint.save(path, {
        "round": r,
        "swept": checkpoint.encode(spec.swept),
        "history": history.encoded(),
        "ctx": checkpoint.encode(ctx.state()),
        "flow": checkpoint.capture(flow),
    }, scenario=scenario_id)


def _saved_rows(saved: Any) -> list[dict[str, Any]]:
    """A checkpoint's metrics rows: one JSON text, or (older checkpoints) encoded containers."""
    return History.decoded(saved) if isinstance(saved, str) else checkpoint.decode(saved)


def resume(run_dir: str | Path, options: RunOptions = RunOptions(), *,
           report: Callable[[str], None] | None = None, spec: RunSpec | None = None) -> Path:
    """Continue the run in `run_dir` from its last checkpoint (see `run`).

    A run killed before its first checkpoint starts over (its rows are discarded, and `report`
    says so); a finished run is left as it is.
    """
    from .scenario import load

    say = report or _stderr
    run_dir = Path(run_dir)
    state = runfolder.inspect(run_dir)
    if state.locked_by is not None:
        raise RunFolderError(f"another fedsim run (pid {state.locked_by}) is writing to this folder", file=str(run_dir))
    if state.kind in ("absent", "empty", "foreign"):
        raise ScenarioError("no checkpoint.pt to resume from (is this a run folder?)", file=str(run_dir))
    if state.kind == "finished":
        say(f"{run_dir}: finished already; nothing to resume (--rerun runs it again)")
        return run_dir
    spec = spec or _point_spec(run_dir) or load(run_dir / "scenario.toml")[0]
    if state.has_checkpoint:
        return run(spec, run_dir.parent, options, run_dir=run_dir, resume=True, report=report)
    rows = _count_rows(run_dir / "metrics.csv")
    say(f"{run_dir}: no checkpoint (killed before its first one): starting over; "
        f"its {rows} row{'s are' if rows != 1 else ' is'} discarded")
    return run(spec, run_dir.parent, options, run_dir=run_dir, report=report)


_resume_folder = resume  # run_all's `resume` argument shadows the function's name


def _point_spec(run_dir: Path) -> RunSpec | None:
    """The sweep point a run folder belongs to, from the sweep file its runs.csv row names (so a
    restarted point keeps its swept values), or None for a single run."""
    from .scenario import load

    try:
        rows = RunsIndex(run_dir.parent).read()
    except FedsimError:
        return None
    row = next((r for r in rows if r.get("run_dir") == run_dir.name), None)
    sweep = row.get("sweep") if row else None
    if not sweep or paths.name_problem(sweep) is not None or not (run_dir.parent / sweep).is_file():
        return None
    for spec in load(run_dir.parent / sweep, max_runs=None):
        if spec.run_name == run_dir.name:
            return spec
    return None


def _count_rows(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return max(0, sum(1 for _ in f) - 1)
    except OSError:
        return 0


def _stderr(line: str) -> None:
    print(f"fedsim: {line}", file=sys.stderr)


def _queue_line(queue: np.ndarray, r: int) -> str:
    copies, node, at, waited = queue
    return (f"uplinks saturated by round {r}: a message of node {int(node)} found {int(copies)} copies queued ahead "
            f"of it at {at:.4g} s simulated and waited {waited:.4g} s; the method sends faster than the links "
            "carry, so its messages arrive ever later and each waiting copy holds a model in memory (more "
            "bandwidth, or sending less often, avoids it; summary.json: uplink_queue)")


def uplink_queue(queue: np.ndarray) -> dict[str, Any]:
    """summary.json's account of the longest uplink queue a message met (see fedsim.network)."""
    copies, node, at, waited = queue
    if copies == 0:
        return {"copies": 0, "node": None, "sim_time": None, "waited_s": 0.0}
    return {"copies": round(float(copies), 1), "node": int(node), "sim_time": float(at), "waited_s": float(waited)}


@dataclass
class _RowStart:
    """What a metrics row records of the moment its round ended, taken before the next round
    runs (an evaluation may finish during it)."""

    ctx: RunContext
    round: int
    train: dict[str, float]
    fields: dict[str, Any]
    first_bad: tuple[int, int] | None


def _row_start(ctx: RunContext, r: int, train: dict[str, float], start: float) -> _RowStart:
    fields = {"sim_time": ctx.clock.now, "wall_time": time.perf_counter() - start, "bytes_sent": ctx.ledger.total,
              "dropped_updates": ctx.dropped_updates, "epsilon": ctx.epsilon()}
    return _RowStart(ctx, r, train, fields, ctx.first_bad)


def _record(history: History, ctx: RunContext, flow: Flow, r: int, train: dict[str, float], start: float) -> dict[str, Any]:
    begun = _row_start(ctx, r, train, start)
    return _append(history, begun, flow.evaluate())


def _append(history: History, begun: _RowStart, metrics: dict[str, float]) -> dict[str, Any]:
    f, train = begun.fields, begun.train
    row: dict[str, Any] = {
        "round": begun.round,
        "sim_time": f["sim_time"],
        "wall_time": f["wall_time"],
        **metrics,
        "train_loss": train.get("train_loss", float("nan")),
        "bytes_sent": f["bytes_sent"],
    }
    if f["epsilon"] is not None:  # the privacy spent up to this row, at [privacy] delta
        row["epsilon"] = f["epsilon"]
    row.update({k: v for k, v in train.items() if k not in row})
    if begun.ctx.spec.scenario.system.on_divergence == "drop":
        row["dropped_updates"] = f["dropped_updates"]
    history.append(row)
    check_divergence(begun.ctx, history, begun.round, begun.first_bad)
    return row


class _Pending:
    """At most one evaluation running on a second thread while the next round trains.

    A flow that offers `evaluation()` (a function computing its metrics from a snapshot of what
    `evaluate` reads) has its evaluation overlap the next round: on two cores a small cohort's
    round then costs its training, not its training plus a test-set pass. The row is appended,
    and divergence checked, with what was known when its round ended, before the next row, so
    metrics.csv, the exit code and the error are those of a run without overlap. Checkpoints and
    the last round wait for their evaluation."""

    def __init__(self, history: History, bar: Any):
        from concurrent.futures import ThreadPoolExecutor

        self.history, self.bar = history, bar
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsim-evaluation")
        self.job: tuple[Any, _RowStart] | None = None

    def start(self, evaluation: Any, begun: _RowStart) -> None:
        self.job = (self.pool.submit(evaluation), begun)

    def finish(self) -> None:
        if self.job is None:
            return
        future, begun = self.job
        self.job = None
        self.bar.evaluated(_append(self.history, begun, future.result()))

    def __enter__(self) -> "_Pending":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self.finish()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


_NOW = object()


def check_divergence(ctx: RunContext, history: History, r: int, first_bad: Any = _NOW) -> None:
    """Stop (exit code 3) when the model went non-finite or its test loss exploded. `first_bad`:
    the first non-finite update known when round r ended (default: known now)."""
    from .errors import DivergenceError

    loss = history.rows[-1]["test_loss"]
    initial = history.rows[0]["test_loss"]
    first_bad = ctx.first_bad if first_bad is _NOW else first_bad
    if first_bad is not None:
        client, k = first_bad
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
        "training": ctx.training_paths,  # vectorised or one after another, and why, per executor
        "uplink_queue": uplink_queue(ctx.net.longest_queue),
    }
    if ctx.spec.scenario.adversary is not None:
        summary["attackers"] = [int(c) for c in ctx.attackers]
    if ctx.privacy_config is not None:
        from .privacy_engine import finite_or_none

        eps = ctx.epsilon()
        summary["epsilon"] = None if eps is None else finite_or_none(eps)
        summary["privacy"] = {"mode": ctx.privacy_config.mode, "delta": ctx.privacy_config.delta,
                              "epsilon": None if eps is None else finite_or_none(eps)}
        if ctx.server_privacy is not None:
            summary["privacy"]["final_clip_norm"] = ctx.server_privacy.clip_norm
        if ctx.local_privacy is not None and ctx.data.num_clients <= 1000:
            summary["privacy"]["client_epsilon"] = [finite_or_none(float(e)) for e in ctx.local_privacy.client_epsilons()]
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
    paths.write_atomic(path, json.dumps(summary, indent=2) + "\n")
    return summary


def resolved_scenario_text(spec: RunSpec) -> str:
    """The scenario as run, every default filled in, with the versions that ran it as (two lines
    of) comments."""
    import torch

    header = (
        f"# resolved by fedsim {__version__} (torch {torch.__version__}, ray {metadata.version('ray')})\n"
        + _comment(f"# from {spec.source}" + (f" with {spec.swept}" if spec.swept else "") + f"; seed {spec.scenario.seed}")
        + "\n"
    )
    return header + tomli_w.dumps(spec.as_dict())


def _comment(text: str) -> str:
    """One comment line whatever the text holds (a file name may contain a newline)."""
    return "".join(ch if ch == "\t" or (ord(ch) >= 32 and ord(ch) != 127) else repr(ch)[1:-1] for ch in text)


def _resolved(spec: RunSpec) -> dict[str, Any]:
    """The resolved scenario as it reads back from scenario.toml (TOML's types, not Python's)."""
    return tomllib.loads(tomli_w.dumps(spec.as_dict()))


def scenario_hash(spec: RunSpec) -> str:
    """What identifies a run's scenario in its checkpoint and against a finished run's folder."""
    return runfolder.scenario_hash(_resolved(spec))


def write_resolved_scenario(spec: RunSpec, path: Path) -> None:
    path.write_text(resolved_scenario_text(spec))


SWEEP_SUFFIX = ".sweep.toml"


class SweepError(FedsimError):
    """Some points of a sweep failed; the others ran. Exit code: the points' own code when they
    all share one, else 1. `dirs` are the folders of the points that finished."""

    def __init__(self, message: str, *, exit_code: int, dirs: list[Path], file: str | None = None):
        super().__init__(message, file=file)
        self.exit_code = exit_code
        self.dirs = dirs


def run_all(
    specs: list[RunSpec], out: str | Path = "runs", options: RunOptions = RunOptions(), *, rerun: bool = False,
    resume: bool = False, sweep: dict[str, Any] | None = None, report: Callable[[str], None] | None = None,
) -> list[Path]:
    """Run every sweep point in turn; returns their folders. Re-running never destroys results:

    - a folder holding a finished run of the same scenario is skipped (`rerun` runs it again);
    - one holding a finished run of another scenario, a run that did not finish or files fedsim
      did not write is refused (exit code 2) before anything runs, unless `rerun` (a run that did
      not finish is continued from its checkpoint with `resume`);
    - a sweep lists its points in `OUT/runs.csv` (merged with the rows already there) with their
      status and error: a point that fails is recorded and the others still run, then a
      `SweepError` says how many failed. `sweep` is the raw scenario (after --set), written to
      `OUT/<name>.sweep.toml` so that `fedsim run --resume OUT` can finish the whole sweep.
    """
    say = report or _stderr
    out = paths.make_out(out)
    plans = []
    for spec in specs:
        run_dir = paths.inside(out, spec.run_name)
        plans.append((spec, run_dir, _decide(spec, run_dir, rerun=rerun, resume=resume)))
    is_sweep = len(specs) > 1 or any(spec.swept for spec in specs)
    index = RunsIndex(out)
    sweep_file = ""
    if is_sweep:
        if sweep is not None:
            sweep_file = specs[0].scenario.name + SWEEP_SUFFIX
            paths.check_name(sweep_file, "sweep file name")
            with paths.writing(out / sweep_file, started=False):
                paths.write_atomic(out / sweep_file, _sweep_text(sweep, specs[0].source))
        index.update([_index_row(spec, d, "pending" if action != "skip" else "done", sweep_file)
                      for spec, d, action in plans], started=False)
    dirs: list[Path] = []
    failures: list[tuple[Path, FedsimError]] = []
    for i, (spec, run_dir, action) in enumerate(plans):
        if action == "skip":
            say(f"{run_dir}: finished already; skipped (--rerun runs it again)")
            dirs.append(run_dir)
            continue
        point = replace(options, position=(i + 1, len(plans)))
        try:
            if action == "resume":
                done = _resume_folder(run_dir, point, report=report, spec=spec)
            else:
                done = run(spec, out, point, run_dir=run_dir, report=report)
        except KeyboardInterrupt:
            if is_sweep:
                index.update([_index_row(spec, run_dir, "interrupted", sweep_file)])
            raise
        except FedsimError as exc:
            if not is_sweep:
                raise
            exc.located(file=spec.source)
            index.update([_index_row(spec, run_dir, "failed", sweep_file, error=str(exc))])
            if isinstance(exc, (paths.OutputError, RunFolderError)):
                raise  # the disk or the folder, not the point: the next points would fail alike
            say(f"error: {run_dir}: {exc}")
            failures.append((run_dir, exc))
            continue
        dirs.append(done)
        if is_sweep:
            index.update([_index_row(spec, run_dir, "done", sweep_file)])
    if failures:
        codes = {exc.exit_code for _, exc in failures}
        raise SweepError(f"{len(failures)} of {len(plans)} runs failed (first: {failures[0][0].name}); "
                         f"their errors are in {index.path}", exit_code=codes.pop() if len(codes) == 1 else 1,
                         dirs=dirs)
    return dirs


def resume_sweep(out: str | Path, options: RunOptions = RunOptions(), *,
                 report: Callable[[str], None] | None = None) -> list[Path]:
    """Finish the sweeps listed in `OUT/runs.csv`: finished points are kept, points that did not
    finish continue from their checkpoints (or start over without one), missing points run."""
    from .scenario import load

    out = Path(out)
    rows = RunsIndex(out).read()
    files = list(dict.fromkeys(r.get("sweep", "") for r in rows if r.get("sweep")))
    if not files:
        raise ScenarioError("no sweep to resume here (no runs.csv naming a .sweep.toml file); "
                            "give a run folder, OUT/RUN_NAME", file=str(out))
    dirs: list[Path] = []
    for name in files:
        if paths.name_problem(name) is not None or not name.endswith(SWEEP_SUFFIX):
            raise runfolder.DamagedFileError(f"names an unexpected sweep file {name!r}", file=str(out / "runs.csv"))
        specs = load(out / name, max_runs=None)
        dirs += run_all(specs, out, options, resume=True, report=report)
    return dirs


def _decide(spec: RunSpec, run_dir: Path, *, rerun: bool, resume: bool) -> str:
    """What to do with a point's folder: run, skip, resume; or a one-line refusal."""
    state = runfolder.inspect(run_dir)
    if state.locked_by is not None:
        raise RunFolderError(f"another fedsim run (pid {state.locked_by}) is writing to this folder; "
                             "wait for it to end or choose another --out or name", file=str(run_dir))
    if state.kind in ("absent", "empty"):
        return "run"
    if state.kind == "foreign" and not rerun:
        shown = ", ".join(state.foreign[:3]) + (", ..." if len(state.foreign) > 3 else "")
        raise RunFolderError(f"holds files fedsim did not write ({shown}); choose another --out or name "
                             "(--rerun writes beside them)", file=str(run_dir))
    if rerun:
        return "run"
    if state.kind == "finished":
        theirs = runfolder.folder_scenario(run_dir)
        if runfolder.scenario_hash(theirs) == scenario_hash(spec):
            return "skip"
        keys = ", ".join(runfolder.changed_keys(theirs, _resolved(spec)))
        raise RunFolderError(f"holds a finished run of another scenario (differs in {keys}); "
                             "choose another --out or name, or replace it with --rerun", file=str(run_dir))
    if resume:
        return "resume"
    raise RunFolderError(f"holds a run that did not finish; continue it with `fedsim run --resume {run_dir}`"
                         " or start it over with --rerun", file=str(run_dir))


def _index_row(spec: RunSpec, run_dir: Path, status: str, sweep_file: str, error: str = "") -> dict[str, Any]:
    row = {"run_dir": run_dir.name, "status": status, "error": error, **{k: label(v) for k, v in spec.swept.items()}}
    if sweep_file:  # (resuming, the sweep file named in the index stays)
        row["sweep"] = sweep_file
    return row


def _sweep_text(raw: dict[str, Any], source: str) -> str:
    return (f"# the sweep as run (with its --set overrides) from {source}; "
            f"`fedsim run --resume OUT` reads it to finish the sweep\n" + tomli_w.dumps(raw))
