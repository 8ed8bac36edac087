"""Tables and figures for reports/compression.md: accuracy against bytes per compressor, FedAvg's
uploads and CHOCO-SGD on a ring.

Reads reports/runs/compression/{server,choco}/runs.csv, prints markdown tables, writes
reports/figures/compression_server.png and compression_choco.png.
Usage: python reports/compression_tables.py [--runs DIR] [--target 0.7]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).parent


def load(folder: Path) -> list[tuple[str, pd.DataFrame, dict]]:
    index = pd.read_csv(folder / "runs.csv")
    out = []
    for _, entry in index.iterrows():
        run = folder / entry["run_dir"]
        if (run / "summary.json").is_file():
            out.append((str(entry["cases"]), pd.read_csv(run / "metrics.csv"), json.loads((run / "summary.json").read_text())))
    return out


def table(runs: list[tuple[str, pd.DataFrame, dict]], target: float, accuracy: str, downloads: float = 0.0) -> None:
    """`downloads`: the bytes every run spends on (uncompressed) downloads, the same in each, since
    the cohorts are the same (same seed, no failures); the upload column is the rest."""
    base = runs[0][2]["total_bytes"] - downloads
    what = "uploaded MB" if downloads else "MB"
    print(f"| case | final accuracy | best | total MB | {what} | x fewer {what.split()[0] if downloads else 'bytes'} "
          f"than {runs[0][0]} | MB to {target:.0%} |")
    print("|---|---|---|---|---|---|---|")
    for label, m, s in runs:
        reached = m[m[accuracy] >= target]
        to = f"{reached['bytes_sent'].iloc[0] / 1e6:.1f}" if len(reached) else "not reached"
        sent = s["total_bytes"] - downloads
        print(f"| {label} | {m[accuracy].iloc[-1]:.4f} | {m[accuracy].max():.4f} | {s['total_bytes'] / 1e6:.1f} | "
              f"{sent / 1e6:.2f} | {base / sent:.1f} | {to} |")


def figure(runs: list[tuple[str, pd.DataFrame, dict]], accuracy: str, title: str, name: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, m, _ in runs:
        ax.plot(m["bytes_sent"] / 1e6, m[accuracy], marker=".", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("megabytes sent (whole federation, cumulative)")
    ax.set_ylabel(accuracy.replace("_", " "))
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "figures" / name, dpi=110)
    print(f"\nwrote reports/figures/{name}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=HERE / "runs" / "compression")
    parser.add_argument("--target", type=float, default=0.7)
    args = parser.parse_args()
    server = load(args.runs / "server")
    print("FedAvg, compressed uploads (test accuracy of the global model)\n")
    table(server, args.target, "test_accuracy", downloads=server[0][2]["total_bytes"] / 2)  # identity: up = down
    figure(server, "test_accuracy", "FedAvg, 20 clients: accuracy against bytes", "compression_server.png")
    choco = load(args.runs / "choco")
    print("CHOCO-SGD on a 20-node ring (accuracy of the averaged model)\n")
    table(choco, args.target, "avg_model_accuracy")
    figure(choco, "avg_model_accuracy", "CHOCO-SGD, ring of 20: accuracy against bytes", "compression_choco.png")


if __name__ == "__main__":
    main()
