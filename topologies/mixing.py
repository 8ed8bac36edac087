"""Gossip (mixing) matrices for a graph, and how fast they mix.

A gossip step is `X <- W X`. W must be symmetric and doubly stochastic with w_ij > 0 only on edges,
so that every step keeps the network average unchanged and repeated steps converge to it. How fast
they converge is set by the spectral gap 1 - max(|lambda_2|, |lambda_n|); DFedSAM-MGS's Q gossip
steps turn the spectral term lambda into lambda^Q.
"""

from __future__ import annotations

import itertools

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


def _lanczos_max_abs(
    W: torch.Tensor, *, max_iter: int = 300, tol: float = 1e-10
) -> float:
    """Largest |eigenvalue| of W - 11^T/n by Lanczos with full reorthogonalisation.

    Subtracting the mean in each mat-vec removes the eigenvalue 1 of the all-ones vector without
    forming the dense 11^T/n. Ritz values lie inside the spectrum, so if `max_iter` runs out (very
    large rings, whose gap is ~1/n^2) the result is a lower bound and the gap an upper bound.
    The start vector comes from a private generator, so the answer is reproducible.
    """
    n = W.shape[0]
    if n == 1:
        return 0.0
    steps = min(n - 1, max_iter)

    def apply(x: torch.Tensor) -> torch.Tensor:
        y = torch.sparse.mm(W, x[:, None])[:, 0] if W.is_sparse else W @ x
        return y - y.mean()

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(n, generator=generator, dtype=torch.float64)
    q -= q.mean()
    q /= q.norm()
    basis = torch.empty((steps, n), dtype=torch.float64)
    alphas: list[float] = []
    betas: list[float] = []
    estimate = 0.0
    for j in range(steps):
        basis[j] = q
        z = apply(q)
        alphas.append(float(q @ z))
        for _ in range(2):  # twice is enough to keep the basis orthogonal in floating point
            z -= basis[: j + 1].T @ (basis[: j + 1] @ z)
        beta = float(z.norm())
        done = beta < tol or j == steps - 1
        if done or j % 10 == 9:  # the tridiagonal eigenproblem is cheap, but not free every step
            T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
            ritz, vectors = torch.linalg.eigh(torch.from_numpy(T))
            ends = [0, len(ritz) - 1]
            estimate = max(abs(float(ritz[k])) for k in ends)
            if done or max(beta * abs(float(vectors[-1, k])) for k in ends) < tol:
                break
        betas.append(beta)
        q = z / beta
    return estimate


def spectral_gap(W: np.ndarray | torch.Tensor) -> float:
    """1 - max(|lambda_2|, |lambda_n|) of a symmetric doubly stochastic W, in [0, 1].

    It is the rate at which gossip forgets disagreement: 0 means some disagreement never fades (a
    disconnected graph), 1 means one step reaches the average (complete graph, uniform rule). Small
    dense matrices get an exact eigendecomposition; sparse tensors and matrices above 2000 nodes
    get Lanczos on sparse mat-vecs, exact for well-connected graphs and an upper bound on the gap
    for huge rings.
    """
    if isinstance(W, torch.Tensor):
        if W.layout != torch.strided:
            sparse = W.to_sparse_coo().coalesce().to(torch.float64)
            _check_sparse(sparse)
            lam = _lanczos_max_abs(sparse)
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
        lam = _lanczos_max_abs(torch.from_numpy(dense))
    return float(min(1.0, max(0.0, 1.0 - lam)))
