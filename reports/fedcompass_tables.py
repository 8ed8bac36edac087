"""Markdown tables for reports/fedcompass.md, read from the runs of scenarios/fedcompass.toml.

    python reports/fedcompass_tables.py [RUNS_DIR]        (default reports/runs/fedcompass)

Everything comes from each run's metrics.csv, summary.json and scenario.toml, except the last
table: a replay of FedCompass's scheduler, which rebuilds each FedCompass run from its
scenario.toml and steps the real `FedCompass` server with training replaced by a no-op (every
client returns its model unchanged). Without compute jitter the schedule depends only on the
clients' simulated speeds and message sizes, never on the model's values, so the replay reproduces
the run's schedule (it checks this against the run's per-client idle fractions) and can report
what metrics.csv does not record: the Q each client was given.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "reports/runs/fedcompass")
TARGETS = (0.75, 0.80)
ORDER = ["fedavg", "fedasync", "fedbuff", "fedcompass"]
ASYNC = ["fedasync", "fedbuff", "fedcompass"]
SIDE = "appfl_weights"  # optional side check, see the report
EARLY = 60.0  # seconds: "the first few rounds" for the group-count table


def markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in row.values) + " |")
    return "\n".join(lines)


def pm(values, fmt: str = "{:.3f}") -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return "n/a"
    return (fmt + " ± " + fmt).format(v.mean(), v.std(ddof=1) if len(v) > 1 else 0.0)


def load_runs(root: Path = RUNS) -> pd.DataFrame:
    index = pd.read_csv(root / "runs.csv")
    rows = []
    for run_dir in index["run_dir"]:
        folder = root / run_dir
        scenario = tomllib.loads((folder / "scenario.toml").read_text())
        rows.append({
            "run": run_dir,
            "folder": folder,
            "method": scenario["algorithm"]["name"],
            "seed": scenario["seed"],
            "metrics": pd.read_csv(folder / "metrics.csv"),
            "summary": json.loads((folder / "summary.json").read_text()),
            "scenario": scenario,
        })
    return pd.DataFrame(rows)


def time_to(m: pd.DataFrame, target: float) -> float:
    hit = m.loc[m["test_accuracy"] >= target, "sim_time"]
    return float(hit.iloc[0]) if len(hit) else float("nan")


def acc_at(m: pd.DataFrame, t: float) -> float:
    """Accuracy of the last evaluation at or before simulated time t."""
    before = m.loc[m["sim_time"] <= t + 1e-9, "test_accuracy"]
    return float(before.iloc[-1]) if len(before) else float("nan")


def staleness(m: pd.DataFrame) -> tuple[float, float, int]:
    """(mean staleness over all applied updates, largest staleness, updates applied)."""
    if "updates_applied" not in m:
        return 0.0, 0.0, 0
    n = m["updates_applied"].fillna(0)
    mean = float((m["mean_staleness"].fillna(0) * n).sum() / n.sum())
    return mean, float(m["max_staleness"].max()), int(n.sum())


def step_times(scenario: dict) -> np.ndarray:
    """Each client's simulated seconds per local step, drawn exactly as fedsim drew them."""
    from fedsim.scenario import SystemConfig
    from fedsim.system import SystemModel

    cfg = SystemConfig(**scenario["system"])
    return SystemModel.from_config(cfg, scenario["data"]["num_clients"], scenario["seed"]).step_time


def main_table(runs: pd.DataFrame) -> str:
    out = []
    for method in ORDER:
        g = runs[runs["method"] == method]
        if g.empty:
            continue
        row = {"method": method, "seeds": len(g)}
        for target in TARGETS:
            times = [time_to(m, target) for m in g["metrics"]]
            reached = [t for t in times if np.isfinite(t)]
            label = f"s to {target:.2f}"
            if not reached:
                row[label] = "not reached"
            else:
                row[label] = pm(reached, "{:.0f}") + ("" if len(reached) == len(times) else f" ({len(reached)}/{len(times)} seeds; others not reached)")
        row["final acc"] = pm([s["final_accuracy"] for s in g["summary"]])
        row["mean acc, last 100 s"] = pm([m.loc[m["sim_time"] > m["sim_time"].iloc[-1] - 100, "test_accuracy"].mean() for m in g["metrics"]])
        row["best acc"] = pm([s["best_accuracy"] for s in g["summary"]])
        st = [staleness(m) for m in g["metrics"]]
        row["mean staleness"] = pm([s[0] for s in st], "{:.2f}") if method in ASYNC else "0 (sync)"
        row["max staleness"] = f"{max(s[1] for s in st):.0f}" if method in ASYNC else "0"
        row["updates applied"] = pm([s[2] for s in st], "{:.0f}") if method in ASYNC else pm([20 * s["rounds"] for s in g["summary"]], "{:.0f}")
        row["total GB"] = pm([s["total_bytes"] / 1e9 for s in g["summary"]], "{:.2f}")
        row["mean idle"] = pm([s["mean_idle_fraction"] for s in g["summary"]], "{:.2f}")
        out.append(row)
    return markdown(pd.DataFrame(out))


