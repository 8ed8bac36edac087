"""The conformance suites: `check_aggregator` accepts valid rules (stateful, non-weighted) and
rejects one broken rule per property in one line; `check_flow` passes every built-in algorithm and
catches a flow whose declared state misses an attribute, naming it."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import Field

from fedsim import Aggregator, LocalSGDConfig, Params, RunContext, ServerRounds, SGDTrainer, UpdateBatch, weighted_sum
from fedsim import checkpoint, registry
from fedsim.algorithms.fedavg import WeightedMean
from fedsim.errors import FedsimError
from fedsim.testing import INT_BUFFER, check_aggregator, check_flow, example_batch
from tests.conftest import SMALL

# ---------------------------------------------------------------------------------------------
# rules that conform


class ServerMomentum(Aggregator):
    """FedAvgM's server: v <- beta v + (mean - w), w <- w + v. Its first call is the plain mean."""

    tags = {"stateful": True}

    def __init__(self, beta: float = 0.9):
        self.beta = beta

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        mean = weighted_sum(batch.params, batch.weights())
        center = batch.center(global_params)  # the global model, or a zero update
        velocity = getattr(self, "velocity_", {})
        out, new = {}, {}
        for k, c in center.items():
            if not c.is_floating_point():
                out[k] = mean[k]
                continue
            new[k] = self.beta * velocity.get(k, torch.zeros_like(c)) + (mean[k] - c)
            out[k] = c + new[k]
        self.velocity_ = new
        return out


