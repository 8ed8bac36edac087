"""The memory estimate against the measured peak, for every shipped scenario and benchmark.

Each case runs in its own Python process (so one case's peak never hides another's): it builds the
run as `fedsim run` does, trains a few rounds, evaluates, and reports the peak resident set of the
driver plus, with the Ray executor, of every actor (VmHWM; pages shared through the object store
are counted once per process that touched them, as the estimate counts them). Sweeps are measured
at their first point. Target: estimate / peak within [0.5, 2] for every case.

    python benchmarks/memory_estimate.py [--rounds 2] [--only quickstart,scale_million]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the scenarios the benchmark scripts build (benchmarks/*.py), at their default sizes
BENCHMARK_CASES: dict[str, dict] = {
    "scale_million": {
        "name": "million",
        "data": {"dataset": "synthetic", "num_clients": 1_000_000, "samples_per_client": 50, "test_size": 5000},
        "model": {"name": "logreg"},
        "algorithm": {"name": "fedavg", "clients_per_round": 100, "lr": 0.05},
        "system": {"executor": "inline"},
    },
    "scale_ring": {
        "name": "ring",
        "data": {"dataset": "synthetic", "num_clients": 10_000, "samples_per_client": 20, "test_size": 2000},
        "model": {"name": "logreg"},
        "topology": {"name": "ring"},
        "algorithm": {"name": "dpsgd", "lr": 0.05, "eval_nodes": 16},
        "system": {"executor": "inline"},
    },
    "modest_scale": {
        "name": "modest_scale",
        "data": {"dataset": "synthetic", "num_clients": 10_000, "samples_per_client": 20, "test_size": 2000},
        "model": {"name": "logreg"},
        "algorithm": {"name": "modest", "sample_size": 20, "aggregators": 2, "lr": 0.05},
        "system": {"executor": "inline"},
    },
    "gossip_scale": {
        "name": "gossip_scale",
        "data": {"dataset": "synthetic", "num_clients": 1000, "samples_per_client": 50, "test_size": 1000},
        "model": {"name": "mlp", "hidden": [200]},
        "topology": {"name": "ring"},
        "algorithm": {"name": "dfedsam_mgs", "gossip_steps": 4, "local_steps": 5, "batch_size": 32, "eval_nodes": 8},
        "system": {"executor": "ray"},
    },
    "async_overhead": {
        "name": "async_overhead",
        "data": {"dataset": "synthetic", "num_clients": 200, "samples_per_client": 100, "test_size": 500},
        "model": {"name": "mlp", "hidden": [200]},
        "algorithm": {"name": "fedcompass", "q_max": 20, "q_min": 4, "round_seconds": 2.0, "batch_size": 32},
        "system": {"executor": "inline", "compute": {"dist": "uniform", "low": 0.01, "high": 0.1}},
    },
    "round_overhead": {
        "name": "round_overhead",
        "data": {"dataset": "synthetic", "num_clients": 100, "samples_per_client": 200},
        "model": {"name": "mlp", "hidden": [200]},
        "algorithm": {"name": "fedavg", "clients_per_round": 100, "batch_size": 32, "local_epochs": 1, "lr": 0.05},
        "system": {"executor": "ray"},
    },
}

CHILD = r"""
import json, sys
from pathlib import Path
from fedsim import resources
from fedsim.coordinator import RunContext
from fedsim.scenario import load, validate
from fedsim.training import torch_threads

def hwm(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0

case, rounds = json.loads(sys.argv[1]), int(sys.argv[2])
if "path" in case:
    spec = load(case["path"], case.get("overrides", []))[0]
else:
    spec = validate(case["raw"], "<" + case["name"] + ">", {})
estimate = resources.estimate(spec)
ctx = RunContext(spec)
actors = []
try:
    flow = spec.algorithm.build(spec.algorithm_config, ctx)
    with torch_threads(spec.scenario.system.threads_per_worker):
        flow.evaluate()
        for r in range(1, rounds + 1):
            flow.step(r)
        flow.evaluate()
    for ex in ctx._executors:
        for a in getattr(ex, "actors", []):
            import ray
            actors.append(ray.get(a.pid.remote()))
    actor_peak = sum(hwm(p) for p in actors)
finally:
    ctx.close()
driver = hwm("self")  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from a forking parent
print("RESULT " + json.dumps({"estimate": estimate, "driver_peak": driver, "actor_peak": actor_peak,
                              "actors": len(actors)}))
"""


def measure(case: dict, rounds: int = 2, timeout: float = 900) -> dict:
    """Run one case in a fresh interpreter; its estimate (bytes, by part) and measured peaks."""
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case), str(rounds)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{case.get('name')}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    out = json.loads(lines[-1].removeprefix("RESULT "))
    out["peak"] = out["driver_peak"] + out["actor_peak"]
    out["ratio"] = out["estimate"]["total"] / out["peak"]
    return out


def cases() -> dict[str, dict]:
    found: dict[str, dict] = {}
    for path in sorted((ROOT / "scenarios").glob("*.toml")):
        found[path.stem] = {"name": path.stem, "path": str(path)}
    for name, raw in BENCHMARK_CASES.items():
        found[name] = {"name": name, "raw": raw}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", help="comma-separated case names")
    args = parser.parse_args()
    chosen = cases()
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    gib = 2**30
    report = {}
    for name, case in chosen.items():
        try:
            m = measure(case, args.rounds)
        except Exception as exc:  # a case whose data is not installed: say so, go on
            report[name] = {"error": str(exc).splitlines()[-1][:300]}
            continue
        report[name] = {
            "estimate_gib": round(m["estimate"]["total"] / gib, 3),
            "peak_gib": round(m["peak"] / gib, 3),
            "ratio": round(m["ratio"], 2),
            "actors": m["actors"],
            "parts_gib": {k: round(v / gib, 3) for k, v in m["estimate"].items() if k != "total"},
        }
        print(name, report[name], file=sys.stderr)
    ok = [r for r in report.values() if "ratio" in r]
    print(json.dumps({"benchmark": "memory_estimate", "rounds": args.rounds, "cases": report,
                      "within_2x": all(0.5 <= r["ratio"] <= 2 for r in ok), "target": [0.5, 2.0]}, indent=2))


if __name__ == "__main__":
    main()
