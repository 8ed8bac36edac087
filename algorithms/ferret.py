"""Ferret: federated full-parameter tuning with shared randomness (Shu, Hu, Ng, Low, Yu, ICML 2025,
arXiv 2409.06277).

Clients train with T first-order steps as in FedAvg, but upload only a few numbers per block of
parameters: the update Delta = w_start - w_end is projected onto random directions that every
party regenerates from shared seeds, so the message is coordinates instead of weights. The server
aggregates the coordinates, regenerates the directions once, and applies
Delta_tilde = sum_k gamma_k v_k, an unbiased estimate of the clients' mean update.

What follows the paper (its Algorithm 1) and the official code (github
allen4747/Ferret: optimizers/ferret_optimizer.py `_group_parameters`, `project_update`, `update`;
server.py `aggregate_seed_pool`; scripts/ferret.sh):
- blocks: trainable tensors in model order, grouped consecutively until a group would exceed
  `block_ratio` (0.9) times the median tensor size (the official `_group_parameters`);
- a pool of K seeds drawn once from the run's seed (`resample_seeds = true` draws a fresh pool
  each round instead: an option, not the official behaviour);
- directions with i.i.d. entries from N(0, 1) truncated to [-1/sqrt(d_l), 1/sqrt(d_l)], drawn from
  a `torch.Generator` seeded by (pool seed, block index), so every worker and the server rebuild
  the same vectors (the official code seeds torch's global generator with the pool seed alone);
- the budget, key `budget`: "adaptive" (default, because the official `project_update` always
  uses it) gives block l n_l = max(2, floor(K ||Delta_l|| / max_l' ||Delta_l'||)) coordinates on a
  random subset of the K seeds; "full" uses all K in every block (blocks that barely moved cost
  K numbers instead of 2);
- the coordinates are the paper's unbiased ones in both cases: gamma_k = <v_k, Delta_l> / (n_l
  rho_l) with rho_l the exact second moment of an entry, so E[sum_k gamma_k v_k] = Delta_l. The
  official code uses (d_l / n_l) <v_k, Delta_l> instead, which is d_l rho_l (about 1/3) times that;
- server: Gamma = mu Gamma + sum_i p_i gamma_i (momentum on coordinates, so it needs a fixed seed
  pool), then for each seed and block u = Gamma_{l,k} v_{l,k} clipped to ||u|| <= clip, and
  w_l <- w_l - eta_s u, with eta_s constant, linearly or cosine annealed to `server_lr_min`
  (the official `update` and main.py's annealing).

The server step, key `server_step`:
- "unbiased" (default): eta_s = `server_lr` (default 1) times the unbiased reconstruction, so the
  expected step is eta_s times the clients' mean update, FedAvg's step: the paper's form, and the
  one whose numbers compare with FedAvg's;
- "official": what the official script does per round. Its coordinates carry d_l rho_l (about
  1/3, the truncated normal's second moment times the block size) and its server learning rate is
  10 (scripts/ferret.sh: --slr_max 10 --anneal no), so the step is 10 d_l rho_l, about 3.3 times
  the mean update. Here the aggregated coordinates are multiplied by d_l rho_l before the clip
  and `server_lr` defaults to 10. The script also averages clients equally (--equal_weight: set
  `equal_weights = true`).

This implementation's own choice: `directions = "kron"` draws each direction as a rank-one matrix
vec(p q^T) over the block reshaped to about sqrt(d) x sqrt(d), with p and q from the same seeded
generator and entries truncated to +-d^(-1/4) (so every entry of v still lies in +-1/sqrt(d)). It
is still isotropic (E[v v^T] = rho I), hence still unbiased, with a reconstruction error of the
same d/K order, but projecting costs one matrix product instead of K * d random draws: what makes
a 22M-parameter update projectable in under two seconds on two cores. The default stays "iid",
the paper's construction. ("official" uses the iid directions' d_l rho_l with either kind.)

Download accounting: by default the round's aggregated coordinates (L*K numbers), see
`FerretConfig.download`. Upload accounting: full budget, 4 bytes per coordinate, K per block (the
seed pool is shared and every seed is used in order, so no index travels); adaptive budget, 4
bytes per coordinate plus a 4-byte seed index for each one sent. The simulation still ships the
coordinate table densely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim import (
    ClientResult,
    LocalSGDConfig,
    Params,
    RunContext,
    ScenarioError,
    ServerRounds,
    SGDTrainer,
    TrainJob,
    TrainOutput,
    UpdateBatch,
    generator,
    register_aggregator,
    register_algorithm,
)

GAMMA = "ferret.gamma"
MASK = "ferret.mask"
Directions = Literal["iid", "kron"]
_CHUNK = 1 << 23  # numbers of directions materialised at once (32 MiB of float32)
_BLOCK_MIX = 0x9E37_79B9_7F4A_7C15  # odd constant: (seed, block) -> one generator seed


# ---------------------------------------------------------------------------------------------
# blocks and seeds


@dataclass(frozen=True)
class Block:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def plan_blocks(named_shapes: Sequence[tuple[str, Sequence[int]]], ratio: float = 0.9) -> tuple[Block, ...]:
    """Group consecutive tensors until a group would exceed ratio * median(tensor sizes), as the
    official code does: big matrices stand alone, runs of biases and norms share a block."""
    if not named_shapes:
        return ()
    sizes = [math.prod(s) for _, s in named_shapes]
    target = int(ratio * float(np.median(sizes)))
    blocks: list[Block] = []
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    current = 0
    for (name, shape), size in zip(named_shapes, sizes):
        if names and current + size > target:
            blocks.append(Block(tuple(names), tuple(shapes)))
            names, shapes, current = [], [], 0
        names.append(name)
        shapes.append(tuple(int(d) for d in shape))
        current += size
    blocks.append(Block(tuple(names), tuple(shapes)))
    return tuple(blocks)


def model_blocks(model: nn.Module, ratio: float = 0.9) -> tuple[Block, ...]:
    return plan_blocks([(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad], ratio)


def seed_pool(root: int, k: int, round: int = 0) -> list[int]:
    """K seeds every party derives alike from the run's seed (and the round, when resampling)."""
    return [int(s) for s in generator(root, "ferret-seeds", round).integers(1, 2**62, size=k)]


