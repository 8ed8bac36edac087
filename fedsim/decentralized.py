"""Decentralized learning on a graph: every node keeps its own model, and there is no global one.

Node models are stacked along dim 0 (`X[name]` has shape `(num_nodes, *shape)`), so a gossip step
`X <- W X` is one sparse matrix product per tensor, never a loop over edges, and one `ray.put` of
the stack per round serves every node's training job.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Callable, Literal

import networkx as nx
import numpy as np
import torch
from pydantic import Field

from .aggregation import Aggregator, WeightedMean, combine
from .errors import ScenarioError, TopologyError
from .models import build_model
from .params import Params, UpdateBatch, stack
from .registry import topologies
from .scenario import rule_min_clients
from .training import LocalSGDConfig, TrainJob, Trainer, get_params

if TYPE_CHECKING:
    from .coordinator import RunContext


class DecentralizedConfig(LocalSGDConfig):
    """Settings every graph-based method shares."""

    needs_topology = True
    gossip_steps: int = Field(1, ge=1)
    init: Literal["shared", "independent"] = "shared"
    eval_nodes: int = Field(16, ge=1)

    def neighbourhood_size(self, degree: int) -> tuple[int, str]:
        """Models in the merge of a node with `degree` neighbours, and what they are: its
        neighbours' and its own (the mixing matrix's diagonal)."""
        return degree + 1, "its neighbours' models and its own"


def require_neighbourhoods(G: nx.Graph, need: int, rule: str, size: Callable[[int], tuple[int, str]]) -> None:
    """Refuse a graph where some node's merge holds fewer models than the rule needs (Krum's
    2f + 3 on a ring's three), naming the node, before anything trains: one line, exit 2.
    `size(degree)` is the merge's size for a node of that degree and what it counts."""
    if need <= 1 or G.number_of_nodes() == 0:
        return
    node, degree = min(G.degree, key=lambda nd: (nd[1], nd[0]))
    have, what = size(int(degree))
    if have < need:
        raise ScenarioError(f"{rule} needs at least {need} models per merge, but node {node} has "
                            f"{degree} neighbours, so its merge holds {have} ({what}); use a denser graph "
                            "or a smaller f", key="aggregator")


def initial_nodes(ctx: "RunContext", init: str) -> Params:
    """All nodes from one initialisation ("shared"), or each from its own seed ("independent")."""
    n = ctx.data.num_clients
    if init == "shared":
        return {k: v.unsqueeze(0).repeat(n, *([1] * v.dim())) for k, v in ctx.init_params.items()}
    s = ctx.spec.scenario
    seeds = ctx.generator("init.nodes").integers(2**31, size=n)
    models = [
        get_params(build_model(s.model.name, s.model.options(), ctx.data.feature_shape, ctx.data.num_classes, int(seed)))
        for seed in seeds
    ]
    return stack(models)


def mixing_operator(G: nx.Graph, rule: str) -> torch.Tensor:
    """The gossip matrix as a sparse float32 tensor: O(edges) memory, whatever the node count."""
    from .topologies import sparse_mixing

    return sparse_mixing(G, rule).to(torch.float32).coalesce()


def mix(W: torch.Tensor, X: Params) -> Params:
    """One gossip step: every node replaces its model by the W-weighted sum of its neighbours'."""
    out = {}
    for name, t in X.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        flat = t.reshape(t.shape[0], -1)
        out[name] = torch.sparse.mm(W, flat).reshape(t.shape)
    return out


def rule_mix(rule: Aggregator, W: torch.Tensor, X: Params, round: int, merge: Callable[..., Params] = combine) -> Params:
    """A gossip step with an aggregation rule: every node combines the models of its
    neighbourhood (its own included, the nodes with a non-zero mixing weight), the mixing weights
    as the batch's coefficients. One rule call per node: robust rules do not factor into a
    matrix product."""
    W = W.coalesce()  # entries sorted by row, then column
    (row, col), val = W.indices(), W.values()
    n = W.shape[0]
    bounds = np.searchsorted(row.numpy(), np.arange(n + 1))
    out = {k: v.clone() for k, v in X.items()}
    for i in range(n):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        nbrs = col[lo:hi]
        batch = UpdateBatch(
            params={k: v[nbrs] for k, v in X.items()},
            num_examples=torch.ones(len(nbrs), dtype=torch.int64),
            client_ids=nbrs.to(torch.int64),
            staleness=torch.zeros(len(nbrs), dtype=torch.int64),
            coefficients=val[lo:hi].to(torch.float64),
        )
        own = {k: v[i] for k, v in X.items()}
        combined = merge(rule, own, batch, round=round, where=f"node {i}'s neighbourhood")
        for k, t in combined.items():
            out[k][i] = t
    return out


