"""Convergence plots: one run's curves, and many runs grouped by a scenario key with a band over seeds.

Written for a reader, not a debugger: rounds on integer ticks, bytes in kB/MB/GB, titles and axes in
words, bands that stay readable with many groups, and no numpy or matplotlib warnings on curves
with missing values (a NaN train loss at round 0, runs of different lengths).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from .errors import FedsimError  # noqa: E402
from .paths import writing  # noqa: E402
from .runfolder import folder_scenario, read_index, read_metrics, read_summary  # noqa: E402

AXIS_LABELS = {
    "round": "round",
    "sim_time": "simulated time (s)",
    "wall_time": "wall time (s)",
    "bytes_sent": "bytes communicated",
    "test_accuracy": "test accuracy",
    "test_loss": "test loss",
    "train_loss": "train loss",
    "avg_model_accuracy": "accuracy of the averaged model",
    "consensus_distance": "consensus distance",
}
KEY_WORDS = {
    "algorithm.name": "algorithm",
    "topology.name": "topology",
    "aggregator.name": "aggregation rule",
    "model.name": "model",
    "data.dataset": "data set",
    "data.partition": "partition",
    "data.num_clients": "number of clients",
    "data.alpha": "Dirichlet alpha",
    "algorithm.lr": "learning rate",
    "algorithm.clients_per_round": "clients per round",
    "cases": "case",
}
MISSING_GROUP = {"topology": "server"}  # runs without the table: a graph key's value for a server method
MANY_GROUPS = 4  # from here on, bands get lighter and lines get their own dash pattern
LINE_STYLES = ["-", "--", "-.", ":"]


def words(key: str) -> str:
    """A column or scenario key as a reader says it: `algorithm.lr` -> `learning rate`."""
    if key in AXIS_LABELS:
        return AXIS_LABELS[key]
    if key in KEY_WORDS:
        return KEY_WORDS[key]
    parts = key.split(".")
    last = parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]
    return last.replace("_", " ")


def human_bytes(value: float, _pos: Any = None) -> str:
    """Tick label for a byte count: 0, 750 kB, 12 MB, 1.5 GB (decimal units, as links are quoted)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B" if value else "0"


def format_axis(ax: Any, x: str) -> None:
    """Integer ticks for rounds, human units for bytes, the axis named in words."""
    if x == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if x == "bytes_sent":
        ax.xaxis.set_major_formatter(FuncFormatter(human_bytes))
    ax.set_xlabel(words(x))


def plot_run(df: pd.DataFrame, path: Path, title: str = "") -> None:
    fig = figure_run(df, title)
    save(fig, path, dpi=110)
    plt.close(fig)


