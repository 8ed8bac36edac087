"""Communication accounting: bytes sent and received per node, and the federation's total."""

from __future__ import annotations

import numpy as np

SERVER = -1


class Ledger:
    """Counts bytes per node. Node ids are clients 0..n-1; the server, when there is one, is -1."""

    def __init__(self, num_nodes: int):
        self.sent = np.zeros(num_nodes + 1, dtype=np.int64)
        self.received = np.zeros(num_nodes + 1, dtype=np.int64)

    def transfer_one(self, sender: int, receiver: int, nbytes: int) -> None:
        """One message between two nodes: the event-driven servers' per-update case, kept to two
        integer additions."""
        self.sent[sender] += nbytes
        self.received[receiver] += nbytes

    def transfer(self, sender: int | np.ndarray, receiver: int | np.ndarray, nbytes: int) -> None:
        """One message of `nbytes` from each sender to each receiver (arrays broadcast)."""
        if np.ndim(sender) == 0 and np.size(receiver) == 1:  # one message: the common case, kept cheap
            self.transfer_one(int(sender), int(np.asarray(receiver).reshape(())), nbytes)
            return
        senders, receivers = np.broadcast_arrays(np.asarray(sender), np.asarray(receiver))
        np.add.at(self.sent, senders.ravel(), nbytes)
        np.add.at(self.received, receivers.ravel(), nbytes)

    @property
    def total(self) -> int:
        return int(self.sent.sum())

    def summary(self) -> dict[str, float]:
        """Totals, the busiest node's load and how unevenly the load is spread (Gini of each
        node's sent + received bytes; the server, if any, is counted as one more node)."""
        load = self.sent + self.received
        clients = load[:-1]
        nodes = load if load[-1] > 0 else clients
        return {
            "total_bytes": self.total,
            "max_bytes_per_client": int(clients.max(initial=0)),
            "server_bytes": int(load[-1]),
            "gini_bytes_per_node": gini(nodes),
        }


def gini(values: np.ndarray) -> float:
    """0 when every node carries the same load, close to 1 when one node carries it all."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.sum() == 0:
        return 0.0
    n = len(v)
    return float((2 * np.arange(1, n + 1) - n - 1) @ v / (n * v.sum()))
