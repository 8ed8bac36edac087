"""DFedAvg and DFedAvgM (Sun et al., 2022): K local SGD steps (with heavy-ball momentum for
DFedAvgM), then one gossip step with the neighbours. The decentralized counterpart of FedAvg and
the baselines of DFedSAM."""

from __future__ import annotations

from pydantic import Field

from fedsim import DecentralizedConfig, GraphRounds, RunContext, register_algorithm


class DFedAvgConfig(DecentralizedConfig):
    local_steps: int | None = Field(5, ge=1)


class DFedAvgMConfig(DFedAvgConfig):
    momentum: float = Field(0.9, ge=0, lt=1)


@register_algorithm("dfedavg")
def dfedavg(cfg: DFedAvgConfig, ctx: RunContext) -> GraphRounds:
    return GraphRounds.from_config(ctx, cfg)


@register_algorithm("dfedavgm")
def dfedavgm(cfg: DFedAvgMConfig, ctx: RunContext) -> GraphRounds:
    return GraphRounds.from_config(ctx, cfg)