def accuracy_over_time(runs: pd.DataFrame, times=(30, 60, 120, 300, 600)) -> str:
    out = []
    for method in ORDER:
        g = runs[runs["method"] == method]
        if g.empty:
            continue
        row = {"method": method}
        for t in times:
            row[f"acc @ {t} s"] = pm([acc_at(m, t) for m in g["metrics"]])
        out.append(row)
    return markdown(pd.DataFrame(out))


def idle_by_speed(runs: pd.DataFrame, k: int = 5) -> str:
    """Idle fraction of the k fastest and k slowest clients (by drawn step time)."""
    out = []
    for method in ORDER:
        g = runs[runs["method"] == method]
        if g.empty:
            continue
        fast, slow, mid = [], [], []
        for _, r in g.iterrows():
            idle = np.asarray(r["summary"]["client_idle_fraction"])
            order = np.argsort(step_times(r["scenario"]))
            fast.append(idle[order[:k]].mean())
            slow.append(idle[order[-k:]].mean())
            mid.append(idle[order[k:-k]].mean())
        out.append({"method": method, f"idle, {k} fastest": pm(fast, "{:.2f}"), "idle, middle": pm(mid, "{:.2f}"), f"idle, {k} slowest": pm(slow, "{:.2f}")})
    return markdown(pd.DataFrame(out))


def group_table(runs: pd.DataFrame) -> str:
    g = runs[runs["method"] == "fedcompass"]
    out = []
    for _, r in g.sort_values("seed").iterrows():
        m = r["metrics"]
        n = r["scenario"]["data"]["num_clients"]
        body = m[m["round"] > 0]
        early = body[body["sim_time"] <= EARLY]
        late = body[body["sim_time"] > EARLY]
        _, _, applied = staleness(m)
        version = int(m["version"].iloc[-1])
        # every client's first update is applied alone (one version each); every later version is
        # one group aggregation, which applies its arrived members plus the general buffer
        aggregations = version - n
        late_stale = staleness(late)[0]
        dv = body["version"].diff().fillna(body["version"].iloc[0])
        sizes = body["mean_group_size"]
        ok = sizes.notna() & (body["sim_time"] > 30)  # after the first arrivals
        weighted = float((sizes[ok] * dv[ok]).sum() / dv[ok].sum())
        out.append({
            "seed": r["seed"],
            f"open groups, first {EARLY:.0f} s": f"{early['groups'].mean():.1f}",
            f"open groups, after {EARLY:.0f} s": f"{late['groups'].mean():.1f} (min {late['groups'].min():.0f}, max {late['groups'].max():.0f})",
            "group aggregations": aggregations,
            "mean group size": f"{(applied - n) / aggregations:.2f}",
            "mean group size (per-window column)": f"{weighted:.2f}",
            f"mean / max staleness after {EARLY:.0f} s": f"{late_stale:.2f} / {late['max_staleness'].max():.0f}",
        })
    return markdown(pd.DataFrame(out))


# --- scheduler replay ------------------------------------------------------------------------


class _NoTraining:
    """Stands in for the JobPool: every job returns its starting model, so every update is zero."""

    def __init__(self):
        self.started = {}

    def start(self, key, job, params):
        self.started[key] = (job, params)

    def result(self, key):
        from fedsim.training import ClientResult

        job, params = self.started.pop(key)
        return ClientResult(job.client_id, params, 0, {"train_loss": 0.0})


def replay(folder: Path) -> dict:
    from fedsim.coordinator import RunContext, RunOptions
    from fedsim.scenario import load

    (spec,) = load(folder / "scenario.toml")
    ctx = RunContext(spec, RunOptions(executor="inline", progress=False))
    try:
        server = spec.algorithm.build(spec.algorithm_config, ctx)
        server.jobs = _NoTraining()
        log = []  # (client, time, Q, arrival time)
        aggregations = []  # (time, arrived members, general-buffer updates, members still out)
        stale: list[tuple[float, int]] = []  # (round end, staleness) of every applied update
        dispatch, aggregate = server.dispatch, server._aggregate

        def recording(client, now, steps):
            end = dispatch(client, now, steps)
            log.append((client, now, steps, end))
            return end

        def recording_aggregate(g, now):
            group = server.groups[g]
            aggregations.append((now, len(group.arrived), len(server.general), len(group.members)))
            return aggregate(g, now)

        server.dispatch = recording
        server._aggregate = recording_aggregate
        budget = spec.scenario.sim_time_budget
        for r in range(1, spec.scenario.rounds + 1):
            server.step(r)
            stale += [(ctx.clock.now, t) for t in server.applied_staleness]
            if ctx.clock.now >= budget:
                break
        now = ctx.clock.now
        idle = 1.0 - np.minimum(ctx.net.busy / now, 1.0)
        jobs = pd.DataFrame(log, columns=["client", "time", "q", "end"])
        # busy time that lies inside [0, now]: a job still running at the end counts only up to now
        inside = (jobs["end"].clip(upper=now) - jobs["time"]).groupby(jobs["client"]).sum()
        idle_inside = 1.0 - inside.reindex(range(len(idle)), fill_value=0.0).to_numpy() / now
        return {
            "log": jobs,
            "idle_inside": idle_inside,
            "aggregations": pd.DataFrame(aggregations, columns=["time", "arrived", "general", "missing"]),
            "staleness": pd.DataFrame(stale, columns=["time", "tau"]),
            "idle": idle,
            "speed": ctx.system.step_time,
            "version": server.version,
        }
    finally:
        ctx.close()


