"""Markdown tables for reports/modest.md.

Reads every run listed in reports/runs/modest/runs.csv (metrics.csv, summary.json) and prints:
per-case efficiency (means over seeds), the bytes-to-target ratios against MoDeST, and the crash
experiment (modest vs modest-crash80). Usage: python reports/modest_tables.py
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pandas as pd

SWEEP = Path(__file__).parent / "runs" / "modest"
ORDER = ["modest", "modest-equal", "modest-fastest", "fedavg", "dpsgd", "gossip", "modest-crash80"]


def load() -> pd.DataFrame:
    index = pd.read_csv(SWEEP / "runs.csv")
    rows = []
    for _, r in index.iterrows():
        folder = SWEEP / r["run_dir"]
        if not (folder / "summary.json").exists():
            continue  # unfinished run
        s = json.loads((folder / "summary.json").read_text())
        scenario = tomllib.loads((folder / "scenario.toml").read_text())
        rows.append({
            "case": r["cases"],
            "seed": int(r["seed"]),
            "crash_round": scenario["system"]["failures"].get("crash_round"),
            "summary": s,
            "metrics": pd.read_csv(folder / "metrics.csv"),
        })
    return pd.DataFrame(rows)


def mean_or_none(values: list) -> tuple[float | None, int]:
    """Mean over the seeds that reached the target, and how many did."""
    got = [v for v in values if v is not None]
    return (sum(got) / len(got) if got else None), len(got)


def reached(values: list, fmt: str) -> str:
    m, k = mean_or_none(values)
    if m is None:
        return "not reached"
    text = fmt.format(m)
    return text if k == len(values) else f"{text} ({k}/{len(values)} seeds)"


def efficiency(runs: pd.DataFrame) -> dict[str, float | None]:
    target = runs["summary"].iloc[0]["target_accuracy"]
    seeds = sorted(runs["seed"].unique())
    print(f"### Per case: mean over the case's finished seeds (seeds {list(map(int, seeds))}; runs = how many) "
          f"(target accuracy {target})\n")
    print("| case | runs | MB to target | sim s to target | round to target | final acc | best acc | total MB "
          "| max MB per node | Gini of bytes per node | sim s total |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    to_target: dict[str, float | None] = {}
    totals: dict[str, float] = {}
    for case in [c for c in ORDER if c in set(runs["case"])]:
        g = runs[runs["case"] == case]
        sm = list(g["summary"])
        b = [s.get("bytes_to_target") for s in sm]
        to_target[case], _ = mean_or_none(b)
        totals[case] = sum(s["total_bytes"] for s in sm) / len(sm)
        print(
            f"| {case} | {len(g)} "
            f"| {reached([None if x is None else x / 1e6 for x in b], '{:.1f}')} "
            f"| {reached([s.get('sim_time_to_target') for s in sm], '{:.1f}')} "
            f"| {reached([s.get('round_to_target') for s in sm], '{:.1f}')} "
            f"| {sum(s['final_accuracy'] for s in sm) / len(sm):.4f} "
            f"| {sum(s['best_accuracy'] for s in sm) / len(sm):.4f} "
            f"| {totals[case] / 1e6:.1f} "
            f"| {sum(s['max_bytes_per_client'] for s in sm) / len(sm) / 1e6:.2f} "
            f"| {sum(s['gini_bytes_per_node'] for s in sm) / len(sm):.3f} "
            f"| {sum(s['sim_time'] for s in sm) / len(sm):.1f} |"
        )
    print()
    base = to_target.get("modest")
    print("### Bytes to target, relative to MoDeST (the paper claims 3x-14x for decentralized learning)\n")
    print("| case | bytes to target / MoDeST's | note |")
    print("|---|---|---|")
    for case in ["fedavg", "dpsgd", "gossip"]:
        if case not in to_target or base is None:
            continue
        if to_target[case] is not None:
            print(f"| {case} | {to_target[case] / base:.1f}x | |")
        else:  # never reached: the whole run's bytes are a lower bound
            print(f"| {case} | > {totals[case] / base:.1f}x | target not reached; total bytes of the run / MoDeST's bytes to target |")
    print()
    return to_target


def per_round(m: pd.DataFrame, lo: int, hi: int) -> float:
    a = m[m["round"] == lo]["sim_time"].iloc[0]
    b = m[m["round"] == hi]["sim_time"].iloc[0]
    return (b - a) / (hi - lo)


def crash(runs: pd.DataFrame) -> None:
    g = runs[runs["case"].isin(["modest", "modest-crash80"])]
    if g.empty:
        return
    crash_round = int(runs[runs["case"] == "modest-crash80"]["crash_round"].iloc[0])
    print(f"### Crash experiment: 80% of the nodes crash at protocol round {crash_round}\n")
    print("Rows are single runs. 'before' = last evaluation before the crash round; 'lowest after' = "
          "minimum over evaluations from the crash round on. Simulated seconds per protocol round from "
          "sim_time differences between evaluations: before = rounds 0 to the last evaluation before the "
          "crash, window = that evaluation to two rounds after the crash, after = from there to the end.\n")
    print("| case | seed | acc before | lowest after | final acc | dropped rounds | s/round before "
          "| s/round crash window | s/round after | max round_seconds after | final global_round |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for _, r in g.sort_values(["case", "seed"]).iterrows():
        m = r["metrics"]
        last = int(m["round"].iloc[-1])
        pre = int(m[m["round"] < crash_round]["round"].iloc[-1])
        post = int(m[m["round"] >= crash_round + 2]["round"].iloc[0]) if (m["round"] >= crash_round + 2).any() else last
        after = m[m["round"] >= crash_round]
        dropped = m["dropped_rounds"].iloc[-1]
        g_final = int(m["global_round"].iloc[-1])
        stalled = g_final < last
        print(
            f"| {r['case']} | {r['seed']} | {m[m['round'] == pre]['test_accuracy'].iloc[0]:.4f} "
            f"| {after['test_accuracy'].min():.4f} | {m['test_accuracy'].iloc[-1]:.4f} "
            f"| {0 if math.isnan(dropped) else int(dropped)} "
            f"| {per_round(m, 0, pre):.2f} | {per_round(m, pre, post):.2f} "
            f"| {'clock frozen (stalled)' if stalled else f'{per_round(m, post, last):.2f}'} "
            f"| {after['round_seconds'].max():.2f} | {g_final}{' of ' + str(last) + ': STALLED' if stalled else ''} |"
        )
    print()


def main() -> None:
    runs = load()
    efficiency(runs)
    crash(runs)


if __name__ == "__main__":
    main()
