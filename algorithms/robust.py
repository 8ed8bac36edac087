"""Byzantine-robust aggregation rules: coordinate-wise median and trimmed mean, Krum and multi-Krum,
Bulyan, the geometric median (RFA), centered clipping and norm bounding.

Every rule follows the contract of `fedsim.Aggregator`: `rule(global_params, batch, *, round)`, with
`batch.params[name]` stacked as (num_clients, *shape).

What the stacked tensors are. A batch holds client models (`batch.relative` false: server rounds,
graph neighbourhoods, gossip and MoDeST merges) or client updates w_start - w_end (`relative`:
FedAsync, FedBuff, FedCompass). Median, trimmed mean, Krum, Bulyan and the geometric median are
translation-equivariant, rule(x + c) = rule(x) + c, so they need no centre and ignore
`global_params`. Centered clipping and norm bounding clip a *difference*, taken to
`batch.center(global_params)`: the global model for models (in a graph merge, the merging node's
own model, which makes them the clipped gossip of He, Karimireddy and Jaggi 2022), zero for updates.

Step sizes. On updates, the merge point's coefficients carry the method's step (FedBuff's server
learning rate, the staleness discount) and need not sum to one; the default weighted sum returns
sum_i w_i Delta_i. A robust rule returns (sum_i w_i) times its robust estimate of the updates, so
the method's step survives the change of rule. On models the estimate is returned as it is.

Attackers: `f` is the number of Byzantine clients a rule tolerates in one aggregation. A cohort too
small for the rule's `f` is an error naming both numbers (`min_clients` says how many a rule needs),
never a silent fallback to the mean.

Weights: median, trimmed mean, Krum, Bulyan and centered clipping treat clients alike, as in their
papers (a Byzantine client could inflate its example count); RFA and norm bounding weight by
example counts, as their papers do. Integer tensors (counters such as BatchNorm's
num_batches_tracked) take the lower coordinate-wise median, which keeps their dtype and does not
depend on client order.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from fedsim import Aggregator, Params, ScenarioError, UpdateBatch, register_aggregator

NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


# ----------------------------------------------------------------------------------------------
# Shared pieces


def _lower_median(t: Tensor) -> Tensor:
    return t.median(dim=0).values


def _median(t: Tensor) -> Tensor:
    """The usual median (mean of the two middle values when n is even); torch's `median` returns
    the lower one, which would bias every coordinate towards smaller values."""
    n = t.shape[0]
    s = t.sort(dim=0).values
    if n % 2:
        return s[n // 2].clone()
    return (s[n // 2 - 1] + s[n // 2]) / 2


def _combine(stacked: Params, weights: Tensor) -> Params:
    """sum_i w_i x_i per floating tensor; integer tensors take the lower median."""
    out = {}
    for name, t in stacked.items():
        if not t.is_floating_point():
            out[name] = _lower_median(t)
            continue
        w = weights.to(t.dtype).reshape(-1, *([1] * (t.dim() - 1)))
        out[name] = (w * t).sum(0)
    return out


def _select(stacked: Params, rows: Tensor) -> Params:
    return {name: t[rows] for name, t in stacked.items()}


def _mean(stacked: Params) -> Params:
    n = next(iter(stacked.values())).shape[0]
    return _combine(stacked, torch.full((n,), 1.0 / n, dtype=torch.float64))


def _sq_norms(diffs: Params) -> Tensor:
    """Squared Euclidean norm of each client's difference over all floating tensors jointly."""
    n = next(iter(diffs.values())).shape[0]
    total = torch.zeros(n, dtype=torch.float64)
    for t in diffs.values():
        if t.is_floating_point():
            total += t.reshape(n, -1).to(torch.float64).pow(2).sum(1)
    return total


def _differences(stacked: Params, center: Params) -> Params:
    return {name: t - center[name] for name, t in stacked.items() if t.is_floating_point()}


def _pairwise_sq_distances(stacked: Params) -> Tensor:
    """||x_i - x_j||^2 over all floating tensors, (n, n) in float64.

    Each tensor is centred on the cohort mean before the Gram product: distances do not change,
    and models (large norms, small differences) no longer lose their differences to cancellation.
    """
    n = next(iter(stacked.values())).shape[0]
    dist = torch.zeros(n, n, dtype=torch.float64)
    for t in stacked.values():
        if not t.is_floating_point():
            continue
        x = t.reshape(n, -1).to(torch.float64)
        x = x - x.mean(0)
        sq = x.pow(2).sum(1)
        dist += sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    dist.clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    return dist


