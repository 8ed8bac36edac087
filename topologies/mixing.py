"""Gossip (mixing) matrices for a graph, and how fast they mix.

A gossip step is `X <- W X`. W must be symmetric and doubly stochastic with w_ij > 0 only on edges,
so that every step keeps the network average unchanged and repeated steps converge to it. How fast
they converge is set by the spectral gap 1 - max(|lambda_2|, |lambda_n|); DFedSAM-MGS's Q gossip
steps turn the spectral term lambda into lambda^Q.
"""

from __future__ import annotations

import itertools
import math

import networkx as nx
import numpy as np
import torch

from fedsim.errors import TopologyError

__all__ = ["MIXING_RULES", "mixing_matrix", "require_connected", "sparse_mixing", "spectral_gap"]

MIXING_RULES = ("metropolis_hastings", "uniform", "max_degree")

# Dense eigvalsh is exact and takes about a second at this size; above it, Lanczos on sparse
# mat-vecs keeps 10,000-node graphs cheap.
_DENSE_EIG_MAX_N = 2000


def require_connected(G: nx.Graph, purpose: str) -> None:
    """Fail early when a method needs consensus, which a disconnected graph can never reach."""
    if G.number_of_nodes() == 0:
        raise TopologyError(f"graph has no nodes but {purpose} needs a connected graph")
    components = nx.number_connected_components(G)
    if components > 1:
        raise TopologyError(
            f"graph is disconnected ({components} components) but {purpose} needs a connected graph"
        )


def _edges(G: nx.Graph) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(n, u, v, degree) as arrays, so weights are computed without a Python loop per edge."""
    if not isinstance(G, nx.Graph) or G.is_directed() or G.is_multigraph():
        raise TopologyError(
            f"a mixing matrix needs an undirected simple networkx.Graph, got {type(G).__name__}"
        )
    n = G.number_of_nodes()
    if n == 0:
        raise TopologyError("a mixing matrix needs a graph with at least one node")
    if set(G.nodes) != set(range(n)):
        raise TopologyError(
            "a mixing matrix needs nodes numbered 0..n-1 (they index the rows); "
            "relabel with networkx.convert_node_labels_to_integers"
        )
    m = G.number_of_edges()
    pairs = np.fromiter(
        itertools.chain.from_iterable(G.edges()), dtype=np.int64, count=2 * m
    ).reshape(m, 2)
    u, v = pairs[:, 0], pairs[:, 1]
    loops = u == v
    if loops.any():
        raise TopologyError(
            f"a mixing matrix needs a graph without self loops (node {int(u[loops][0])} has one); "
            "the rules put the self weight on the diagonal themselves"
        )
    degree = np.bincount(u, minlength=n) + np.bincount(v, minlength=n)
    return n, u, v, degree


def _weights(
    G: nx.Graph, rule: str
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Edge list, one weight per undirected edge, and the diagonal of W."""
    if rule not in MIXING_RULES:
        raise TopologyError(
            f"unknown mixing rule {rule!r} (accepted: {', '.join(MIXING_RULES)})"
        )
    n, u, v, degree = _edges(G)
    if rule == "metropolis_hastings":
        w = 1.0 / (1.0 + np.maximum(degree[u], degree[v]))
    elif rule == "uniform":
        low, high = int(degree.min()), int(degree.max())
        if low != high:
            raise TopologyError(
                f"mixing rule 'uniform' needs a regular graph, but degrees range from {low} to "
                f"{high}; use 'metropolis_hastings' or 'max_degree'"
            )
        w = np.full(u.shape, 1.0 / (high + 1))
        # 1/(d+1) directly rather than 1 - d/(d+1), so the complete graph gives exact averaging.
        return n, u, v, w, np.full(n, 1.0 / (high + 1))
    else:  # max_degree
        w = np.full(u.shape, 1.0 / (1.0 + int(degree.max())))
    off_diagonal = np.bincount(u, weights=w, minlength=n) + np.bincount(v, weights=w, minlength=n)
    return n, u, v, w, 1.0 - off_diagonal


def mixing_matrix(G: nx.Graph, rule: str = "metropolis_hastings") -> np.ndarray:
    """Dense n x n gossip matrix W (float64) of graph G under `rule`.

    Rules (all symmetric, doubly stochastic, non-negative, zero off the edges):
    - "metropolis_hastings": w_ij = 1/(1 + max(deg_i, deg_j)); works on any graph and needs only
      the neighbours' degrees, which is why decentralized methods default to it.
    - "uniform": w_ij = 1/(deg + 1) including the node itself; only doubly stochastic on a regular
      graph, so any other graph is refused.
    - "max_degree": w_ij = 1/(1 + max degree); one global constant, slower on irregular graphs.
    The diagonal takes what the row leaves, w_ii = 1 - sum_j w_ij.
    """
    n, u, v, w, diag = _weights(G, rule)
    W = np.zeros((n, n), dtype=np.float64)
    W[u, v] = w
    W[v, u] = w
    W[np.arange(n), np.arange(n)] = diag
    return W


