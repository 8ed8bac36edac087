"""Graph factories for decentralized learning, in networkx's plain-function style.

Every factory returns an undirected `networkx.Graph` whose nodes are the client ids 0..n-1, so a
node label can index stacked node parameters and mixing-matrix rows without a lookup table.
Random factories redraw until the graph is connected, because gossip on a disconnected graph never
reaches consensus and would silently turn one experiment into several. Each redraw takes its seed
from a `numpy.random.SeedSequence` rooted at the caller's seed, so the same seed gives the same graph
on every machine and no global random state is touched.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from fedsim import limits
from fedsim.errors import DataError, FedsimError, PluginError, TopologyError
from fedsim.registry import register_topology, topologies

__all__ = [
    "build",
    "complete",
    "erdos_renyi",
    "exponential",
    "from_file",
    "hypercube",
    "random_regular",
    "ring",
    "small_world",
    "star",
    "time_varying_random",
    "torus",
]

_GRAPHML_SUFFIXES = (".graphml", ".xml")


# --------------------------------------------------------------------------------------------------
# argument checks: every bad value becomes a TopologyError that says what was expected


def _check_int(value: Any, name: str, *, minimum: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TopologyError(f"{where}: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise TopologyError(f"{where}: {name} must be >= {minimum}, got {value}")
    return int(value)


def _check_probability(value: Any, name: str, *, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TopologyError(f"{where}: {name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise TopologyError(f"{where}: {name} must be in [0, 1], got {value}")
    return float(value)


def _check_seed(seed: Any, *, where: str) -> int | None:
    if seed is None:
        return None
    return _check_int(seed, "seed", minimum=0, where=where)


def _attempt_seeds(seed: int | None, tries: int) -> Iterator[int]:
    """Seeds for successive redraws, all derived from one seed.

    Deriving them (rather than using seed, seed+1, ...) keeps the graphs for nearby user seeds
    independent; 32-bit values suit both networkx's `random.Random` and numpy's legacy seeding.
    """
    words = np.random.SeedSequence(seed).generate_state(tries, dtype=np.uint32)
    for word in words:
        yield int(word)


def _named(G: nx.Graph, name: str) -> nx.Graph:
    G.graph["name"] = name
    return G


# --------------------------------------------------------------------------------------------------
# deterministic graphs


@register_topology("ring")
def ring(n: int) -> nx.Graph:
    """Cycle 0-1-...-(n-1)-0, the sparsest connected regular graph and the slowest to mix.

    For n < 3 a cycle would need a self loop or a doubled edge, so those sizes give the path
    (one node, or one edge) instead; a sweep over small federations then still runs.
    """
    n = _check_int(n, "n", minimum=1, where="ring")
    return _named(nx.cycle_graph(n) if n >= 3 else nx.path_graph(n), f"ring({n})")


def _torus_shapes(n: int) -> list[tuple[int, int]]:
    return [(r, n // r) for r in range(3, math.isqrt(n) + 1) if n % r == 0 and n // r >= 3]


def _nearest_torus_sizes(n: int) -> str:
    below = next((m for m in range(n - 1, 8, -1) if _torus_shapes(m)), None)
    above = next(m for m in range(max(n + 1, 9), 4 * n + 10) if _torus_shapes(m))
    return " or ".join(str(m) for m in (below, above) if m is not None)


@register_topology("torus")
def torus(n: int, *, rows: int | None = None) -> nx.Graph:
    """2-D grid with wrap-around, rows x cols = n; node r*cols + c sits at row r, column c.

    Both sides must be at least 3: with 2 the wrap-around edge coincides with the grid edge and
    with 1 it is a self loop, so nodes would not all have the 4 distinct neighbours a torus
    promises. The default shape is the most square one, which mixes fastest.
    """
    n = _check_int(n, "n", minimum=1, where="torus")
    shapes = _torus_shapes(n)
    if rows is None:
        if not shapes:
            raise TopologyError(
                f"torus: n={n} cannot be split as rows x cols with both sides >= 3 "
                f"(nearest sizes that can: {_nearest_torus_sizes(n)}); use 'ring' for this n"
            )
        rows, cols = shapes[-1]
    else:
        rows = _check_int(rows, "rows", minimum=3, where="torus")
        if n % rows != 0 or n // rows < 3:
            options = ", ".join(str(r) for r in sorted({r for pair in shapes for r in pair}))
            raise TopologyError(
                f"torus: rows={rows} does not split n={n} into rows x cols with cols >= 3 "
                f"(rows that work: {options or 'none'})"
            )
        cols = n // rows
    G = nx.Graph()
    G.add_nodes_from(range(n))
    for r in range(rows):
        for c in range(cols):
            node = r * cols + c
            G.add_edge(node, r * cols + (c + 1) % cols)
            G.add_edge(node, ((r + 1) % rows) * cols + c)
    return _named(G, f"torus({rows}x{cols})")


@register_topology("complete")
def complete(n: int) -> nx.Graph:
    """Everyone talks to everyone: gossip on it is exact averaging, the centralised reference."""
    n = _check_int(n, "n", minimum=1, where="complete")
    return _named(nx.complete_graph(n), f"complete({n})")


@register_topology("star")
def star(n: int) -> nx.Graph:
    """Node 0 linked to all others, the graph shape of a central server."""
    n = _check_int(n, "n", minimum=1, where="star")
    return _named(nx.star_graph(n - 1), f"star({n})")


@register_topology("exponential")
def exponential(n: int) -> nx.Graph:
    """Node i linked to i +/- 2^j (mod n) for every 2^j < n.

    This static exponential graph keeps the degree logarithmic in n while its spectral gap stays
    bounded away from zero, which is why decentralized-SGD papers use it as the sparse-but-fast
    topology.
    """
    n = _check_int(n, "n", minimum=1, where="exponential")
    G = nx.Graph()
    G.add_nodes_from(range(n))
    offsets: list[int] = []
    while (step := 1 << len(offsets)) < n:
        offsets.append(step)
    for i in range(n):
        for off in offsets:
            G.add_edge(i, (i + off) % n)
            G.add_edge(i, (i - off) % n)
    return _named(G, f"exponential({n})")


@register_topology("hypercube")
def hypercube(n: int) -> nx.Graph:
    """Nodes are d-bit numbers, linked when they differ in one bit (n = 2^d, degree d).

    Only powers of two have this shape; rounding n silently would change the federation size.
    """
    n = _check_int(n, "n", minimum=1, where="hypercube")
    if n & (n - 1):
        lower = 1 << (n.bit_length() - 1)
        raise TopologyError(
            f"hypercube: n must be a power of two, got {n} (nearest: {lower} or {2 * lower})"
        )
    d = n.bit_length() - 1
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_edges_from((i, i ^ (1 << b)) for i in range(n) for b in range(d) if i < i ^ (1 << b))
    return _named(G, f"hypercube({n})")


# --------------------------------------------------------------------------------------------------
# random graphs, redrawn until connected


def _first_connected(
    draw: Callable[[int], nx.Graph], seed: int | None, max_tries: int
) -> nx.Graph | None:
    for attempt_seed in _attempt_seeds(seed, max_tries):
        G = draw(attempt_seed)
        if nx.is_connected(G):
            return G
    return None


@register_topology("erdos_renyi")
def erdos_renyi(
    n: int, *, p: float, seed: int | None = None, max_tries: int = 100
) -> nx.Graph:
    """G(n, p): each edge present independently with probability p, redrawn until connected.

    Connectivity needs p above about ln(n)/n; far below it no number of redraws helps, so the
    search is bounded by `max_tries` and the error says which threshold to aim for.
    """
    n = _check_int(n, "n", minimum=1, where="erdos_renyi")
    p = _check_probability(p, "p", where="erdos_renyi")
    seed = _check_seed(seed, where="erdos_renyi")
    max_tries = _check_int(max_tries, "max_tries", minimum=1, where="erdos_renyi")
    G = _first_connected(lambda s: nx.fast_gnp_random_graph(n, p, seed=s), seed, max_tries)
    if G is None:
        hint = f"; connectivity needs p above about ln(n)/n = {math.log(n) / n:.3g}" if n > 1 else ""
        raise TopologyError(
            f"erdos_renyi: no connected graph with p={p} on n={n} nodes in {max_tries} tries{hint}"
        )
    return _named(G, f"erdos_renyi({n}, p={p})")


@register_topology("random_regular")
def random_regular(
    n: int, *, degree: int, seed: int | None = None, max_tries: int = 100
) -> nx.Graph:
    """A (nearly) uniformly drawn connected graph in which every node has `degree` neighbours.

    Two cases avoid hopeless or slow redraws: a connected 2-regular graph is a single cycle, so it
    is drawn directly as a ring through a random permutation (redrawing would almost never hit one
    for large n); and a dense graph (degree >= n/2) is the complement of a sparse regular graph,
    which networkx draws far faster and which is always connected at that density.
    """
    n = _check_int(n, "n", minimum=1, where="random_regular")
    degree = _check_int(degree, "degree", minimum=0, where="random_regular")
    seed = _check_seed(seed, where="random_regular")
    max_tries = _check_int(max_tries, "max_tries", minimum=1, where="random_regular")
    if degree >= n:
        raise TopologyError(f"random_regular: degree must be < n, got degree={degree}, n={n}")
    if (n * degree) % 2:
        raise TopologyError(
            f"random_regular: n * degree must be even, got n={n}, degree={degree}"
        )
    name = f"random_regular({n}, degree={degree})"
    if degree <= 1 and n > degree + 1:
        raise TopologyError(
            f"random_regular: a {degree}-regular graph on n={n} nodes is never connected; "
            f"use degree >= 2"
        )
    if degree == 2 and n >= 3:
        order = np.random.default_rng(np.random.SeedSequence(seed)).permutation(n)
        G = nx.Graph()
        G.add_nodes_from(range(n))
        G.add_edges_from((int(order[i]), int(order[(i + 1) % n])) for i in range(n))
        return _named(G, name)
    if 2 * degree >= n:
        sparse = nx.random_regular_graph(n - 1 - degree, n, seed=next(_attempt_seeds(seed, 1)))
        return _named(nx.complement(sparse), name)
    G = _first_connected(lambda s: nx.random_regular_graph(degree, n, seed=s), seed, max_tries)
    if G is None:
        raise TopologyError(
            f"random_regular: no connected graph with degree={degree} on n={n} nodes "
            f"in {max_tries} tries"
        )
    return _named(G, name)


@register_topology("small_world")
def small_world(
    n: int, *, k: int = 4, p: float = 0.1, seed: int | None = None, max_tries: int = 100
) -> nx.Graph:
    """Watts-Strogatz: a ring lattice with k neighbours per node, each edge rewired with prob. p.

    A few rewired shortcuts shrink the diameter of a ring dramatically, which makes this the usual
    model for "mostly local, a little global" communication. k must be even because each node
    links to k/2 neighbours on either side; networkx would silently round an odd k down.
    """
    n = _check_int(n, "n", minimum=3, where="small_world")
    k = _check_int(k, "k", minimum=2, where="small_world")
    p = _check_probability(p, "p", where="small_world")
    seed = _check_seed(seed, where="small_world")
    max_tries = _check_int(max_tries, "max_tries", minimum=1, where="small_world")
    if k % 2:
        raise TopologyError(f"small_world: k must be even (k/2 neighbours on each side), got {k}")
    if k >= n:
        raise TopologyError(f"small_world: k must be < n, got k={k}, n={n}")
    G = _first_connected(lambda s: nx.watts_strogatz_graph(n, k, p, seed=s), seed, max_tries)
    if G is None:
        raise TopologyError(
            f"small_world: no connected graph with k={k}, p={p} on n={n} nodes in {max_tries} tries"
        )
    return _named(G, f"small_world({n}, k={k}, p={p})")


def time_varying_random(n: int, *, degree: int, round: int, seed: int) -> nx.Graph:
    """The round's graph of a time-varying topology: a fresh connected random regular graph.

    It is a pure function of (seed, round), so any worker can rebuild round t's graph without
    replaying rounds 0..t-1, and a resumed run sees the same graphs as an uninterrupted one.
    """
    seed = _check_int(seed, "seed", minimum=0, where="time_varying_random")
    round = _check_int(round, "round", minimum=0, where="time_varying_random")
    derived = np.random.SeedSequence(seed, spawn_key=(round,)).generate_state(1, dtype=np.uint32)
    G = random_regular(n, degree=degree, seed=int(derived[0]))
    return _named(G, f"time_varying_random({n}, degree={degree}, round={round})")


# --------------------------------------------------------------------------------------------------
# graphs from files


def _node_sort_key(labels: Iterable[Hashable]) -> Callable[[Hashable], Any]:
    """Numeric order when every label is an integer, otherwise natural order ("n2" < "n10").

    Plain string order would put node "10" before "2", so a file numbered from 0 would not keep
    its numbering.
    """
    labels = list(labels)
    if all(re.fullmatch(r"[+-]?\d+", str(label)) for label in labels):
        return lambda label: int(str(label))
    return lambda label: [
        int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(label))
    ]


def _read_edge_list(path: Path) -> nx.Graph:
    G = nx.Graph()
    try:
        _within_limits(path)
        with path.open(encoding="utf-8") as handle:
            for number, line in limits.lines(handle, path):
                text = line.split("#", 1)[0].strip()
                if not text:
                    continue
                tokens = text.split()
                if len(tokens) != 2:
                    raise TopologyError(
                        f"{path}: line {number}: expected an edge 'u v' (two node names; "
                        f"weights are not supported), got {text!r}"
                    )
                u, v = tokens
                if u == v:
                    raise TopologyError(f"{path}: line {number}: self loop on node {u!r}")
                G.add_edge(u, v)
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(f"{path}: cannot read graph file: {exc}") from None
    return G


def _read_graphml(path: Path) -> nx.Graph:
    """GraphML may describe a directed or multi-graph; gossip needs a simple undirected one."""
    try:
        _within_limits(path)
        raw = nx.read_graphml(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(f"{path}: cannot read graph file: {exc}") from None
    except (ElementTree.ParseError, nx.NetworkXError, ValueError, KeyError) as exc:
        raise TopologyError(f"{path}: not a valid GraphML file: {exc}") from None
    loops = list(nx.selfloop_edges(raw))
    if loops:
        raise TopologyError(f"{path}: self loop on node {loops[0][0]!r}")
    G = nx.Graph()
    G.add_nodes_from(raw.nodes(data=True))
    G.add_edges_from((u, v) for u, v, *_ in raw.edges)
    return G


def _within_limits(path: Path) -> None:
    """Refuse (one line) a graph file larger than fedsim's input limit before reading it."""
    try:
        limits.check_file_size(path, "graph file")
    except DataError as exc:
        raise TopologyError(exc.message) from None


