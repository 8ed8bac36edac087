"""Graph factories, mixing matrices and spectral gaps (fedsim.topologies)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch

from fedsim.errors import TopologyError, UnknownNameError
from fedsim.topologies import (
    MIXING_RULES,
    build,
    complete,
    erdos_renyi,
    exponential,
    from_file,
    hypercube,
    mixing_matrix,
    random_regular,
    require_connected,
    ring,
    small_world,
    sparse_mixing,
    spectral_gap,
    star,
    time_varying_random,
    torus,
)

FACTORIES: dict[str, Callable[[], nx.Graph]] = {
    "ring": lambda: ring(10),
    "torus": lambda: torus(12),
    "complete": lambda: complete(7),
    "star": lambda: star(7),
    "erdos_renyi": lambda: erdos_renyi(30, p=0.15, seed=0),
    "random_regular": lambda: random_regular(20, degree=4, seed=0),
    "small_world": lambda: small_world(30, k=4, p=0.3, seed=0),
    "exponential": lambda: exponential(13),
    "hypercube": lambda: hypercube(16),
    "time_varying_random": lambda: time_varying_random(20, degree=3, round=5, seed=1),
}


def degrees(G: nx.Graph) -> set[int]:
    return {d for _, d in G.degree}


def edge_set(G: nx.Graph) -> set[tuple[int, int]]:
    return {(min(u, v), max(u, v)) for u, v in G.edges}


# ------------------------------------------------------------------------------------------------
# factories


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factory_gives_connected_graph_on_nodes_0_to_n_minus_1(name: str) -> None:
    G = FACTORIES[name]()
    n = G.number_of_nodes()
    assert isinstance(G, nx.Graph) and not G.is_directed()
    assert set(G.nodes) == set(range(n))
    assert nx.is_connected(G)
    assert nx.number_of_selfloops(G) == 0


def test_sizes_match_request() -> None:
    assert [f(n).number_of_nodes() for f, n in [(ring, 10), (complete, 7), (star, 7)]] == [10, 7, 7]
    assert erdos_renyi(30, p=0.2, seed=1).number_of_nodes() == 30
    assert small_world(25, seed=1).number_of_nodes() == 25


def test_ring_and_star_shapes() -> None:
    assert edge_set(ring(5)) == {(0, 1), (1, 2), (2, 3), (3, 4), (0, 4)}
    assert edge_set(ring(2)) == {(0, 1)} and ring(1).number_of_edges() == 0
    assert edge_set(star(5)) == {(0, i) for i in range(1, 5)}


def test_torus_is_4_regular_with_wraparound() -> None:
    G = torus(16)  # 4 x 4, the most square shape
    assert degrees(G) == {4}
    assert set(G[0]) == {1, 3, 4, 12}
    G = torus(12, rows=4)  # 4 rows x 3 columns
    assert degrees(G) == {4}
    assert set(G[0]) == {1, 2, 3, 9}
    assert G.number_of_edges() == 2 * 12
    assert set(torus(36)[0]) == {1, 5, 6, 30}  # 6 x 6 rather than 3 x 12 or 4 x 9


@pytest.mark.parametrize("n", [7, 8, 10])
def test_torus_without_valid_shape_says_so(n: int) -> None:
    with pytest.raises(TopologyError, match=rf"n={n} cannot be split .* >= 3"):
        torus(n)


def test_torus_rejects_rows_that_do_not_divide() -> None:
    with pytest.raises(TopologyError, match="rows=5"):
        torus(12, rows=5)


@pytest.mark.parametrize("n", [1, 2, 8, 32])
def test_hypercube_degree_is_log2_n(n: int) -> None:
    G = hypercube(n)
    assert degrees(G) == {int(math.log2(n))}
    assert all(bin(u ^ v).count("1") == 1 for u, v in G.edges)


def test_hypercube_rejects_non_power_of_two() -> None:
    with pytest.raises(TopologyError, match="power of two"):
        hypercube(12)


@pytest.mark.parametrize(("n", "degree"), [(16, 7), (10, 6), (12, 6), (2, 1)])
def test_exponential_degree(n: int, degree: int) -> None:
    assert degrees(exponential(n)) == {degree}


def test_exponential_links_powers_of_two_both_ways() -> None:
    assert set(exponential(16)[0]) == {1, 2, 4, 8, 15, 14, 12}


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: erdos_renyi(40, p=0.2, seed=seed),
        lambda seed: random_regular(40, degree=4, seed=seed),
        lambda seed: small_world(40, k=4, p=0.3, seed=seed),
    ],
    ids=["erdos_renyi", "random_regular", "small_world"],
)
def test_random_graphs_reproducible_by_seed(make: Callable[[int], nx.Graph]) -> None:
    assert edge_set(make(7)) == edge_set(make(7))
    assert edge_set(make(7)) != edge_set(make(8))


@pytest.mark.parametrize(("n", "degree"), [(20, 3), (200, 2), (30, 20), (30, 29), (2, 1)])
def test_random_regular_is_regular_and_connected(n: int, degree: int) -> None:
    G = random_regular(n, degree=degree, seed=3)
    assert G.number_of_nodes() == n
    assert degrees(G) == {degree}
    assert nx.is_connected(G)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"degree": 3}, "even"), ({"degree": 5}, "degree must be < n"), ({"degree": 0}, "never connected")],
)
def test_random_regular_rejects_impossible_degrees(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        random_regular(5, **kwargs)


def test_erdos_renyi_gives_up_naming_p_and_n() -> None:
    with pytest.raises(TopologyError, match=r"p=0\.01 on n=100 .* 5 tries"):
        erdos_renyi(100, p=0.01, seed=0, max_tries=5)


@pytest.mark.parametrize("bad", [{"p": 1.5}, {"p": -0.1}, {"p": 0.5, "seed": -1}])
def test_erdos_renyi_rejects_bad_parameters(bad: dict[str, float]) -> None:
    with pytest.raises(TopologyError):
        erdos_renyi(10, **bad)


def test_small_world_rejects_odd_k() -> None:
    with pytest.raises(TopologyError, match="k must be even"):
        small_world(20, k=3)


def test_time_varying_random_depends_only_on_seed_and_round() -> None:
    first = time_varying_random(30, degree=4, round=0, seed=5)
    assert edge_set(first) == edge_set(time_varying_random(30, degree=4, round=0, seed=5))
    assert edge_set(first) != edge_set(time_varying_random(30, degree=4, round=1, seed=5))
    assert edge_set(first) != edge_set(time_varying_random(30, degree=4, round=0, seed=6))
    for t in range(3):
        G = time_varying_random(30, degree=4, round=t, seed=5)
        assert degrees(G) == {4} and nx.is_connected(G)


# ------------------------------------------------------------------------------------------------
# from_file


def test_from_file_edge_list_relabels_in_numeric_order(tmp_path: Path) -> None:
    path = tmp_path / "graph.txt"
    path.write_text("# a square\n3 10\n10 20   # trailing comment\n\n20 40\n40 3\n")
    G = from_file(path, n=4)
    assert set(G.nodes) == {0, 1, 2, 3}
    assert edge_set(G) == {(0, 1), (1, 2), (2, 3), (0, 3)}
    assert G.nodes[1]["file_id"] == "10"


def test_from_file_graphml(tmp_path: Path) -> None:
    source = nx.Graph([("n0", "n1"), ("n1", "n2"), ("n2", "n10"), ("n10", "n0"), ("n0", "n2")])
    path = tmp_path / "graph.graphml"
    nx.write_graphml(source, path)
    G = from_file(path)
    assert G.number_of_nodes() == 4
    # natural order: n0, n1, n2, n10
    assert edge_set(G) == {(0, 1), (1, 2), (2, 3), (0, 3), (0, 2)}


def test_from_file_malformed_line_names_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.txt"
    path.write_text("0 1\n1 2\n2 3 0.5\n")
    with pytest.raises(TopologyError) as info:
        from_file(path)
    assert str(path) in str(info.value) and "line 3" in str(info.value)


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        ("0 1\n1 1\n", {}, "line 2: self loop"),
        ("0 1\n1 2\n", {"n": 4}, "3 nodes but n=4"),
        ("# nothing\n", {}, "no nodes"),
    ],
)
def test_from_file_rejects_bad_graphs(
    tmp_path: Path, content: str, kwargs: dict[str, int], message: str
) -> None:
    path = tmp_path / "g.txt"
    path.write_text(content)
    with pytest.raises(TopologyError, match=message) as info:
        from_file(path, **kwargs)
    assert str(path) in str(info.value)


def test_from_file_missing_and_invalid_graphml(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="does not exist") as info:
        from_file(tmp_path / "absent.txt")
    assert str(tmp_path / "absent.txt") in str(info.value)
    bad = tmp_path / "bad.graphml"
    bad.write_text("this is not xml")
    with pytest.raises(TopologyError, match="GraphML") as info:
        from_file(bad)
    assert str(bad) in str(info.value)


# ------------------------------------------------------------------------------------------------
# mixing matrices

MIXING_CASES = [
    (graph, rule)
    for graph in ["ring", "torus", "complete", "star", "erdos_renyi", "exponential", "hypercube"]
    for rule in MIXING_RULES
    if not (rule == "uniform" and graph in ("star", "erdos_renyi"))
]


@pytest.mark.parametrize(("graph", "rule"), MIXING_CASES)
def test_mixing_matrix_is_a_valid_gossip_matrix(graph: str, rule: str) -> None:
    G = FACTORIES[graph]()
    W = mixing_matrix(G, rule)
    n = G.number_of_nodes()
    assert W.shape == (n, n) and W.dtype == np.float64
    np.testing.assert_array_equal(W, W.T)
    np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)
    assert (W >= 0).all()
    allowed = nx.to_numpy_array(G, nodelist=range(n)) + np.eye(n)
    assert (W[allowed == 0] == 0).all()
    assert (W[allowed != 0] > 0).all()
    assert 0.0 < spectral_gap(W) <= 1.0


def test_metropolis_hastings_weights_on_a_star() -> None:
    W = mixing_matrix(star(4))  # centre degree 3, leaves degree 1
    assert W[0, 1] == pytest.approx(1 / 4)
    assert W[0, 0] == pytest.approx(1 / 4)
    assert W[1, 1] == pytest.approx(3 / 4)


def test_max_degree_uses_one_global_weight() -> None:
    W = mixing_matrix(star(5), "max_degree")
    assert W[0, 3] == pytest.approx(1 / 5)
    assert W[2, 2] == pytest.approx(4 / 5)


def test_uniform_on_ring_is_one_third() -> None:
    W = mixing_matrix(ring(6), "uniform")
    assert W[0, 0] == W[0, 1] == W[0, 5] == pytest.approx(1 / 3)


@pytest.mark.parametrize("n", [2, 5, 8])
def test_complete_graph_with_uniform_rule_is_exact_averaging(n: int) -> None:
    W = mixing_matrix(complete(n), "uniform")
    np.testing.assert_array_equal(W, np.full((n, n), 1.0 / n))
    assert spectral_gap(W) == pytest.approx(1.0)


def test_uniform_rule_needs_a_regular_graph() -> None:
    with pytest.raises(TopologyError, match="regular"):
        mixing_matrix(star(5), "uniform")


def test_unknown_rule_lists_accepted_rules() -> None:
    with pytest.raises(TopologyError, match="metropolis_hastings.*uniform.*max_degree"):
        mixing_matrix(ring(5), "laplacian")


def test_mixing_rejects_nodes_that_are_not_0_to_n_minus_1() -> None:
    with pytest.raises(TopologyError, match="0..n-1"):
        mixing_matrix(nx.path_graph(["a", "b", "c"]))


@pytest.mark.parametrize("rule", MIXING_RULES)
def test_sparse_mixing_equals_dense(rule: str) -> None:
    G = random_regular(24, degree=4, seed=2) if rule == "uniform" else erdos_renyi(24, p=0.2, seed=2)
    S = sparse_mixing(G, rule)
    assert S.layout == torch.sparse_coo and S.dtype == torch.float64
    assert S._nnz() == G.number_of_nodes() + 2 * G.number_of_edges()
    np.testing.assert_array_equal(S.to_dense().numpy(), mixing_matrix(G, rule))


# ------------------------------------------------------------------------------------------------
# spectral gap and connectivity


def test_spectral_gap_of_ring_matches_closed_form() -> None:
    n = 10
    expected = 1 - (1 + 2 * math.cos(2 * math.pi / n)) / 3  # MH on a ring: weights 1/3
    assert spectral_gap(mixing_matrix(ring(n))) == pytest.approx(expected, abs=1e-12)


def test_spectral_gap_of_a_large_sparse_ring_converges_to_the_closed_form() -> None:
    # Lanczos needs about n/2 iterations on a ring; stopped at 300 it returned 1.58e-5 here
    # (an upper bound, 1.2x the exact 1.316e-5; 2x at 2,000 nodes)
    n = 1000
    expected = 1 - (1 + 2 * math.cos(2 * math.pi / n)) / 3
    assert spectral_gap(sparse_mixing(ring(n))) == pytest.approx(expected, rel=1e-8)


def test_spectral_gap_raises_instead_of_returning_an_unconverged_bound() -> None:
    with pytest.raises(TopologyError, match="did not converge in 100 iterations"):
        spectral_gap(sparse_mixing(ring(1000)), max_iter=100)
    G = random_regular(3000, degree=4, seed=1)  # well connected: converges within the default cap
    assert 0.05 < spectral_gap(sparse_mixing(G)) < 0.2


def test_spectral_gap_orders_topologies() -> None:
    gaps = [spectral_gap(mixing_matrix(f(64))) for f in (ring, torus, hypercube, complete)]
    assert gaps[0] < gaps[1] < gaps[2] < gaps[3] == pytest.approx(1.0)


def test_spectral_gap_counts_negative_eigenvalues() -> None:
    # a swap of two nodes never converges: its eigenvalues are 1 and -1
    W = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert spectral_gap(W) == pytest.approx(0.0, abs=1e-12)


def test_sparse_spectral_gap_agrees_with_dense() -> None:
    for G in (torus(100), random_regular(300, degree=6, seed=0)):
        dense = spectral_gap(mixing_matrix(G))
        assert spectral_gap(sparse_mixing(G)) == pytest.approx(dense, rel=1e-6, abs=1e-9)
        assert spectral_gap(torch.from_numpy(mixing_matrix(G))) == pytest.approx(dense, abs=1e-12)


def test_spectral_gap_rejects_a_non_stochastic_matrix() -> None:
    with pytest.raises(TopologyError, match="doubly stochastic"):
        spectral_gap(np.full((3, 3), 0.5))
    with pytest.raises(TopologyError, match="symmetric"):
        spectral_gap(np.array([[0.5, 0.5], [0.0, 1.0]]))


def test_disconnected_graph_has_zero_gap_and_fails_require_connected() -> None:
    G = nx.disjoint_union(ring(5), complete(4))
    assert spectral_gap(mixing_matrix(G)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(TopologyError, match=r"disconnected \(2 components\) but gossip averaging"):
        require_connected(G, "gossip averaging")
    require_connected(ring(5), "gossip averaging")  # no error


# ------------------------------------------------------------------------------------------------
# build by name


def test_build_suggests_close_names() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'ring'"):
        build("rnig", 8)


def test_build_passes_options_and_lists_accepted_keys() -> None:
    assert edge_set(build("torus", 12, rows=4)) == edge_set(torus(12, rows=4))
    with pytest.raises(TopologyError, match=r"does not accept 'q'.*accepted keys: p, seed, max_tries"):
        build("erdos_renyi", 10, q=0.5)
    with pytest.raises(TopologyError, match="needs 'p'"):
        build("erdos_renyi", 10)


def test_build_forwards_seed_only_to_random_factories() -> None:
    assert edge_set(build("erdos_renyi", 20, p=0.3, seed=4)) == edge_set(
        erdos_renyi(20, p=0.3, seed=4)
    )
    assert edge_set(build("ring", 6, seed=4)) == edge_set(ring(6))


def test_build_from_file_takes_n_from_the_federation(tmp_path: Path) -> None:
    path = tmp_path / "g.txt"
    path.write_text("0 1\n1 2\n2 0\n")
    assert edge_set(build("from_file", 3, path=str(path))) == {(0, 1), (1, 2), (0, 2)}
    with pytest.raises(TopologyError, match="3 nodes but n=4"):
        build("from_file", 4, path=str(path))
