"""Crashes, graceful leaves, late joins, on/off churn and lost messages, drawn from the seed.

Every method asks the same questions (is node i up at time t / in round r?) through the network
(`fedsim.network.Network`, which also draws message loss from `message_loss`), so a scenario's `[system.failures]` applies to all of them. Which nodes fail, their
on/off periods and every message loss derive from (seed, purpose, ids), never from the order in
which a method happens to ask.
"""

from __future__ import annotations

import bisect

import numpy as np

from .scenario import FailuresConfig
from .seeding import generator


def _chosen(n: int, fraction: float, seed: int, purpose: str) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    k = int(round(fraction * n))
    if k:
        mask[generator(seed, purpose).permutation(n)[:k]] = True
    return mask


class FailureModel:
    def __init__(self, cfg: FailuresConfig, num_nodes: int, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.n = num_nodes
        self.crashes = _chosen(num_nodes, cfg.crash_fraction, seed, "failures.crash")
        self.leaves = _chosen(num_nodes, cfg.leave_fraction, seed, "failures.leave")
        self.joins = _chosen(num_nodes, cfg.join_fraction, seed, "failures.join")
        self.churns = _chosen(num_nodes, cfg.churn_fraction, seed, "failures.churn")
        self._toggles: dict[int, list[float]] = {}

    @property
    def active(self) -> bool:
        c = self.cfg
        return bool(self.crashes.any() or self.leaves.any() or self.joins.any() or self.churns.any() or c.message_loss > 0)

    @staticmethod
    def _reached(at: float | None, at_round: int | None, t: float, round: int | None) -> bool:
        return (at is not None and t >= at) or (at_round is not None and round is not None and round >= at_round)

    def alive(self, node: int, t: float, round: int | None = None) -> bool:
        c = self.cfg
        if self.crashes[node] and self._reached(c.crash_at, c.crash_round, t, round):
            return False
        if self.leaves[node] and self._reached(c.leave_at, c.leave_round, t, round):
            return False
        if self.joins[node] and not self._reached(c.join_at, c.join_round, t, round):
            return False
        return not self.churns[node] or self._churn_up(node, t)

    def alive_mask(self, t: float, round: int | None = None) -> np.ndarray:
        if not self.active:
            return np.ones(self.n, dtype=bool)
        return np.array([self.alive(i, t, round) for i in range(self.n)])

    def left(self, node: int, t: float, round: int | None = None) -> bool:
        """Left gracefully (and said so), as opposed to crashed."""
        return bool(self.leaves[node]) and self._reached(self.cfg.leave_at, self.cfg.leave_round, t, round)

    def _churn_up(self, node: int, t: float) -> bool:
        """Churning nodes start up and flip at exponential intervals (mean_up, then mean_down, ...),
        each interval drawn from (seed, node, k) and generated only as far as asked."""
        toggles = self._toggles.setdefault(node, [])
        while not toggles or toggles[-1] <= t:
            k = len(toggles)
            mean = self.cfg.mean_up if k % 2 == 0 else self.cfg.mean_down
            draw = generator(self.seed, "failures.churn.period", node, k).exponential(mean)
            toggles.append((toggles[-1] if toggles else 0.0) + max(draw, 1e-9))
        return bisect.bisect_right(toggles, t) % 2 == 0

    def summary(self) -> dict[str, float]:
        return {
            "crashed_nodes": int(self.crashes.sum()),
            "leaving_nodes": int(self.leaves.sum()),
            "joining_nodes": int(self.joins.sum()),
            "churning_nodes": int(self.churns.sum()),
        }

