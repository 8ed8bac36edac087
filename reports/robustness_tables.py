"""Markdown tables and figures for reports/robustness.md.

Reads every finished run listed in the runs.csv files under reports/runs/robustness (server/,
graph/ring/, graph/random_regular/, alie/) and prints, per setting, the final test accuracy of each merge
rule under each attack and attacker fraction (fraction 0 is the clean run, shared by all attacks).
Draws final accuracy against the attacker fraction, one panel per attack, one line per rule, to
reports/figures/robustness_server.png and robustness_graph.png.
Usage: python reports/robustness_tables.py [--runs DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

RUNS = Path(__file__).parent / "runs" / "robustness"
FIGURES = Path(__file__).parent / "figures"
SETTINGS = {"server": "Server (FedAvg)", "graph/ring": "DFedAvg, ring",
            "graph/random_regular": "DFedAvg, random 4-regular graph"}
RULES = ["mean", "median", "trimmed_mean", "krum", "geometric_median", "centered_clipping"]
ATTACKS = ["sign_flip", "alie", "ipm", "label_flip"]
FRACTIONS = [0.1, 0.2, 0.4]


def load(folder: Path) -> pd.DataFrame:
    rows = []
    for setting in SETTINGS:
        index = folder / setting / "runs.csv"
        if not index.is_file():
            continue
        for _, entry in pd.read_csv(index).iterrows():
            run = folder / setting / entry["run_dir"]
            if not (run / "summary.json").is_file():
                continue  # a run the sweep had not finished
            summary = json.loads((run / "summary.json").read_text())
            rows.append({"setting": setting, "rule": entry["cases"], "attack": entry["adversary.behaviour"],
                         "fraction": float(entry["adversary.fraction"]), "final": summary["final_accuracy"],
                         "attackers": len(summary.get("attackers", [])), "run": run})
    return pd.DataFrame(rows)


def table(df: pd.DataFrame, setting: str) -> str:
    part = df[df.setting == setting]
    rules = [r for r in RULES if r in set(part.rule)]
    head = ["rule", "clean"] + [f"{a} {int(f * 100)}%" for a in ATTACKS for f in FRACTIONS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule in rules:
        mine = part[part.rule == rule]
        clean = mine[mine.fraction == 0.0]["final"]
        cells = [rule, f"{clean.iloc[0]:.3f}" if len(clean) else "–"]
        for attack in ATTACKS:
            for f in FRACTIONS:
                hit = mine[(mine.attack == attack) & (mine.fraction == f)]["final"]
                cells.append(f"{hit.iloc[0]:.3f}" if len(hit) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alie_table(folder: Path) -> str | None:
    """ALIE with 50 clients per merge (runs/robustness/alie): final accuracy per rule and attacker
    fraction, mean and range over the seeds."""
    index = folder / "alie" / "runs.csv"
    if not index.is_file():
        return None
    rows = []
    for _, entry in pd.read_csv(index).iterrows():
        run = folder / "alie" / entry["run_dir"]
        if (run / "summary.json").is_file():
            rows.append({"rule": entry["cases"], "fraction": float(entry["adversary.fraction"]), "seed": int(entry["seed"]),
                         "final": json.loads((run / "summary.json").read_text())["final_accuracy"]})
    df = pd.DataFrame(rows)
    fractions = sorted(df.fraction.unique())
    seeds = sorted(int(x) for x in df.seed.unique())
    head = ["rule"] + [("clean" if f == 0 else f"ALIE {round(f * 100)}%") for f in fractions] + \
        [f"drop at {round(f * 100)}%" for f in fractions if f > 0]
    lines = [f"{len(df)} runs, seeds {seeds}: mean final accuracy (min-max over seeds)\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule in [r for r in RULES if r in set(df.rule)]:
        mine = df[df.rule == rule]
        means = {f: mine[mine.fraction == f]["final"].mean() for f in fractions}
        cells = [rule]
        for f in fractions:
            g = mine[mine.fraction == f]["final"]
            cells.append(f"{g.mean():.3f} ({g.min():.3f}-{g.max():.3f})")
        cells += [f"{means[0.0] - means[f]:+.3f}" for f in fractions if f > 0]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(df: pd.DataFrame, settings: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(settings), len(ATTACKS), figsize=(4 * len(ATTACKS), 3.2 * len(settings)),
                             sharey=True, squeeze=False)
    for row, setting in zip(axes, settings):
        part = df[df.setting == setting]
        for ax, attack in zip(row, ATTACKS):
            for rule in [r for r in RULES if r in set(part.rule)]:
                mine = part[(part.rule == rule) & ((part.attack == attack) | (part.fraction == 0.0))]
                mine = mine.drop_duplicates("fraction").sort_values("fraction")
                ax.plot(mine.fraction * 100, mine.final, marker="o", label=rule, color=f"C{RULES.index(rule)}")
            ax.set_title(f"{SETTINGS[setting]}: {attack}", fontsize=9)
            ax.set_xlabel("attackers (%)")
            ax.grid(alpha=0.3)
        row[0].set_ylabel("final test accuracy")
        row[-1].legend(fontsize=7)  # one per row: the ring runs fewer rules
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=RUNS)
    args = parser.parse_args()
    df = load(args.runs)
    for setting in SETTINGS:
        if (df.setting == setting).any():
            print(f"\n### {SETTINGS[setting]}: final test accuracy ({(df.setting == setting).sum()} runs)\n")
            print(table(df, setting))
    alie = alie_table(args.runs)
    if alie is not None:
        print("\n### ALIE, 50 clients per merge (Server, FedAvg, IID)\n")
        print(alie)
    if (df.setting == "server").any():
        figure(df, ["server"], FIGURES / "robustness_server.png")
    graphs = [s for s in SETTINGS if s.startswith("graph") and (df.setting == s).any()]
    if graphs:
        figure(df, graphs, FIGURES / "robustness_graph.png")


if __name__ == "__main__":
    main()