def _ranked(scores: Tensor, client_ids: Tensor) -> Tensor:
    """Rows by increasing score, exact ties broken by client id, so the choice never depends on the
    order in which clients arrived."""
    by_id = torch.argsort(client_ids, stable=True)
    return by_id[torch.argsort(scores[by_id], stable=True)]


def _krum_scores(dist: Tensor, neighbours: int) -> Tensor:
    """Blanchard et al. 2017, Sec. 4: s(i) = sum of the squared distances to the `neighbours`
    closest other vectors."""
    off = dist + torch.diag(torch.full((dist.shape[0],), float("inf"), dtype=dist.dtype))
    return off.sort(dim=1).values[:, :neighbours].sum(1)


def _as_step(batch: UpdateBatch, estimate: Params) -> Params:
    """On updates, scale a location estimate by the merge point's total weight (see the module
    docstring); models come back as they are."""
    if not batch.relative:
        return estimate
    total = float(batch.weights().sum())
    return {name: t * total if t.is_floating_point() else t for name, t in estimate.items()}


def _need(rule: str, have: int, need: int, why: str) -> None:
    if have < need:
        raise ValueError(f"{rule}: {why} needs at least {need} updates per aggregation, got {have}")


def _check_positive(rule: str, key: str, value: float) -> None:
    if not value > 0:
        raise ScenarioError(f"{rule}: {key} must be > 0, got {value!r}")


def _check_f(rule: str, f: int) -> None:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ScenarioError(f"{rule}: f (tolerated attackers) must be an integer >= 0, got {f!r}")


# ----------------------------------------------------------------------------------------------
# Coordinate-wise rules


@register_aggregator("median")
class CoordinateMedian(Aggregator):
    """Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, ICML 2018, Definition 1, "median-
    based gradient descent"). Breakdown point one half: fewer than n/2 corrupted clients cannot move
    any coordinate outside the range of the honest values. Needs no `f`."""

    min_clients = 1

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        return _as_step(batch, {name: _median(t) if t.is_floating_point() else _lower_median(t)
                                for name, t in batch.params.items()})


@register_aggregator("trimmed_mean")
class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018, Definition 2): in every coordinate drop
    the b largest and b smallest values and average the rest.

    b is `f` when given (the number of attackers tolerated, needs n >= 2f + 1), otherwise
    floor(trim * n) (the paper's beta fraction; default 0.1), which adapts to cohorts whose size
    varies (FedBuff buffers, gossip neighbourhoods)."""

    def __init__(self, f: NonNegativeInt | None = None, trim: Annotated[float, Field(ge=0, lt=0.5)] | None = None):
        if f is not None and trim is not None:
            raise ScenarioError(f"trimmed_mean: set f or trim, not both (got f={f}, trim={trim})")
        if f is not None:
            _check_f("trimmed_mean", f)
        if trim is not None and not 0 <= trim < 0.5:
            raise ScenarioError(f"trimmed_mean: trim must lie in [0, 0.5), got {trim!r}")
        self.f = f
        self.trim = trim

    @property
    def min_clients(self) -> int:
        return 2 * self.f + 1 if self.f is not None else 1

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        n = len(batch)
        if self.f is not None:
            _need("trimmed_mean", n, self.min_clients, f"f={self.f}")
            b = self.f
        else:
            b = int((0.1 if self.trim is None else self.trim) * n)
        out = {}
        for name, t in batch.params.items():
            if not t.is_floating_point():
                out[name] = _lower_median(t)
                continue
            out[name] = t.sort(dim=0).values[b : n - b].mean(dim=0)
        return _as_step(batch, out)


# ----------------------------------------------------------------------------------------------
# Krum, multi-Krum, Bulyan


@register_aggregator("krum")
class Krum(Aggregator):
    """Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017, Sec. 4): score each update by
    the sum of squared distances to its n - f - 2 nearest neighbours and keep the lowest-scoring
    one; with `m` > 1, multi-Krum averages the m best (same section, "Multi-Krum"). Needs
    n >= 2f + 3. Exact score ties go to the smaller client id."""

    rule_name = "krum"

    def __init__(self, f: NonNegativeInt = 1, m: PositiveInt = 1):
        _check_f(self.rule_name, f)
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ScenarioError(f"{self.rule_name}: m must be an integer >= 1, got {m!r}")
        self.f = f
        self.m = m

    @property
    def min_clients(self) -> int:
        return max(2 * self.f + 3, self.m)

    def _selected(self, batch: UpdateBatch, m: int) -> Tensor:
        n = len(batch)
        _need(self.rule_name, n, max(2 * self.f + 3, m), f"f={self.f}, m={m}")
        scores = _krum_scores(_pairwise_sq_distances(batch.params), n - self.f - 2)
        return _ranked(scores, batch.client_ids)[:m]

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        return _as_step(batch, _mean(_select(batch.params, self._selected(batch, self.m))))


@register_aggregator("multi_krum")
class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al. 2017, Sec. 4): the mean of the m updates with the best Krum
    scores; m defaults to n - f (El Mhamdi et al. 2018's choice), so only the f most isolated
    updates are discarded."""

    rule_name = "multi_krum"

    def __init__(self, f: NonNegativeInt = 1, m: PositiveInt | None = None):
        super().__init__(f=f, m=1 if m is None else m)
        self.m = m

    @property
    def min_clients(self) -> int:
        return max(2 * self.f + 3, self.m or 0)

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        m = len(batch) - self.f if self.m is None else self.m
        return _as_step(batch, _mean(_select(batch.params, self._selected(batch, m))))