def save(fig: Figure, path: Path, dpi: int) -> None:
    """Save without matplotlib's per-glyph warnings: a run name in a script the font lacks draws
    as boxes, which the user sees in the figure; a warning per character says nothing more."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from font", category=UserWarning)
        fig.savefig(path, dpi=dpi)


def image_formats() -> list[str]:
    """The file suffixes matplotlib can write here (its own list, so a backend's extra formats count)."""
    return sorted(Figure().canvas.get_supported_filetypes())


def check_output(out: str | Path, flag: str = "-o") -> Path:
    """`out` as a Path, or one line saying why matplotlib could not write an image there.

    Checked before any work (loading runs, building a federation): matplotlib finds a missing
    folder or an unknown suffix only when it saves, and says so in a traceback; and a name without
    a suffix would be saved as `name.png`, not the `name` we print.
    """
    path = Path(out)
    shown = f"{flag} {out}"
    if path.is_dir():
        raise FedsimError(f"{shown}: is a folder; expected an image file name such as {path / 'plot.png'}")
    suffix = path.suffix.lower().lstrip(".")
    formats = image_formats()
    if suffix not in formats:
        got = f"got .{suffix}" if suffix else "got no suffix"
        raise FedsimError(f"{shown}: expected an image file name ending in one of "
                          f"{', '.join('.' + f for f in formats)} ({got})")
    parent = path.parent
    if not parent.exists():
        raise FedsimError(f"{shown}: the folder {parent} does not exist; create it first or choose another file")
    if not parent.is_dir():
        raise FedsimError(f"{shown}: {parent} is not a folder; expected an image file inside a folder")
    return path


def save_image(fig: Figure, path: Path, dpi: int) -> None:
    """`save`, with an operating-system refusal (permissions, full disk) as one line naming the file."""
    with writing(path, started=False):
        save(fig, path, dpi=dpi)


def figure_run(df: pd.DataFrame, title: str = "") -> Figure:
    """Accuracy and loss against round; a graph method's panel also shows its worst and best node."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    marker = "o" if len(df) <= 60 else None
    for ax, metric in zip(axes, ["test_accuracy", "test_loss"]):
        nodes = metric == "test_accuracy" and {"min_node_accuracy", "max_node_accuracy"} <= set(df.columns)
        label = "mean over nodes" if nodes else None
        (line,) = ax.plot(df["round"], df[metric], marker=marker, markersize=3, label=label)
        if nodes:
            ax.fill_between(df["round"], df["min_node_accuracy"], df["max_node_accuracy"], color=line.get_color(),
                            alpha=0.2, linewidth=0, label="min to max node")
            if "avg_model_accuracy" in df:
                ax.plot(df["round"], df["avg_model_accuracy"], linestyle="--", linewidth=1, label="averaged model")
            ax.legend(fontsize="small")
        format_axis(ax, "round")
        ax.set_ylabel(words(metric))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: test accuracy and loss by round" if title else "Test accuracy and loss by round")
    return fig


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
    """Every run's rows with its group: the run's value of `by`. A run without the key belongs to
    the group that absence means (no [topology] table: "server"); a key no run has is a typo."""
    frames = []
    missing = []
    for run in runs:
        scenario = folder_scenario(run)
        value = lookup(scenario, by)
        if value is None and (run / "summary.json").is_file():  # a swept label such as `cases`
            swept = read_summary(run / "summary.json").get("swept", {})
            value = swept.get(by) if isinstance(swept, dict) else None
        if value is None:
            missing.append(run)
            value = MISSING_GROUP.get(by.split(".")[0], "none")
        df = read_metrics(run / "metrics.csv")
        df["group"] = str(value)
        df["run"] = str(run)
        frames.append(df)
    if missing and len(missing) == len(runs):
        raise FedsimError(f"key '{by}' is in none of the runs' scenarios", file=str(missing[0] / "scenario.toml"))
    return pd.concat(frames, ignore_index=True)


def plot_runs(
    inputs: Iterable[str | Path], by: str, out: str | Path, x: str = "round", metric: str = "test_accuracy",
    title: str | None = None,
) -> Path:
    """Mean curve per group with a min-max band over the group's runs (seeds, usually)."""
    out = check_output(out)
    df = load_runs(find_runs(inputs), by)
    for column in (x, metric):
        if column not in df:
            raise FedsimError(f"no column '{column}' in the runs' metrics.csv (have: {', '.join(df.columns)})")
    fig = figure_runs(df, by, x, metric, title)
    try:
        save_image(fig, out, dpi=120)
    finally:
        plt.close(fig)
    return out


def group_curves(runs: pd.DataFrame, x: str, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(grid, mean, min, max, number of runs) of one group's runs on the union of their x values.

    A run contributes where it has a finite value (inside its own x range); points where no run
    has one stay NaN, without the warnings numpy's nan-reductions give for all-NaN columns.
    """
    curves = []
    for _, r in runs.groupby("run"):
        c = r[[x, metric]].astype(float).dropna(subset=[x]).sort_values(x)
        curves.append((c[x].to_numpy(), c[metric].to_numpy()))
    grid = np.unique(np.concatenate([cx for cx, _ in curves]))
    values = np.full((len(curves), len(grid)), np.nan)
    for i, (cx, cy) in enumerate(curves):
        finite = np.isfinite(cy)
        if finite.any():
            inside = (grid >= cx[finite][0]) & (grid <= cx[finite][-1])
            values[i, inside] = np.interp(grid[inside], cx[finite], cy[finite])
    valid = np.isfinite(values)
    count = valid.sum(0)
    has = count > 0
    mean = np.full(len(grid), np.nan)
    mean[has] = np.where(valid, values, 0.0).sum(0)[has] / count[has]
    low = np.where(has, np.where(valid, values, np.inf).min(0), np.nan)
    high = np.where(has, np.where(valid, values, -np.inf).max(0), np.nan)
    return grid, mean, low, high, len(curves)


def figure_runs(df: pd.DataFrame, by: str, x: str, metric: str, title: str | None = None) -> Figure:
    groups = sorted(df.groupby("group"), key=lambda g: _natural(g[0]))
    many = len(groups) >= MANY_GROUPS
    fig, ax = plt.subplots(figsize=(7.5 if many else 6.5, 4.2), constrained_layout=True)
    for i, (group, runs) in enumerate(groups):
        grid, mean, low, high, n = group_curves(runs, x, metric)
        style = LINE_STYLES[i // 10 % len(LINE_STYLES)] if not many else LINE_STYLES[i % len(LINE_STYLES)]
        marker = "o" if len(grid) == 1 else None
        (line,) = ax.plot(grid, mean, linestyle=style, marker=marker, linewidth=1.6, label=f"{group} (n={n})")
        if n > 1:
            # Many groups: lighter bands, outlined, so that overlapping ones stay apart.
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.1 if many else 0.2,
                            linewidth=0.6 if many else 0, edgecolor=line.get_color() if many else None)
    format_axis(ax, x)
    ax.set_ylabel(words(metric))
    default = f"{words(metric).capitalize()} against {words(x)}, by {words(by)}"
    ax.set_title(title or default)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(title=words(by), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.legend(title=words(by))
    return fig