def block_seed(seed: int, block: int) -> int:
    return (int(seed) * _BLOCK_MIX + int(block)) % (2**63 - 1)


# ---------------------------------------------------------------------------------------------
# directions


def truncnorm_second_moment(a: float) -> float:
    """E[x^2] for x ~ N(0, 1) truncated to [-a, a] (about a^2 / 3 when a is small)."""
    if a < 1e-2:  # the closed form cancels catastrophically; its series does not
        return a * a / 3.0 * (1.0 - 2.0 * a * a / 15.0)
    z = math.erf(a / math.sqrt(2.0))
    return 1.0 - 2.0 * a * math.exp(-a * a / 2.0) / (math.sqrt(2.0 * math.pi) * z)


def uniform_to_truncnorm(u: Tensor, a: float) -> Tensor:
    """Map U(0, 1) draws, in place, to N(0, 1) truncated to [-a, a] by the inverse CDF (exact,
    like torch's trunc_normal_). Elementwise, so a row gives the same bits alone or in a batch."""
    return torch.special.erfinv(u.mul_(2.0).sub_(1.0).mul_(math.erf(a / math.sqrt(2.0))), out=u).mul_(math.sqrt(2.0))


def truncnorm(n: int, a: float, gen: torch.Generator) -> Tensor:
    """n draws of N(0, 1) truncated to [-a, a] from an explicit generator."""
    return uniform_to_truncnorm(torch.rand(n, generator=gen), a)


