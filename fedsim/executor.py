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
from dataclasses import dataclass, replace
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from . import vectorized
from .data import FederatedData
from .models import build_model
from .errors import ClientError, FedsimError, PluginError
from .params import Params, from_numpy, is_finite, to_numpy
from .seeding import generator
from .training import ClientResult, TrainJob, Trainer, TrainOutput, torch_threads


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
        supported = self.plan is not None
        self.vectorize = supported if spec.vectorize is None else (spec.vectorize and supported)
        cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if cuda and self.vectorize else "cpu")
        if self.device.type == "cuda":
            self.model.to(self.device)  # functional_call reads the module's structure there

    def run(self, shared: dict[str, np.ndarray], jobs: Sequence[TrainJob], payload: dict[str, np.ndarray] | None = None) -> list[ClientResult]:
        tensors = from_numpy(shared)
        if payload:  # the round's payload reaches each trainer with the job's own inputs
            extra = from_numpy(payload)
            jobs = [replace(j, inputs={**extra, **j.inputs}) for j in jobs]
        if self.vectorize:
            return self._run_vectorized(tensors, jobs)
        return self._run_sequential(tensors, jobs)

    def _train_one(self, params: Params, x: np.ndarray, y: np.ndarray, job: TrainJob) -> TrainOutput:
        rng = generator(self.spec.seed, "train", job.client_id, job.round)
        return TrainOutput.coerce(self.spec.trainer.train(self.model, params, x, y, job, rng))

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
                            f"trainer {type(self.spec.trainer).__name__} raised {exc!r} on client "
                            f"{job.client_id} in round {job.round}"
                        ) from exc
                    out = TrainOutput({k: v.clone() for k, v in params.items()}, 0, float("nan"), {"failed": 1.0})
                if not is_finite(out.params) or not math.isfinite(out.train_loss):
                    out.metrics["nonfinite"] = 1.0
                results.append(_result(job, len(y), out))
        return results

    def _run_vectorized(self, tensors: Params, jobs: Sequence[TrainJob]) -> list[ClientResult]:
        """Chunks of at most `chunk_size` jobs, each trained as one batched computation."""
        results = []
        size = self.spec.chunk_size
        with torch_threads(self.spec.threads):
            for start in range(0, len(jobs), size):
                chunk = jobs[start : start + size]
                params = [tensors if j.row is None else {k: v[j.row] for k, v in tensors.items()} for j in chunk]
                data = [self.client_data(j.client_id) for j in chunk]
                rngs = [generator(self.spec.seed, "train", j.client_id, j.round) for j in chunk]
                try:
                    sgd, names = self.plan  # type: ignore[misc]
                    trained = vectorized.train_chunk(self.model, sgd, params, data, chunk, rngs, self.device)
                    if names is not None:
                        for out in trained:
                            out.params = {n: out.params[n] for n in names}
                except Exception:  # find the client to blame (or drop) one by one
                    results += self._run_sequential(tensors, chunk)
                    continue
                for job, (x, y), out in zip(chunk, data, trained):
                    if not math.isfinite(out.train_loss):  # parameters were checked per chunk
                        out.metrics["nonfinite"] = 1.0
                    results.append(_result(job, len(y), out))
        return results

    def client_data(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.data.client(client)
        if client in self.spec.label_flip:
            y = (self.data.num_classes - 1) - y
        return x, y

    def pid(self) -> int:
        """The hosting process's id: to measure its memory, or to kill it in fault tests."""
        return os.getpid()

    def run_numpy(self, shared: dict[str, np.ndarray], jobs: Sequence[TrainJob], payload: dict[str, np.ndarray] | None = None) -> list[ClientResult]:
        """`run` with numpy results, which Ray moves without pickling tensor storages."""
        results = self.run(shared, jobs, payload)
        for result in results:
            result.params = to_numpy(result.params)  # type: ignore[assignment]
        return results


def _result(job: TrainJob, num_examples: int, out: TrainOutput) -> ClientResult:
    return ClientResult(job.client_id, out.params, num_examples, out.metrics, out.extras, out.steps, out.train_loss, out.state)


class Executor(Protocol):
    def train(self, shared: Params, jobs: Sequence[TrainJob], payload: Params | None = None) -> list[ClientResult]: ...

    def close(self) -> None: ...


class InlineExecutor:
    """Runs every job in this process: for tests, debugging and small federations."""

    def __init__(self, data: FederatedData, spec: WorkerSpec):
        self.worker = Worker(data, spec)

    def train(self, shared: Params, jobs: Sequence[TrainJob], payload: Params | None = None) -> list[ClientResult]:
        return self.worker.run(to_numpy(shared), jobs, to_numpy(payload or {}))

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
        results: list[ClientResult | None] = [None] * len(jobs)
        pending = {a: idx for a, idx in enumerate(self._assign(jobs)) if idx}
        losses = [0] * len(jobs)  # how often each job's actor died under it
        while pending:
            calls = {a: self.actors[a].run_numpy.remote(shared_ref, [jobs[i] for i in idx], payload_ref)
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
                for i, result in zip(pending[a], out):
                    result.params = from_numpy(result.params)  # type: ignore[arg-type]
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
