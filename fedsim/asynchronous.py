"""Event-driven servers: clients train at their own simulated speed, updates arrive out of step.

The server holds one global model with a version counter. A client is dispatched with the current
model and a number of local steps; it finishes after its download, compute and upload times and
its update is applied when it arrives, in simulated-time order (ties in dispatch order). Real
training happens lazily in batches (`JobPool`), so Ray may finish work in any order without
changing a single number. Methods (FedAsync, FedBuff, FedCompass) subclass `AsyncServer` and
decide what an arrival does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field

from .aggregation import ServerOptimizer, WeightedMean
from .checkpoint import checkpointable
from .events import EventLoop
from .jobs import JobPool
from .ledger import SERVER
from .params import Params, UpdateBatch, clone, identity, num_bytes, stack
from .training import ClientResult, LocalSGDConfig, SGDTrainer, TrainJob

if TYPE_CHECKING:
    from .coordinator import RunContext


class AsyncConfig(LocalSGDConfig):
    """Settings every event-driven server method shares."""

    staleness: Literal["polynomial", "hinge", "constant"] = "polynomial"
    staleness_a: float = Field(0.5, ge=0)
    staleness_b: float = Field(4.0, ge=0)  # hinge: no discount up to this staleness
    weights: Literal["equal", "examples"] = "equal"
    round_seconds: float | None = Field(None, gt=0)  # simulated seconds per recorded round


def staleness_weight(tau: int | np.ndarray, kind: str = "polynomial", a: float = 0.5, b: float = 4.0) -> Any:
    """s(tau): how much an update computed `tau` versions ago still counts.

    polynomial: (tau + 1)^(-a) (the later APPFL form; one public FedCompass snapshot has the sign
    flipped); hinge: 1 up to b, then 1 / (a (tau - b) + 1); constant: 1.
    """
    tau = np.asarray(tau, dtype=np.float64)
    if kind == "polynomial":
        out = (tau + 1.0) ** (-a)
    elif kind == "hinge":
        out = 1.0 / (a * np.maximum(tau - b, 0.0) + 1.0)
    else:
        out = np.ones_like(tau)
    return float(out) if out.ndim == 0 else out


@checkpointable
@dataclass
class Arrival:
    """A finished job as the server sees it."""

    client: int
    result: ClientResult
    start_params: Params
    version: int  # the global version the client started from
    steps: int
    sent_at: float

    @property
    def delta(self) -> Params:
        """w_start - w_end: the client's update, as FedBuff and FedCompass send it."""
        return {k: self.start_params[k] - v for k, v in self.result.params.items()}


