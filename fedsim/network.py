"""The simulated network: the one object through which every method's messages travel.

Flows decide what to send, to whom and when; the network alone decides what that costs and
whether it arrives. It charges the ledger (bytes sent and received per node), computes arrival
times from each node's link, serialises copies of a message over the sender's uplink, draws message
loss, answers liveness questions (crash, leave, join, churn) and counts each node's busy time. One
set of rules for every method, stated once:

- A message of b bytes from node i to one receiver takes latency_i + b / bandwidth_i. Copies to
  several receivers leave one after another over i's uplink, queued behind anything i is still
  sending: the k-th copy arrives at start + k b / bandwidth_i + latency_i, start = max(now, when
  the uplink frees up).
- The server (node -1) has ample bandwidth: a download from it takes the receiving client's
  latency + b / bandwidth, and its copies are not serialised.
- A node is busy while it computes and while its uplink transmits (b / bandwidth per copy);
  server-round clients are busy for their whole download-train-upload job.
- Each copy is lost with probability `message_loss`, drawn from (seed, purpose, ids, sender,
  receiver):
  never from the order in which the simulation happens to ask.
- A node that is down neither sends nor receives; liveness is asked of the failure model by time
  (event-driven methods) or round (round-based methods).

A flow that sends faster than a node's uplink carries builds a queue there that nothing bounds:
its messages arrive ever later, and each copy still waiting holds a model in the flow's event
queue. The network cannot know whether the flow meant that, so it only measures it: the most
copies any message found ahead of it on its sender's uplink (`longest_queue`), which the
coordinator reports once it passes `QUEUE_WARNING` and records in summary.json.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .failures import FailureModel
from .ledger import SERVER, Ledger
from .seeding import generator
from .system import SystemModel


QUEUE_WARNING = 100  # copies queued on one uplink: a hundred models held, and as many late arrivals


class Network:
    """Moves messages between nodes 0..n-1 and the server (-1); see the module's rules."""

    STATE = ("busy", "uplink_free", "longest_queue")

    def __init__(self, system: SystemModel, failures: FailureModel, ledger: Ledger, seed: int):
        self.system = system
        self.failures = failures
        self.ledger = ledger
        self.seed = seed
        n = len(system.step_time)
        self.busy = np.zeros(n)  # simulated seconds each node spent computing or transmitting
        self.uplink_free = np.zeros(n)  # when each node's uplink has sent everything queued on it
        # the most copies a message found queued ahead of it on its sender's uplink: (copies,
        # node, simulated time, seconds it waited); zeros while no message ever waited
        self.longest_queue = np.zeros(4)

    # --- liveness ------------------------------------------------------------------------

    def alive(self, node: int, t: float, round: int | None = None) -> bool:
        return node == SERVER or self.failures.alive(node, t, round)

    def alive_mask(self, t: float, round: int | None = None) -> np.ndarray:
        return self.failures.alive_mask(t, round)

    def left(self, node: int, t: float, round: int | None = None) -> bool:
        """Left gracefully (and announced it), as opposed to crashed."""
        return self.failures.left(node, t, round)

    @property
    def joining(self) -> np.ndarray:
        """Nodes absent at the start that join later (a protocol may know who its founders are)."""
        return self.failures.joins

    @property
    def leaving(self) -> np.ndarray:
        """Nodes that will leave gracefully, announcing it."""
        return self.failures.leaves

    @property
    def lossy(self) -> bool:
        return self.failures.cfg.message_loss > 0

    def delivered(self, purpose: str, *ids: int) -> bool:
        """Whether the message identified by (purpose, ids) gets through."""
        loss = self.failures.cfg.message_loss
        return loss == 0 or bool(generator(self.seed, f"loss.{purpose}", *ids).random() >= loss)

    def delivered_many(self, count: int, purpose: str, *ids: int) -> np.ndarray:
        """`count` messages identified together, e.g. every edge of one gossip step."""
        loss = self.failures.cfg.message_loss
        if loss == 0:
            return np.ones(count, dtype=bool)
        return generator(self.seed, f"loss.{purpose}", *ids).random(count) >= loss

    # --- sending -------------------------------------------------------------------------

    def post(
        self, sender: int, receivers: Sequence[int] | np.ndarray, nbytes: int, *, purpose: str, ids: tuple[int, ...] = (),
    ) -> list[int]:
        """One message of `nbytes` from `sender` to each receiver whose transit the caller times
        itself (a server-round job's download and upload are part of `round_trip`). Charges every
        copy (a lost message still cost its bytes); returns the receivers it reached."""
        receivers = [int(r) for r in receivers]
        if len(receivers) == 1:
            self.ledger.transfer_one(sender, receivers[0], nbytes)
        elif receivers:
            self.ledger.transfer(sender, np.asarray(receivers), nbytes)
        if self.failures.cfg.message_loss == 0:
            return receivers
        # drawn per (purpose, ids, sender, receiver); the server, -1, counts as 0 in the ids
        return [r for r in receivers if self.delivered(purpose, *ids, sender + 1, r + 1)]

    def send(
        self, sender: int, receivers: Sequence[int] | np.ndarray, nbytes: int, *, at: float, purpose: str,
        ids: tuple[int, ...] = (),
    ) -> list[tuple[int, float]]:
        """`post`, timed by the rules above: (receiver, arrival time) for the copies that get
        through."""
        receivers = [int(r) for r in receivers]
        reached = set(self.post(sender, receivers, nbytes, purpose=purpose, ids=ids))
        if sender == SERVER:
            return [(r, at + self.system.transfer_time(r, nbytes)) for r in receivers if r in reached]
        per_copy = nbytes / float(self.system.bandwidth[sender])
        start = max(at, float(self.uplink_free[sender]))
        if start > at and (start - at) / per_copy > self.longest_queue[0]:
            self.longest_queue[:] = ((start - at) / per_copy, sender, at, start - at)
        latency = float(self.system.latency[sender])
        self.uplink_free[sender] = start + len(receivers) * per_copy
        self.busy[sender] += len(receivers) * per_copy
        return [(r, start + k * per_copy + latency) for k, r in enumerate(receivers, start=1) if r in reached]

    def signal(self, sender: int, receivers: Sequence[int] | np.ndarray | int, nbytes: int) -> None:
        """A control message (ping, acknowledgement, announcement) whose transit time the
        protocol models itself (timeouts): its bytes are charged, nothing else."""
        self.ledger.transfer(sender, np.asarray(receivers), nbytes)

    def exchange(self, senders: np.ndarray, receivers: np.ndarray, nbytes: "int | np.ndarray") -> None:
        """Bytes of many point-to-point messages at once (a synchronous gossip step's edges);
        the caller times the step with `gossip_time`."""
        self.ledger.transfer(senders, receivers, nbytes)

    def gossip_time(self, senders: np.ndarray, nbytes: "int | np.ndarray") -> float:
        """How long one synchronous gossip step takes: each node sends one copy per out-edge over
        its own uplink, one after another; the step ends when the slowest node is done. Counts
        every sender's busy time. `nbytes` may give each node its own message size."""
        system = self.system
        copies = np.bincount(senders, minlength=len(self.busy))
        sending = np.where(copies > 0, system.latency + copies * nbytes / system.bandwidth, 0.0)
        self.busy += sending
        return float(sending.max(initial=0.0))

    # --- computing -----------------------------------------------------------------------

    def compute(self, node: int, steps: int, *, job: int) -> float:
        """Simulated seconds of `steps` local steps of `node`'s `job`-th job; counted as busy."""
        seconds = self.system.compute_time(node, steps, job=job)
        self.busy[node] += seconds
        return seconds

    def round_trip(self, client: int, steps: int, down: int, up: int, *, job: int, limit: float = np.inf) -> float:
        """A server-round job: download, `steps` local steps, upload. The client is busy for all of
        it, or until `limit` (a deadline) when that comes first."""
        seconds = self.system.job_time(client, steps, down, up, job=job)
        self.busy[client] += min(seconds, limit)
        return seconds

    def state(self) -> dict[str, np.ndarray]:
        return {"busy": self.busy, "uplink_free": self.uplink_free, "longest_queue": self.longest_queue,
                "sent": self.ledger.sent, "received": self.ledger.received}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.busy[:] = state["busy"]
        self.uplink_free[:] = state["uplink_free"]
        if "longest_queue" in state:  # (checkpoints written before it was measured have none)
            self.longest_queue[:] = state["longest_queue"]
        self.ledger.sent[:] = state["sent"]
        self.ledger.received[:] = state["received"]