class FedAdam(Aggregator):
    """FedAdam (Reddi et al., ICLR 2021): Adam's moments on the mean update, no bias correction."""

    tags = {"stateful": True, "server_optimizer": True}

    def __init__(self, lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        mean = weighted_sum(batch.params, batch.weights())
        center = batch.center(global_params)
        m, v = getattr(self, "m_", {}), getattr(self, "v_", {})
        out, new_m, new_v = {}, {}, {}
        for k, c in center.items():
            if not c.is_floating_point():
                out[k] = mean[k]
                continue
            d = mean[k] - c  # the pseudo-gradient
            new_m[k] = self.beta1 * m.get(k, torch.zeros_like(c)) + (1 - self.beta1) * d
            new_v[k] = self.beta2 * v.get(k, torch.zeros_like(c)) + (1 - self.beta2) * d * d
            out[k] = c + self.lr * new_m[k] / (new_v[k].sqrt() + self.tau)
        self.m_, self.v_ = new_m, new_v
        return out


class Krum(Aggregator):
    """Krum (Blanchard et al., NeurIPS 2017): the client closest to its n - f - 2 nearest others.
    It ignores example counts and needs 2f + 3 clients."""

    def __init__(self, f: int = 1):
        self.f = f

    @property
    def tags(self) -> dict[str, object]:
        return {"uses_weights": False, "min_clients": 2 * self.f + 3}

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        n = len(batch)
        if n < 2 * self.f + 3:
            raise ValueError(f"Krum with f = {self.f} needs at least {2 * self.f + 3} clients, got {n}")
        flat = torch.cat([t.reshape(n, -1).double() for t in batch.params.values() if t.is_floating_point()], 1)
        dist = torch.cdist(flat, flat) ** 2
        scores = dist.sort(dim=1).values[:, 1 : n - self.f - 1].sum(1)  # column 0: the client itself
        best = int(scores.argmin())
        return {k: t[best].clone() for k, t in batch.params.items()}


@pytest.mark.parametrize("rule", [ServerMomentum(), FedAdam(), Krum(), Krum(f=2), WeightedMean()], ids=lambda r: type(r).__name__)
def test_valid_rules_pass_stateful_and_non_weighted_included(rule):
    check_aggregator(rule)


def test_each_check_works_on_a_fresh_clone_and_leaves_the_rule_as_given():
    rule = ServerMomentum()
    check_aggregator(rule)
    assert not hasattr(rule, "velocity_")  # never called itself
    # the identity check only holds on a fresh clone's first call: a used rule has momentum left
    g, batch = example_batch()
    rule(g, batch, round=1)
    same = UpdateBatch({k: v[:1].expand_as(v).clone() for k, v in batch.params.items()}, batch.num_examples,
                       batch.client_ids, batch.staleness)
    out = rule(g, same, round=2)
    assert not torch.allclose(out["layer.bias"], same.params["layer.bias"][0])
    check_aggregator(rule)  # clones keep the settings, not what the rule learnt, so a used rule passes too
    assert rule.velocity_  # and it keeps what it learnt


# ---------------------------------------------------------------------------------------------
# one broken rule per property


class Mean(Aggregator):
    def __call__(self, global_params, batch, *, round):
        return weighted_sum(batch.params, batch.weights())


class MutatesInput(Mean):
    def __call__(self, global_params, batch, *, round):
        for k, t in batch.params.items():
            if t.is_floating_point():
                t.sub_(global_params[k])  # deltas, computed in the caller's tensors
        delta = weighted_sum(batch.params, batch.weights())
        return {k: global_params[k] + delta[k] if delta[k].is_floating_point() else delta[k] for k in delta}


class DropsKey(Mean):
    def __call__(self, global_params, batch, *, round):
        out = super().__call__(global_params, batch, round=round)
        del out["head.weight"]
        return out


class WrongShape(Mean):
    def __call__(self, global_params, batch, *, round):
        out = super().__call__(global_params, batch, round=round)
        out["layer.bias"] = out["layer.bias"].unsqueeze(0)
        return out


class FloatForIntBuffer(Mean):
    def __call__(self, global_params, batch, *, round):
        return weighted_sum({k: t.float() for k, t in batch.params.items()}, batch.weights())


class DependsOnOrder(Mean):
    def __call__(self, global_params, batch, *, round):
        w = torch.linspace(1.0, 2.0, len(batch), dtype=torch.float64)
        return weighted_sum(batch.params, w / w.sum())


class NotDeterministic(Mean):
    def __call__(self, global_params, batch, *, round):
        out = super().__call__(global_params, batch, round=round)
        return {k: t + 1e-3 * torch.randn(t.shape) if t.is_floating_point() else t for k, t in out.items()}


class NonFinite(Mean):
    def __call__(self, global_params, batch, *, round):
        s = batch.staleness.to(torch.float64)
        return weighted_sum(batch.params, s / s.sum())  # 0 / 0 in synchronous rounds


class FrozenModel(Mean):
    def __call__(self, global_params, batch, *, round):
        return {k: v.clone() for k, v in global_params.items()}


class UndeclaredState(ServerMomentum):
    tags: dict[str, object] = {}


class StateOutsideUnderscore(ServerMomentum):
    def __call__(self, global_params, batch, *, round):
        self.velocity_ = getattr(self, "velocity", {})
        out = super().__call__(global_params, batch, round=round)
        self.velocity = self.velocity_
        del self.velocity_
        return out


class CountsInASetting(Mean):
    def __init__(self):
        self.calls = 0

    def __call__(self, global_params, batch, *, round):
        self.calls += 1
        return super().__call__(global_params, batch, round=round)


class KrumWithoutMinClients(Krum):
    tags = {"uses_weights": False}  # type: ignore[assignment]


class WeightedButSaysNot(Mean):
    tags = {"uses_weights": False}


class AdamWithoutTag(FedAdam):
    tags = {"stateful": True}


class AdamForModelsOnly(FedAdam):
    """Takes mean - global as the pseudo-gradient whatever the batch holds: wrong for updates."""

    def __call__(self, global_params, batch, *, round):
        as_models = UpdateBatch(batch.params, batch.num_examples, batch.client_ids, batch.staleness,
                                coefficients=batch.coefficients)  # relative dropped: always centred on global
        return super().__call__(global_params, as_models, round=round)


class MisspelledTag(Mean):
    tags = {"min_client": 3}


BROKEN = [
    (MutatesInput(), r"^MutatesInput: inputs not mutated: key 'layer.weight': the batch's stacked params were changed in place$"),
    (DropsKey(), r"^DropsKey: keys: key 'head.weight': missing from the output"),
    (WrongShape(), r"^WrongShape: shapes: key 'layer.bias': shape \(1, 4\), expected \(4,\)$"),
    (FloatForIntBuffer(), rf"^FloatForIntBuffer: integer buffers: key '{INT_BUFFER}': dtype torch.float32, expected torch.int64$"),
    (DependsOnOrder(), r"^DependsOnOrder: client order: key 'layer.weight': result depends on client order"),
    (NotDeterministic(), r"^NotDeterministic: deterministic: key 'layer.weight': two fresh copies given the same calls differ"),
    (NonFinite(), r"^NonFinite: finite: key 'layer.weight': non-finite values"),
    (FrozenModel(), r"^FrozenModel: identity: key 'layer.weight': every client sent the same tensor, but the output differs"),
    (UndeclaredState(), r"^UndeclaredState: deterministic: key 'layer.weight': a second call on the same input gave another"),
    (StateOutsideUnderscore(), r"^StateOutsideUnderscore: state: key 'layer.weight': a fresh copy given the state saved after round 2"),
    (CountsInASetting(), r"^CountsInASetting: state: attribute 'calls' changed while aggregating"),
    (KrumWithoutMinClients(), r"^KrumWithoutMinClients: cohort size \(cohort of 1\): raised ValueError: Krum with f = 1 needs"),
    (WeightedButSaysNot(), r"^WeightedButSaysNot: weights: key 'layer.weight': the output depends on the weights, but"),
    (AdamWithoutTag(), r"^AdamWithoutTag: identity: key 'layer.weight': every client sent the same tensor"),
    (AdamForModelsOnly(), r"^AdamForModelsOnly: identity \(updates\): key 'layer.weight': every client sent the same "
                          r"tensor, but the output does not move toward it"),
    (MisspelledTag(), r"^MisspelledTag: tags: unknown tag 'min_client'"),
]


@pytest.mark.parametrize("rule, message", BROKEN, ids=[type(r).__name__ for r, _ in BROKEN])
def test_a_broken_rule_is_named_in_one_line_with_its_property_and_key(rule, message):
    with pytest.raises(AssertionError, match=message) as info:
        check_aggregator(rule)
    assert "\n" not in str(info.value)


def test_each_broken_rule_breaks_only_its_property_when_repaired():
    """The valid base of each broken rule passes: the failures above come from the break itself."""
    check_aggregator(Mean())
    check_aggregator(ServerMomentum())
    check_aggregator(Krum())


# ---------------------------------------------------------------------------------------------
# flows: every built-in algorithm resumes to the same curves and state


def scenario(algorithm: dict, *, topology: bool = False, model: dict | None = None, system: dict | None = None) -> dict:
    raw = {
        "name": "conformance",
        "seed": 3,
        "data": {"dataset": "synthetic", "num_clients": 8, "samples_per_client": 40, "test_size": 200},
        "model": model or {"name": "mlp", "hidden": [16]},
        "algorithm": {"lr": 0.1, "batch_size": 16, **algorithm},
        "system": {"executor": "inline", **(system or {})},
    }
    if topology:
        raw["topology"] = {"name": "ring"}
    return raw


def personal(algorithm: dict, *, model: dict | None = None) -> dict:
    """A scenario whose clients hold out a quarter of their data, for per-client accuracy."""
    raw = scenario(algorithm, model=model)
    raw["data"]["client_test_fraction"] = 0.25
    return raw


PRETRAINED = {"name": "pretrained_mlp", "hidden": [16], "pretrain_examples": 400, "pretrain_epochs": 1}
UNEVEN = {"compute": {"dist": "uniform", "low": 0.01, "high": 0.08}}
GRAPH = {"local_steps": 2}
FLOWS = {
    "dpsgd": scenario({"name": "dpsgd"}, topology=True),
    "dfedavg": scenario({"name": "dfedavg", **GRAPH}, topology=True),
    "dfedavgm": scenario({"name": "dfedavgm", **GRAPH}, topology=True),
    "dfedsam": scenario({"name": "dfedsam", **GRAPH}, topology=True),
    "dfedsam_mgs": scenario({"name": "dfedsam_mgs", **GRAPH, "gossip_steps": 2}, topology=True),
    # CHOCO's public copies x_hat are state too
    "choco": {**scenario({"name": "choco", "gamma": 0.5, "gossip_steps": 2}, topology=True),
              "compression": {"name": "top_k", "ratio": 0.1}},
    # a slow link, so that uplinks queue copies and when each is free again matters
    "gossip": scenario({"name": "gossip", "merge": "variance_corrected"}, topology=True,
                       system={"link": {"bandwidth_mbps": 0.1, "latency_ms": 30}}),
    "fedasync": scenario({"name": "fedasync", "local_steps": 3, "round_seconds": 0.3}, system=UNEVEN),
    "fedbuff": scenario({"name": "fedbuff", "local_steps": 3, "buffer_size": 2, "round_seconds": 0.3}, system=UNEVEN),
    "fedcompass": scenario({"name": "fedcompass", "q_max": 6, "q_min": 2, "round_seconds": 0.3}, system=UNEVEN),
    "modest": scenario({"name": "modest", "sample_size": 4}),
    "fedit": scenario({"name": "fedit", "clients_per_round": 3, "local_steps": 3}, model={**PRETRAINED, "rank": 2}),
    "ffa_lora": scenario({"name": "ffa_lora", "clients_per_round": 3, "local_steps": 3}, model={**PRETRAINED, "rank": 2}),
    "flexlora": scenario({"name": "flexlora", "clients_per_round": 3, "local_steps": 3}, model={**PRETRAINED, "rank": 2}),
    "lora_fair": scenario({"name": "lora_fair", "clients_per_round": 3, "local_steps": 3, "server_steps": 5},
                          model={**PRETRAINED, "rank": 2}),
    "ferret": scenario({"name": "ferret", "clients_per_round": 3, "local_steps": 3, "K": 20, "server_momentum": 0.5},
                       model={**PRETRAINED, "rank": 0}),
    # issue 12's baselines: server state (SCAFFOLD's c, FedDyn's h), server optimisers' moments,
    # drawn steps, and client state (variates, previous models, heads, batch norm, personal models)
    "fedprox": scenario({"name": "fedprox", "clients_per_round": 3, "mu": 0.1}),
    "scaffold": scenario({"name": "scaffold", "clients_per_round": 3, "global_lr": 0.8}),
    "fednova": scenario({"name": "fednova", "clients_per_round": 3, "local_steps_range": [1, 4]}),
    "fedadam": scenario({"name": "fedadam", "clients_per_round": 3}),
    "fedyogi": scenario({"name": "fedyogi", "clients_per_round": 3}),
    "fedadagrad": scenario({"name": "fedadagrad", "clients_per_round": 3}),
    "fedavgm": scenario({"name": "fedavgm", "clients_per_round": 3}),
    "feddyn": scenario({"name": "feddyn", "clients_per_round": 3, "alpha": 0.1}),
    "moon": scenario({"name": "moon", "clients_per_round": 3}),
    "ditto": personal({"name": "ditto", "clients_per_round": 3}),
    "fedper": personal({"name": "fedper", "clients_per_round": 3}),
    "fedrep": personal({"name": "fedrep", "clients_per_round": 3, "head_steps": 2}),
    "fedbn": personal({"name": "fedbn", "clients_per_round": 3}, model={"name": "mlp", "hidden": [16], "batch_norm": True}),
    "local": personal({"name": "local", "clients_per_round": 3}),
    "fedavg_ft": personal({"name": "fedavg_ft", "clients_per_round": 3, "finetune_steps": 2}),
}


@pytest.fixture(autouse=True)
def _pretrained_cache(tmp_path_factory, monkeypatch):
    """Pretrained models are cached once for this module, away from the user's cache."""
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path_factory.getbasetemp() / "conformance-cache"))