def from_file(path: str | os.PathLike[str], *, n: int | None = None) -> nx.Graph:
    """Load a measured or hand-made network: an edge list (`u v` per line, `#` comments) or GraphML.

    Nodes are renumbered 0..n-1 in sorted label order (the label used in the file is kept in the node
    attribute "file_id"), so that node ids line up with client ids. Passing `n` makes a mismatch
    between the file and the federation size an error instead of a silently idle client.
    Connectivity is not required here; methods that need it call `require_connected`.
    """
    where = Path(os.fspath(path))
    if n is not None:
        n = _check_int(n, "n", minimum=1, where=f"from_file({where})")
    if not where.exists():
        raise TopologyError(f"{where}: graph file does not exist")
    if not where.is_file():
        raise TopologyError(f"{where}: not a file")
    if where.suffix.lower() in _GRAPHML_SUFFIXES:
        raw = _read_graphml(where)
    else:
        raw = _read_edge_list(where)
    if raw.number_of_nodes() == 0:
        raise TopologyError(f"{where}: graph file has no nodes")
    if n is not None and raw.number_of_nodes() != n:
        raise TopologyError(
            f"{where}: graph file has {raw.number_of_nodes()} nodes but n={n} clients were asked for"
        )
    order = sorted(raw.nodes, key=_node_sort_key(raw.nodes))
    G = nx.Graph()
    G.add_nodes_from(
        (i, {**raw.nodes[label], "file_id": label}) for i, label in enumerate(order)
    )
    index = {label: i for i, label in enumerate(order)}
    G.add_edges_from((index[u], index[v]) for u, v in raw.edges)
    return _named(G, f"from_file({where.name})")


