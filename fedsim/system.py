"""Simulated devices and links: how long a client's job takes in simulated seconds.

Every client gets a compute speed (seconds per local step), a bandwidth and a latency, drawn once
from the run's seed (or read from a per-client CSV trace). An optional jitter makes each job a
little slower or faster, drawn from (seed, client, job) so it never depends on execution order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import limits
from .errors import DataError
from .scenario import Distribution, SystemConfig
from .seeding import generator


def draw(dist: Distribution | float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n positive draws whose mean is `dist.mean` (uniform: between low and high)."""
    if not isinstance(dist, Distribution):
        return np.full(n, float(dist))
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
    jitter: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: SystemConfig, num_clients: int, seed: int) -> "SystemModel":
        step_time = draw(cfg.compute, num_clients, generator(seed, "system.compute"))
        bandwidth_mbps = draw(cfg.link.bandwidth_mbps, num_clients, generator(seed, "system.bandwidth"))
        latency_ms = draw(cfg.link.latency_ms, num_clients, generator(seed, "system.latency"))
        if cfg.trace is not None:
            step_time, bandwidth_mbps, latency_ms = read_trace(cfg.trace, num_clients, step_time, bandwidth_mbps, latency_ms)
        return cls(step_time, bandwidth_mbps * 1e6 / 8, latency_ms / 1e3, cfg.compute_jitter, seed)

    def transfer_time(self, client: int, nbytes: int) -> float:
        return float(self.latency[client] + nbytes / self.bandwidth[client])

    def compute_time(self, client: int, steps: int, job: int = 0) -> float:
        """Seconds for `steps` local steps of the client's `job`-th job (jitter drawn per job)."""
        seconds = steps * float(self.step_time[client])
        if self.jitter > 0:
            seconds *= float(np.exp(generator(self.seed, "system.jitter", client, job).normal(-0.5 * self.jitter**2, self.jitter)))
        return seconds

    def job_time(self, client: int, steps: int, down_bytes: int, up_bytes: int, job: int = 0) -> float:
        """Download, train `steps` local steps, upload."""
        return (
            self.transfer_time(client, down_bytes)
            + self.compute_time(client, steps, job)
            + self.transfer_time(client, up_bytes)
        )


def read_trace(
    path: str, n: int, step_time: np.ndarray, bandwidth: np.ndarray, latency: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-client values from a CSV with a `client` column; clients it does not list keep their draws."""
    where = Path(path)
    try:
        if where.is_dir():
            raise DataError("is a folder; expected a CSV trace file", file=path, key="system.trace")
        limits.check_file_size(where, "trace")
        with where.open(encoding="utf-8", newline="") as handle:
            text = "".join(line for _, line in limits.lines(handle, where))
        table = pd.read_csv(io.StringIO(text))
    except FileNotFoundError:
        raise DataError("trace file not found", file=path, key="system.trace") from None
    except DataError as exc:
        raise exc.located(key="system.trace") from None
    except OSError as exc:
        raise DataError(f"cannot read the trace: {exc.strerror or exc}", file=path, key="system.trace") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"not a CSV trace ({exc.__class__.__name__})", file=path, key="system.trace") from None
    if "client" not in table or "step_time" not in table:
        raise DataError("expected columns client, step_time[, bandwidth_mbps, latency_ms]", file=path, key="system.trace")
    clients = table["client"].to_numpy()
    if not np.issubdtype(clients.dtype, np.integer) or clients.min() < 0 or clients.max() >= n:
        raise DataError(f"client ids must be integers in [0, {n})", file=path, key="system.trace")
    out = [step_time.copy(), bandwidth.copy(), latency.copy()]
    for array, column in zip(out, ["step_time", "bandwidth_mbps", "latency_ms"]):
        if column in table:
            values = pd.to_numeric(table[column], errors="coerce").to_numpy(float)
            if not np.all(np.isfinite(values) & (values > 0)):
                raise DataError(f"column {column} must hold positive numbers", file=path, key="system.trace")
            array[clients] = values
    return out[0], out[1], out[2]