@register_aggregator("bulyan")
class Bulyan(Aggregator):
    """Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018, Sec. 4, Algorithm 1) over Krum.

    1. Select theta = n - 2f updates by applying Krum repeatedly to the ones not yet selected
       (scores over the remaining set; when it holds fewer than f + 3 updates a score sums the
       single nearest neighbour, as Flower and most implementations do).
    2. In every coordinate, average the beta = theta - 2f selected values closest to their median.

    Needs n >= 4f + 3."""

    def __init__(self, f: NonNegativeInt = 1):
        _check_f("bulyan", f)
        self.f = f

    @property
    def min_clients(self) -> int:
        return 4 * self.f + 3

    def selection(self, batch: UpdateBatch) -> list[int]:
        """Step 1: the rows Krum picks, in the order it picks them."""
        n, f = len(batch), self.f
        _need("bulyan", n, self.min_clients, f"f={f}")
        dist = _pairwise_sq_distances(batch.params)
        remaining = torch.arange(n)
        chosen = []
        for _ in range(n - 2 * f):
            sub = dist[remaining][:, remaining]
            scores = _krum_scores(sub, max(len(remaining) - f - 2, 1))
            best = int(_ranked(scores, batch.client_ids[remaining])[0])
            chosen.append(int(remaining[best]))
            remaining = torch.cat([remaining[:best], remaining[best + 1 :]])
        return chosen

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        chosen = self.selection(batch)
        beta = len(chosen) - 2 * self.f
        selected = _select(batch.params, torch.tensor(sorted(chosen)))
        out = {}
        for name, t in selected.items():
            if not t.is_floating_point():
                out[name] = _lower_median(t)
                continue
            closest = (t - _median(t)).abs().topk(beta, dim=0, largest=False).indices
            out[name] = t.gather(0, closest).mean(dim=0)
        return _as_step(batch, out)


# ----------------------------------------------------------------------------------------------
# Geometric median


