"""Table and figure for reports/privacy.md: final accuracy against the epsilon spent (at delta =
1e-5) for DP-FedAvg with fixed and adaptive clipping and for local DP-SGD.

Reads reports/runs/privacy/runs.csv, prints a markdown table, writes
reports/figures/privacy_accuracy_vs_epsilon.png. Usage: python reports/privacy_tables.py [--runs DIR]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).parent


def load(folder: Path) -> pd.DataFrame:
    index = pd.read_csv(folder / "runs.csv")
    rows = []
    for _, entry in index.iterrows():
        run = folder / entry["run_dir"]
        if not (run / "summary.json").is_file():
            continue
        summary = json.loads((run / "summary.json").read_text())
        metrics = pd.read_csv(run / "metrics.csv")
        privacy = summary.get("privacy") or {}
        label = str(entry["cases"])
        rows.append({
            "case": label, "family": label.split("-")[0],
            "final": summary["final_accuracy"], "best": summary["best_accuracy"],
            "epsilon": privacy.get("epsilon", math.inf) if privacy else math.inf,
            "clip": privacy.get("final_clip_norm"),
            "clipped": metrics["clipped_fraction"].iloc[-1] if "clipped_fraction" in metrics else None,
        })
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=HERE / "runs" / "privacy")
    args = parser.parse_args()
    df = load(args.runs)
    print("| case | final accuracy | best | epsilon (delta 1e-5) | final clip norm | clipped in last round |")
    print("|---|---|---|---|---|---|")
    for _, r in df.iterrows():
        eps = "none (no noise)" if r["epsilon"] is None or not math.isfinite(r["epsilon"] or math.inf) else f"{r['epsilon']:.3g}"
        if r["family"] == "nonprivate":
            eps = "(not private)"
        clip = "" if r["clip"] is None or pd.isna(r["clip"]) else f"{r['clip']:.3g}"
        clipped = "" if r["clipped"] is None or pd.isna(r["clipped"]) else f"{r['clipped']:.2f}"
        print(f"| {r['case']} | {r['final']:.4f} | {r['best']:.4f} | {eps} | {clip} | {clipped} |")
    fig, ax = plt.subplots(figsize=(6, 4))
    for family, marker in (("fixed", "o"), ("adaptive", "s"), ("adaptive0.5", "D"), ("local", "^")):
        part = df[df["family"] == family].sort_values("epsilon")
        ax.plot(part["epsilon"], part["final"], marker=marker, label={"fixed": "DP-FedAvg, fixed C = 0.5",
                "adaptive": "DP-FedAvg, adaptive C from 0.05", "adaptive0.5": "DP-FedAvg, adaptive C from 0.5", "local": "local DP-SGD, C = 1"}[family])
    base = df[df["family"] == "nonprivate"]
    if len(base):
        ax.axhline(float(base["final"].iloc[0]), color="grey", linestyle="--", label="FedAvg, not private")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon after 30 rounds (delta = 1e-5)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Fashion-MNIST, 20 clients, MLP: accuracy against epsilon")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = HERE / "figures" / "privacy_accuracy_vs_epsilon.png"
    fig.savefig(out, dpi=110)
    print(f"\nwrote {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
