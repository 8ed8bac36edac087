"""Markdown tables for reports/dfedsam.md and reports/gossip_vc.md.

Reads every run listed in reports/runs/{dfedsam,dfedsam_cnn,gossip_vc,gossip_vc_paper}/runs.csv (each run's metrics.csv and
scenario.toml) and prints the tables. Usage: python reports/tables.py [dfedsam|dfedsam_cnn|gossip|rho|all] [--target 0.6 ...]
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pandas as pd

RUNS = Path(__file__).parent / "runs"
ALGORITHMS = ["dpsgd", "dfedavg", "dfedsam", "dfedsam_mgs"]
TOPOLOGIES = ["ring", "torus", "exponential", "complete"]


def load(sweep: str) -> pd.DataFrame:
    """One row per run: its scenario (flattened) and its whole metrics.csv as a frame."""
    index = pd.read_csv(RUNS / sweep / "runs.csv")
    rows = []
    for run_dir in index["run_dir"]:
        folder = RUNS / sweep / run_dir
        if not (folder / "summary.json").is_file():
            continue  # a point the sweep has not finished (or was narrowed to skip)
        s = tomllib.loads((folder / "scenario.toml").read_text())
        topo = s["topology"]
        merge = s["algorithm"].get("merge")
        if merge and s["algorithm"].get("correction") == "paper":  # variance correction's paper-era reading
            merge += "/paper"
        rows.append({
            "run": run_dir,
            "algorithm": s["algorithm"]["name"],
            "merge": merge,
            "topology": topo["name"] + (f"(d={topo['degree']})" if "degree" in topo else ""),
            "num_clients": s["data"]["num_clients"],
            "seed": s["seed"],
            "metrics": pd.read_csv(folder / "metrics.csv"),
        })
    return pd.DataFrame(rows)


def pm(values: pd.Series, digits: int = 3) -> str:
    if len(values) > 1:
        return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"
    return f"{values.mean():.{digits}f}"


def dfedsam_tables(sweep: str = "dfedsam") -> None:
    runs = load(sweep)
    runs["final_acc"] = runs["metrics"].map(lambda m: m["test_accuracy"].iloc[-1])
    runs["best_acc"] = runs["metrics"].map(lambda m: m["test_accuracy"].max())
    runs["final_min_node"] = runs["metrics"].map(lambda m: m["min_node_accuracy"].iloc[-1])
    runs["final_avg_model"] = runs["metrics"].map(lambda m: m["avg_model_accuracy"].iloc[-1])
    runs["final_consensus"] = runs["metrics"].map(lambda m: m["consensus_distance"].iloc[-1])
    runs["sim_time"] = runs["metrics"].map(lambda m: m["sim_time"].iloc[-1])
    runs["gb_sent"] = runs["metrics"].map(lambda m: m["bytes_sent"].iloc[-1] / 1e9)
    # how flat the curve is at the end: node-accuracy gain over the last quarter of the rounds
    runs["late_gain"] = runs["metrics"].map(
        lambda m: m["test_accuracy"].iloc[-1] - m["test_accuracy"][m["round"] <= 0.75 * m["round"].iloc[-1]].iloc[-1])
    rounds = int(runs["metrics"].iloc[0]["round"].iloc[-1])
    seeds = sorted(int(x) for x in runs["seed"].unique())
    print(f"### {sweep} sweep: after {rounds} rounds, mean ± std over seeds {seeds}\n")
    print("| algorithm | topology | final node acc | best node acc | final worst node | final avg-model acc "
          "| final consensus dist | gain, last quarter | sim s | GB sent |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for topo in TOPOLOGIES:
        for alg in ALGORITHMS:
            g = runs[(runs["algorithm"] == alg) & (runs["topology"] == topo)]
            if g.empty:
                continue
            print(f"| {alg} | {topo} | {pm(g['final_acc'])} | {pm(g['best_acc'])} | {pm(g['final_min_node'])} "
                  f"| {pm(g['final_avg_model'])} | {pm(g['final_consensus'], 4)} | {pm(g['late_gain'])} "
                  f"| {g['sim_time'].mean():.1f} "
                  f"| {g['gb_sent'].mean():.2f} |")
    print()
    # compact pivot: final mean node accuracy, algorithm x topology
    pivot = runs.pivot_table(index="algorithm", columns="topology", values="final_acc", aggfunc="mean")
    pivot = pivot.loc[[a for a in ALGORITHMS if a in pivot.index], [t for t in TOPOLOGIES if t in pivot.columns]]
    print("### Final mean node accuracy (mean over seeds), algorithm x topology\n")
    print("| algorithm | " + " | ".join(pivot.columns) + " |")
    print("|---|" + "---|" * len(pivot.columns))
    for alg, row in pivot.iterrows():
        print(f"| {alg} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    print()


def rho_table() -> None:
    """Extra check: DFedSAM on the ring with lr_decay = 1 (as the baselines) and larger rho."""
    if not (RUNS / "dfedsam_rho" / "runs.csv").is_file():
        return
    runs = load("dfedsam_rho")
    runs["rho"] = [tomllib.loads((RUNS / "dfedsam_rho" / r / "scenario.toml").read_text())["algorithm"]["rho"]
                   for r in runs["run"]]
    base = load("dfedsam")
    base = base[(base["topology"] == "ring") & base["algorithm"].isin(["dfedavg", "dfedsam"])].copy()
    base["rho"] = base["algorithm"].map({"dfedavg": "-", "dfedsam": "0.01 (lr_decay 0.998, main sweep)"})
    runs["rho"] = runs["rho"].map(lambda r: f"{r} (lr_decay 1.0)")
    both = pd.concat([base, runs], ignore_index=True)
    for col, fn in [("final_acc", lambda m: m["test_accuracy"].iloc[-1]),
                    ("final_avg_model", lambda m: m["avg_model_accuracy"].iloc[-1]),
                    ("final_consensus", lambda m: m["consensus_distance"].iloc[-1])]:
        both[col] = both["metrics"].map(fn)
    print("### Extra check on the ring: DFedSAM with the baselines' lr_decay = 1.0 and larger rho "
          "(mean ± std over seeds 0-2)\n")
    print("| algorithm | rho | final node acc | final avg-model acc | final consensus dist |")
    print("|---|---|---|---|---|")
    for (alg, rho), g in both.groupby(["algorithm", "rho"], sort=False):
        print(f"| {alg} | {rho} | {pm(g['final_acc'])} | {pm(g['final_avg_model'])} | {pm(g['final_consensus'], 4)} |")
    print()


def first_reach(m: pd.DataFrame, target: float) -> tuple[float, float]:
    hit = m[m["test_accuracy"] >= target]
    if hit.empty:
        return float("nan"), float("nan")
    return float(hit["sim_time"].iloc[0]), float(hit["round"].iloc[0])


def gossip_tables(targets: list[float]) -> None:
    runs = load("gossip_vc")
    if (RUNS / "gossip_vc_paper" / "runs.csv").is_file():  # variance correction, the paper-era reading
        runs = pd.concat([runs, load("gossip_vc_paper")], ignore_index=True)
    # compare like with like: only the seeds that every (topology, nodes, merge) group has
    groups = runs.groupby(["topology", "num_clients", "merge"])["seed"].apply(set)
    common = set.intersection(*groups) if len(groups) else set()
    runs = runs[runs["seed"].isin(common)]
    runs["final_acc"] = runs["metrics"].map(lambda m: m["test_accuracy"].iloc[-1])
    runs["final_avg_model"] = runs["metrics"].map(lambda m: m["avg_model_accuracy"].iloc[-1])
    runs["var_start"] = runs["metrics"].map(lambda m: m["weight_variance"].iloc[0])
    runs["var_min"] = runs["metrics"].map(lambda m: m["weight_variance"].min())
    runs["var_end"] = runs["metrics"].map(lambda m: m["weight_variance"].iloc[-1])
    runs["sim_end"] = runs["metrics"].map(lambda m: m["sim_time"].iloc[-1])
    for t in targets:
        reach = runs["metrics"].map(lambda m: first_reach(m, t))
        runs[f"t@{t}"] = reach.map(lambda x: x[0])
        runs[f"r@{t}"] = reach.map(lambda x: x[1])
    rounds = int(runs["metrics"].iloc[0]["round"].iloc[-1])
    seeds = sorted(int(x) for x in runs["seed"].unique())
    keys = ["topology", "num_clients", "merge"]
    print(f"### Gossip sweep: {rounds} rounds (= minibatch jobs per node), mean over seeds {seeds}\n")
    head = " | ".join(f"sim s (round) to {t:.0%}" for t in targets)
    print(f"| topology | nodes | merge | {head} | final node acc | final avg-model acc "
          "| weight var start | min | end |")
    print("|---|---|---|" + "---|" * len(targets) + "---|---|---|---|---|")
    for (topo, n, merge), g in runs.groupby(keys, sort=True):
        cells = []
        for t in targets:
            ok = g[f"t@{t}"].notna()
            if not ok.any():
                cells.append(f"not reached (≤ {g['sim_end'].max():.1f} s)")
                continue
            cell = f"{g.loc[ok, f't@{t}'].mean():.2f} ({g.loc[ok, f'r@{t}'].mean():.0f})"
            if not ok.all():
                cell += f" [{int(ok.sum())}/{len(g)} seeds]"
            cells.append(cell)
        print(f"| {topo} | {n} | {merge} | " + " | ".join(cells)
              + f" | {g['final_acc'].mean():.3f} | {g['final_avg_model'].mean():.3f} "
              f"| {g['var_start'].mean():.2e} | {g['var_min'].mean():.2e} | {g['var_end'].mean():.2e} |")
    print()
    # speed-up of each VC reading over plain averaging, per target
    for vc_label in sorted(m for m in runs["merge"].unique() if m.startswith("variance_corrected")):
        print(f"### Time-to-target ratio, plain average / {vc_label} (mean over seeds)\n")
        print("| topology | nodes | " + " | ".join(f"ratio at {t:.0%}" for t in targets) + " |")
        print("|---|---|" + "---|" * len(targets))
        for (topo, n), g in runs.groupby(["topology", "num_clients"], sort=True):
            cells = []
            for t in targets:
                avg = g[g["merge"] == "average"][f"t@{t}"]
                vc = g[g["merge"] == vc_label][f"t@{t}"]
                if vc.empty:
                    cells.append("n/a")
                elif avg.notna().all() and vc.notna().all():
                    cells.append(f"{avg.mean() / vc.mean():.2f}x")
                elif vc.notna().all():
                    cells.append("plain not reached")
                else:
                    cells.append("n/a")
            print(f"| {topo} | {n} | " + " | ".join(cells) + " |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", nargs="?", choices=["dfedsam", "dfedsam_cnn", "rho", "gossip", "all"], default="all")
    parser.add_argument("--target", type=float, action="append", help="gossip target accuracy (repeatable)")
    args = parser.parse_args()
    if args.which in ("dfedsam", "all"):
        dfedsam_tables()
    if args.which in ("dfedsam_cnn", "all") and (RUNS / "dfedsam_cnn" / "runs.csv").is_file():
        dfedsam_tables("dfedsam_cnn")
    if args.which in ("dfedsam", "rho", "all"):
        rho_table()
    if args.which in ("gossip", "all"):
        gossip_tables(args.target or [0.3, 0.4, 0.6])


if __name__ == "__main__":
    main()