@register_aggregator("geometric_median")
class GeometricMedian(Aggregator):
    """Robust federated aggregation, RFA (Pillutla, Kakade, Harchaoui, IEEE TSP 2022, Algorithm 3,
    the smoothed Weiszfeld algorithm): the example-weighted geometric median

        argmin_v sum_i alpha_i max(nu, ||v - x_i||),

    iterating v <- sum_i beta_i x_i / sum_i beta_i with beta_i = alpha_i / max(nu, ||v - x_i||) from
    the weighted mean, for at most `max_iter` steps. It stops once a step moves v by less than
    `ftol` times the weighted median of the distances ||v - x_i||: a scale set by the majority, where
    the paper's relative change of the objective is dominated by far-away attackers and would stop
    while v is still being dragged towards them. Breakdown point one half; needs no `f`."""

    min_clients = 1

    def __init__(self, max_iter: PositiveInt = 100, nu: PositiveFloat = 1e-6, ftol: PositiveFloat = 1e-6):
        _check_positive("geometric_median", "max_iter", max_iter)
        _check_positive("geometric_median", "nu", nu)
        _check_positive("geometric_median", "ftol", ftol)
        self.max_iter = max_iter
        self.nu = nu
        self.ftol = ftol

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        alpha = batch.weights() / batch.weights().sum()
        v = _combine(batch.params, alpha)
        for _ in range(self.max_iter):
            dist = _sq_norms(_differences(batch.params, v)).sqrt()
            beta = alpha / dist.clamp(min=self.nu)
            new = _combine(batch.params, beta / beta.sum())
            moved = float(_sq_norms({k: (new[k] - v[k])[None] for k in v if v[k].is_floating_point()}).sqrt())
            v = new
            if moved <= self.ftol * max(self.nu, _weighted_median(dist, alpha)):
                break
        return _as_step(batch, v)


def _weighted_median(values: Tensor, weights: Tensor) -> float:
    order = torch.argsort(values)
    cumulative = torch.cumsum(weights[order], 0)
    return float(values[order][int(torch.searchsorted(cumulative, cumulative[-1] / 2))])


# ----------------------------------------------------------------------------------------------
# Clipping rules


def _center(global_params: Params, batch: UpdateBatch) -> Params:
    center = batch.center(global_params)
    return {name: center[name] for name, t in batch.params.items() if t.is_floating_point()}


@register_aggregator("centered_clipping")
class CenteredClipping(Aggregator):
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021, Sec. 4, eq. (CC)): starting from
    v_0 = `batch.center(global_params)` (the global model, or the merging node's own model, for
    models; zero for updates), repeat `iterations` times

        v <- v + (1/n) sum_i (x_i - v) min(1, tau / ||x_i - v||),

    so no client moves the aggregate by more than tau / n per iteration. The paper centres on the
    previous round's aggregate momentum; fedsim's rules are stateless, and the model the clients
    started from is that point for models. Needs no `f`; `tau` bounds each client's pull."""

    min_clients = 1

    def __init__(self, tau: PositiveFloat = 10.0, iterations: PositiveInt = 1):
        _check_positive("centered_clipping", "tau", tau)
        _check_positive("centered_clipping", "iterations", iterations)
        self.tau = tau
        self.iterations = iterations

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        v = _center(global_params, batch)
        n = len(batch)
        for _ in range(self.iterations):
            diffs = _differences(batch.params, v)
            norms = _sq_norms(diffs).sqrt()
            scale = torch.clamp(self.tau / norms, max=1.0) / n  # norm 0 gives inf, clamped to 1
            step = _combine(diffs, scale)
            v = {name: v[name] + step[name] for name in v}
        out = {name: v[name] if name in v else _lower_median(t) for name, t in batch.params.items()}
        return _as_step(batch, out)


@register_aggregator("norm_bounding")
class NormBounding(Aggregator):
    """Norm bounding (Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?",
    2019, Sec. 4, "norm thresholding of updates"): every client's difference Delta_i to
    c = `batch.center(global_params)` is scaled to norm at most `max_norm`, then combined with the
    batch's weights (example counts in server rounds, the method's coefficients on updates):

        c + sum_i w_i Delta_i / max(1, ||Delta_i|| / max_norm).

    Needs no `f`; it bounds what any one client can do rather than identifying attackers."""

    min_clients = 1

    def __init__(self, max_norm: PositiveFloat = 10.0):
        _check_positive("norm_bounding", "max_norm", max_norm)
        self.max_norm = max_norm

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        ref = _center(global_params, batch)
        diffs = _differences(batch.params, ref)
        norms = _sq_norms(diffs).sqrt()
        scale = torch.clamp(self.max_norm / norms, max=1.0) * batch.weights()
        step = _combine(diffs, scale)
        return {name: ref[name] + step[name] if name in ref else _lower_median(t) for name, t in batch.params.items()}
