"""Executors run client jobs: inline in this process, or on a pool of long-lived Ray actors.

Both go through the same `Worker`, so they cannot drift apart. A worker is built once per run and
keeps the model, the trainer and a view of every client's data; each job carries only ids. The data
set enters Ray's object store once (actors read zero-copy views) and the parameters that a round
shares are put there once per round, never once per client.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from . import training_path, vectorized
from .data import FederatedData
from .models import build_model
from .errors import ClientError, FedsimError, PluginError
from .params import Params, from_numpy, is_finite, to_numpy
from .seeding import generator
from .stacked_linear import LinearStack
from .training import ClientResult, TrainJob, Trainer, TrainOutput, adds_to_loss, torch_threads
from .training_path import TrainingPath, calibrate


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides the data; small, pickled once per actor."""

    model_name: str
    model_options: dict[str, Any]
    input_shape: tuple[int, ...]
    num_classes: int
    seed: int
    trainer: Trainer
    threads: int = 1
    on_client_error: str = "stop"
    vectorize: bool | None = None
    chunk_size: int = 64
    device: str = "auto"
    plugins: tuple[str, ...] = ()  # [plugins] modules, imported first: they may register the model
    plugin_dirs: tuple[str, ...] = ()  # where the driver found them
    label_flip: tuple[int, ...] = ()  # attackers that train on labels C - 1 - y
    chunk_threads: int = 1  # vectorised chunks trained at once (the inline executor: one per core)


