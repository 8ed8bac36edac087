"""Markdown tables for reports/baselines.md.

Reads every run listed in reports/runs/baselines/runs.csv (its metrics.csv and summary.json) and
prints: global test accuracy (final and best, mean ± std over seeds), rounds and megabytes to the
scenario's target accuracy, and per-client accuracy (mean, 10th percentile, worst) of the model
each client would use. Usage: python reports/baselines_tables.py [--runs DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

RUNS = Path(__file__).parent / "runs" / "baselines"
METHODS = ["fedavg", "fedprox", "scaffold", "fednova", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "feddyn",
           "moon", "ditto", "fedper", "fedrep", "fedbn", "local", "fedavg_ft"]
PERSONAL = {"ditto", "fedper", "fedrep", "fedbn", "local", "fedavg_ft"}
SPLITS = {"dirichlet-0.1": "Dir(0.1)", "dirichlet-0.5": "Dir(0.5)", "shards-2": "2 classes/client"}


def load(folder: Path) -> pd.DataFrame:
    index = pd.read_csv(folder / "runs.csv")
    rows = []
    for _, entry in index.iterrows():
        run = folder / entry["run_dir"]
        if not (run / "summary.json").is_file():
            continue  # a run the sweep had not finished
        summary = json.loads((run / "summary.json").read_text())
        metrics = pd.read_csv(run / "metrics.csv")
        last = metrics.iloc[-1]
        rows.append({
            "method": entry["cases"], "split": entry["data"], "seed": int(entry["seed"]),
            "final": summary["final_accuracy"], "best": summary["best_accuracy"],
            "rounds_to_target": summary.get("round_to_target"), "bytes_to_target": summary.get("bytes_to_target"),
            "total_mb": summary["total_bytes"] / 1e6,
            "client_mean": last.get("client_accuracy_mean"), "client_p10": last.get("client_accuracy_p10"),
            "client_worst": last.get("client_accuracy_worst"),
            "best_client_mean": metrics["client_accuracy_mean"].max() if "client_accuracy_mean" in metrics else None,
            "rounds": int(summary["rounds"]), "target": summary.get("target_accuracy"),
        })
    return pd.DataFrame(rows)


def pm(values: pd.Series, digits: int = 3) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    if len(values) > 1:
        return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"
    return f"{values.mean():.{digits}f}"


def reached(group: pd.DataFrame) -> str:
    """Rounds and MB to the target, mean over the seeds that reached it, and how many did."""
    hit = group.dropna(subset=["rounds_to_target"])
    if hit.empty:
        return f"– (0/{len(group)})"
    return f"{hit['rounds_to_target'].mean():.0f} · {hit['bytes_to_target'].mean() / 1e6:.0f} MB ({len(hit)}/{len(group)})"


def table(runs: pd.DataFrame, title: str, cell) -> None:  # noqa: ANN001
    splits = [s for s in SPLITS if s in set(runs["split"])]
    print(f"### {title}\n")
    print("| method | " + " | ".join(SPLITS[s] for s in splits) + " |")
    print("|---|" + "---|" * len(splits))
    for method in METHODS:
        cells = []
        for split in splits:
            g = runs[(runs["method"] == method) & (runs["split"] == split)]
            cells.append(cell(g) if not g.empty else "")
        if any(cells):
            print(f"| {method} | " + " | ".join(cells) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=RUNS)
    args = parser.parse_args()
    runs = load(args.runs)
    seeds = sorted(runs["seed"].unique().tolist())
    rounds = int(runs["rounds"].max())
    target = runs["target"].dropna().iloc[0] if runs["target"].notna().any() else None
    stamp = args.runs / "commit.txt"
    commit = stamp.read_text().strip() if stamp.is_file() else "unknown (no commit.txt)"
    print(f"{len(runs)} runs, seeds {seeds}, {rounds} rounds, made at fedsim commit {commit}\n")
    table(runs, "Global model, test accuracy after the last round (best over evaluations), mean ± std over seeds",
          lambda g: f"{pm(g['final'])} ({g['best'].mean():.3f})")
    if target is not None:
        table(runs, f"Rounds to {target:.0%} test accuracy and MB sent by then (evaluated every few rounds; seeds that reached it)",
              reached)
    table(runs, "Per-client accuracy of the model each client uses, after the last round: mean / 10th percentile / worst "
          "(mean over seeds)",
          lambda g: f"{g['client_mean'].mean():.3f} / {g['client_p10'].mean():.3f} / {g['client_worst'].mean():.3f}")
    table(runs, "Megabytes sent in the whole run (all clients, both directions)", lambda g: f"{g['total_mb'].mean():.0f}")


if __name__ == "__main__":
    main()