@dataclass(frozen=True)
class BlockDirections:
    """The random directions of one block: regenerated from (seed, block index) on demand."""

    size: int
    index: int
    kind: Directions = "iid"

    @property
    def shape2d(self) -> tuple[int, int]:
        m = math.ceil(math.sqrt(self.size))
        return m, math.ceil(self.size / m)

    @property
    def bound(self) -> float:
        return self.size ** (-0.25 if self.kind == "kron" else -0.5)

    @property
    def rho(self) -> float:
        """E[v_i^2], the scale that makes sum_k <v_k, x> v_k / (K rho) unbiased for x."""
        r = truncnorm_second_moment(self.bound)
        return r * r if self.kind == "kron" else r

    def _gen(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(block_seed(seed, self.index))

    def _uniforms(self, seeds: Sequence[int], n: int) -> Tensor:
        """Row i: the first n uniforms of seed i's generator. Only this loop is per seed; the
        transform to truncated normals then runs once over the whole matrix."""
        out = torch.empty(len(seeds), n)
        for i, s in enumerate(seeds):
            torch.rand(n, generator=self._gen(s), out=out[i])
        return out

    def rows(self, seeds: Sequence[int]) -> Tensor:
        """(len(seeds), size) dense directions (iid)."""
        return uniform_to_truncnorm(self._uniforms(seeds, self.size), self.bound)

    def factors(self, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(K, m) and (K, n): direction k is vec(p_k q_k^T)[:size] (kron); p_k then q_k are the
        first m + n draws of seed k's generator."""
        m, n = self.shape2d
        t = uniform_to_truncnorm(self._uniforms(seeds, m + n), self.bound)
        return t[:, :m], t[:, m:]

    def _seed_chunks(self, seeds: Sequence[int]) -> list[tuple[int, int]]:
        step = max(1, _CHUNK // max(1, self.size))
        return [(i, min(i + step, len(seeds))) for i in range(0, len(seeds), step)]

    def project(self, delta: Tensor, seeds: Sequence[int]) -> Tensor:
        """<v_k, delta> for every seed (float32, shape (K,))."""
        delta = delta.reshape(-1).to(torch.float32)
        if self.kind == "kron":
            p, q = self.factors(seeds)
            m, n = self.shape2d
            x = torch.zeros(m * n)
            x[: self.size] = delta
            return ((x.view(m, n) @ q.T) * p.T).sum(0)
        out = torch.empty(len(seeds))
        for lo, hi in self._seed_chunks(seeds):
            out[lo:hi] = self.rows(seeds[lo:hi]) @ delta
        return out

    def combine(self, coefs: Tensor, seeds: Sequence[int], clip: float | None = None) -> Tensor:
        """sum_k coefs_k v_k (shape (size,)), each term first clipped to norm <= clip if given."""
        coefs = coefs.to(torch.float32)
        if self.kind == "kron":
            p, q = self.factors(seeds)
            if clip is not None:
                coefs = coefs * self._clip_factor(coefs, self._kron_norms(p, q), clip)
            return ((p.T * coefs) @ q).reshape(-1)[: self.size]
        out = torch.zeros(self.size)
        for lo, hi in self._seed_chunks(seeds):
            v = self.rows(seeds[lo:hi])
            c = coefs[lo:hi]
            if clip is not None:
                c = c * self._clip_factor(c, v.norm(dim=1), clip)
            out += v.T @ c
        return out

    def _kron_norms(self, p: Tensor, q: Tensor) -> Tensor:
        """||vec(p q^T)[:size]|| for each direction: whole rows, then the partial last row."""
        m, n = self.shape2d
        full, rem = divmod(self.size, n)
        sq = (p[:, :full] ** 2).sum(1) * (q**2).sum(1)
        if rem:
            sq = sq + p[:, full] ** 2 * (q[:, :rem] ** 2).sum(1)
        return sq.sqrt()

    @staticmethod
    def _clip_factor(coefs: Tensor, norms: Tensor, clip: float) -> Tensor:
        size = coefs.abs() * norms
        return torch.where(size > clip, clip / size.clamp_min(1e-30), torch.ones_like(size))


# ---------------------------------------------------------------------------------------------
# client side


def _flat(params: Params, block: Block) -> Tensor:
    return torch.cat([params[n].reshape(-1).to(torch.float32) for n in block.names])


@dataclass(frozen=True)
class FerretTrainer:
    """T local SGD steps, then the update's coordinates on the shared directions, block by block.

    Returns `{ferret.gamma: (L, K)}` (plus `ferret.mask` for the adaptive budget) instead of the
    model, and the relative reconstruction error ||Delta_rec - Delta||^2 / ||Delta||^2 as a metric.
    """

    sgd: SGDTrainer = field(default_factory=SGDTrainer)
    k: int = 200
    seed_root: int = 0
    directions: Directions = "iid"
    budget: Literal["adaptive", "full"] = "adaptive"
    resample_seeds: bool = False
    block_ratio: float = 0.9
    track_error: bool = True

    def seeds(self, round: int) -> list[int]:
        return seed_pool(self.seed_root, self.k, round if self.resample_seeds else 0)

    def train(
        self, model: nn.Module, params: Params, x: np.ndarray, y: np.ndarray, job: TrainJob, rng: np.random.Generator
    ) -> TrainOutput:
        blocks = model_blocks(model, self.block_ratio)
        trained = self.sgd.train(model, params, x, y, job, rng)
        deltas = [_flat(params, b) - _flat(trained.params, b) for b in blocks]
        gamma, mask = encode(deltas, blocks, self.seeds(job.round), self.directions, self.budget, rng)
        out: Params = {GAMMA: gamma}
        if self.budget == "adaptive":
            out[MASK] = mask.to(torch.uint8)
        trained.params = out
        trained.metrics["coordinates"] = float(mask.sum())
        if self.track_error:
            trained.metrics["recon_error"] = reconstruction_error(deltas, gamma, blocks, self.seeds(job.round), self.directions)
        return trained


def encode(
    deltas: Sequence[Tensor],
    blocks: Sequence[Block],
    seeds: Sequence[int],
    kind: Directions = "iid",
    budget: str = "full",
    rng: np.random.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Per block, the unbiased coordinates of Delta_l: (L, K) float32 and the (L, K) mask of sent
    entries."""
    k = len(seeds)
    gamma = torch.zeros(len(blocks), k)
    mask = torch.zeros(len(blocks), k, dtype=torch.bool)
    norms = [float(d.norm()) for d in deltas]
    top = max([n for n in norms if math.isfinite(n)] + [1e-8])
    for l, (delta, block) in enumerate(zip(deltas, blocks)):
        dirs = BlockDirections(block.size, l, kind)
        if budget == "adaptive":
            n_l = min(k, max(2, int(k * norms[l] / top))) if math.isfinite(norms[l]) else 2
            if rng is None:
                raise ValueError("the adaptive budget draws its seed subset from the client's generator")
            chosen = np.sort(rng.choice(k, size=n_l, replace=False))
        else:
            n_l, chosen = k, np.arange(k)
        raw = dirs.project(delta, [seeds[i] for i in chosen])
        idx = torch.from_numpy(chosen)
        gamma[l, idx] = raw / (n_l * dirs.rho)
        mask[l, idx] = True
    return gamma, mask


def decode(gamma: Tensor, blocks: Sequence[Block], seeds: Sequence[int], kind: Directions = "iid", clip: float | None = None) -> list[Tensor]:
    """sum_k gamma_{l,k} v_{l,k} for every block l."""
    return [BlockDirections(b.size, l, kind).combine(gamma[l], seeds, clip) for l, b in enumerate(blocks)]


def reconstruction_error(deltas: Sequence[Tensor], gamma: Tensor, blocks: Sequence[Block], seeds: Sequence[int], kind: Directions = "iid") -> float:
    rec = decode(gamma, blocks, seeds, kind)
    num = sum(float(((r - d) ** 2).sum()) for r, d in zip(rec, deltas))
    den = sum(float((d**2).sum()) for d in deltas)
    return num / den if den > 0 else 0.0


def official_scale(size: int) -> float:
    """d_l rho_l for a block of `size` numbers: what the official code's coordinates, (d_l / n_l)
    <v, Delta>, carry on top of the unbiased 1 / (n_l rho_l) <v, Delta> (about 1/3, since the
    entries are nearly uniform on +-1/sqrt(d_l))."""
    return size * truncnorm_second_moment(size**-0.5)


def upload_bytes(result: ClientResult) -> int:
    """4 bytes per coordinate sent, plus a 4-byte seed index each when the budget is adaptive."""
    if MASK in result.params:
        return 8 * int(result.params[MASK].sum())
    return 4 * result.params[GAMMA].numel()


# ---------------------------------------------------------------------------------------------
# server side


@register_aggregator("ferret")
class FerretRule:
    """Aggregate coordinates, regenerate the directions once, apply the reconstructed update.

    Settings are the scenario's. The blocks, the seed pool and the run's length depend on the
    model and the run, so the flow that owns the rule hands them over with `bind`; they are
    configuration, not learnt state, hence not attributes ending in `_`. Learnt state: `buffer_`
    (server momentum on the coordinates) and `stats_` (the last round's figures).
    """

    def __init__(
        self,
        server_lr: float = 1.0,
        server_lr_min: float = 0.0,
        anneal: Literal["none", "linear", "cosine"] = "none",
        momentum: float = 0.0,
        clip: float = 10.0,
        equal_weights: bool = False,
        directions: Directions = "iid",
        server_step: Literal["unbiased", "official"] = "unbiased",
    ):
        self.server_lr = server_lr
        self.server_lr_min = server_lr_min
        self.anneal = anneal
        self.momentum = momentum
        self.clip = clip
        self.equal_weights = equal_weights
        self.directions = directions
        self.server_step = server_step

    def bind(self, plan: Sequence[Block], seeds_for: Callable[[int], list[int]], rounds: int) -> "FerretRule":
        self._plan = tuple(plan)
        self._seeds_for = seeds_for
        self._rounds = rounds
        return self

    def lr_at(self, round: int) -> float:
        total = getattr(self, "_rounds", None) or round
        r, hi, lo = round - 1, self.server_lr, self.server_lr_min
        if self.anneal == "linear":
            return lo + (hi - lo) * (1.0 - r / total)
        if self.anneal == "cosine":
            return lo + (hi - lo) * (1.0 + math.cos(math.pi * r / total)) / 2.0
        return hi

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        if not hasattr(self, "_plan"):
            raise RuntimeError("FerretRule needs the model's blocks and seed pool: use it through the ferret algorithm")
        plan = self._plan
        seeds = self._seeds_for(round)
        gam = batch.params[GAMMA].to(torch.float64)
        if self.equal_weights:
            w = torch.full((len(batch),), 1.0 / len(batch), dtype=torch.float64)
        else:
            w = batch.weights()
        agg = torch.einsum("i,ilk->lk", w, gam)
        if self.momentum > 0:
            prev = getattr(self, "buffer_", None)
            agg = agg if prev is None else self.momentum * prev + agg
            self.buffer_ = agg
        eta = self.lr_at(round)
        if self.server_step == "official":  # the official coordinates' d_l rho_l, before the clip
            agg = agg * torch.tensor([official_scale(b.size) for b in plan], dtype=torch.float64)[:, None]
        updates = decode(agg.to(torch.float32), plan, seeds, self.directions, self.clip if self.clip > 0 else None)
        out = dict(global_params)
        for block, u in zip(plan, updates):
            start = 0
            for name, shape in zip(block.names, block.shapes):
                n = math.prod(shape)
                ref = global_params[name]
                out[name] = ref - (eta * u[start : start + n]).view(shape).to(ref.dtype)
                start += n
        errors = [m["recon_error"] for m in batch.metrics if "recon_error" in m]
        self.stats_ = {"server_lr": eta, "upload_coordinates": float(np.mean([m.get("coordinates", 0.0) for m in batch.metrics]))}
        if errors:
            self.stats_["recon_error"] = float(np.average(errors, weights=w.numpy()[: len(errors)]))
        return out


class FerretConfig(LocalSGDConfig):
    accepts_aggregator = False  # clients send projected coordinates: only Ferret's own rule decodes them
    clients_per_round: int = Field(10, ge=1)
    K: int = Field(200, ge=1)  # seeds (coordinates) per block
    directions: Directions = "iid"
    budget: Literal["adaptive", "full"] = "adaptive"
    resample_seeds: bool = False
    server_step: Literal["unbiased", "official"] = "unbiased"
    server_lr: float | None = Field(None, gt=0)  # default 1 ("unbiased") or 10 ("official")
    server_lr_min: float = Field(0.0, ge=0)
    anneal: Literal["none", "linear", "cosine"] = "none"
    server_momentum: float = Field(0.0, ge=0, lt=1)
    clip: float = Field(10.0, ge=0)  # per-direction norm bound on the server; 0 disables
    equal_weights: bool = False
    block_ratio: float = Field(0.9, gt=0)
    track_error: bool = True
    # What a sampled client downloads: the round's aggregated coordinates (clients that stay in
    # sync rebuild the model from them, the paper's accounting; a client that missed rounds would
    # replay each missed round's L*K numbers, which this does not count) or the whole trainable
    # model (the conservative bound, FedAvg's cost).
    download: Literal["coordinates", "model"] = "coordinates"


@register_algorithm("ferret")
def ferret(cfg: FerretConfig, ctx: RunContext) -> ServerRounds:
    if cfg.server_momentum > 0 and cfg.resample_seeds:
        raise ScenarioError(
            "server momentum accumulates coordinates of a fixed seed pool; set resample_seeds = false",
            key="algorithm.server_momentum",
        )
    plan = model_blocks(ctx.model, cfg.block_ratio)
    if not plan:
        raise ScenarioError("the model has no trainable parameter", key="model")
    trainer = FerretTrainer(
        SGDTrainer.from_config(cfg), k=cfg.K, seed_root=ctx.seed, directions=cfg.directions, budget=cfg.budget,
        resample_seeds=cfg.resample_seeds, block_ratio=cfg.block_ratio, track_error=cfg.track_error,
    )
    server_lr = cfg.server_lr if cfg.server_lr is not None else (10.0 if cfg.server_step == "official" else 1.0)
    rule = FerretRule(
        server_lr=server_lr, server_lr_min=cfg.server_lr_min, anneal=cfg.anneal, momentum=cfg.server_momentum,
        clip=cfg.clip, equal_weights=cfg.equal_weights, directions=cfg.directions, server_step=cfg.server_step,
    )
    rule.bind(plan, trainer.seeds, ctx.spec.scenario.rounds)
    trainable = {n for b in plan for n in b.names}
    coordinates_down = 4 * len(plan) * cfg.K

    def download_bytes(params: Params) -> int:
        if cfg.download == "model":
            return sum(params[n].numel() * params[n].element_size() for n in trainable)
        return coordinates_down

    return ServerRounds(
        ctx,
        trainer=trainer,
        aggregator=rule,
        clients_per_round=cfg.clients_per_round,
        download_bytes=download_bytes,
        upload_bytes=upload_bytes,
    )