def sparse_mixing(G: nx.Graph, rule: str = "metropolis_hastings") -> torch.Tensor:
    """The same W as `mixing_matrix`, as a coalesced torch sparse COO float64 tensor.

    Nothing n x n is ever formed, so 10,000-node graphs cost O(edges) memory, and a gossip step on
    stacked node parameters is one `torch.sparse.mm(W, X)`.
    """
    n, u, v, w, diag = _weights(G, rule)
    nodes = np.arange(n)
    rows = np.concatenate([u, v, nodes])
    cols = np.concatenate([v, u, nodes])
    values = np.concatenate([w, w, diag])
    indices = torch.from_numpy(np.stack([rows, cols]))
    return torch.sparse_coo_tensor(
        indices, torch.from_numpy(values), (n, n), dtype=torch.float64, check_invariants=False
    ).coalesce()


def _check_dense(W: np.ndarray) -> None:
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise TopologyError(f"spectral_gap needs a square non-empty matrix, got shape {W.shape}")
    if not np.allclose(W, W.T, rtol=0.0, atol=1e-10):
        raise TopologyError("spectral_gap needs a symmetric mixing matrix")
    if not np.allclose(W.sum(axis=1), 1.0, rtol=0.0, atol=1e-9):
        raise TopologyError("spectral_gap needs a doubly stochastic mixing matrix (rows sum to 1)")


def _check_sparse(W: torch.Tensor) -> None:
    if W.dim() != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise TopologyError(
            f"spectral_gap needs a square non-empty matrix, got shape {tuple(W.shape)}"
        )
    asymmetry = (W - W.t()).coalesce().values()
    if asymmetry.numel() and float(asymmetry.abs().max()) > 1e-10:
        raise TopologyError("spectral_gap needs a symmetric mixing matrix")
    row_sums = torch.sparse.mm(W, torch.ones((W.shape[0], 1), dtype=W.dtype))[:, 0]
    if not torch.allclose(
        row_sums, torch.ones_like(row_sums), rtol=0.0, atol=1e-9
    ):
        raise TopologyError("spectral_gap needs a doubly stochastic mixing matrix (rows sum to 1)")


# Lanczos keeps its whole basis (full reorthogonalisation): at most this many float64 numbers.
_LANCZOS_BASIS_MAX = 2**26  # 512 MiB


def _sturm_below(alphas: list[float], betas: list[float], x: float) -> int:
    """How many eigenvalues of the tridiagonal T (diagonal `alphas`, off-diagonal `betas`) are
    below x: the negative pivots of the LDL^T factorisation of T - xI (Sylvester's law)."""
    count, d = 0, 1.0
    for i, a in enumerate(alphas):
        d = a - x - (betas[i - 1] ** 2 / d if i else 0.0)
        if d == 0.0:
            d = -1e-300
        count += d < 0.0
    return count


def _extreme_ritz(alphas: list[float], betas: list[float], beta_next: float, largest: bool) -> tuple[float, float]:
    """The largest (or smallest) eigenvalue theta of the Lanczos tridiagonal T, by bisection on
    Sturm counts, and the residual ||(A - theta) V s|| of its Ritz pair.

    O(k) per count in plain Python, where a dense eigendecomposition of T would cost O(k^3) and
    dominate the whole solve on rings. The eigenvector s comes from a twisted factorisation of
    T - theta I (top-down and bottom-up LDL^T pivots meeting at the index r where the eigenvector
    is largest), the stable way to get an eigenvector of a tridiagonal matrix from its eigenvalue:
    (T - theta I) s = gamma_r e_r, so the Ritz residual is sqrt(gamma_r^2 + beta_k^2 s_k^2) / ||s||.
    """
    k = len(alphas)
    radius = [(abs(betas[i - 1]) if i else 0.0) + (abs(betas[i]) if i < k - 1 else 0.0) for i in range(k)]
    lo = min(a - r for a, r in zip(alphas, radius))
    hi = max(a + r for a, r in zip(alphas, radius))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        below = _sturm_below(alphas, betas, mid)
        if (below == k) if largest else (below >= 1):
            hi = mid
        else:
            lo = mid
    theta = hi if largest else lo
    shifted = [a - theta for a in alphas]
    down = [0.0] * k  # top-down pivots
    up = [0.0] * k  # bottom-up pivots
    for i in range(k):
        down[i] = shifted[i] - (betas[i - 1] ** 2 / down[i - 1] if i else 0.0) or 1e-300
    for i in reversed(range(k)):
        up[i] = shifted[i] - (betas[i] ** 2 / up[i + 1] if i < k - 1 else 0.0) or 1e-300
    gammas = [down[i] + up[i] - shifted[i] for i in range(k)]
    r = min(range(k), key=lambda i: abs(gammas[i]))
    vector = [0.0] * k
    vector[r] = 1.0
    for i in reversed(range(r)):
        vector[i] = -betas[i] / down[i] * vector[i + 1]
    for i in range(r + 1, k):
        vector[i] = -betas[i - 1] / up[i] * vector[i - 1]
    norm = math.sqrt(math.fsum(v * v for v in vector))
    residual = math.hypot(gammas[r], beta_next * vector[-1]) / norm
    return theta, residual


