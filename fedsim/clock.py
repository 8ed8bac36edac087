"""Simulated time.

`sim_time` never reads the wall clock: it advances by durations computed from each client's
simulated speed and link, so a run's curves against time are the same on any machine.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import checkpointable


class Clock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def advance_to(self, t: float) -> None:
        if t < self.now:
            raise ValueError(f"the clock cannot go back from {self.now} to {t}")
        self.now = t


@checkpointable
@dataclass
class Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    payload: Any = field(compare=False, default=None)

    def __lt__(self, other: "Event") -> bool:
        # by time, then insertion order; written out because the heap compares events about ten
        # times per event, and the generated comparison builds two tuples each time
        return self.time < other.time or (self.time == other.time and self.seq < other.seq)


class EventQueue:
    """Events ordered by simulated time; equal times keep the order in which they were pushed.

    The insertion counter is the tie-break, so two events at the same instant never fall back to
    comparing payloads and the order does not depend on which real computation finished first.
    """

    STATE = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._seq = 0

    def push(self, time: float, kind: str, payload: Any = None) -> Event:
        event = Event(time, self._seq, kind, payload)
        self._seq += 1
        heapq.heappush(self._heap, event)
        return event

    def pop(self) -> Event:
        return heapq.heappop(self._heap)

    def peek(self) -> Event | None:
        return self._heap[0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)