def test_every_built_in_algorithm_has_a_flow_check():
    built_in = [name for name in registry.algorithms.names()
                if getattr(registry.algorithms.get(name), "__module__", "").startswith("fedsim.algorithms.")]
    assert len(built_in) >= 16  # other tests register plug-ins of their own; these are the package's
    assert sorted([*FLOWS, "fedavg"]) == built_in


def test_fedavg_resumes_to_the_same_curves_from_toml_text():
    check_flow("fedavg", SMALL.replace("rounds = 4", "rounds = 1"), rounds=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FLOWS))
def test_built_in_flow_resumes_to_the_same_curves_and_state(name):
    check_flow(name, FLOWS[name], rounds=3)


@pytest.mark.slow
def test_flows_with_failures_optimisers_and_rules_resume_to_the_same_curves(tmp_path):
    failures = {"churn_fraction": 0.5, "mean_up": 0.4, "mean_down": 0.2, "message_loss": 0.2}
    for raw in (FLOWS["fedbuff"], FLOWS["gossip"], FLOWS["dpsgd"]):
        raw = copy.deepcopy(raw)
        raw["system"]["failures"] = failures
        check_flow(raw["algorithm"]["name"], raw, rounds=4, resume_from=2)
    # a server optimiser's moments and a rule on updates survive the resume too
    adam = {**scenario({"name": "fedavg", "clients_per_round": 4}), "server_optimizer": {"name": "adam", "lr": 0.05}}
    check_flow("fedavg", adam, rounds=4)
    robust = {**copy.deepcopy(FLOWS["fedbuff"]), "aggregator": {"name": "trimmed_mean", "trim": 0.2},
              "server_optimizer": {"name": "sgd", "lr": 1.0, "momentum": 0.9}}
    robust["algorithm"].pop("server_lr", None)
    check_flow("fedbuff", robust, rounds=4)
    path = tmp_path / "fedavg.toml"
    path.write_text(SMALL.replace("[system]", "[system.failures]\ncrash_fraction = 0.3\ncrash_round = 2\n\n[system]"))
    check_flow("fedavg", path, rounds=4)


