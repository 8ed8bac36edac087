"""FedCompass (Li, Chaturvedi, Ryu, Huerta, Mao; ICLR 2024): semi-asynchronous FL with a
computing-power-aware scheduler (arXiv 2309.14675).

The server estimates each client's seconds per local step and assigns it a number of local steps
Q in [Q_min, Q_max] so that clients of similar finishing time form an arrival group. A group is
aggregated when all its members have arrived or at its latest arrival time L = t + lambda * Q * v;
members that miss L go to a general buffer that is folded into the next group aggregation.
Aggregation is staleness-weighted: w <- w - alpha * sum_j s(TS - ts_j) p_j Delta_j with
s(tau) = (tau + 1)^(-a). Follows the authors' code (github APPFL/FedCompass,
src/appfl/scheduler/compass_scheduler.py; APPFL's src/appfl/algorithm/aggregator/
fedcompass_aggregator.py, whose later versions fix the sign of a); defaults from its server config
(examples/config/server_fedcompass.yaml): Q_max 100, Q_min 20, beta 0.9, lambda 1.5, alpha 0.9,
a 0.5, equal client weights p_j = 1/N. That is APPFL's weighting, the one FedAsync and FedBuff
reproduce with `weighting = "appfl"` (docs/conventions.md).

A reading fedsim had to choose: when a new group is created and no group's estimate gives a
Q <= Q_max, Q is Q_max; when the best one is below Q_min (negative included), Q is Q_min.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from pydantic import Field, model_validator

from fedsim import ScenarioError, Arrival, AsyncConfig, AsyncServer, RunContext, SGDTrainer, checkpointable, register_algorithm


@checkpointable
@dataclass
class Group:
    expected: float  # E_g
    latest: float  # L_g
    members: set[int] = field(default_factory=set)  # assigned, not yet arrived
    arrived: list[Arrival] = field(default_factory=list)
    closed: bool = False


def assign(t: float, speed: float, groups: dict[int, Group], speeds: np.ndarray, q_min: int, q_max: int, lam: float) -> tuple[int | None, int, float, float]:
    """Step 6 of the scheduler: (group to join or None for a new one, Q, E, L) for a client with
    `speed` seconds per step that becomes free at time t. Pure, so it can be checked by hand."""
    open_groups = {g: grp for g, grp in groups.items() if not grp.closed}
    if not open_groups:
        q = q_max
        return None, q, t + q * speed, t + lam * q * speed
    best: tuple[int, int] | None = None
    for g, grp in open_groups.items():
        q = math.floor((grp.expected - t) / speed)
        if q_min <= q <= q_max and (best is None or q > best[1]):
            best = (g, q)
    if best is not None:
        g, q = best
        return g, q, open_groups[g].expected, open_groups[g].latest
    candidate: int | None = None
    for grp in open_groups.values():
        if t < grp.latest and grp.members | {a.client for a in grp.arrived}:
            fastest = min(speeds[c] for c in grp.members | {a.client for a in grp.arrived})
            q = math.floor((grp.latest + fastest * q_max - t) / speed)
            if q <= q_max and (candidate is None or q > candidate):
                candidate = q
    q = q_max if candidate is None else max(candidate, q_min)
    return None, q, t + q * speed, t + lam * q * speed


class FedCompassConfig(AsyncConfig):
    q_max: int = Field(100, ge=1)
    q_min: int = Field(20, ge=1)
    speed_momentum: float = Field(0.9, gt=0, le=1)  # beta: the weight of the newest observation
    latest_time_factor: float = Field(1.5, gt=1)  # lambda
    alpha: float = Field(0.9, gt=0)

    @model_validator(mode="after")
    def _range(self) -> "FedCompassConfig":
        if self.q_min > self.q_max:
            raise ValueError("q_min must not exceed q_max")
        return self


class FedCompass(AsyncServer):
    STATE = AsyncServer.STATE + ("speed", "q", "began", "group_of", "groups", "general", "_next_group")

    def __init__(self, cfg: FedCompassConfig, ctx: RunContext):
        trainer = SGDTrainer.from_config(cfg)
        super().__init__(ctx, cfg, trainer, default_round_seconds=float(np.median(cfg.q_max * ctx.system.step_time)))
        n = ctx.data.num_clients
        self.speed = np.full(n, np.nan)  # v_i, seconds per step as observed by the server
        self.q = np.full(n, cfg.q_max)
        self.began = np.zeros(n)  # b_i
        self.group_of = np.full(n, -1)  # g(i), -1 before a client's first arrival
        self.groups: dict[int, Group] = {}
        self.general: list[Arrival] = []
        self._next_group = 0
        self.group_sizes: list[int] = []
        # A rule that needs several updates (Krum's 2f + 3) cannot merge one arrival or a small
        # group: updates then wait in the general buffer until a group aggregation holds enough.
        # Any scenario rule sees first arrivals with the next group rather than alone: a lone
        # update is its own median, so an attacker's first one would pass any robust rule.
        need = getattr(self.rule, "min_clients", 1)
        self.min_merge = need if isinstance(need, int) else 1
        self.first_alone = ctx.spec.scenario.aggregator is None
        if self.min_merge > n:
            raise ScenarioError(f"the aggregator needs at least {self.min_merge} updates per merge, more than the "
                                f"{n} clients", key="aggregator")

    def start(self) -> None:
        for client in range(self.ctx.data.num_clients):
            self._send(client, 0.0, self.cfg.q_max)

    def _send(self, client: int, now: float, q: int) -> bool:
        self.q[client] = q
        self.began[client] = now
        return self.dispatch(client, now, q) is not None

    def on_rejoin(self, client: int, now: float) -> None:
        """Back after a failure: leave the group it never reached, then schedule as usual."""
        g = int(self.group_of[client])
        if g in self.groups:
            self.groups[g].members.discard(client)
            self._drop_if_empty(g)
        if np.isnan(self.speed[client]):  # never arrived: no speed estimate yet
            self._send(client, now, self.cfg.q_max)
        else:
            self._schedule(client, now)

    def on_arrival(self, arrival: Arrival, now: float) -> None:
        i = arrival.client
        observed = (now - self.began[i]) / self.q[i]
        beta = self.cfg.speed_momentum
        self.speed[i] = observed if np.isnan(self.speed[i]) else (1 - beta) * self.speed[i] + beta * observed
        g = int(self.group_of[i])
        if g < 0 and not self.first_alone:  # first arrival under a scenario rule: wait, then join a group
            self.general.append(arrival)
            self._schedule(i, now)
            return
        if g < 0:  # first arrival: apply at once, then join a group
            tau = self.version - arrival.version  # ts_i: the version the client trained from
            self.merge([arrival.delta], np.array([self.cfg.alpha * self.weight(tau) * self.p[i]]), [i], [int(tau)])
            self.applied_staleness.append(int(tau))
            self._schedule(i, now)
            return
        group = self.groups[g]
        group.members.discard(i)
        if now <= group.latest and not group.closed:
            group.arrived.append(arrival)
            if not group.members:
                self._aggregate(g, now)
        else:  # late: buffered for the next group aggregation, the client goes on at once
            self.general.append(arrival)
            self._drop_if_empty(g)
            self._schedule(i, now)

    def on_timer(self, g: int, now: float) -> None:
        if g in self.groups and not self.groups[g].closed:
            self._aggregate(g, now)

    def _aggregate(self, g: int, now: float) -> None:
        group = self.groups[g]
        group.closed = True
        updates = group.arrived + self.general
        if not self.first_alone:  # a scenario rule counts senders: each client's latest update only
            updates = list({a.client: a for a in sorted(updates, key=lambda a: a.version)}.values())
        if 0 < len(updates) < self.min_merge:  # too few for the rule: they wait for the next group
            self.general = updates
            updates = []
        elif updates:  # a deadline that finds nobody arrived and nothing buffered changes nothing
            # staleness counts from the version each update was trained from, late ones included
            taus = np.array([self.version - a.version for a in updates])
            coefficients = self.cfg.alpha * self.weight(taus) * self.p[[a.client for a in updates]]
            self.merge(self.deltas(updates), coefficients, [a.client for a in updates], [int(t) for t in taus])
            self.applied_staleness += [int(t) for t in taus]
            self.group_sizes.append(len(group.arrived))
            self.general = []
        members = sorted((a.client for a in group.arrived), key=lambda c: (self.speed[c], c))
        self._drop_if_empty(g)
        for c in members:  # fastest first, as the scheduler re-assigns them
            self._schedule(c, now)

    def _drop_if_empty(self, g: int) -> None:
        group = self.groups[g]
        if group.closed and not group.members:
            del self.groups[g]

    def _schedule(self, client: int, now: float) -> None:
        g, q, expected, latest = assign(
            now, float(self.speed[client]), self.groups, self.speed, self.cfg.q_min, self.cfg.q_max, self.cfg.latest_time_factor
        )
        if not self._send(client, now, q):
            return  # down: rejoins later
        if g is None:
            g = self._next_group
            self._next_group += 1
            self.groups[g] = Group(expected, latest)
            self.loop.at(latest, "deadline", g)
        self.groups[g].members.add(client)
        self.group_of[client] = g

    def round_metrics(self) -> dict[str, float]:
        open_groups = sum(1 for grp in self.groups.values() if not grp.closed)
        sizes, self.group_sizes = self.group_sizes, []
        return {"groups": float(open_groups), "mean_group_size": float(np.mean(sizes)) if sizes else float("nan")}


@register_algorithm("fedcompass")
def fedcompass(cfg: FedCompassConfig, ctx: RunContext) -> FedCompass:
    return FedCompass(cfg, ctx)
