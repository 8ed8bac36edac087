"""Markdown tables for reports/lora_fair.md and reports/ferret.md.

    .venv/bin/python reports/finetune_tables.py [lora|ferret|all]

Reads reports/runs/{lora_fair,lora_fair_drift,ferret,ferret_k,ferret_k/K5000}/runs.csv and each run's metrics.csv and
summary.json. Means and stds are over seeds (std with ddof = 1; n = 1 prints std as 0).
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pandas as pd

RUNS = Path(__file__).resolve().parent / "runs"


def md(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """A pipe table (no tabulate dependency: the venv does not ship it)."""
    def cell(v):
        if isinstance(v, float):
            return "nan" if pd.isna(v) else format(v, floatfmt)
        return str(v)
    head = [str(df.index.name or "")] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([cell(idx)] + [cell(v) for v in row.tolist()]) + " |")
    return "\n".join(lines)


def load(sweep: str) -> pd.DataFrame:
    """One row per round and run, with the run's case label, seed and scenario values attached."""
    folder = RUNS / sweep
    if (folder / "runs.csv").exists():
        index = pd.read_csv(folder / "runs.csv")
    else:  # a one-point sweep writes no runs.csv: read the swept values from each summary.json
        rows = []
        for run in sorted(p for p in folder.iterdir() if (p / "summary.json").exists()):
            rows.append({"run_dir": run.name, **json.loads((run / "summary.json").read_text())["swept"]})
        index = pd.DataFrame(rows)
    frames = []
    for _, row in index.iterrows():
        run = folder / row["run_dir"]
        m = pd.read_csv(run / "metrics.csv")
        s = json.loads((run / "summary.json").read_text())
        sc = tomllib.loads((run / "scenario.toml").read_text())
        m["case"] = row["cases"]
        m["seed"] = row["seed"]
        m["final_accuracy"] = s["final_accuracy"]
        m["best_accuracy"] = s["best_accuracy"]
        m["final_loss"] = s["final_loss"]
        m["total_bytes"] = s["total_bytes"]
        m["rounds"] = sc["rounds"]
        m["clients_per_round"] = sc["algorithm"]["clients_per_round"]
        m["K"] = sc["algorithm"].get("K")
        m["budget"] = sc["algorithm"].get("budget")
        frames.append(m)
    return pd.concat(frames, ignore_index=True)