# ---------------------------------------------------------------------------------------------
# flows with a declared state that is incomplete, or absent


class MomentumConfig(LocalSGDConfig):
    clients_per_round: int = Field(4, ge=1)
    server_momentum: float = Field(0.9, ge=0, lt=1)


class MomentumRounds(ServerRounds):
    """FedAvgM as a flow: the round's mean update drives a server velocity."""

    STATE = ServerRounds.STATE + ("velocity",)

    def __init__(self, ctx: RunContext, cfg: MomentumConfig):
        super().__init__(ctx, trainer=SGDTrainer.from_config(cfg), aggregator=WeightedMean(),
                         clients_per_round=cfg.clients_per_round)
        self.beta = cfg.server_momentum
        self.velocity = {k: torch.zeros_like(v) for k, v in self.params.items()}

    def step(self, round: int) -> dict[str, float]:
        before = self.params
        metrics = super().step(round)
        self.velocity = {k: self.beta * self.velocity[k] + (self.params[k] - before[k]) for k in before}
        self.params = {k: before[k] + self.velocity[k] for k in before}
        return metrics


class ForgetfulRounds(MomentumRounds):
    STATE = ServerRounds.STATE  # forgets the velocity: a resumed run restarts it from zero


class PolyakRounds(MomentumRounds):
    """Keeps a running average of the models, declared, but its step counter is not: after a resume
    the average weighs rounds differently while the curves (of `params`) stay the same."""

    STATE = MomentumRounds.STATE + ("average",)

    def __init__(self, ctx: RunContext, cfg: MomentumConfig):
        super().__init__(ctx, cfg)
        self.average = {k: v.clone() for k, v in self.params.items()}
        self.t = 0

    def step(self, round: int) -> dict[str, float]:
        metrics = super().step(round)
        self.t += 1
        self.average = {k: a + (self.params[k] - a) / (self.t + 1) for k, a in self.average.items()}
        return metrics


