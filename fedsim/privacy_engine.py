"""Where a scenario's `[privacy]` table meets the run: DP-FedAvg's sampling and noisy merge in
server rounds, the per-client step counts behind local DP-SGD's accountant, and the epsilon both
report per evaluation.

The mechanisms themselves are the pure functions of `fedsim.privacy`; this module only decides
when they run and keeps the state a checkpoint must hold (the accountant's composed events, the
adaptive clip norm, each client's local steps), so that a resumed run spends, and reports, the
same privacy as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .errors import ScenarioError
from .params import Params, UpdateBatch
from .privacy import (
    PrivacyAccountant,
    PrivacyConfig,
    adaptive_clip_norm,
    default_count_noise_std,
    dp_fedavg_aggregate,
    poisson_sample,
    update_noise_multiplier,
)
from .training import ClientResult, TrainJob

if TYPE_CHECKING:
    from .coordinator import RunContext


class ServerPrivacy:
    """DP-FedAvg (McMahan et al. 2018) in a server round: the cohort is drawn by Poisson sampling
    with q = clients_per_round / N (or, `sampling = "fixed"`, the flow's own fixed-size sample),
    and the round's update is the clipped, fixed-denominator, noised mean of the client updates
    (`fedsim.privacy.dp_fedavg_aggregate`); with `adaptive`, the clip norm then follows Andrew et
    al.'s (2021) noisy quantile estimate, and the update noise is raised so that both releases
    together cost the configured noise multiplier. Each round is one sampled Gaussian release for
    the accountant, cohort empty or not."""

    def __init__(self, cfg: PrivacyConfig, num_clients: int, clients_per_round: int):
        self.cfg = cfg
        self.num_clients = num_clients
        self.expected = float(clients_per_round)  # qN, the estimator's fixed denominator
        self.q = clients_per_round / num_clients
        self.count_noise_std = cfg.count_noise_std or default_count_noise_std(self.expected)
        self.update_noise = cfg.noise_multiplier
        if cfg.adaptive:
            try:
                self.update_noise = update_noise_multiplier(cfg.noise_multiplier, self.count_noise_std)
            except ValueError as exc:
                raise ScenarioError(str(exc), key="privacy.count_noise_std") from None
        self.clip_norm = cfg.clip_norm  # moves with adaptive clipping: checkpointed
        self.accountant = PrivacyAccountant(cfg.delta, sampling=cfg.sampling, population=num_clients)

    def sample(self, ctx: "RunContext", round: int) -> np.ndarray | None:
        """The round's cohort under Poisson sampling; None: the flow's own fixed-size sample."""
        if self.cfg.sampling != "poisson":
            return None
        return poisson_sample(self.num_clients, self.q, ctx.generator("privacy.sample", round))

    def merge(self, ctx: "RunContext", params: Params, batch: UpdateBatch | None, round: int) -> tuple[Params, dict[str, float]]:
        """The server's new model: params + clipped mean update + noise, and the round's figures
        (the clip norm used, the share of updates it clipped)."""
        names = [n for n, t in params.items() if t.is_floating_point() and (batch is None or n in batch.params)]
        if batch is None:  # nobody came back: the release is noise alone
            deltas = {n: torch.zeros((0, *params[n].shape), dtype=params[n].dtype) for n in names}
        else:
            deltas = {n: batch.params[n] - params[n] for n in names}
        used = self.clip_norm
        mean, norms = dp_fedavg_aggregate(deltas, clip_norm=used, noise_multiplier=self.update_noise,
                                          expected_clients=self.expected, rng=ctx.generator("privacy.noise", round))
        if self.cfg.adaptive:
            self.clip_norm = adaptive_clip_norm(
                used, norms, target_quantile=self.cfg.target_quantile, lr=self.cfg.clip_lr,
                count_noise_std=self.count_noise_std, expected_clients=self.expected,
                rng=ctx.generator("privacy.clip", round))
        self.accountant.step(self.q, self.cfg.noise_multiplier)
        new = {**params, **{n: params[n] + mean[n] for n in names}}
        clipped = float((norms > used).double().mean()) if len(norms) else 0.0
        return new, {"clip_norm": used, "clipped_fraction": clipped}

    def epsilon(self) -> float:
        return self.accountant.epsilon() if self.accountant.events else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip_norm = float(state["clip_norm"])
        self.accountant.load_state_dict(state["accountant"])


class LocalPrivacy:
    """Local DP-SGD's bookkeeping: how many private steps each client has taken. A client's
    epsilon is that of the sampled Gaussian mechanism with q = B / n_k (its batch size over its
    example count) composed over its steps, by the same RDP accountant. fedsim draws minibatches
    by shuffling, not by Poisson sampling; counting them as Poisson-sampled lots with q = B / n
    is the approximation Abadi et al. (2016) and most DP-SGD code make, stated here so that the
    figure is read as such."""

    def __init__(self, cfg: PrivacyConfig, sizes: np.ndarray, batch_size: int):
        self.cfg = cfg
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.batch_size = batch_size
        self.steps = np.zeros(len(self.sizes), dtype=np.int64)
        self._cache: dict[tuple[float, int], float] = {}

    def count(self, results: Sequence[ClientResult]) -> None:
        for r in results:
            if not r.metrics.get("failed"):
                self.steps[r.client_id] += int(r.steps)

    def client_epsilons(self) -> np.ndarray:
        """Each client's epsilon at `delta` so far (0 for clients that never trained)."""
        out = np.zeros(len(self.steps))
        for c in np.flatnonzero(self.steps):
            q = min(self.batch_size, int(self.sizes[c])) / int(self.sizes[c])
            key = (q, int(self.steps[c]))
            if key not in self._cache:
                acc = PrivacyAccountant(self.cfg.delta, sampling="poisson")
                self._cache[key] = acc.step(q, self.cfg.noise_multiplier, int(self.steps[c])).epsilon()
            out[c] = self._cache[key]
        return out

    def epsilon(self) -> float:
        """The worst client's epsilon: the guarantee every client has."""
        eps = self.client_epsilons()
        return float(eps.max(initial=0.0))

    def state_dict(self) -> dict[str, Any]:
        return {"steps": torch.from_numpy(self.steps.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"].numpy().astype(np.int64).copy()


class CountingExecutor:
    """Wraps a client executor so that every job a client trains with local DP-SGD is counted."""

    def __init__(self, inner: Any, privacy: LocalPrivacy):
        self.inner = inner
        self.privacy = privacy

    def train(self, shared: Params, jobs: Sequence[TrainJob], payload: Params | None = None) -> list[ClientResult]:
        results = self.inner.train(shared, jobs, payload)
        self.privacy.count(results)
        return results

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def finite_or_none(value: float) -> float | None:
    """JSON has no infinity: an unbounded epsilon (noise multiplier 0) is written as null."""
    return value if math.isfinite(value) else None