def directed_edges(G: nx.Graph) -> tuple[np.ndarray, np.ndarray]:
    """Both directions of every edge: one message each way per gossip step."""
    edges = np.asarray(G.edges(), dtype=np.int64).reshape(-1, 2)
    return np.concatenate([edges[:, 0], edges[:, 1]]), np.concatenate([edges[:, 1], edges[:, 0]])


def consensus_distance(X: Params) -> float:
    """mean_i ||x_i - x_bar||^2 over all parameters: how far the nodes are from agreeing."""
    total = 0.0
    for t in X.values():
        if t.is_floating_point():
            flat = t.reshape(t.shape[0], -1).double()
            total += float(((flat - flat.mean(0)) ** 2).sum(1).mean())
    return total


def layer_variance(X: Params, rows: np.ndarray) -> float:
    """Mean over the chosen nodes and their weight tensors of each tensor's variance."""
    values = [
        t[rows].reshape(len(rows), -1).var(dim=1).mean()
        for name, t in X.items()
        if t.is_floating_point() and t[0].numel() > 1
    ]
    return float(torch.stack(values).mean())


class NodeEvaluator:
    """Test metrics of a stack of node models: per-node accuracy on a fixed seeded sample of
    nodes (all nodes when there are few), the accuracy of the averaged model, consensus distance."""

    def __init__(self, ctx: "RunContext", eval_nodes: int):
        self.ctx = ctx
        n = ctx.data.num_clients
        # attackers' models are not the system's: accuracy is that of the honest nodes
        honest = np.setdiff1d(np.arange(n), ctx.attackers)
        rows = honest if len(honest) <= eval_nodes else ctx.generator("eval.nodes").choice(honest, eval_nodes, replace=False)
        self.rows = np.sort(rows)
        self.honest = None if len(honest) == n else torch.from_numpy(honest)

    def __call__(self, X: Params) -> dict[str, float]:
        if self.honest is not None:
            X = {k: v[self.honest] for k, v in X.items()}
            rows = np.searchsorted(self.honest.numpy(), self.rows)
        else:
            rows = self.rows
        accs, losses = zip(*(self.ctx.evaluate({k: v[int(r)] for k, v in X.items()}) for r in rows))
        average = {k: (v.mean(0) if v.is_floating_point() else v[0]) for k, v in X.items()}
        avg_acc, avg_loss = self.ctx.evaluate(average)
        return {
            "test_accuracy": float(np.mean(accs)),
            "test_loss": float(np.mean(losses)),
            "min_node_accuracy": float(np.min(accs)),
            "max_node_accuracy": float(np.max(accs)),
            "avg_model_accuracy": avg_acc,
            "avg_model_loss": avg_loss,
            "consensus_distance": consensus_distance(X),
        }


