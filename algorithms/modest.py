"""MoDeST: mostly-consistent decentralized sampling training (de Vos, Dhasade, Kermarrec, Lavoie,
Pouwelse, Sharma; arXiv 2302.13837; later "Plexus", EuroMLSys 2025).

No server: each round k, the first s available nodes of the candidates ordered by
MD5(node id || "-" || k) train; they send their models (with their population view) to the first a
available nodes of round k+1's order, who average them once floor(s x success_fraction) have
arrived, or at their timeout with at least `liveness_min` models, and send the result to round
k+1's trainers. Availability is checked by pinging in order and skipping nodes that do not answer
within the ping timeout. Views (last active round and a join/leave counter per peer) travel with
every model and are merged; joins wait in a pending set until the next send; nodes inactive for
more than `inactivity_threshold` rounds drop out of the candidates. This is the paper's round
protocol as the authors' code runs it (github devos50/decentralized-learning,
accdfl/dfl/community.py and sample_manager.py; github sacs-epfl/plexus, dlsim/plexus/community.py
and sample_manager.py); defaults are theirs.

Conventions (keys):
- `weights`: how an aggregator averages the models it received. "examples" (default) weights
  them by their clients' example counts, as FedAvg does, so that MoDeST and FedAvg on the same
  sample (`sampler = "hash"`) give the same models; "equal" is the authors' code, whose
  aggregators call `aggregate_trained_models()` without weights (plexus dlsim/core/model_manager.py,
  dlsim/core/gradient_aggregation/fedavg.py: 1/m each).
- `aggregator_choice`: which nodes of round k+1's sample aggregate round k. "first" (default):
  the first a available nodes of the hash order, the paper's rule; "fastest": the first s nodes of
  the order sorted by bandwidth, fastest first, then pinged in that order, as the Plexus runs do
  (dlsim/plexus/community.py `determine_available_peers_for_sample` with `other_nodes_bws`); if
  none of those s answers, fedsim goes on down the rest of the order (Plexus would find no one).

Readings fedsim had to choose (the paper and code leave them open):
- Trainers wait `ack_timeout` for their aggregators' acknowledgement and otherwise forward the
  model to the next available aggregators of the order; a dropped round acknowledges no one.
- Liveness: when an aggregator drops a round below the liveness minimum, it restarts that round
  from the freshest global model it knows (every node keeps the last one it received), sending it
  to the round's trainers. The node that started a round pings its trainers two aggregation
  timeouts later; if none answers (all crashed, so no aggregator will ever hear of the round), it
  starts the round again.
- Silence (`silence_timeout`): if the starter crashed as well, nobody is left to notice, and the
  protocol would stall for good. So every trainer whose model was aggregated (it got its ack:
  round k+1 has started) watches the rounds after it: `silence_timeout` later it pings the first s
  available nodes of the newest round it knows of, whose pongs carry their round estimate (the
  highest round they have heard of). A newer round means progress: once it has seen
  `WATCH_ROUNDS` rounds go by it stops watching (the newer trainers watch). Some of them in the
  round means the round is under way: it waits another `silence_timeout`. None of them in it, a
  full `silence_timeout` after the watcher learnt of the round, means the round's trainers and its
  starter are gone: it starts the round again from the freshest model it knows (`silence_restarts`
  counts these). A node that sits out rounds never watches, and a
  watcher acts only on what its pings return, so it cannot fire just because it was not sampled.
  `silence_timeout` defaults to three aggregation timeouts, after the starter's own check, and
  must exceed the time a round takes to start (its pings and the model transfer). Watchers check
  one after another, the k-th of the round's order silence_timeout x k / s later than the first,
  so that the first restart has reached its trainers when the others look.
- Pings cost one round trip; every unanswered ping in a wave costs the ping timeout. Views are
  counted on the wire at 6 bytes per known peer, pings and acks at 64 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from fedsim import (
    ClientResult,
    EventLoop,
    JobPool,
    LocalSGDConfig,
    Params,
    RunContext,
    SGDTrainer,
    TrainJob,
    WeightedMean,
    checkpointable,
    clone,
    make_batch,
    num_bytes,
    ordered_candidates,
    register_algorithm,
)

SMALL_MESSAGE = 64  # bytes of a ping, pong or acknowledgement
WATCH_ROUNDS = 3  # a trainer watches the protocol until it has seen this many rounds after its own


@checkpointable
class View:
    """A node's population view, as two arrays over node ids. Copy-on-write: nodes share one
    object until one of them learns something new, so 10,000 nodes cost one view, not 10,000."""

    __slots__ = ("last_active", "membership")

    def __init__(self, last_active: np.ndarray, membership: np.ndarray):
        self.last_active = last_active  # round in which the peer was last seen active
        self.membership = membership  # join/leave counter: even = member, odd = left, -1 = unknown

    def merged(self, other: "View") -> "View":
        if other is self:
            return self
        last = np.maximum(self.last_active, other.last_active)
        member = np.maximum(self.membership, other.membership)
        if np.array_equal(last, self.last_active) and np.array_equal(member, self.membership):
            return self
        return View(last, member)

    def candidates(self, round: int, threshold: int, me: int) -> np.ndarray:
        mask = (self.membership >= 0) & (self.membership % 2 == 0) & (self.last_active >= round - threshold)
        mask[me] = True
        return mask

    def nbytes(self) -> int:
        return 6 * int((self.membership >= 0).sum())


class MoDeSTConfig(LocalSGDConfig):
    needs_topology = False
    sample_size: int = Field(10, ge=1)  # s
    aggregators: int = Field(1, ge=1)  # a
    success_fraction: float = Field(1.0, gt=0, le=1)
    liveness_min: int = Field(3, ge=1)
    aggregation_timeout: float = Field(300.0, gt=0)
    ping_timeout: float = Field(5.0, gt=0)
    ack_timeout: float = Field(600.0, gt=0)
    inactivity_threshold: int = Field(1000, ge=1)
    batch_size: int = Field(20, ge=1)
    local_steps: int | None = Field(5, ge=1)
    max_round_seconds: float = Field(3600.0, gt=0)  # a recorded round gives up waiting after this
    silence_timeout: float | None = Field(None, gt=0)  # a watcher's seconds between checks (3 x aggregation_timeout)
    weights: Literal["examples", "equal"] = "examples"
    aggregator_choice: Literal["first", "fastest"] = "first"


@checkpointable
@dataclass
class Collection:
    """What one aggregator has received for one round."""

    results: list[ClientResult] = field(default_factory=list)
    done: bool = False


class MoDeST:
    STATE = (
        "loop", "jobs", "views", "genesis", "pending", "r_hat", "known_model", "collections", "acked", "tried",
        "initial", "models", "latest", "joined", "left", "dropped_rounds", "restarts", "_round", "_started",
        "heard", "heard_at", "watching", "silence_restarts",
    )

    def __init__(self, cfg: MoDeSTConfig, ctx: RunContext):
        self.cfg, self.ctx = cfg, ctx
        n = ctx.data.num_clients
        self.n = n
        if cfg.sample_size > n:
            from fedsim import ScenarioError

            raise ScenarioError(f"expected at most data.num_clients = {n}", key="algorithm.sample_size")
        self.trainer = SGDTrainer.from_config(cfg)
        self.sizes = ctx.data.num_examples()
        self.jobs = JobPool(ctx.executor(self.trainer))
        self.rule = ctx.rule(WeightedMean())
        self.loop = EventLoop(ctx, {
            "model": lambda p, t: self.on_model(p[0], p[1], p[2], p[3], p[4], t),
            "trained": lambda p, t: self.on_trained(p[0], p[1], t),
            "update": lambda p, t: self.on_update(p[0], p[1], p[2], p[3], p[4], t),
            "aggregation_timeout": lambda p, t: self.on_aggregation_timeout(p[0], p[1], t),
            "ack_timeout": lambda p, t: self.on_ack_timeout(p[0], p[1], p[2], t),
            "round_check": lambda p, t: self.on_round_check(p[0], p[1], p[2], p[3], t),
            "watch": lambda p, t: self.on_watch(p[0], p[1], p[2], t),
        })
        genesis_member = np.where(ctx.net.joining, -1, 0).astype(np.int16)
        self.views: dict[int, View] = {}
        self.genesis = View(np.zeros(n, dtype=np.int32), genesis_member)
        self.pending: dict[int, list[int]] = {}  # node -> peers whose JOIN it holds back
        self.r_hat = np.zeros(n, dtype=np.int64)
        self.known_model: dict[int, tuple[int, Params]] = {}  # node -> (round, last global model)
        self.collections: dict[tuple[int, int], Collection] = {}
        self.acked: set[tuple[int, int]] = set()  # (trainer, round) acknowledged
        self.tried: dict[tuple[int, int], int] = {}  # (trainer, round) -> aggregators tried so far
        self.initial = clone(ctx.init_params)
        self.models: dict[int, Params] = {0: self.initial}  # the latest round -> its first aggregated model
        self.latest = 0
        self.joined = ~ctx.net.joining
        self.left = np.zeros(n, dtype=bool)
        self.nbytes = num_bytes(ctx.init_params)
        self.dropped_rounds = 0
        self.restarts = 0
        self.heard = np.zeros(n, dtype=np.int64)  # the highest round each node knows was started
        self.heard_at = np.zeros(n)  # when it learnt of that round
        self.silence_timeout = cfg.silence_timeout or 3.0 * cfg.aggregation_timeout
        self.watching = np.full(n, -1, dtype=np.int64)  # the round whose ack a node's watch follows (-1: none)
        self.silence_restarts = 0
        self.stall_seconds = 0.0
        self._round = 1
        self._started = False
        self.losses: list[float] = []

    # --- views and samples ---------------------------------------------------------------

    def view(self, node: int) -> View:
        return self.views.get(node, self.genesis)

    def learn(self, node: int, other: View) -> None:
        merged = self.view(node).merged(other)
        if merged is not self.view(node):
            self.views[node] = merged

    def mark_active(self, node: int, peer: int, round: int) -> None:
        v = self.view(node)
        if v.last_active[peer] < round:
            v = View(v.last_active.copy(), v.membership)
            v.last_active[peer] = round
            self.views[node] = v

    def outgoing_view(self, node: int) -> View:
        """The view a node sends: its own, with the joins it held back flushed in."""
        held = self.pending.pop(node, [])
        if held:
            v = self.view(node)
            member = v.membership.copy()
            for peer in held:  # unknown -> member (0); left (odd) -> member again (next even)
                member[peer] = 0 if member[peer] < 0 else member[peer] + member[peer] % 2
            self.views[node] = View(v.last_active, member)
        return self.view(node)

    def select(
        self, node: int, round: int, count: int, now: float, skip: int = 0, fastest: bool = False
    ) -> tuple[list[int], float]:
        """The first `count` nodes of round's order (after `skip` answering ones) that answer a ping,
        as `node` sees it; returns them and the time the pinging took. `fastest`: the order's first
        s nodes are pinged by bandwidth, fastest first (ties in hash order), then the rest."""
        order = ordered_candidates(self.view(node).candidates(round, self.cfg.inactivity_threshold, node), round)
        if fastest:
            head = order[: self.cfg.sample_size]
            head = head[np.argsort(-self.ctx.system.bandwidth[head], kind="stable")]
            order = np.concatenate([head, order[self.cfg.sample_size :]])
        chosen: list[int] = []
        elapsed, pos, answered = 0.0, 0, 0
        latency = float(self.ctx.system.latency[node])
        while len(chosen) < count and pos < len(order):
            wave = order[pos : pos + count - len(chosen)]
            pos += len(wave)
            self.ctx.net.signal(node, wave, SMALL_MESSAGE)
            alive = [int(p) for p in wave if p == node or self.ctx.net.alive(int(p), now + elapsed, self._round)]
            for p in alive:
                answered += 1
                if answered > skip:
                    chosen.append(p)
            elapsed += 2 * latency if len(alive) == len(wave) else self.cfg.ping_timeout
        return chosen, elapsed

    # --- the protocol --------------------------------------------------------------------

    def _send_model(self, sender: int, receivers: list[int], kind: str, round: int, payload: object, now: float) -> None:
        view = self.outgoing_view(sender)
        size = self.nbytes + view.nbytes()
        for r, arrives in self.ctx.net.send(sender, receivers, size, at=now, purpose=f"modest.{kind}", ids=(sender, round)):
            self.loop.at(arrives, kind, (r, round, payload, view, sender))

    def _start_round(self, node: int, round: int, model: Params, now: float, trainers: list[int] | None = None) -> None:
        """Send `model` as round `round`'s to its trainers: the first s available nodes of the
        round's order (`trainers`, when the caller has just pinged them)."""
        self._hear(node, round, now)
        delay = 0.0
        if trainers is None:
            trainers, delay = self.select(node, round, self.cfg.sample_size, now)
        self._send_model(node, trainers, "model", round, model, now + delay)
        check = now + delay + 2 * self.cfg.aggregation_timeout
        self.loop.at(check, "round_check", (node, round, model, tuple(trainers)))

    def on_round_check(self, node: int, round: int, model: Params, trainers: tuple[int, ...], now: float) -> None:
        """Liveness: the node that started a round pings its trainers later; if none answers,
        every trainer crashed and no aggregator will ever hear of the round, so it starts the
        round again with trainers that answer. Costs a few pings per round otherwise."""
        if not self.ctx.net.alive(node, now, self._round) or not trainers:
            return
        self.ctx.net.signal(node, np.array(trainers), SMALL_MESSAGE)
        if any(self.ctx.net.alive(t, now, self._round) for t in trainers):
            return
        self.restarts += 1
        self._start_round(node, round, model, now + self.cfg.ping_timeout)

    def on_model(self, trainer: int, round: int, model: Params, view: View, sender: int, now: float) -> None:
        if not self.ctx.net.alive(trainer, now, self._round) or round <= self.r_hat[trainer]:
            return  # down, or an older (or second) copy of a round it already has
        self.r_hat[trainer] = round
        self._hear(trainer, round, now)
        self.learn(trainer, view)
        self.known_model[trainer] = (round, model)
        self.jobs.start((trainer, round), TrainJob(trainer, round), model)
        steps = self.trainer.num_steps(int(self.sizes[trainer]))
        duration = self.ctx.net.compute(trainer, steps, job=round)
        self.loop.at(now + duration, "trained", (trainer, round))

    def on_trained(self, trainer: int, round: int, now: float) -> None:
        result = self.loop.finish(self.jobs, (trainer, round), trainer, now, self._round)
        if result is None or not self.ctx.screen([result], self._round):
            return  # failed or dropped: like a trainer that crashed this round
        self.losses.append(result.train_loss)
        self._deliver(trainer, round, result, now, skip=0)

    def _deliver(self, trainer: int, round: int, result: ClientResult, now: float, skip: int) -> None:
        fastest = self.cfg.aggregator_choice == "fastest"
        aggregators, delay = self.select(trainer, round + 1, self.cfg.aggregators, now, skip=skip, fastest=fastest)
        self.tried[(trainer, round)] = skip + len(aggregators)
        self.mark_active(trainer, trainer, round)
        self._send_model(trainer, aggregators, "update", round + 1, result, now + delay)
        self.loop.at(now + delay + self.cfg.ack_timeout, "ack_timeout", (trainer, round, result))

    def on_update(self, aggregator: int, round: int, result: ClientResult, view: View, sender: int, now: float) -> None:
        if not self.ctx.net.alive(aggregator, now, self._round):
            return
        self.learn(aggregator, view)
        self.mark_active(aggregator, sender, round - 1)
        key = (aggregator, round)
        collection = self.collections.setdefault(key, Collection())
        if collection.done:  # a round it already closed: acknowledged, so the sender stops
            self.ctx.net.signal(aggregator, sender, SMALL_MESSAGE)
            self.acked.add((sender, round - 1))
            return
        if any(r.client_id == result.client_id for r in collection.results):
            return
        collection.results.append(result)
        if len(collection.results) == 1:
            self.loop.at(now + self.cfg.aggregation_timeout, "aggregation_timeout", key)
        if len(collection.results) >= max(1, int(self.cfg.sample_size * self.cfg.success_fraction)):
            self._aggregate(aggregator, round, now)

    def on_aggregation_timeout(self, aggregator: int, round: int, now: float) -> None:
        collection = self.collections.get((aggregator, round))
        if collection is None or collection.done or not self.ctx.net.alive(aggregator, now, self._round):
            return
        if len(collection.results) >= self.cfg.liveness_min:
            self._aggregate(aggregator, round, now)
            return
        collection.done = True  # dropped: too few models to trust
        self.dropped_rounds += 1
        # restart the round from the freshest global model this node knows; if another
        # aggregator did aggregate, its trainers already hold this round and ignore the copy
        _, model = self.known_model.get(aggregator, (0, self.initial))
        self._start_round(aggregator, round, model, now)

    def _aggregate(self, aggregator: int, round: int, now: float) -> None:
        collection = self.collections[(aggregator, round)]
        collection.done = True
        results = sorted(collection.results, key=lambda r: r.client_id)
        _, current = self.known_model.get(aggregator, (0, self.initial))
        m = len(results)
        batch = make_batch(results, coefficients=[1.0 / m] * m if self.cfg.weights == "equal" else None)
        model = self.ctx.combine(self.rule, current, batch, round=round - 1, where=f"MoDeST aggregator {aggregator}")
        for r in results:
            self.acked.add((r.client_id, round - 1))
            self.ctx.net.signal(aggregator, r.client_id, SMALL_MESSAGE)
            self._watch_after_ack(r.client_id, round - 1, now)
        self.known_model[aggregator] = (round - 1, model)
        if round - 1 > self.latest:
            self.latest = round - 1
            self.models = {round - 1: model}
        self._start_round(aggregator, round, model, now)

    def _hear(self, node: int, round: int, now: float) -> None:
        """`node` learns that round `round` has started (its round estimate, carried by pongs)."""
        if round > self.heard[node]:
            self.heard[node] = round
            self.heard_at[node] = now

    def _watch_after_ack(self, trainer: int, trained: int, now: float) -> None:
        """The ack tells `trainer` that round `trained` + 1 has started: it starts watching."""
        if not self.ctx.net.alive(trainer, now, self._round):
            return
        self._hear(trainer, trained + 1, now)
        if self.watching[trainer] >= trained:
            return  # already watching from this round or a later one
        self.watching[trainer] = trained  # one watch per node: a newer ack replaces the older one
        order = ordered_candidates(self.view(trainer).candidates(trained, self.cfg.inactivity_threshold, trainer), trained)
        place = int(np.flatnonzero(order == trainer)[0]) if trainer in order else 0
        check = now + self.silence_timeout * (1.0 + place / self.cfg.sample_size)
        self.loop.at(check, "watch", (trainer, trained, int(self.heard[trainer])))

    def on_watch(self, node: int, trained: int, front: int, now: float) -> None:
        """Silence check (see the module docstring): ping the first s available nodes of the
        newest round `node` knows of; each pong carries the highest round its sender has heard
        of and the round it last received a model for."""
        if self.watching[node] != trained or not self.ctx.net.alive(node, now, self._round):
            return  # replaced by a newer watch, or down
        front = max(front, int(self.heard[node]))
        answering, delay = self.select(node, front, self.cfg.sample_size, now)
        others = [p for p in answering if p != node]
        self.ctx.net.signal(node, others, SMALL_MESSAGE)  # the pongs
        newest = max([front, *(int(self.heard[p]) for p in others)])
        self._hear(node, newest, now)
        if newest >= trained + 1 + WATCH_ROUNDS:
            self.watching[node] = -1
            return  # the protocol moved on: newer trainers watch it
        known_long = now - self.heard_at[node] >= self.silence_timeout  # not a round that just started
        if newest == front and known_long and not any(self.r_hat[p] >= front for p in answering):
            # none of the nodes the round's starter would pick now holds the round's model: its
            # trainers (and its starter) are gone, so start it again
            self.silence_restarts += 1
            _, model = self.known_model.get(node, (0, self.initial))
            self._start_round(node, front, model, now + delay, trainers=answering)
        self.loop.at(now + delay + self.silence_timeout, "watch", (node, trained, newest))

    def on_ack_timeout(self, trainer: int, round: int, result: ClientResult, now: float) -> None:
        if (trainer, round) in self.acked or not self.ctx.net.alive(trainer, now, self._round):
            return
        self._deliver(trainer, round, result, now, skip=self.tried[(trainer, round)])

    # --- membership changes announced at round boundaries --------------------------------

    def _membership(self, now: float) -> None:
        net = self.ctx.net
        rng = self.ctx.generator("modest.gossip", self._round)
        for node in np.flatnonzero(net.joining & ~self.joined):
            if net.alive(int(node), now, self._round):
                self.joined[node] = True
                peers = rng.choice(self.n, size=min(self.n, 10 * self.cfg.sample_size), replace=False)
                for p in peers:
                    self.pending.setdefault(int(p), []).append(int(node))
                net.signal(int(node), peers, SMALL_MESSAGE)
        for node in np.flatnonzero(net.leaving & ~self.left):
            if net.left(int(node), now, self._round):
                self.left[node] = True
                peers = rng.choice(self.n, size=min(self.n, 10 * self.cfg.sample_size), replace=False)
                for p in peers:
                    v = self.view(int(p))
                    member = v.membership.copy()
                    member[node] = member[node] + 1 if member[node] % 2 == 0 else member[node]
                    self.views[int(p)] = View(v.last_active, member)
                net.signal(int(node), peers, SMALL_MESSAGE)

    # --- the flow protocol ---------------------------------------------------------------

    def step(self, round: int) -> dict[str, float]:
        """Advance until round `round`'s model exists (or the protocol has nothing left to do)."""
        self._round = round
        now = self.ctx.clock.now
        self._membership(now)
        if not self._started:  # everyone knows the initial model: round 1's trainers just start
            self._started = True
            order = ordered_candidates(self.genesis.candidates(1, self.cfg.inactivity_threshold, 0), 1)
            trainers = [int(p) for p in order if self.ctx.net.alive(int(p), now, round)][: self.cfg.sample_size]
            for trainer in trainers:
                self.on_model(trainer, 1, self.initial, self.genesis, trainer, now)
        before = self.ctx.clock.now
        self.losses = []
        limit = before + self.cfg.max_round_seconds
        self.loop.run(limit, until=lambda: self.latest >= round)
        if self.latest < round:  # stalled: let simulated time pass so the run stays bounded
            self.ctx.clock.advance_to(max(self.ctx.clock.now, limit if self.loop else self.ctx.clock.now))
        return {
            "train_loss": float(np.mean(self.losses)) if self.losses else float("nan"),
            "global_round": float(self.latest),
            "dropped_rounds": float(self.dropped_rounds),
            "restarted_rounds": float(self.restarts),
            "silence_restarts": float(self.silence_restarts),
            "round_seconds": self.ctx.clock.now - before,
        }

    def evaluate(self) -> dict[str, float]:
        acc, loss = self.ctx.evaluate(self.models[self.latest])
        return {"test_accuracy": acc, "test_loss": loss}


@register_algorithm("modest")
def modest(cfg: MoDeSTConfig, ctx: RunContext) -> MoDeST:
    return MoDeST(cfg, ctx)