@register_topology("from_file")
def _from_file_topology(n: int, *, path: str) -> nx.Graph:
    """Registry entry for `from_file`: every registered factory takes the node count first."""
    return from_file(path, n=n)


# --------------------------------------------------------------------------------------------------
# lookup by name


def _accepted_keys(sig: inspect.Signature) -> list[str]:
    params = list(sig.parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _call_error(name: str, sig: inspect.Signature, given: dict[str, Any], exc: TypeError) -> str:
    params = list(sig.parameters.values())[1:]
    accepted = _accepted_keys(sig)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return f"topology '{name}' cannot be called with {sorted(given)}: {exc}"
    unknown = [key for key in given if key not in accepted]
    missing = [
        p.name for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is p.empty and p.name not in given
    ]
    parts = []
    if unknown:
        parts.append(f"does not accept {', '.join(repr(k) for k in unknown)}")
    if missing:
        parts.append(f"needs {', '.join(repr(k) for k in missing)}")
    if not parts:
        parts.append(f"cannot be called with {sorted(given)} ({exc})")
    return f"topology '{name}' {' and '.join(parts)} (accepted keys: {', '.join(accepted) or 'none'})"


def _check_result(G: Any, name: str, n: int) -> nx.Graph:
    """Plugin factories are outside our control; catch a wrong graph here, not deep in a run."""
    if not isinstance(G, nx.Graph) or G.is_directed() or G.is_multigraph():
        raise TopologyError(
            f"topology '{name}' returned {type(G).__name__}, expected an undirected networkx.Graph"
        )
    if G.number_of_nodes() != n or set(G.nodes) != set(range(n)):
        raise TopologyError(
            f"topology '{name}' returned a graph with {G.number_of_nodes()} nodes that are not "
            f"0..{n - 1}"
        )
    return G


def build(name: str, n: int, /, *, seed: int | None = None, **kwargs: Any) -> nx.Graph:
    """Build the topology registered as `name` on n nodes, with a scenario's keys as `kwargs`.

    `seed` is forwarded only to factories that take one, so a run can hand its seed to every
    topology without knowing which ones are random. Keyword mistakes are checked against the
    factory's signature before the call, so a scenario typo reads as a list of accepted keys
    rather than a Python TypeError; an exception raised inside a factory (a plugin's bug) is
    reported in one line naming the topology (PluginError, exit code 1).
    """
    factory = topologies.get(name)
    try:
        sig: inspect.Signature | None = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if seed is not None and (
        sig is None
        or "seed" in sig.parameters
        or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    ):
        kwargs["seed"] = seed
    if sig is not None:
        try:
            sig.bind(n, **kwargs)
        except TypeError as exc:
            raise TopologyError(_call_error(name, sig, kwargs, exc)) from None
    try:
        graph = factory(n, **kwargs)
    except FedsimError:
        raise
    except Exception as exc:
        raise PluginError(f"topology '{name}' raised {exc!r} building a graph of {n} nodes") from exc
    return _check_result(graph, name, n)