class GlobalNoiseRounds(MomentumRounds):
    """Perturbs the model from torch's global generator, whose state no checkpoint holds."""

    def step(self, round: int) -> dict[str, float]:
        metrics = super().step(round)
        self.params = {k: v + 1e-3 * torch.randn(v.shape) for k, v in self.params.items()}
        return metrics


class StateDictRounds:
    """A flow that states its state with methods instead of STATE."""

    def __init__(self, ctx: RunContext, cfg: MomentumConfig):
        self.inner = MomentumRounds(ctx, cfg)

    def step(self, round: int) -> dict[str, float]:
        return self.inner.step(round)

    def evaluate(self) -> dict[str, float]:
        return self.inner.evaluate()

    def state_dict(self) -> dict[str, object]:
        return {"params": self.inner.params, "velocity": self.inner.velocity}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.inner.params, self.inner.velocity = state["params"], state["velocity"]


class NoState(StateDictRounds):
    state_dict = None  # type: ignore[assignment]


def momentum(cfg: MomentumConfig, ctx: RunContext) -> MomentumRounds:
    return MomentumRounds(ctx, cfg)


def forgetful(cfg: MomentumConfig, ctx: RunContext) -> ForgetfulRounds:
    return ForgetfulRounds(ctx, cfg)


def polyak(cfg: MomentumConfig, ctx: RunContext) -> PolyakRounds:
    return PolyakRounds(ctx, cfg)