def pm(mean: float, std: float, digits: int = 2, scale: float = 100.0) -> str:
    std = 0.0 if pd.isna(std) else std
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def final_table(df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Final / best accuracy (%) and final test loss, mean ± std over seeds, per case."""
    per_run = df.groupby(["case", "seed"]).first()[["final_accuracy", "best_accuracy", "final_loss", "total_bytes"]]
    last5 = df[df["round"] > df["round"].max() - 5].groupby(["case", "seed"])["test_accuracy"].mean()
    l5 = last5.groupby("case")
    g = per_run.groupby("case")
    out = pd.DataFrame(
        {
            "seeds": g.size(),
            "final acc (%)": [pm(g.final_accuracy.mean()[c], g.final_accuracy.std()[c]) for c in g.size().index],
            "mean acc last 5 rounds (%)": [pm(l5.mean()[c], l5.std()[c]) for c in g.size().index],
            "best acc (%)": [pm(g.best_accuracy.mean()[c], g.best_accuracy.std()[c]) for c in g.size().index],
            "final test loss": [pm(g.final_loss.mean()[c], g.final_loss.std()[c], 3, 1.0) for c in g.size().index],
            "total bytes (MB)": (g.total_bytes.mean() / 1e6).round(3),
        },
        index=g.size().index,
    )
    return out.reindex([c for c in order if c in out.index])


def lora(sweep: str = "lora_fair") -> None:
    df = load(sweep)
    order = ["fedit", "ffa_lora", "flexlora", "lora_fair", "lora_fair_lam0"]
    print("### Final accuracy (round 30), mean ± std over 3 seeds\n")
    print(md(final_table(df, order)))

    # paired difference to FedIT, same seed (same client sampling and data)
    per_run = df.groupby(["case", "seed"]).first()["final_accuracy"].unstack("case")
    print("\n### Paired final-accuracy differences (same seed: same sampling and data), percentage points\n")
    diffs = {c: per_run[c] - per_run["fedit"] for c in order if c != "fedit" and c in per_run}
    rows = {
        c: {**{f"seed {s}": f"{d[s] * 100:+.2f}" for s in d.index}, "mean": f"{d.mean() * 100:+.2f}"} for c, d in diffs.items()
    }
    d = per_run["lora_fair_lam0"] - per_run["lora_fair"]
    rows["lora_fair_lam0 - lora_fair"] = {**{f"seed {s}": f"{d[s] * 100:+.2f}" for s in d.index}, "mean": f"{d.mean() * 100:+.2f}"}
    print(md(pd.DataFrame(rows).T))

    print("\n### Aggregation fidelity, mean over rounds 1-30 and seeds (per-round values averaged over layers)\n")
    fair = df[(df["round"] > 0)]
    cols = ["ideal_cos", "avg_cos", "delta_b_norm", "b_cos"]
    g = fair.groupby("case")
    stats = g[cols].mean()
    stats["min ideal_cos"] = g["ideal_cos"].min()
    stats["min avg_cos"] = g["avg_cos"].min()
    stats["1 - ideal_cos"] = 1 - stats["ideal_cos"]
    stats["1 - avg_cos"] = 1 - stats["avg_cos"]
    stats["max delta_b_norm"] = g["delta_b_norm"].max()
    nz = fair.assign(nz=fair["delta_b_norm"] > 0).groupby("case")["nz"]
    stats["rounds with dB != 0"] = [f"{int(a)} / {int(b)}" for a, b in zip(nz.sum(), nz.size())]
    stats = stats[["ideal_cos", "avg_cos", "1 - ideal_cos", "1 - avg_cos", "min ideal_cos", "min avg_cos",
                   "delta_b_norm", "max delta_b_norm", "rounds with dB != 0", "b_cos"]]
    stats = stats.reindex([c for c in order if c in stats.index])
    print(md(stats, ".6f"))


def ferret() -> None:
    df = load("ferret")
    order = ["fedavg", "ferret", "ferret_kron"]
    print("### Final accuracy (round 30), mean ± std over 3 seeds\n")
    print(md(final_table(df, order)))

    print("\n### Communication\n")
    per_run = df.groupby(["case", "seed"]).first()
    last = df.sort_values("round").groupby(["case", "seed"]).last()
    rows = {}
    for case in [c for c in order if c in per_run.index.get_level_values(0)]:
        pr, la = per_run.loc[case], last.loc[case]
        rounds, cpr = int(pr["rounds"].iloc[0]), int(pr["clients_per_round"].iloc[0])
        ferret_rows = df[(df["case"] == case) & (df["round"] > 0)]
        coords = ferret_rows["upload_coordinates"].mean() if "upload_coordinates" in df and ferret_rows["upload_coordinates"].notna().any() else float("nan")
        per_client = la["bytes_sent"].mean() / rounds / cpr
        rows[case] = {
            "upload_coordinates / client / round": coords,
            # FedAvg sends the whole model both ways: half of a client's bytes, 4 bytes a number
            "uploaded numbers / client / round": coords if coords == coords else per_client / 2 / 4,
            # the adaptive budget sends a 4-byte seed index with each 4-byte coordinate
            "upload bytes / client / round": (8 if pr["budget"].iloc[0] == "adaptive" else 4)
            * (coords if coords == coords else per_client / 2 / 4),
            "bytes_sent / rounds / clients per round (up + down)": per_client,
            "total bytes (MB)": la["bytes_sent"].mean() / 1e6,
        }
    print(md(pd.DataFrame(rows).T, ".1f"))

    if (RUNS / "ferret_k" / "runs.csv").exists():
        k = load("ferret_k")
        if (RUNS / "ferret_k" / "K5000").is_dir():  # the K = 5000 run, a separate command
            k = pd.concat([k, load("ferret_k/K5000")], ignore_index=True)
        k = k[k["round"] > 0]
        g = k.groupby("K")
        out = pd.DataFrame(
            {
                "runs": g["seed"].nunique(),
                "mean recon_error": g["recon_error"].mean(),
                "recon_error round 1": k[k["round"] == 1].groupby("K")["recon_error"].mean(),
                "recon_error round 30": k[k["round"] == k["round"].max()].groupby("K")["recon_error"].mean(),
                "upload_coordinates": g["upload_coordinates"].mean(),
                "final acc (%)": g["final_accuracy"].first() * 100,
                "final test loss": g["final_loss"].first(),
            }
        )
        out["K x mean recon_error"] = out.index * out["mean recon_error"]
        print("\n### Reconstruction error against K (ferret_k sweep)\n")
        print(md(out, ".4g"))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what in ("lora", "all"):
        print("## LoRA-FAIR tables\n")
        lora()
        print()
        if (RUNS / "lora_fair_drift" / "runs.csv").exists():
            print("## LoRA-FAIR tables, clients drifting further (lora_fair_drift)\n")
            lora("lora_fair_drift")
            print()
    if what in ("ferret", "all"):
        print("## Ferret tables\n")
        ferret()