def _lanczos_max_abs(W: torch.Tensor, *, max_iter: int | None = None, tol: float = 1e-11) -> float:
    """Largest |eigenvalue| of W - 11^T/n by Lanczos with full reorthogonalisation, run until it
    has converged; raises TopologyError when `max_iter` runs out first.

    Subtracting the mean in each mat-vec removes the eigenvalue 1 of the all-ones vector without
    forming the dense 11^T/n. Ritz values lie inside the spectrum and approach its ends from
    within, so a run stopped early under-estimates |lambda| and over-estimates the gap: it stops
    only once both extreme Ritz values have a residual bound beta_k |s_k| below `tol` (Paige: the
    Ritz value is then within `tol` of an eigenvalue), or once the Krylov space is exhausted (exact).
    Rings need about n/2 iterations (their gap is ~1/n^2), well-connected graphs a few dozen.
    The default cap is n - 1 or what a 512 MiB basis holds. The start vector comes from a private
    generator, so the answer is reproducible.
    """
    n = W.shape[0]
    if n == 1:
        return 0.0
    cap = min(n - 1, max(1, _LANCZOS_BASIS_MAX // n)) if max_iter is None else min(n - 1, max_iter)

    def apply(x: torch.Tensor) -> torch.Tensor:
        y = torch.sparse.mm(W, x[:, None])[:, 0] if W.is_sparse else W @ x
        return y - y.mean()

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(n, generator=generator, dtype=torch.float64)
    q -= q.mean()
    q /= q.norm()
    basis = torch.empty((cap, n), dtype=torch.float64)
    alphas: list[float] = []
    betas: list[float] = []
    residual = math.inf
    next_check = 10
    for j in range(cap):
        basis[j] = q
        z = apply(q)
        alphas.append(float(q @ z))
        for _ in range(2):  # twice is enough to keep the basis orthogonal in floating point
            z -= basis[: j + 1].T @ (basis[: j + 1] @ z)
        beta = float(z.norm())
        exhausted = beta < tol or j == n - 2  # an invariant subspace, or all of 1-perp: exact
        if exhausted or j + 1 >= next_check or j == cap - 1:
            next_check = max(j + 11, int(1.2 * (j + 1)))  # each check costs O(j): a geometric schedule
            ends = [_extreme_ritz(alphas, betas, beta, largest) for largest in (True, False)]
            estimate = max(abs(theta) for theta, _ in ends)
            residual = max(r for _, r in ends)
            if exhausted or residual < tol:
                return estimate
        betas.append(beta)
        q = z / beta
    raise TopologyError(
        f"spectral_gap: Lanczos did not converge in {cap} iterations on {n} nodes (residual {residual:.1e}, "
        f"tolerance {tol:.0e}); the gap is too small to resolve with this many iterations: pass a larger "
        "max_iter (memory grows as max_iter x nodes x 8 bytes)"
    )


def spectral_gap(W: np.ndarray | torch.Tensor, *, max_iter: int | None = None) -> float:
    """1 - max(|lambda_2|, |lambda_n|) of a symmetric doubly stochastic W, in [0, 1].

    It is the rate at which gossip forgets disagreement: 0 means some disagreement never fades (a
    disconnected graph), 1 means one step reaches the average (complete graph, uniform rule). Small
    dense matrices get an exact eigendecomposition; sparse tensors and matrices above 2000 nodes
    get Lanczos on sparse mat-vecs, iterated until it converges (to about 1e-11 absolute): a
    1,000-node ring takes about 500 iterations. `max_iter` caps them (default: n - 1, or what a
    512 MiB basis holds); a run that reaches the cap unconverged raises TopologyError rather than
    return what would only be an upper bound on the gap.
    """
    if isinstance(W, torch.Tensor):
        if W.layout != torch.strided:
            sparse = W.to_sparse_coo().coalesce().to(torch.float64)
            _check_sparse(sparse)
            lam = _lanczos_max_abs(sparse, max_iter=max_iter)
            return float(min(1.0, max(0.0, 1.0 - lam)))
        W = W.detach().cpu().numpy()
    dense = np.asarray(W, dtype=np.float64)
    _check_dense(dense)
    n = dense.shape[0]
    if n <= _DENSE_EIG_MAX_N:
        # torch's LAPACK, not numpy's: with torch loaded, numpy's OpenBLAS threads can contend
        # with torch's OpenMP pool and run an order of magnitude slower.
        lam = float(torch.linalg.eigvalsh(torch.from_numpy(dense - 1.0 / n)).abs().max())
    else:
        lam = _lanczos_max_abs(torch.from_numpy(dense), max_iter=max_iter)
    return float(min(1.0, max(0.0, 1.0 - lam)))