class Worker:
    """Hosts virtual clients: trains any of them on request, in the order given."""

    def __init__(self, data: FederatedData, spec: WorkerSpec):
        self.data = data
        self.spec = spec
        if spec.plugins:
            from .plugins import import_modules

            import_modules(spec.plugins, spec.plugin_dirs)
        self.model = build_model(spec.model_name, spec.model_options, spec.input_shape, spec.num_classes, spec.seed)
        self.plan = vectorized.plan(self.model, spec.trainer)
        # The stacked MLP backward gives neither per-example gradients (local DP-SGD) nor a term on
        # the representation (MOON), which needs the module's own forward pass: those train with
        # vmap, and then never on two threads at once (functional_call swaps the shared module's
        # tensors while it runs).
        objective = getattr(spec.trainer, "objective", None)
        private = getattr(spec.trainer, "dp_clip", None) is not None
        represents = adds_to_loss(objective) and getattr(objective, "batch_loss", None) is not None
        plain = self.plan is not None and not private and not represents
        self.stack = LinearStack.of(self.model, tuple(spec.input_shape)) if plain else None
        supported = self.plan is not None
        cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
        self.path: TrainingPath | None = None  # decided on the first jobs unless forced or unsupported
        self._pool: ThreadPoolExecutor | None = None  # chunk threads, started on first use
        # why vectorised training cannot work for this trainer (a chunk raised, and the same clients
        # then trained one after another): from then on this worker trains them that way
        self.cannot_vectorize: str | None = None
        if not supported:
            if list(self.model.buffers()):
                why = "the model has buffers"
            elif getattr(self.model, "vectorize", True) is False:
                why = f"the model ({type(self.model).__name__}) opts out of vectorised training"
            else:
                why = f"{type(spec.trainer).__name__} has no vectorised form"
            self.path = TrainingPath(False, why)
        elif spec.vectorize is not None:
            self.path = TrainingPath(spec.vectorize, f"system.vectorize = {str(spec.vectorize).lower()}", self.engine)
        elif cuda:
            self.path = TrainingPath(True, "a GPU: one batched computation per chunk keeps it busy", self.engine)
        self.vectorize = supported and (self.path is None or self.path.vectorize)
        self.device = torch.device("cuda" if cuda and self.vectorize else "cpu")
        if self.device.type == "cuda":
            self.model.to(self.device)  # functional_call reads the module's structure there
        self._channels_last = False  # while training one client after another, see _nhwc
        if self.device.type == "cpu" and len(spec.input_shape) == 3 and any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
            self._nhwc()

    @property
    def engine(self) -> str:
        """How a vectorised chunk computes its gradients."""
        return "stacked MLP backward" if self.stack is not None else "vmap"

    def run(
        self, shared: dict[str, np.ndarray], jobs: Sequence[TrainJob], payload: dict[str, np.ndarray] | None = None,
        vectorize: bool | None = None,
    ) -> list[ClientResult]:
        """Train `jobs` from `shared`. `vectorize` is the path the executor decided for every
        worker; None: this worker's own decision (calibrated on these jobs the first time)."""
        tensors = from_numpy(shared)
        if payload:  # the round's payload reaches each trainer with the job's own inputs
            extra = from_numpy(payload)
            jobs = [replace(j, inputs={**extra, **j.inputs}) for j in jobs]
        if vectorize is None:
            vectorize = self.decide(tensors, jobs).vectorize
        if vectorize and self.plan is not None and self.cannot_vectorize is None:
            return self._run_vectorized(tensors, jobs)
        return self._run_sequential(tensors, jobs)

    def decide(self, tensors: Params, jobs: Sequence[TrainJob]) -> "TrainingPath":
        """Vectorised or one client after another, whichever is faster here (see `calibrate`)."""
        if self.path is None:
            self.path = calibrate(self, tensors, jobs)
            self.vectorize = self.path.vectorize
        return self.path

    def decide_numpy(self, shared: dict[str, np.ndarray], jobs: Sequence[TrainJob], payload: dict[str, np.ndarray] | None = None) -> "TrainingPath":
        """`decide` from what an actor receives (the Ray executor asks one actor for all)."""
        tensors = from_numpy(shared)
        if payload:
            extra = from_numpy(payload)
            jobs = [replace(j, inputs={**extra, **j.inputs}) for j in jobs]
        return self.decide(tensors, jobs)

    def _nhwc(self) -> None:
        """Convolutions one client after another run in channels-last layout: oneDNN's CPU kernels
        are about an eighth faster in it (the model's tensors are kept that way, each input
        batch converted on entry; results are handed back contiguous). Vectorised chunks, which
        call the module with stacked tensors of their own, never see the conversion."""
        self.model.to(memory_format=torch.channels_last)

        def convert(module: nn.Module, args: tuple) -> tuple | None:
            if self._channels_last and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
                return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
            return None

        self.model.register_forward_pre_hook(convert)

    def _train_one(self, params: Params, x: np.ndarray, y: np.ndarray, job: TrainJob) -> TrainOutput:
        rng = generator(self.spec.seed, "train", job.client_id, job.round)
        self._channels_last = True
        try:
            out = TrainOutput.coerce(self.spec.trainer.train(self.model, params, x, y, job, rng))
        finally:
            self._channels_last = False
        out.params = {k: v.contiguous() for k, v in out.params.items()}
        return out

    def _run_sequential(self, tensors: Params, jobs: Sequence[TrainJob]) -> list[ClientResult]:
        results = []
        with torch_threads(self.spec.threads):
            for job in jobs:
                params = tensors if job.row is None else {k: v[job.row] for k, v in tensors.items()}
                x, y = self.client_data(job.client_id)
                try:
                    out = self._train_one(params, x, y, job)
                except Exception as exc:  # a plugin's bug: name it, and the client, for the user
                    if self.spec.on_client_error == "stop":
                        raise ClientError(
                            f"trainer {self._trainer_name()} raised {exc!r} on client "
                            f"{job.client_id} in round {job.round}"
                        ) from exc
                    out = TrainOutput({k: v.clone() for k, v in params.items()}, 0, float("nan"), {"failed": 1.0})
                if not is_finite(out.params) or not math.isfinite(out.train_loss):
                    out.metrics["nonfinite"] = 1.0
                results.append(_result(job, len(y), out))
        return results

    def _run_vectorized(self, tensors: Params, jobs: Sequence[TrainJob], parallel: bool = True) -> list[ClientResult]:
        """Chunks of at most `chunk_size` jobs, each trained as one batched computation. Jobs are
        grouped by step count first, so that a chunk rarely waits for one long client (a client's
        numbers do not depend on which clients share its chunk); results keep the jobs' order.

        With `chunk_threads` > 1 and the stacked engine (which touches no shared module), chunks
        train on that many threads at once, the cohort split into at least as many chunks (of at
        least MIN_CHUNK clients): every op runs single-threaded on its own thread, so the numbers
        are those of one thread, and an inline run keeps both cores of a small machine busy."""
        sgd, names = self.plan  # type: ignore[misc]
        data = [self.client_data(j.client_id) for j in jobs]
        steps = [sgd.num_steps(len(y), j) for (_, y), j in zip(data, jobs)]
        order = sorted(range(len(jobs)), key=steps.__getitem__)
        results: list[ClientResult | None] = [None] * len(jobs)
        threads = self.spec.chunk_threads if parallel and self.stack is not None else 1
        count = max(-(-len(jobs) // self.spec.chunk_size), min(threads, len(jobs) // MIN_CHUNK))
        bounds = [len(jobs) * i // count for i in range(count + 1)]
        chunks = [order[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
        failures: list[Exception] = []

        def train(picked: list[int]) -> list[TrainOutput] | None:
            chunk = [jobs[i] for i in picked]
            params = [tensors if j.row is None else {k: v[j.row] for k, v in tensors.items()} for j in chunk]
            rngs = [generator(self.spec.seed, "train", j.client_id, j.round) for j in chunk]
            try:
                trained = vectorized.train_chunk(self.model, sgd, params, [data[i] for i in picked], chunk, rngs,
                                                 self.device, self.stack)
            except Exception as exc:  # found and blamed (or dropped) client by client, below
                failures.append(exc)
                return None
            if names is not None:
                for out in trained:
                    out.params = {n: out.params[n] for n in names}
            return trained

        with torch_threads(self.spec.threads):
            if threads > 1 and len(chunks) > 1:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.spec.chunk_threads, thread_name_prefix="fedsim-chunk")
                outcomes = list(self._pool.map(train, chunks))
            else:
                outcomes = [train(picked) for picked in chunks]
            for picked, trained in zip(chunks, outcomes):
                chunk = [jobs[i] for i in picked]
                if trained is None:  # one client after another, on this thread (the model is shared)
                    retried = self._run_sequential(tensors, chunk)
                    for i, result in zip(picked, retried):
                        results[i] = result
                    if failures and self.cannot_vectorize is None and not any(r.metrics.get("failed") for r in retried):
                        self._give_up_vectorising(failures[0])
                    continue
                for i, job, out in zip(picked, chunk, trained):
                    if not math.isfinite(out.train_loss):  # parameters were checked per chunk
                        out.metrics["nonfinite"] = 1.0
                    results[i] = _result(job, len(data[i][1]), out)
        return results  # type: ignore[return-value]

    def _trainer_name(self) -> str:
        """The trainer, and the local objective inside it (the plug-in a user wrote, more often)."""
        objective = getattr(self.spec.trainer, "objective", None)
        name = type(self.spec.trainer).__name__
        return f"{name} (objective {type(objective).__name__})" if objective is not None else name

    def _give_up_vectorising(self, exc: Exception) -> None:
        """A chunk raised where the same clients train one after another: the trainer (a local
        objective with data-dependent control flow, an operation vmap cannot batch) works, only not
        vectorised. Retrying every chunk would cost both paths' time; the run says so instead."""
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        self.cannot_vectorize = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        self.vectorize = False
        self.path = TrainingPath(False, f"vectorised training raised {self.cannot_vectorize}; the same clients "
                                        "trained one after another, as every client will from now on", self.engine)

    def client_data(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.data.client(client)
        if client in self.spec.label_flip:
            y = (self.data.num_classes - 1) - y
        return x, y

    def pid(self) -> int:
        """The hosting process's id: to measure its memory, or to kill it in fault tests."""
        return os.getpid()

    def run_numpy(
        self, shared: dict[str, np.ndarray], jobs: Sequence[TrainJob], payload: dict[str, np.ndarray] | None = None,
        vectorize: bool | None = None,
    ) -> list[ClientResult]:
        """`run` packed for Ray: see `pack`."""
        return pack(self.run(shared, jobs, payload, vectorize))


Packed = tuple[list[ClientResult], dict[str, np.ndarray] | None]


def pack(results: list[ClientResult]) -> Packed:
    """Results whose parameters travel as one array per tensor name, stacked over the results,
    when they all have the same names and shapes (they nearly always do): Ray then moves a few
    large buffers instead of pickling one small array per client and tensor. Otherwise each
    result carries its own numpy arrays."""
    if results:
        layout = [(n, tuple(t.shape), t.dtype) for n, t in results[0].params.items()]
        if all([(n, tuple(t.shape), t.dtype) for n, t in r.params.items()] == layout for r in results):
            blocks = {n: torch.stack([r.params[n] for r in results]).numpy() for n, _, _ in layout}
            for r in results:
                r.params = {}
            return results, blocks
    for r in results:
        r.params = to_numpy(r.params)  # type: ignore[assignment]
    return results, None


def unpack(packed: Packed) -> list[ClientResult]:
    """`pack` undone on the driver: each result's tensors are views into the stacked arrays."""
    results, blocks = packed
    if blocks is None:
        for r in results:
            r.params = from_numpy(r.params)  # type: ignore[arg-type]
        return results
    tensors = from_numpy(blocks)
    for i, r in enumerate(results):
        r.params = {n: t[i] for n, t in tensors.items()}
    return results


def _result(job: TrainJob, num_examples: int, out: TrainOutput) -> ClientResult:
    return ClientResult(job.client_id, out.params, num_examples, out.metrics, out.extras, out.steps, out.train_loss, out.state)


class Executor(Protocol):
    def train(self, shared: Params, jobs: Sequence[TrainJob], payload: Params | None = None) -> list[ClientResult]: ...

    def close(self) -> None: ...


class InlineExecutor:
    """Runs every job in this process: for tests, debugging and small federations."""

    def __init__(self, data: FederatedData, spec: WorkerSpec):
        # the only worker: its vectorised chunks may use every core (one torch thread each)
        self.worker = Worker(data, replace(spec, chunk_threads=max(1, (os.cpu_count() or 1) // max(1, spec.threads))))
        self.path: TrainingPath | None = None  # how the clients train, once the first jobs decided it

    def train(self, shared: Params, jobs: Sequence[TrainJob], payload: Params | None = None) -> list[ClientResult]:
        results = self.worker.run(to_numpy(shared), jobs, to_numpy(payload or {}))
        if self.worker.path is not None and self.worker.path is not self.path:  # decided, or given up
            self.path = self.worker.path
            print(self.path.line(), flush=True)
        return results

    def close(self) -> None:
        pass


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start Ray once per process (dashboard off), or join the cluster at `address`.

    Without an address Ray is started in this process with `address="local"`: plain `ray.init()`
    would silently join any cluster started on this machine (another user's `ray start`, another
    fedsim run's), and two runs would then share, and fight over, one set of CPUs.
    """
    local = not address or address.split(":")[0] in ("127.0.0.1", "localhost", "::1")
    # Ray rewrites a loopback address to the machine's routable IP and then listens on every
    # interface. A local run (or one joining a cluster on loopback) keeps to 127.0.0.1: Ray's own
    # switch for that is this variable (read by the processes it starts) and the constant it sets.
    import ray

    if local:
        from ray._private import ray_constants

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    if ray.is_initialized():
        if address and address != "auto":
            current = ray.get_runtime_context().gcs_address
            if address.split("://", 1)[-1] != current:
                # (tests and notebooks run many runs in one process: Ray joins one cluster per process)
                _probe(address, CONNECT_TIMEOUT)
                raise ClusterError(f"this process already uses the Ray cluster at {current}, and Ray joins one "
                                   f"cluster per process: run the scenario for {address} in a new process",
                                   key="system.address")
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                                  runtime_env={"worker_process_setup_hook": _this_fedsim_first()})
    if address:
        _join(address, kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)


CONNECT_TIMEOUT = 30.0  # seconds to reach and join the cluster that --address names


class ClusterError(FedsimError):
    """The cluster named by --address (or [system] address) cannot be joined: exit code 2.

    `hard_exit` is set when Ray's own connection attempt is still stuck in a thread: the command
    line then ends the process at once rather than wait for Ray to give up (minutes)."""

    hard_exit = False


def _join(address: str, kwargs: dict[str, Any], timeout: float = CONNECT_TIMEOUT) -> None:
    """ray.init(address=...), but failing within `timeout` seconds in one line when nothing
    answers: a TCP probe first (refused, unreachable or silent addresses fail in seconds), then
    Ray's own handshake in a thread we stop waiting for at the deadline. Ray's C++ warnings while
    it retries are kept off the terminal unless RAY_BACKEND_LOG_LEVEL says otherwise."""
    import threading

    import ray

    deadline = time.monotonic() + timeout
    _probe(address, timeout)
    outcome: dict[str, BaseException] = {}

    def connect() -> None:
        try:
            ray.init(address=address, **kwargs)
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=connect, name="fedsim-ray-connect", daemon=True)
    with _stderr_silenced():  # Ray's C++ client logs each failed retry to file descriptor 2
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        error = ClusterError(f"no Ray cluster answered at {address} within {timeout:.0f} s (something listens "
                             "there, but it is not a Ray head that accepts this driver); check the address, "
                             "and that the head runs the same Ray version", key="system.address")
        error.hard_exit = True
        raise error
    if "error" in outcome:
        first = (str(outcome["error"]).strip().splitlines() or [outcome["error"].__class__.__name__])[0]
        raise ClusterError(f"cannot join the Ray cluster at {address}: {first[:200]}", key="system.address")


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at a scratch file for the duration (C++ code writes there directly,
    past Python's sys.stderr)."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            sys.stderr.flush()
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _probe(address: str, timeout: float) -> None:
    """Fail fast (ClusterError) when nothing accepts a TCP connection at the address's host:port."""
    import socket

    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        if target == "auto":
            return  # Ray finds the address itself
        raise ClusterError(f"expected HOST:PORT (or ray://HOST:PORT, or auto), got {address!r}", key="system.address")
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=min(10.0, timeout)):
            pass
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
        if isinstance(exc, (socket.timeout, TimeoutError)):
            reason = f"no answer within {min(10.0, timeout):.0f} s"
        raise ClusterError(f"nothing answers at {host}:{port} ({reason}); start the head with "
                           f"`ray start --head --port {port}` or check the address", key="system.address") from None


def local_ray_processes() -> list[dict[str, float]]:
    """(pid, start time) of the Ray processes this process started with its local cluster (GCS,
    raylet, agents), or [] when Ray is not running here or joined someone else's cluster. The
    run folder's lock file records them, so that a run killed with SIGKILL, which cannot stop its
    own cluster, has it ended by the next fedsim run into that folder (fedsim.runfolder.reap)."""
    try:
        import ray
        from ray._private import worker as ray_worker

        import psutil  # Ray's own copy, on the path once ray is imported
    except ImportError:  # pragma: no cover
        return []
    node = getattr(ray_worker, "_global_node", None)
    if not ray.is_initialized() or node is None or not getattr(node, "head", False):
        return []
    found: dict[int, float] = {}
    for infos in getattr(node, "all_processes", {}).values():
        for info in infos:
            pid = getattr(getattr(info, "process", None), "pid", None)
            if not isinstance(pid, int):
                continue
            try:
                proc = psutil.Process(pid)
                # the raylet's agents outlive it after a SIGKILL (they are reparented): record them too
                for p in [proc, *proc.children(recursive=True)]:
                    found[p.pid] = p.create_time()
            except psutil.Error:
                continue
    return [{"pid": pid, "create_time": t} for pid, t in found.items()]


_SETUP_HOOK = """
def fedsim_first(package={package!r}):
    import importlib.util, os, sys
    init = os.path.join(package, "__init__.py")
    if "fedsim" in sys.modules or not os.path.isfile(init):
        return  # already imported, or another machine with fedsim elsewhere: the usual import
    spec = importlib.util.spec_from_file_location("fedsim", init, submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fedsim"] = module
    spec.loader.exec_module(module)
"""


def _this_fedsim_first() -> Any:
    """A hook that Ray runs in every worker process before it loads any job: import the fedsim
    package the driver imported, from its own folder.

    Ray puts the driver's working directory first on its workers' `sys.path` (so that user
    modules beside the scenario can be unpickled), so a folder named `fedsim` there, even an empty
    one, would be imported instead of the installed package and every actor would die on start.
    The function is compiled here, outside any importable module, so that Ray pickles it by value:
    a worker needs no `import fedsim` to run it.
    """
    package = os.path.dirname(os.path.abspath(__file__))
    namespace: dict[str, Any] = {"__name__": "fedsim_worker_setup"}
    exec(compile(_SETUP_HOOK.format(package=package), "<fedsim worker setup>", "exec"), namespace)
    return namespace["fedsim_first"]


MAX_ACTOR_RESTARTS = 3  # per job: a job whose actor dies a fourth time ends the run (exit code 1)


class ActorsDiedError(PluginError):
    """A job's Ray actor died more often than the retry budget allows: exit code 1."""


def _actors_died(job: TrainJob, losses: int, exc: BaseException) -> ActorsDiedError:
    text = str(exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()] or [exc.__class__.__name__]
    raised = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", line)]
    cause = raised[-1] if raised else lines[0]  # an exception in the actor's start-up, else Ray's reason
    if "out of memory" in text.lower():
        cause = "out of memory"
    return ActorsDiedError(
        f"the Ray actor training client {job.client_id} in round {job.round} died {losses} times "
        f"(last: {cause[:160]}); the machine may be short of memory: try fewer --workers, or --executor inline"
    )
MIN_CHUNK = 4  # clients: smaller chunks waste more per-step overhead than a second thread wins


class RayExecutor:
    """A fixed pool of Ray actors, each hosting many virtual clients.

    With `clients_per_actor` set, client c always runs on actor c // clients_per_actor (so 1 gives
    one actor per client); otherwise each round's jobs are split evenly across `workers` actors.
    Either way results come back in job order, and each job's randomness is derived from its own
    ids, so the assignment never changes the numbers.
    """

    def __init__(
        self,
        data: FederatedData,
        spec: WorkerSpec,
        *,
        workers: int | None = None,
        clients_per_actor: int | None = None,
        address: str | None = None,
    ):
        import ray

        ensure_ray(address, num_cpus=workers)
        cpus = max(1, int(ray.available_resources().get("CPU", 1)))
        self.clients_per_actor = clients_per_actor
        if clients_per_actor is not None:
            n_actors = math.ceil(data.num_clients / clients_per_actor)
        else:
            n_actors = workers or cpus
        self._remote = ray.remote(Worker).options(num_cpus=min(1.0, cpus / n_actors), max_restarts=0)
        self._data_ref = ray.put(data)
        self._spec = spec
        self.actors = [self._remote.remote(self._data_ref, spec) for _ in range(n_actors)]
        self.replaced = 0
        self.path: TrainingPath | None = None  # decided by one actor on the first jobs, then used by all

    def _decide(self, shared_ref: Any, jobs: Sequence[TrainJob], payload_ref: Any) -> TrainingPath:
        """One actor calibrates (or reports the forced or only path), so that every actor of the
        run, replacements included, trains the same way."""
        import ray
        from ray.exceptions import RayActorError

        for _ in range(MAX_ACTOR_RESTARTS + 1):
            try:
                return ray.get(self.actors[0].decide_numpy.remote(shared_ref, list(jobs[: training_path.CLIENTS]), payload_ref))
            except RayActorError:
                self.actors[0] = self._remote.remote(self._data_ref, self._spec)
                self.replaced += 1
        raise RuntimeError(f"Ray actors kept dying ({MAX_ACTOR_RESTARTS} replacements while calibrating)")

    def _assign(self, jobs: Sequence[TrainJob]) -> list[list[int]]:
        """Job indices per actor: by hosting when clients are pinned, else an even split. A
        vectorised client's numbers do not depend on which clients share its chunk (fixed padding;
        tests/test_vectorized.py), so the split never changes results."""
        groups: list[list[int]] = [[] for _ in self.actors]
        for i, job in enumerate(jobs):
            if self.clients_per_actor is not None:
                actor = job.client_id // self.clients_per_actor
            else:
                actor = i * len(self.actors) // len(jobs)
            groups[actor].append(i)
        return groups

    def train(self, shared: Params, jobs: Sequence[TrainJob], payload: Params | None = None) -> list[ClientResult]:
        """Run the jobs on the pool. An actor that dies (killed, out of memory) is replaced and
        its jobs run again on the new one; since every job's randomness derives from its ids, the
        results are those the dead actor would have returned."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        shared_ref = ray.put(to_numpy(shared))
        payload_ref = ray.put(to_numpy(payload or {}))
        if self.path is None and jobs:
            self.path = self._decide(shared_ref, jobs, payload_ref)
            print(self.path.line(), flush=True)
        vectorize = self.path.vectorize if self.path is not None else None
        results: list[ClientResult | None] = [None] * len(jobs)
        pending = {a: idx for a, idx in enumerate(self._assign(jobs)) if idx}
        losses = [0] * len(jobs)  # how often each job's actor died under it
        while pending:
            calls = {a: self.actors[a].run_numpy.remote(shared_ref, [jobs[i] for i in idx], payload_ref, vectorize)
                     for a, idx in pending.items()}
            failed = {}
            for a, ref in calls.items():
                try:
                    out = ray.get(ref)
                except RayActorError as exc:
                    failed[a] = pending[a]
                    for i in pending[a]:
                        losses[i] += 1
                        if losses[i] > MAX_ACTOR_RESTARTS:
                            raise _actors_died(jobs[i], losses[i], exc) from None
                    continue
                except RayTaskError as exc:  # the job itself raised: report the original error
                    cause = exc.cause if isinstance(exc.cause, Exception) else exc
                    raise cause from None
                for i, result in zip(pending[a], unpack(out)):
                    results[i] = result
            for a in failed:
                self.actors[a] = self._remote.remote(self._data_ref, self._spec)
                self.replaced += 1
            pending = failed
        return results  # type: ignore[return-value]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
