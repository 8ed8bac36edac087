"""D-PSGD (Lian et al., NeurIPS 2017): one local SGD step, then one gossip step, every round.

The baseline that DFedSAM and MoDeST compare against: decentralized SGD where each node averages
with its neighbours after every step.
"""

from __future__ import annotations

from pydantic import Field

from fedsim import DecentralizedConfig, GraphRounds, RunContext, register_algorithm


class DPSGDConfig(DecentralizedConfig):
    local_steps: int | None = Field(1, ge=1)


@register_algorithm("dpsgd")
def dpsgd(cfg: DPSGDConfig, ctx: RunContext) -> GraphRounds:
    return GraphRounds.from_config(ctx, cfg)
