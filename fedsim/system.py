"""Simulated devices and links: how long a client's job takes in simulated seconds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenario import Distribution, SystemConfig
from .seeding import generator


def draw(dist: Distribution, n: int, rng: np.random.Generator) -> np.ndarray:
    """n positive draws whose mean is `dist.mean` (uniform: between low and high)."""
    if dist.dist == "fixed":
        return np.full(n, dist.mean)
    if dist.dist == "uniform":
        return rng.uniform(dist.low, dist.high, n)
    if dist.dist == "normal":
        return np.maximum(rng.normal(dist.mean, dist.sigma, n), 0.05 * dist.mean)
    if dist.dist == "lognormal":
        return dist.mean * np.exp(rng.normal(-0.5 * dist.sigma**2, dist.sigma, n))
    return rng.exponential(dist.mean, n)


@dataclass(frozen=True)
class SystemModel:
    step_time: np.ndarray  # simulated seconds per local step, per client
    bandwidth: np.ndarray  # bytes per second, per client
    latency: np.ndarray  # seconds per message, per client

    @classmethod
    def from_config(cls, cfg: SystemConfig, num_clients: int, seed: int) -> "SystemModel":
        step_time = draw(cfg.compute, num_clients, generator(seed, "system.compute"))
        bandwidth = np.full(num_clients, cfg.link.bandwidth_mbps * 1e6 / 8)
        latency = np.full(num_clients, cfg.link.latency_ms / 1e3)
        return cls(step_time, bandwidth, latency)

    def transfer_time(self, client: int, nbytes: int) -> float:
        return float(self.latency[client] + nbytes / self.bandwidth[client])

    def job_time(self, client: int, steps: int, down_bytes: int, up_bytes: int) -> float:
        """Download, train `steps` local steps, upload."""
        return (
            self.transfer_time(client, down_bytes)
            + float(steps * self.step_time[client])
            + self.transfer_time(client, up_bytes)
        )
