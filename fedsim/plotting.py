"""Convergence plots: one run's curves, and many runs grouped by a scenario key with a band over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .errors import FedsimError  # noqa: E402
from .runfolder import folder_scenario, read_index, read_metrics, read_summary  # noqa: E402

AXIS_LABELS = {
    "round": "round",
    "sim_time": "simulated time (s)",
    "wall_time": "wall time (s)",
    "bytes_sent": "bytes communicated",
    "test_accuracy": "test accuracy",
    "test_loss": "test loss",
    "train_loss": "train loss",
}


def plot_run(df: pd.DataFrame, path: Path, title: str = "") -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    for ax, metric in zip(axes, ["test_accuracy", "test_loss"]):
        ax.plot(df["round"], df[metric], marker="o", markersize=3)
        ax.set_xlabel("round")
        ax.set_ylabel(AXIS_LABELS[metric])
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def find_runs(inputs: Iterable[str | Path]) -> list[Path]:
    """Run folders from folders, `runs.csv` files, or folders that hold many runs."""
    runs: list[Path] = []
    for item in map(Path, inputs):
        if item.is_file() and item.name.endswith(".csv"):
            rows = read_index(item)
            # a sweep's index also lists points that failed or have not run yet
            runs += [item.parent / r["run_dir"] for r in rows if r.get("status", "done") in ("done", "")]
        elif (item / "metrics.csv").is_file():
            runs.append(item)
        elif item.is_dir() and any(item.glob("*/metrics.csv")):
            runs += sorted(p.parent for p in item.glob("*/metrics.csv"))
        else:
            raise FedsimError("expected a run folder (with metrics.csv), a folder of runs or a runs.csv", file=str(item))
    return runs


def _natural(text: str) -> tuple[int, float | str]:
    """Numbers in numeric order (50 before 200), then text."""
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)


def lookup(scenario: dict[str, Any], key: str) -> Any:
    node: Any = scenario
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_runs(runs: list[Path], by: str) -> pd.DataFrame:
    frames = []
    for run in runs:
        scenario = folder_scenario(run)
        value = lookup(scenario, by)
        if value is None and (run / "summary.json").is_file():  # a swept label such as `cases`
            swept = read_summary(run / "summary.json").get("swept", {})
            value = swept.get(by) if isinstance(swept, dict) else None
        if value is None:
            raise FedsimError(f"key '{by}' is not in this run's scenario", file=str(run / "scenario.toml"))
        df = read_metrics(run / "metrics.csv")
        df["group"] = str(value)
        df["run"] = str(run)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def plot_runs(
    inputs: Iterable[str | Path], by: str, out: str | Path, x: str = "round", metric: str = "test_accuracy",
    title: str | None = None,
) -> Path:
    """Mean curve per group with a min-max band over the group's runs (seeds, usually)."""
    df = load_runs(find_runs(inputs), by)
    for column in (x, metric):
        if column not in df:
            raise FedsimError(f"no column '{column}' in the runs' metrics.csv (have: {', '.join(df.columns)})")
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    for group, runs in sorted(df.groupby("group"), key=lambda g: _natural(g[0])):
        curves = [r.set_index(x)[metric] for _, r in runs.groupby("run")]
        grid = np.unique(np.concatenate([c.index.to_numpy(float) for c in curves]))
        values = np.vstack([np.interp(grid, c.index.to_numpy(float), c.to_numpy(float), right=np.nan) for c in curves])
        mean = np.nanmean(values, axis=0)
        (line,) = ax.plot(grid, mean, label=f"{group} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(grid, np.nanmin(values, 0), np.nanmax(values, 0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel(AXIS_LABELS.get(metric, metric))
    ax.set_title(title or f"{metric} by {by}")
    ax.grid(alpha=0.3)
    ax.legend(title=by)
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