class AsyncServer:
    """The event-driven server loop FedAsync, FedBuff and FedCompass share; subclasses decide what
    an arrival does and call `merge` to fold updates into the global model through the rule."""

    STATE: tuple[str, ...] = ("params", "version", "jobs_started", "loop", "jobs", "_pending", "_round")

    def __init__(self, ctx: "RunContext", cfg: AsyncConfig, trainer: SGDTrainer, default_round_seconds: float | None = None):
        """By default every client trains continuously for its trainer's step count, and a recorded
        round lasts one median client's job (`round_seconds` overrides)."""
        self.ctx = ctx
        self.cfg = cfg
        self.trainer = trainer
        self.rule = ctx.rule(WeightedMean())
        self.server_optimizer: ServerOptimizer | None = None  # a method's own; else the scenario's
        self.jobs = JobPool(ctx.executor(trainer))
        self.loop = EventLoop(ctx, {"arrival": self._arrival, "deadline": self.on_timer})
        self.params: Params = clone(ctx.init_params)
        self.version = 0
        self.nbytes = num_bytes(self.params)
        # [compression]: an arrival's update w_start - w_end is what the client sends, compressed
        # with the client's own error memory; its upload is timed at the compressed size
        self.compression = ctx.uploads()
        self.upload_nbytes = self.nbytes if self.compression is None else self.compression.message_bytes(self.params)
        n = ctx.data.num_clients
        self.jobs_started = np.zeros(n, dtype=np.int64)
        self._round = 1
        sizes = ctx.data.num_examples().astype(np.float64)
        self.p = np.full(n, 1.0 / n) if cfg.weights == "equal" else sizes / sizes.sum()
        self.steps = trainer.steps_for(ctx.data.num_examples())
        self.round_seconds = cfg.round_seconds or default_round_seconds or float(np.median(self.steps * ctx.system.step_time))
        self._pending: dict[tuple[int, int], Arrival] = {}
        self.applied_staleness: list[int] = []
        self.losses: list[float] = []

    # --- what subclasses call ------------------------------------------------------------

    def dispatch(self, client: int, now: float, steps: int) -> float | None:
        """Send the current model to `client` for `steps` local steps; returns its arrival time,
        or None when the client is down or the model lost (it is offered work again once up, at
        the next round boundary)."""
        net = self.ctx.net
        k = int(self.jobs_started[client])
        reached = net.post(SERVER, [client], self.nbytes, purpose="download", ids=(client, k, self._round))
        if not reached or not net.alive(client, now, self._round):
            self.loop.idle[client] = True
            return None
        self.jobs_started[client] += 1
        start = dict(self.params)  # `merge` replaces tensors, never writes into them: no copy needed
        self.jobs.start((client, k), TrainJob(client, k + 1, steps=steps), start)
        duration = net.round_trip(client, steps, self.nbytes, self.upload_nbytes, job=k)
        self._pending[(client, k)] = Arrival(client, None, start, self.version, steps, now)  # type: ignore[arg-type]
        self.loop.at(now + duration, "arrival", (client, k))
        return now + duration

    def merge(self, updates: list[Params] | Params, coefficients: np.ndarray, clients: list[int], staleness: list[int]) -> None:
        """w <- w - rule(updates): the rule combines the clients' updates (w_start - w_end, or any
        other descent direction; a list, or already stacked as `deltas` gives them) with
        `coefficients` as the weights of a plain weighted sum (the default rule); the server then
        steps towards the result, and the version moves on."""
        batch = UpdateBatch(
            params=updates if isinstance(updates, dict) else stack(updates),
            num_examples=torch.as_tensor(self.ctx.data.num_examples()[clients], dtype=torch.int64),
            client_ids=torch.as_tensor(clients, dtype=torch.int64),
            staleness=torch.as_tensor(staleness, dtype=torch.int64),
            coefficients=torch.as_tensor(coefficients, dtype=torch.float64),
            relative=True,
        )
        total = self.ctx.combine(self.rule, self.params, batch, round=self._round, where=f"{self.cfg.name}'s merge")
        target = {name: t - total[name] if t.is_floating_point() else t for name, t in self.params.items()}
        if self.server_optimizer is not None:
            self.params = self.server_optimizer.step(self.params, target, round=self._round)
        else:
            self.params = self.ctx.server_step(self.params, target, round=self._round)
        self.version += 1

    @staticmethod
    def deltas(arrivals: list[Arrival]) -> Params:
        """The arrivals' updates w_start - w_end, stacked, with the same numbers as one subtraction
        per client but less memory traffic: the ends are stacked once, and each run of arrivals
        that started from the same model (a merge's clients started from a few versions, often
        in runs) is subtracted from that model in place, one call per run. A FedCompass group
        merges about a hundred updates at a time, and this was the largest part of the server's
        bookkeeping."""
        runs: list[tuple[int, int, Params]] = []  # [first, end) rows that share a start model
        keys = [identity(a.start_params) for a in arrivals]
        first = 0
        for i in range(1, len(arrivals) + 1):
            if i == len(arrivals) or keys[i] != keys[first]:
                runs.append((first, i, arrivals[first].start_params))
                first = i
        out: Params = {}
        for name in arrivals[0].result.params:
            delta = torch.stack([a.result.params[name] for a in arrivals])
            for a, b, start in runs:
                torch.sub(start[name], delta[a:b], out=delta[a:b])
            out[name] = delta
        return out

    def weight(self, tau: int) -> float:
        return staleness_weight(tau, self.cfg.staleness, self.cfg.staleness_a, self.cfg.staleness_b)

    # --- what subclasses define ----------------------------------------------------------

    def start(self) -> None:
        for client in range(self.ctx.data.num_clients):
            self.dispatch(client, 0.0, int(self.steps[client]))

    def on_arrival(self, arrival: Arrival, now: float) -> None:
        raise NotImplementedError

    def on_timer(self, payload: Any, now: float) -> None:
        pass

    def on_rejoin(self, client: int, now: float) -> None:
        """A client that was down (or whose model or update was lost) is up again at a round boundary."""
        self.dispatch(client, now, int(self.steps[client]))

    def round_metrics(self) -> dict[str, float]:
        return {}

    # --- the flow protocol ---------------------------------------------------------------

    def _arrival(self, key: tuple[int, int], now: float) -> None:
        arrival = self._pending.pop(key)
        result = self.loop.finish(self.jobs, key, arrival.client, now, self._round)
        if result is None:
            return
        up = self.nbytes
        if self.compression is not None:  # the server rebuilds w_end from w_start and what arrived
            [result], sizes = self.compression.apply(self.ctx, arrival.start_params, [result], self._round, job=key[1])
            up = sizes[arrival.client]
        arrival.result = result
        reached = self.ctx.net.post(arrival.client, [SERVER], up, purpose="upload", ids=key)
        if not reached or not self.ctx.screen([result], self._round):
            self.loop.idle[arrival.client] = True
            return
        self.losses.append(result.train_loss)
        self.on_arrival(arrival, now)

    def step(self, round: int) -> dict[str, float]:
        self._round = round
        if round == 1:
            self.start()
        horizon = round * self.round_seconds
        self.applied_staleness, self.losses = [], []
        self.loop.rejoin(round, self.on_rejoin)
        self.loop.run(horizon)
        self.ctx.clock.advance_to(horizon)
        stale = self.applied_staleness
        return {
            "train_loss": float(np.mean(self.losses)) if self.losses else float("nan"),
            "updates_applied": float(len(stale)),
            "mean_staleness": float(np.mean(stale)) if stale else float("nan"),
            "max_staleness": float(np.max(stale)) if stale else float("nan"),
            "version": float(self.version),
            **self.round_metrics(),
        }

    def evaluate(self) -> dict[str, float]:
        acc, loss = self.ctx.evaluate(self.params)
        return {"test_accuracy": acc, "test_loss": loss}

