"""What the benchmark scripts share: building a run from a scenario dict, timing its rounds, and
reading peak memory (of this process and of the Ray actors a run started)."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fedsim.coordinator import RunContext, RunOptions
from fedsim.preflight import preflight
from fedsim.scenario import validate
from fedsim.training import torch_threads


@contextmanager
def built(raw: dict[str, Any], options: RunOptions = RunOptions()) -> Iterator[tuple[RunContext, Any, float]]:
    """(context, flow, seconds to build them) for a scenario given as a dict; actors closed after.

    The scenario passes the checks `fedsim run` makes first (data, partition, topology, memory
    estimate, without --force), so a benchmark that runs here would run from the command line.
    """
    spec = validate(raw, "<benchmark>", {})
    preflight(spec, executor=options.executor, workers=options.workers)
    start = time.perf_counter()
    ctx = RunContext(spec, options)
    try:
        flow = spec.algorithm.build(spec.algorithm_config, ctx)
        yield ctx, flow, time.perf_counter() - start
    finally:
        ctx.close()


def time_rounds(flow: Any, rounds: int, threads: int = 1) -> list[float]:
    """Seconds of each `flow.step`, with the fixed thread count `fedsim run` uses."""
    times = []
    with torch_threads(threads):
        for r in range(1, rounds + 1):
            start = time.perf_counter()
            flow.step(r)
            times.append(time.perf_counter() - start)
    return times


def peak_rss_gib(pid: int | None = None) -> float:
    """VmHWM (peak resident set) of a process, in GiB; this process when pid is None."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def actor_pids(executor: Any) -> list[int]:
    import ray

    actors = getattr(executor, "actors", [])
    return ray.get([a.pid.remote() for a in actors]) if actors else []
