"""Plug-ins for Ray tests, in a module of their own: Ray's workers import them by module name
(`tests.ray_plugins`, the repository being their working directory), which a test module that
pytest imports under its bare name would not allow."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from fedsim.training import SGDTrainer


@dataclass(frozen=True)
class DyingTrainer(SGDTrainer):
    """Kills its own worker process while training `victim`'s job, `deaths` times in all (counted
    in files in `tally`, since the process's memory dies with it): an actor dying as if out of memory."""

    victim: int = 3
    deaths: int = 0
    tally: str = ""

    def train(self, model, params, x, y, job, rng):
        if job.client_id == self.victim and len(os.listdir(self.tally)) < self.deaths:
            Path(self.tally, f"death-{time.monotonic_ns()}").write_text("")
            os._exit(1)
        return super().train(model, params, x, y, job, rng)