def q_table(runs: pd.DataFrame, k: int = 5) -> str:
    g = runs[runs["method"] == "fedcompass"]
    out, mechanism = [], []
    for _, r in g.sort_values("seed").iterrows():
        rep = replay(r["folder"])
        log, speed = rep["log"], rep["speed"]
        later = log[log["time"] > 0]  # after the initial Q_max dispatch to everyone
        q = later.groupby("client")["q"].mean().reindex(range(len(speed)))
        jobs = log.groupby("client").size().reindex(range(len(speed)), fill_value=0)
        order = np.argsort(speed)
        rho = pd.Series(speed).rank().corr(q.rank())
        match = np.abs(rep["idle"] - np.asarray(r["summary"]["client_idle_fraction"])).max()
        same_version = rep["version"] == int(r["metrics"]["version"].iloc[-1])
        cfg = r["scenario"]["algorithm"]
        aggs = rep["aggregations"]
        tau = rep["staleness"]
        settled = tau[tau["time"] > EARLY]["tau"]
        first_arrivals = log.groupby("client")["time"].apply(lambda t: t[t > 0].min() if (t > 0).any() else np.nan)
        mechanism.append({
            "seed": r["seed"],
            "all clients in a group by (s)": f"{first_arrivals.max():.1f}",
            "first group aggregation (s)": f"{aggs['time'].min():.1f}",
            "aggregations by deadline timer": int((aggs["missing"] > 0).sum()),
            "idle, fastest 5 / slowest 5 (jobs clipped at the budget)": f"{rep['idle_inside'][order[:k]].mean():.3f} / {rep['idle_inside'][order[-k:]].mean():.3f}",
            "general-buffer updates": int(aggs["general"].sum()),
            "staleness 0 / 1 / 2 / >=3, all updates": " / ".join(f"{x:.0%}" for x in shares(tau["tau"])),
            f"same, after {EARLY:.0f} s": " / ".join(f"{x:.0%}" for x in shares(settled)),
        })
        out.append({
            "seed": r["seed"],
            "step time, fastest / slowest (s)": f"{speed.min():.3f} / {speed.max():.3f}",
            f"mean Q, {k} fastest": f"{q.iloc[order[:k]].mean():.0f}",
            f"mean Q, {k} slowest": f"{q.iloc[order[-k:]].mean():.0f}",
            "Spearman(step time, Q)": f"{rho:.2f}",
            f"share of jobs at Q_max={cfg['q_max']} / Q_min={cfg['q_min']}": f"{(later['q'] == cfg['q_max']).mean():.0%} / {(later['q'] == cfg['q_min']).mean():.0%}",
            f"jobs, {k} fastest / {k} slowest": f"{jobs.iloc[order[:k]].mean():.0f} / {jobs.iloc[order[-k:]].mean():.0f}",
            "replay check: idle diff / same version": f"{match:.4f} / {'yes' if same_version else 'NO'}",
        })
    return markdown(pd.DataFrame(out)) + "\n\n" + markdown(pd.DataFrame(mechanism))


def shares(tau: pd.Series) -> list[float]:
    t = tau.to_numpy()
    return [(t == 0).mean(), (t == 1).mean(), (t == 2).mean(), (t >= 3).mean()]


def main() -> None:
    runs = load_runs()
    print(f"Runs: {len(runs)} from {RUNS} ({', '.join(f'{m}: {int((runs.method == m).sum())}' for m in ORDER)})\n")
    print("### Time to target, final and best accuracy, staleness, bytes, idle (mean ± std over seeds)\n")
    print(main_table(runs), "\n")
    print("### Test accuracy at fixed simulated times (last evaluation at or before t)\n")
    print(accuracy_over_time(runs), "\n")
    print("### Client idle fraction by speed (clients ranked by their drawn step time)\n")
    print(idle_by_speed(runs), "\n")
    if (runs["method"] == "fedcompass").any():
        print("### FedCompass arrival groups, per seed\n")
        print(group_table(runs), "\n")
        print("### FedCompass local steps Q by client speed, and the schedule (scheduler replay without training)\n")
        print(q_table(runs))
    side = RUNS / SIDE
    if (side / "runs.csv").is_file():
        print("\n### Side check: FedAsync and FedBuff with APPFL's per-update weight alpha * s(tau) / N\n")
        print(f"(runs in {side}: FedAsync alpha = 0.9 / 20 = 0.045, FedBuff server_lr = 0.9 * 3 / 20 = 0.135; "
              "FedAvg and FedCompass rows repeated from the main table)\n")
        both = pd.concat([load_runs(side), runs[runs["method"].isin(["fedavg", "fedcompass"])]], ignore_index=True)
        print(main_table(both))


if __name__ == "__main__":
    main()
