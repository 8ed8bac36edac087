"""The one event loop under every event-driven method (FedAsync, FedBuff, FedCompass, gossip
learning, MoDeST): handlers run in simulated-time order, ties in the order they were scheduled.

What those methods share is written here once: advancing the clock to each event, nodes that were
down when they should have worked restarting once they are back up (checked at round boundaries),
and a job whose node died while it trained being dropped rather than delivered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Hashable, Mapping

import numpy as np

from .clock import EventQueue
from .jobs import JobPool
from .training import ClientResult

if TYPE_CHECKING:
    from .coordinator import RunContext

Handler = Callable[[Any, float], None]


class EventLoop:
    STATE = ("queue", "idle")

    def __init__(self, ctx: "RunContext", handlers: Mapping[str, Handler]):
        self.ctx = ctx
        self.handlers = dict(handlers)
        self.queue = EventQueue()
        self.idle = np.zeros(ctx.data.num_clients, dtype=bool)  # down when it should have worked

    def at(self, time: float, kind: str, payload: Any = None) -> None:
        """Run handler `kind` with `payload` at simulated `time`."""
        if kind not in self.handlers:
            raise KeyError(f"no handler for event kind {kind!r}")
        self.queue.push(time, kind, payload)

    def run(self, horizon: float, *, until: Callable[[], bool] | None = None) -> None:
        """Handle every event up to `horizon` (or until `until()` holds), advancing the clock."""
        clock = self.ctx.clock
        while self.queue and self.queue.peek().time <= horizon and not (until is not None and until()):
            event = self.queue.pop()
            clock.advance_to(event.time)
            self.handlers[event.kind](event.payload, event.time)

    def __len__(self) -> int:
        return len(self.queue)

    def rejoin(self, round: int, restart: Callable[[int, float], None]) -> None:
        """Restart every idle node that is up again now (a round boundary)."""
        now = self.ctx.clock.now
        for node in np.flatnonzero(self.idle):
            if self.ctx.net.alive(int(node), now, round):
                self.idle[node] = False
                restart(int(node), now)

    def finish(self, jobs: JobPool, key: Hashable, node: int, now: float, round: int) -> ClientResult | None:
        """The result of `node`'s job `key`, done at `now`; None, with the job cancelled and the
        node marked idle, when the node went down while training."""
        if not self.ctx.net.alive(node, now, round):
            jobs.cancel(key)
            self.idle[node] = True
            return None
        return jobs.result(key)
