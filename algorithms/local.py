"""Local-only training: every client trains its own model on its own data and never communicates,
the floor any personalised method must beat.

It is `fedsim.keep_local_rounds` with every tensor local: the rounds sample clients as FedAvg does
(so each client gets the same local work as under the federated methods), nothing is sent (0
bytes), the server's model never moves, and per-client accuracy is of each client's own model (of
the initial model for a client never sampled). There is no merge, so `[aggregator]` and
`[server_optimizer]` are refused.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from fedsim import LocalSGDConfig, RunContext, ServerRounds, keep_local_rounds, register_algorithm


class LocalConfig(LocalSGDConfig):
    accepts_aggregator: ClassVar[bool] = False
    clients_per_round: int = Field(10, ge=1)


@register_algorithm("local")
def local(cfg: LocalConfig, ctx: RunContext) -> ServerRounds:
    return keep_local_rounds(ctx, cfg, list(ctx.init_params), merge=False)
