"""Byzantine clients: who they are and what they send, as pure functions over one round's updates.

The engine calls these where client results enter it: `choose_attackers` once per run (from the
generator `generator(seed, "adversary")`, so the same seed marks the same clients on any executor),
`flip_labels` on an attacker's training labels (a data-side attack), and `corrupt` on the stacked
updates of a round, which replaces the attackers' rows. ALIE and IPM are computed from the
updates of the round's honest clients, as their papers' omniscient attackers do; pass the
attackers' own mask as `honest` for the non-omniscient variant (attackers that only know their own
honest computations).

Updates follow the engine's convention for relative batches, Delta = w_start - w_end (a descent
direction, like a gradient). `corrupt` takes either kind of row: given `reference` (the model the
clients started from) the rows are models, attacked as Delta_i = reference - x_i and returned as
reference - Delta'_i; with `reference=None` they are already updates. Sign flip, scaling, IPM and
Gaussian noise read the same in either sign; ALIE's mu - z sigma is written for descent
directions, as the paper's gradients are.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Literal, Mapping

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from .params import Params
from .scenario import Section

Behaviour = Literal["label_flip", "sign_flip", "gaussian", "scale", "alie", "ipm"]


class AdversaryConfig(Section):
    """The `[adversary]` table: what fraction of clients attack, and how.

    - `label_flip`: attackers train on labels y -> C - 1 - y (Biggio et al. 2012; Fang et al. 2020);
    - `sign_flip`: attackers send the negation of their honest update (Damaskinos et al. 2018,
      "sign flipping"; scale it further with `behaviour = "scale"` and a negative `scale`);
    - `gaussian`: attackers send N(0, noise_std^2) in every coordinate instead of their update
      (Blanchard et al. 2017, Sec. 5, "Gaussian Byzantine workers");
    - `scale`: attackers send `scale` times their update (boosting, Bagdasaryan et al. 2020);
    - `alie`: every attacker sends mu - z * sigma, the coordinate-wise mean and standard deviation
      (population, 1/n) of the honest updates (Baruch, Baruch, Goldberg, NeurIPS 2019, Sec. 3); `z` defaults to
      their z_max from the round's n and f (`alie_z`);
    - `ipm`: every attacker sends -epsilon times the mean honest update (Xie, Koyejo, Gupta, UAI
      2019, "Fall of Empires", Sec. 4: small epsilon defeats median and Krum, large ones the mean).
    """

    fraction: float = Field(0.0, ge=0.0, lt=1.0)
    behaviour: Behaviour = "sign_flip"
    scale: float = 10.0
    noise_std: float = Field(1.0, gt=0.0)
    z: float | None = None
    epsilon: float = Field(0.1, gt=0.0)


def choose_attackers(num_clients: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """round(fraction * num_clients) distinct client ids, sorted, drawn uniformly from `rng` (pass
    `fedsim.seeding.generator(seed, "adversary")`): the attackers for the whole run."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"adversary fraction must lie in [0, 1), got {fraction!r}")
    count = int(round(fraction * num_clients))
    return np.sort(rng.choice(num_clients, size=count, replace=False)).astype(np.int64)


def attacker_mask(client_ids: Tensor, attackers: np.ndarray) -> Tensor:
    """Which rows of a batch (by `batch.client_ids`) belong to attackers."""
    return torch.from_numpy(np.isin(client_ids.numpy(), attackers))


def flip_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Label flipping, y -> C - 1 - y: the data an attacker trains on when behaviour = "label_flip"."""
    return (num_classes - 1) - labels


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019, Sec. 3 (Algorithm 3, lines 1-2): with s = floor(n/2 + 1) - f workers the
    attackers need to sway, z_max = Phi^-1((n - s) / n), the largest shift that still looks like a
    plausible honest value to more than half of the workers. 0 where the ratio leaves (0, 1)."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    return NormalDist().inv_cdf(p) if 0.0 < p < 1.0 else 0.0


def corrupt(
    updates: Mapping[str, Tensor],
    attackers: Tensor,
    honest: Tensor,
    reference: Mapping[str, Tensor] | None,
    cfg: AdversaryConfig,
    rng: np.random.Generator,
) -> Params:
    """The round's stacked updates with the attackers' rows replaced by what they send.

    `attackers` and `honest` are boolean masks over dim 0; rows in neither are left alone. Honest
    rows come back unchanged; the input is never modified. `rng` draws the Gaussian attack's noise
    (pass a generator derived from the round). Integer tensors are not attacked.
    """
    attackers = torch.as_tensor(attackers, dtype=torch.bool)
    honest = torch.as_tensor(honest, dtype=torch.bool)
    out = {name: t.clone() for name, t in updates.items()}
    num_bad = int(attackers.sum())
    if num_bad == 0 or cfg.behaviour == "label_flip":  # label flipping acted on the data already
        return out
    source = honest if bool(honest.any()) else attackers  # no honest row: their own computations
    z = cfg.z if cfg.z is not None else alie_z(int(attackers.numel()), num_bad)
    noise = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
    for name, t in updates.items():
        if not t.is_floating_point():
            continue
        ref = reference[name] if reference is not None else None
        delta = ref - t if ref is not None else t
        if cfg.behaviour == "sign_flip":
            bad = -delta[attackers]
        elif cfg.behaviour == "scale":
            bad = cfg.scale * delta[attackers]
        elif cfg.behaviour == "gaussian":
            bad = cfg.noise_std * torch.randn(delta[attackers].shape, generator=noise, dtype=t.dtype)
        elif cfg.behaviour == "alie":
            sample = delta[source]
            mu = sample.mean(0)
            sigma = sample.std(0, correction=0)
            bad = (mu - z * sigma).expand(num_bad, *t.shape[1:])
        elif cfg.behaviour == "ipm":
            bad = (-cfg.epsilon * delta[source].mean(0)).expand(num_bad, *t.shape[1:])
        else:  # pragma: no cover - the config's Literal rules this out
            raise ValueError(f"unknown adversary behaviour {cfg.behaviour!r}")
        out[name][attackers] = ref - bad if ref is not None else bad
    return out
