"""Peak resident memory of this process and of the Ray actors an executor started."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_gib(pid: int | None = None) -> float:
    """VmHWM (peak resident set) of a process, in GiB; this process when pid is None."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def actor_pids(executor) -> list[int]:
    import ray

    actors = getattr(executor, "actors", [])
    return ray.get([a.pid.remote() for a in actors]) if actors else []
