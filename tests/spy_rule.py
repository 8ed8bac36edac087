"""The spy rule and the scenarios of every merge point, shared by the engine-contract and attack
tests. One module, imported under one name by both: a test module imported twice (by pytest, and
by another test as `tests.x`) would register two spies and record calls in the other's list."""

from __future__ import annotations

from fedsim import Aggregator, WeightedMean, register_aggregator
from tests.conftest import SMALL

CALLS: list[tuple[str, tuple[int, ...], bool]] = []


@register_aggregator("test_spy")
class Spy(Aggregator):
    """Records every call (merge point, senders, models or updates), then does what `mode` says:
    `mean` the weighted mean, `freeze` returns the batch's centre (no merge at all)."""

    def __init__(self, mode: str = "mean"):
        self.mode = mode

    def __call__(self, global_params, batch, *, round):
        CALLS.append((type(self).__name__, tuple(batch.client_ids.tolist()), batch.relative))
        if self.mode == "freeze":
            center = batch.center(global_params)
            return {k: center[k].clone() for k in batch.params}
        return WeightedMean()(global_params, batch, round=round)


def scenario(algorithm: str, extra: str = "", topology: bool = False) -> str:
    text = SMALL.replace('name = "fedavg"\nclients_per_round = 4', f'name = "{algorithm}"\n{extra}')
    if topology:
        text = text.replace("[system]", '[topology]\nname = "ring"\n\n[system]')
    return text


METHODS = {
    "fedavg": scenario("fedavg", "clients_per_round = 4"),
    "fedasync": scenario("fedasync", "round_seconds = 1.0\nlocal_steps = 4"),
    "fedbuff": scenario("fedbuff", "round_seconds = 1.0\nlocal_steps = 4"),
    "fedcompass": scenario("fedcompass", "round_seconds = 1.0\nq_max = 8\nq_min = 2"),
    "gossip": scenario("gossip", "", topology=True),
    "dpsgd": scenario("dpsgd", "", topology=True),
    "dfedsam": scenario("dfedsam", "", topology=True),
    "modest": scenario("modest", "sample_size = 4\nlocal_steps = 2"),
}
