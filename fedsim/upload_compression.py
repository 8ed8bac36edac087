"""Where a scenario's `[compression]` table meets server rounds and event-driven servers (FedAsync,
FedBuff, FedCompass: per arrival, from the model that job started with): each client's upload is
its update compressed (with error feedback, the compressor's leftover kept for the client's next
upload), the server reconstructs the client's model from what arrived, and the ledger is charged
the compressed message's exact size.

The compressors are the pure functions of `fedsim.compression`. Compression runs on the driver
as results come home, which gives the numbers a client-side compressor would: the update, the
generator (seed, "compression", round, client) and the error memory are the client's own. The
memory is kept per client by the engine, like a trainer's client state, and checkpointed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch

from .client_state import ClientStates
from .compression import CompressionConfig, build_compressor, error_feedback
from .params import Params
from .training import ClientResult


class UploadCompression:
    def __init__(self, cfg: CompressionConfig):
        self.cfg = cfg
        self.compressor = build_compressor(cfg)
        self.memory = ClientStates()  # client -> its error memory e_k (error feedback only)

    def apply(
        self, ctx: Any, params: Params, results: Sequence[ClientResult], round: int, job: int | None = None,
    ) -> tuple[list[ClientResult], dict[int, int]]:
        """Each result with its model replaced by `params` + the compressed update, and each
        client's message size in bytes. `job` (an event-driven server's per-client job counter)
        tells apart two uploads of one client in one recorded round, which would otherwise draw
        the same random coordinates."""
        out, sizes = [], {}
        for r in results:
            update = {n: (t - params[n]) if t.is_floating_point() else t for n, t in r.params.items()}
            ids = (round, r.client_id) if job is None else (round, r.client_id, job)
            rng = ctx.generator("compression", *ids)
            if self.cfg.error_feedback:
                memory = self.memory.states.get(r.client_id)
                sent, nbytes, left = error_feedback(self.compressor, update, memory, rng)
                self.memory.states[r.client_id] = left
            else:
                sent, nbytes = self.compressor(update, rng)
            model = {n: (params[n] + sent[n]) if t.is_floating_point() else sent[n] for n, t in r.params.items()}
            out.append(replace(r, params=model))
            sizes[r.client_id] = int(nbytes)
        return out, sizes

    def message_bytes(self, params: Params) -> int:
        """The size of one upload of a model shaped like `params`, known before the update is:
        every compressor's size depends on the shapes alone (top-k's also on which tensors its k
        values fall in, when floating tensors mix dtypes; this counts a zero update's). Event-driven
        servers time an upload when they dispatch the job, before it is trained."""
        zeros = {n: torch.zeros_like(t) for n, t in params.items()}
        return int(self.compressor(zeros, np.random.default_rng(0))[1])

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.states = dict(state["memory"])
