"""DFedAvg and DFedAvgM (Sun et al., 2022): K local SGD steps (with heavy-ball momentum for
DFedAvgM), then one gossip step with the neighbours. The decentralized counterpart of FedAvg and
the baselines of DFedSAM."""

from __future__ import annotations

from pydantic import Field

from fedsim import RunContext, SGDTrainer, register_algorithm
from fedsim.decentralized import DecentralizedConfig, GraphRounds


class DFedAvgConfig(DecentralizedConfig):
    local_steps: int | None = Field(5, ge=1)


class DFedAvgMConfig(DFedAvgConfig):
    momentum: float = Field(0.9, ge=0, lt=1)


def _rounds(cfg: DFedAvgConfig, ctx: RunContext) -> GraphRounds:
    return GraphRounds(
        ctx, trainer=SGDTrainer.from_config(cfg), gossip_steps=cfg.gossip_steps, init=cfg.init,
        eval_nodes=cfg.eval_nodes, purpose=f"{cfg.name} (gossip averaging)",
    )


@register_algorithm("dfedavg")
def dfedavg(cfg: DFedAvgConfig, ctx: RunContext) -> GraphRounds:
    return _rounds(cfg, ctx)


@register_algorithm("dfedavgm")
def dfedavgm(cfg: DFedAvgMConfig, ctx: RunContext) -> GraphRounds:
    return _rounds(cfg, ctx)
