"""FedAsync (Xie, Koyejo, Gupta, 2019): apply every update the moment it arrives.

w <- (1 - alpha_t) w + alpha_t w_client with alpha_t = alpha * s(tau), tau the number of global
versions since the client read its model and s the staleness function ((tau + 1)^(-a) by
default). The client then restarts at once from the new model. Defaults as in the FedCompass
repository's baseline config: alpha 0.9, polynomial a = 0.5.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fedsim import Arrival, AsyncConfig, AsyncServer, RunContext, SGDTrainer, register_algorithm


class FedAsyncConfig(AsyncConfig):
    alpha: float = Field(0.9, gt=0, le=1)
    local_steps: int | None = Field(20, ge=1)


class FedAsync(AsyncServer):
    def __init__(self, cfg: FedAsyncConfig, ctx: RunContext):
        super().__init__(ctx, cfg, SGDTrainer.from_config(cfg))
        self.alpha = cfg.alpha

    def on_arrival(self, arrival: Arrival, now: float) -> None:
        tau = self.version - arrival.version
        mix = self.alpha * self.weight(tau)
        # (1 - m) w + m w_c  ==  w - m (w - w_c)
        diff = {k: self.params[k] - v for k, v in arrival.result.params.items()}
        self.merge([diff], np.array([mix]), [arrival.client], [tau])
        self.applied_staleness.append(tau)
        self.dispatch(arrival.client, now, int(self.steps[arrival.client]))


@register_algorithm("fedasync")
def fedasync(cfg: FedAsyncConfig, ctx: RunContext) -> FedAsync:
    return FedAsync(cfg, ctx)
