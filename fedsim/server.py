"""Server rounds: sample clients, train them from the global model, aggregate, repeat."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
from torch import Tensor

from .aggregation import Aggregator, make_batch
from .errors import ScenarioError
from .ledger import SERVER
from .params import Params, UpdateBatch, clone, num_bytes
from .sampling import hash_order
from .training import ClientResult, TrainJob, Trainer

if TYPE_CHECKING:
    from .coordinator import RunContext


def _model_bytes(result: ClientResult) -> int:
    """What a client sends by default: its model and every tensor among its extras (FedNova's
    step count, a plug-in's control variate): whatever reaches the server travelled."""
    return num_bytes(result.params) + _extras_bytes(result)


def _extras_bytes(result: ClientResult) -> int:
    return num_bytes({k: v for k, v in result.extras.items() if isinstance(v, Tensor)})


class ServerRounds:
    """The synchronous server loop shared by FedAvg-style methods.

    A round lasts, in simulated time, until the slowest sampled client has downloaded the model,
    trained and uploaded its result, or until `deadline` simulated seconds when one is set. Clients
    still busy at the deadline, down when the round starts (`[system.failures]`), or whose download
    or upload is lost do not count in the round and are recorded as failures; the round goes on
    with the rest. Bytes are counted per message; methods that send less than the whole model
    (adapters, projections) say how much with `download_bytes` and `upload_bytes`. A rule that sets
    a `stats_` dict while aggregating has it added to the round's metrics. Clients are
    sampled uniformly from a per-round generator, or with `sampler = "hash"` as the first nodes of
    the round's hash order (MoDeST's sample, for like-for-like comparisons).
    """

    STATE = ("params", "aggregator_state")

    def __init__(
        self,
        ctx: "RunContext",
        *,
        trainer: Trainer,
        aggregator: Aggregator,
        clients_per_round: int,
        deadline: float | None = None,
        download_bytes: Callable[[Params], int] = num_bytes,
        upload_bytes: Callable[[ClientResult], int] = _model_bytes,
        sampler: str = "uniform",
        payload: Callable[[int], Params] | None = None,
        after_merge: Callable[[UpdateBatch, int], None] | None = None,
        steps: Callable[[int, int], int | None] | None = None,
        prepare: Callable[[Params, UpdateBatch, int], UpdateBatch] | None = None,
        client_model: Callable[[int], Params] | None = None,
    ):
        """`payload(round)` is what the server sends every sampled client besides the model
        (SCAFFOLD's control variate); its bytes are counted with each download. `after_merge(batch,
        round)` sees the round's batch once the model has moved (SCAFFOLD's and FedDyn's server
        state are updated from the clients' extras there). `steps(client, round)` sets a client's
        local steps for the round (None: the trainer's own count), for methods whose clients do
        unequal work (FedNova). `prepare(global_params, batch, round)` turns the cohort's batch into
        the one the rule merges (FedNova's normalised models). `client_model(client)` is the model a
        client would use, for per-client accuracy (`[data] client_test_fraction`): the global
        model when not given, a personalised method's own otherwise."""
        self.sampler = sampler
        self.payload = payload
        self.after_merge = after_merge
        self.steps = steps
        self.prepare = prepare
        self.client_model = client_model
        self.ctx = ctx
        self.deadline = deadline
        self.executor = ctx.executor(trainer)
        self.aggregator = aggregator
        self.clients_per_round = clients_per_round
        self.download_bytes = download_bytes
        self.upload_bytes = upload_bytes
        self.params: Params = clone(ctx.init_params)
        # DP-FedAvg ([privacy] mode = "server") replaces the sample and the merge; it clips and
        # noises the model update alone, so a method that sends or merges more is refused
        self.privacy = ctx.dp_fedavg(clients_per_round)
        if self.privacy is not None:
            hooks = [name for name, hook in (("payload", payload), ("after_merge", after_merge), ("prepare", prepare))
                     if hook is not None]
            if hooks or sampler != "uniform":
                why = f"its {', '.join(hooks)} hook{'s' if len(hooks) > 1 else ''}" if hooks else \
                    f"sampler = {sampler!r} (not random, so sampling does not amplify privacy)"
                raise ScenarioError(f"DP-FedAvg clips and noises the model update only; {ctx.spec.algorithm_config.name} "
                                    f"has {why}: remove [privacy] or use mode = \"local\"", key="privacy.mode")
        # [compression] compresses uploads that are the model (update); methods that count their
        # own upload (adapters, projections, control variates) are left alone, and refused
        self.compression = ctx.uploads() if upload_bytes is _model_bytes else None

    @property
    def aggregator_state(self) -> dict[str, object]:
        """What the rule has learnt across rounds: its attributes ending in `_` (scikit-learn's rule)."""
        return {k: v for k, v in vars(self.aggregator).items() if k.endswith("_")}

    @aggregator_state.setter
    def aggregator_state(self, state: dict[str, object]) -> None:
        for k, v in state.items():
            setattr(self.aggregator, k, v)

    def sample(self, round: int) -> np.ndarray:
        n = self.ctx.data.num_clients
        if self.sampler == "hash":
            return np.sort(hash_order(n, round)[: self.clients_per_round])
        rng = self.ctx.generator("sample", round)
        return np.sort(rng.choice(n, size=self.clients_per_round, replace=False))

    def step(self, round: int) -> dict[str, float]:
        ctx, net, now = self.ctx, self.ctx.net, self.ctx.clock.now
        poisson = self.privacy.sample(ctx, round) if self.privacy is not None else None
        sampled = self.sample(round) if poisson is None else poisson
        extra = self.payload(round) if self.payload is not None else None
        down = self.download_bytes(self.params) + (num_bytes(extra) if extra else 0)
        reached = [c for c in net.post(SERVER, sampled, down, purpose="download", ids=(round,)) if net.alive(c, now, round)]
        jobs = [TrainJob(c, round, steps=None if self.steps is None else self.steps(c, round)) for c in reached]
        results = self.executor.train(self.params, jobs, extra) if reached else []
        results = ctx.screen(results, round)
        limit = self.deadline if self.deadline is not None else np.inf
        sizes: dict[int, int] = {}
        if self.compression is not None:  # what arrives is the model rebuilt from the compressed update
            results, sizes = self.compression.apply(ctx, self.params, results, round)
        kept, longest = [], 0.0
        for r in results:
            up = self.upload_bytes(r) if not sizes else sizes[r.client_id] + _extras_bytes(r)
            duration = net.round_trip(r.client_id, r.steps, down, up, job=round, limit=limit)
            longest = max(longest, min(duration, limit))
            if duration <= limit and net.post(r.client_id, [SERVER], up, purpose="upload", ids=(round,)):
                kept.append(r)
        if len(kept) < len(sampled) and self.deadline is not None:
            longest = self.deadline  # the server waited for someone who never came
        ctx.clock.advance_to(now + longest)
        metrics = {"failures": float(len(sampled) - len(kept))}
        if self.privacy is not None:
            return self._private_merge(kept, round, metrics)
        if not kept:
            return {"train_loss": float("nan"), **metrics}
        batch = make_batch(kept)
        if hasattr(self.aggregator, "stats_"):
            self.aggregator.stats_ = {}  # this round's figures only
        merged = batch if self.prepare is None else self.prepare(self.params, batch, round)
        combined = ctx.combine(self.aggregator, self.params, merged, round=round, where="the server's merge")
        self.params = ctx.server_step(self.params, {**self.params, **combined}, round=round)
        if self.after_merge is not None:
            self.after_merge(batch, round)
        weights = batch.weights().numpy()
        metrics["train_loss"] = float(sum(w * r.train_loss for w, r in zip(weights, kept)))
        # a rule may report per-round figures (LoRA-FAIR's cosines, Ferret's reconstruction error)
        metrics.update(getattr(self.aggregator, "stats_", None) or {})
        return metrics

    def _private_merge(self, kept: list[ClientResult], round: int, metrics: dict[str, float]) -> dict[str, float]:
        """DP-FedAvg's merge: the engine's view of the batch (an adversary's rows included),
        clipped, averaged over the expected cohort, noised; then the server's step (a server
        optimiser post-processes the noisy update, which costs no privacy). An empty round still
        releases noise, and counts for the accountant."""
        ctx = self.ctx
        batch = make_batch(kept) if kept else None
        if batch is not None:
            for hook in ctx.batch_hooks:
                batch = hook(batch, self.params, round)
        assert self.privacy is not None
        new, figures = self.privacy.merge(ctx, self.params, batch, round)
        self.params = ctx.server_step(self.params, new, round=round)
        metrics.update(figures)
        metrics["train_loss"] = float(np.mean([r.train_loss for r in kept])) if kept else float("nan")
        return metrics

    def evaluate(self) -> dict[str, float]:
        acc, loss = self.ctx.evaluate(self.params)
        clients = self.ctx.client_accuracy(self.params if self.client_model is None else self.client_model)
        return {"test_accuracy": acc, "test_loss": loss, **clients}

    def evaluation(self) -> Callable[[], dict[str, float]] | None:
        """`evaluate` of the model as it is now, to run later (the coordinator overlaps it with
        the next round). `step` replaces `self.params`, never writes into it, so holding the
        dict is a snapshot. A subclass with its own `evaluate`, or a personalised method (whose
        clients' models live in state the next round changes), is evaluated in turn instead."""
        if type(self).evaluate is not ServerRounds.evaluate or self.client_model is not None:
            return None
        params, ctx = self.params, self.ctx

        def run() -> dict[str, float]:
            acc, loss = ctx.evaluate(params)
            return {"test_accuracy": acc, "test_loss": loss, **ctx.client_accuracy(params)}

        return run