def global_noise(cfg: MomentumConfig, ctx: RunContext) -> GlobalNoiseRounds:
    return GlobalNoiseRounds(ctx, cfg)


def by_state_dict(cfg: MomentumConfig, ctx: RunContext) -> StateDictRounds:
    return StateDictRounds(ctx, cfg)


def stateless(cfg: MomentumConfig, ctx: RunContext) -> NoState:
    return NoState(ctx, cfg)


MOMENTUM = scenario({"name": "momentum", "clients_per_round": 4})


def test_a_flow_with_complete_state_passes_by_state_or_by_state_dict():
    check_flow(momentum, MOMENTUM)
    check_flow(by_state_dict, MOMENTUM)


def test_a_flow_that_forgets_an_attribute_resumes_to_other_curves_and_is_named():
    with pytest.raises(AssertionError) as info:
        check_flow(forgetful, MOMENTUM)
    message = str(info.value)
    assert message.startswith("forgetful: resumed from the checkpoint of round 1: metrics.csv row 2 (round 2), column ")
    assert message.endswith("; not restored (not in the flow's declared state, different right after the resume): 'velocity'")
    assert "\n" not in message


def test_a_forgotten_attribute_that_moves_only_the_state_is_caught_at_the_end():
    with pytest.raises(AssertionError, match=r"^polyak: resumed from the checkpoint of round 1: after round 3 the "
                       r"state differs at flow\.average\['.*'\]; not restored .*: 't'$"):
        check_flow(polyak, MOMENTUM)


def test_a_flow_that_draws_from_global_random_state_is_caught_and_that_state_restored():
    before = torch.get_rng_state()
    with pytest.raises(AssertionError, match=r"^global_noise: resumed from the checkpoint of round 1: metrics.csv "
                       r"row 2 \(round 2\), column test_loss"):
        check_flow(global_noise, MOMENTUM)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_flow_without_declared_state_is_refused_when_built():
    with pytest.raises(AssertionError, match=r"^stateless: declared state: algorithm 'stateless': its flow NoState "
                       r"declares no state: list the attributes .* STATE = \(\.\.\.\), or define state_dict\(\)"):
        check_flow(stateless, MOMENTUM)


def test_require_state_names_what_is_wrong_in_one_line():
    class Flow:
        STATE = ("params", "velocity")
        params: dict = {}

    with pytest.raises(FedsimError, match="algorithm 'x': its flow Flow declares 'velocity' in STATE but has no such attribute"):
        checkpoint.require_state(Flow(), "x")
    Flow.STATE = "params"  # type: ignore[assignment]  # a string, not a tuple: ("params") is a common slip
    with pytest.raises(FedsimError, match="must declare STATE as a tuple of attribute names, got 'params'"):
        checkpoint.require_state(Flow(), "x")
    Flow.STATE = ("params",)
    checkpoint.require_state(Flow(), "x")


def test_check_flow_compares_bit_for_bit_and_rejects_what_it_cannot_check():
    with pytest.raises(ValueError, match="needs at least 2 rounds"):
        check_flow(momentum, MOMENTUM, rounds=1)
    with pytest.raises(ValueError, match="resume_from = 3: expected a round from 1 to 2"):
        check_flow(momentum, MOMENTUM, rounds=3, resume_from=3)
    with pytest.raises(ValueError, match="needs an evaluation before the last one"):
        check_flow(momentum, {**MOMENTUM, "eval_every": 5}, rounds=3)
    with pytest.raises(ValueError, match="remove the \\[sweep\\] table"):
        check_flow(momentum, {**MOMENTUM, "sweep": {"seed": [0, 1]}})