class GraphRounds:
    """Synchronous decentralized rounds (D-PSGD, DFedAvg(M), DFedSAM, DFedSAM-MGS).

    Every node trains from its own model, then the nodes run `gossip_steps` mixing steps
    X <- W X with the graph's mixing matrix. A round lasts, in simulated time, until the slowest
    node has trained, plus one slowest-link transfer per gossip step. With `time_varying`, a fresh
    graph is drawn every round from the topology's factory with a seed derived from the round.
    """

    STATE = ("X",)

    def __init__(self, ctx: "RunContext", *, trainer: Trainer, gossip_steps: int, init: str, eval_nodes: int, purpose: str):
        if ctx.graph is None:
            raise TopologyError("this method runs on a graph: add a [topology] table", key="topology")
        self.ctx = ctx
        self.purpose = purpose
        self.topology = ctx.spec.scenario.topology
        self.executor = ctx.executor(trainer)
        self.gossip_steps = gossip_steps
        self.rule = ctx.aggregator  # None: the sparse product X <- W X, the fast path
        if self.rule is None and ctx.batch_hooks:  # attackers' rows are replaced per neighbourhood
            self.rule = WeightedMean()
        self.X = initial_nodes(ctx, init)
        self.evaluator = NodeEvaluator(ctx, eval_nodes)
        if self.topology.time_varying and "seed" not in inspect.signature(topologies.get(self.topology.name)).parameters:
            raise TopologyError(f"'{self.topology.name}' is not random, so it cannot vary over time", key="topology.time_varying")
        self._need = rule_min_clients(ctx.spec.scenario) if self.rule is not None else (1, "")
        self._set_graph(ctx.graph)

    @classmethod
    def from_config(cls, ctx: "RunContext", cfg: DecentralizedConfig, trainer: Trainer | None = None) -> "GraphRounds":
        """The rounds a graph method's shared settings describe; plain local SGD unless given a trainer."""
        from .training import SGDTrainer

        return cls(
            ctx, trainer=trainer or SGDTrainer.from_config(cfg), gossip_steps=cfg.gossip_steps, init=cfg.init,
            eval_nodes=cfg.eval_nodes, purpose=f"{cfg.name} (gossip averaging)",
        )

    def _set_graph(self, G: nx.Graph) -> None:
        from .topologies import require_connected

        try:
            require_connected(G, self.purpose)
        except TopologyError as exc:
            raise exc.located(key="topology") from None
        require_neighbourhoods(G, *self._need, lambda d: (d + 1, "its neighbours' models and its own"))
        self.graph = G
        self.W = mixing_operator(G, self.topology.mixing)
        self.senders, self.receivers = directed_edges(G)

    def graph_for(self, round: int) -> nx.Graph:
        options = {**self.topology.options(), "seed": int(self.ctx.generator("topology", round).integers(2**31))}
        return topologies.get(self.topology.name)(self.ctx.data.num_clients, **options)

    def step(self, round: int) -> dict[str, float]:
        if self.topology.time_varying:
            self._set_graph(self.graph_for(round))
        ctx, net = self.ctx, self.ctx.net
        alive = net.alive_mask(ctx.clock.now, round)
        active = np.flatnonzero(alive)
        results = ctx.screen(self.executor.train(self.X, [TrainJob(int(i), round, row=int(i)) for i in active]), round)
        if results:  # a node whose job failed or was dropped keeps its model
            rows = [r.client_id for r in results]
            trained = stack([r.params for r in results])
            for name, t in trained.items():
                self.X[name][rows] = t
        nbytes = sum(t[0].numel() * t.element_size() for t in self.X.values())
        compute = np.zeros(self.ctx.data.num_clients)
        for r in results:
            compute[r.client_id] = net.compute(r.client_id, r.steps, job=round)
        W, senders, receivers = self.W, self.senders, self.receivers
        sending = []
        for q in range(self.gossip_steps):
            if not alive.all() or net.lossy:
                W, senders, receivers = self._surviving(alive, round, q)
            self.X = self.merge(W, self.X, round)
            sizes = self.gossip_bytes(nbytes)
            net.exchange(senders, receivers, sizes if np.ndim(sizes) == 0 else sizes[senders])
            # a node sends one copy per neighbour over its own uplink, one after another
            sending.append(net.gossip_time(senders, sizes))
        ctx.clock.advance_to(ctx.clock.now + float(compute.max(initial=0.0)) + math.fsum(sending))
        losses = [r.train_loss for r in results]
        return {
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "alive_nodes": float(alive.sum()),
        }

    def merge(self, W: torch.Tensor, X: Params, round: int) -> Params:
        """One neighbourhood averaging step: X <- W X as a sparse product, or, with a configured
        `[aggregator]`, the rule applied to each node's neighbourhood (itself included), the
        mixing weights as the batch's weights."""
        if self.rule is None:
            return mix(W, X)
        return rule_mix(self.rule, W, X, round, self.ctx.combine)

    def gossip_bytes(self, model_bytes: int) -> int | np.ndarray:
        """The size of the message each node sent its neighbours in the gossip step just merged:
        one number for all (a whole model, by default), or one per node (a compressed method's
        messages, whose sizes vary)."""
        return model_bytes

    def _surviving(self, alive: np.ndarray, round: int, q: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The mixing operator over the edges that work in this gossip step: both ends up and the
        message not lost (drawn per undirected edge: a lost exchange is lost both ways). Nodes
        left without a working edge keep their own model."""
        keep = alive[self.senders] & alive[self.receivers]
        if self.ctx.net.lossy:
            delivered = self.ctx.net.delivered_many(len(self.senders) // 2, "gossip", round, q)
            keep &= np.concatenate([delivered, delivered])
        G = nx.Graph()
        G.add_nodes_from(range(self.ctx.data.num_clients))
        half = len(self.senders) // 2
        G.add_edges_from(zip(self.senders[:half][keep[:half]].tolist(), self.receivers[:half][keep[:half]].tolist()))
        # the survivors' graph is rarely regular, which the uniform rule needs
        rule = "metropolis_hastings" if self.topology.mixing == "uniform" else self.topology.mixing
        return mixing_operator(G, rule), self.senders[keep], self.receivers[keep]

    def evaluate(self) -> dict[str, float]:
        return self.evaluator(self.X)
