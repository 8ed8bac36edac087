"""What a user reads: plots (ticks, units, titles, bands, node spread), `fedsim list`, `--version`,
the progress bar ("run i/n", one line per evaluation without a terminal width)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import tomli_w

from fedsim import plotting, progress
from fedsim.cli import main
from fedsim.coordinator import RunOptions, run_all
from fedsim.scenario import loads
from tests.conftest import SMALL


def fake_run(root: Path, name: str, scenario: dict, rows: int = 6, offset: float = 0.0,
             extra: dict | None = None) -> Path:
    """A run folder as `fedsim run` leaves it, with made-up curves (plots only read files)."""
    run = root / name
    run.mkdir(parents=True)
    r = np.arange(rows)
    df = pd.DataFrame({
        "round": r, "sim_time": r * 1.5, "wall_time": r * 0.1, "test_accuracy": 0.1 + 0.1 * r + offset,
        "test_loss": 2.0 - 0.1 * r, "train_loss": np.r_[np.nan, 1.5 - 0.1 * r[1:]],
        "bytes_sent": r * 3_000_000,
    })
    for key, values in (extra or {}).items():
        df[key] = values
    df.to_csv(run / "metrics.csv", index=False)
    (run / "scenario.toml").write_text(tomli_w.dumps(scenario))
    (run / "summary.json").write_text(json.dumps({"swept": {}}))
    return run


def scenario(lr: float = 0.1, topology: str | None = None) -> dict:
    out = {"name": "x", "algorithm": {"name": "dpsgd" if topology else "fedavg", "lr": lr}}
    if topology:
        out["topology"] = {"name": topology}
    return out


def tick_values(ax, axis: str = "x") -> list[float]:
    ax.figure.canvas.draw()
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    locs = ax.get_xticks() if axis == "x" else ax.get_yticks()
    return [v for v in locs if lo <= v <= hi]


def test_round_ticks_are_integers_and_titles_are_words():
    df = pd.read_csv(io.StringIO("round,test_accuracy,test_loss\n0,0.1,2\n1,0.2,1.9\n2,0.3,1.8\n"))
    fig = plotting.figure_run(df, "quick")
    try:
        for ax in fig.axes:
            assert all(float(v).is_integer() for v in tick_values(ax))  # 0, 1, 2: never 0.25, 0.5, ...
        assert fig._suptitle.get_text() == "quick: test accuracy and loss by round"
        assert [ax.get_ylabel() for ax in fig.axes] == ["test accuracy", "test loss"]
    finally:
        plt.close(fig)


def test_bytes_read_in_megabytes_and_the_title_in_words(tmp_path):
    for lr in (0.05, 0.1):
        fake_run(tmp_path, f"lr{lr}", scenario(lr))
    df = plotting.load_runs(plotting.find_runs([tmp_path]), "algorithm.lr")
    fig = plotting.figure_runs(df, "algorithm.lr", "bytes_sent", "test_accuracy")
    try:
        ax = fig.axes[0]
        ax.figure.canvas.draw()
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert any(label.endswith(" MB") for label in labels) and not any("e+" in label or "1e" in label for label in labels)
        assert plotting.human_bytes(15_000_000) == "15 MB" and plotting.human_bytes(2.5e9) == "2.5 GB"
        assert ax.get_title() == "Test accuracy against bytes communicated, by learning rate"
        assert ax.get_xlabel() == "bytes communicated"
        assert ax.get_legend().get_title().get_text() == "learning rate"
    finally:
        plt.close(fig)


def test_four_or_more_groups_get_light_outlined_bands_and_their_own_dashes(tmp_path):
    for i, lr in enumerate((0.01, 0.02, 0.05, 0.1, 0.2)):
        for seed in (0, 1):
            fake_run(tmp_path, f"lr{lr}-s{seed}", scenario(lr), offset=0.01 * i + 0.005 * seed)
    df = plotting.load_runs(plotting.find_runs([tmp_path]), "algorithm.lr")
    fig = plotting.figure_runs(df, "algorithm.lr", "round", "test_accuracy")
    try:
        ax = fig.axes[0]
        bands = ax.collections
        assert len(bands) == 5 and all(b.get_alpha() <= 0.1 for b in bands)
        assert all(b.get_linewidth()[0] > 0 for b in bands)  # outlined, so overlapping bands stay apart
        assert len({line.get_linestyle() for line in ax.get_lines()[:4]}) == 4
        legend = ax.get_legend()
        assert legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1  # beside the axes, not over curves
    finally:
        plt.close(fig)
    fig = plotting.figure_runs(df[df["group"].isin(["0.01", "0.02"])], "algorithm.lr", "round", "test_accuracy")
    try:
        assert all(b.get_alpha() == 0.2 for b in fig.axes[0].collections)  # few groups: the usual band
    finally:
        plt.close(fig)


def test_a_graph_methods_run_figure_shows_its_worst_and_best_node():
    r = np.arange(4)
    df = pd.DataFrame({"round": r, "test_accuracy": 0.3 + 0.1 * r, "test_loss": 2 - 0.1 * r,
                       "min_node_accuracy": 0.2 + 0.1 * r, "max_node_accuracy": 0.45 + 0.1 * r,
                       "avg_model_accuracy": 0.35 + 0.1 * r})
    fig = plotting.figure_run(df)
    try:
        acc = fig.axes[0]
        (band,) = acc.collections
        ys = band.get_paths()[0].vertices[:, 1]
        assert ys.min() == pytest.approx(0.2) and ys.max() == pytest.approx(0.75)
        labels = [t.get_text() for t in acc.get_legend().get_texts()]
        assert labels == ["mean over nodes", "min to max node", "averaged model"]
    finally:
        plt.close(fig)
    fig = plotting.figure_run(df.drop(columns=["min_node_accuracy", "max_node_accuracy"]))
    try:
        assert not fig.axes[0].collections  # a server method: no node band
    finally:
        plt.close(fig)


def test_plot_by_topology_groups_server_runs_as_server(tmp_path, capsys):
    fake_run(tmp_path, "fedavg", scenario())
    fake_run(tmp_path, "ring", scenario(topology="ring"))
    df = plotting.load_runs(plotting.find_runs([tmp_path]), "topology.name")
    assert sorted(df["group"].unique()) == ["ring", "server"]
    out = tmp_path / "by-topology.png"
    assert main(["plot", str(tmp_path), "--by", "topology.name", "-o", str(out)]) == 0
    assert out.stat().st_size > 0 and capsys.readouterr().out.strip() == str(out)
    assert main(["plot", str(tmp_path), "--by", "topolgy.name", "-o", str(out)]) == 2  # a typo is still an error
    assert "key 'topolgy.name' is in none of the runs' scenarios" in capsys.readouterr().err


def test_plots_raise_no_numpy_or_matplotlib_warnings(tmp_path, monkeypatch):
    """NaN train loss at round 0, runs of different lengths, a one-evaluation run, many groups."""
    fake_run(tmp_path, "a", scenario(0.1), rows=6)
    fake_run(tmp_path, "b", scenario(0.1), rows=3, offset=0.02)
    fake_run(tmp_path, "c", scenario(0.2), rows=1)
    fake_run(tmp_path, "d", scenario(0.3), rows=4, extra={"failures": [np.nan, 0, 1, 1]})
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for metric in ("train_loss", "test_accuracy", "failures"):
            for x in ("round", "sim_time", "bytes_sent"):
                assert main(["plot", str(tmp_path), "--by", "algorithm.lr", "--x", x, "--metric", metric,
                             "-o", str(tmp_path / f"{metric}-{x}.png")]) == 0
        plotting.plot_run(pd.read_csv(tmp_path / "c" / "metrics.csv"), tmp_path / "one.png", "c")
        # a run name in a script the font lacks (fuzzed names found it): boxes, not a warning per glyph
        plotting.plot_run(pd.read_csv(tmp_path / "c" / "metrics.csv"), tmp_path / "glyphs.png", "c-\U00042e57\x9f")


def test_plot_says_where_the_default_output_went(tmp_path, monkeypatch, capsys):
    fake_run(tmp_path / "runs", "a", scenario())
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "runs"]) == 0
    assert capsys.readouterr().out.strip() == "convergence.png (the default; choose the file with -o)"
    assert (tmp_path / "convergence.png").is_file()


def test_group_curves_mean_and_band_over_the_runs_that_have_a_value():
    df = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 2, "round": [0, 1, 2, 0, 1],
                       "m": [np.nan, 1.0, 3.0, np.nan, 2.0]})
    grid, mean, low, high, n = plotting.group_curves(df, "round", "m")
    assert n == 2 and grid.tolist() == [0, 1, 2]
    assert np.isnan(mean[0]) and mean[1:].tolist() == [1.5, 3.0]
    assert low[1:].tolist() == [1.0, 3.0] and high[1:].tolist() == [2.0, 3.0]


def test_list_algorithms_shows_summaries_and_keys(capsys):
    assert main(["list", "algorithms"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    fedavg = next(i for i, line in enumerate(lines) if line.split()[:1] == ["fedavg"])
    assert "FedAvg (McMahan et al., AISTATS 2017)" in lines[fedavg]
    assert "no graph (no [topology] table); keys: clients_per_round, deadline, sampler" in " ".join(lines[fedavg:fedavg + 3])
    dpsgd = next(i for i, line in enumerate(lines) if line.split()[:1] == ["dpsgd"])
    assert "graph ([topology] needed); keys: gossip_steps, init, eval_nodes" in " ".join(lines[dpsgd:dpsgd + 3])
    assert main(["list", "algorithms", "fedcompass"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fedcompass: FedCompass (Li, Chaturvedi, Ryu, Huerta, Mao; ICLR 2024)")
    rows = {line.split(" = ")[0].strip(): " ".join(line.split()) for line in out.splitlines() if " = " in line}
    assert rows["q_max"] == "q_max = 100 integer >= 1"
    assert rows["staleness"] == 'staleness = "polynomial" one of "polynomial", "hinge", "constant"'
    assert rows["speed_momentum"] == "speed_momentum = 0.9 number > 0, <= 1"
    assert rows["lr"] == "lr = 0.05 number > 0"
    assert main(["list", "algorithms", "fedcompas"]) == 2
    assert "did you mean 'fedcompass'" in capsys.readouterr().err
    assert main(["list", "topologies", "random_regular"]) == 0
    assert "degree = " in capsys.readouterr().out


def test_version(capsys):
    from fedsim import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedsim {__version__}"


class Terminal(io.StringIO):
    """A stream that says it is a terminal; its width is set by the test."""

    def isatty(self) -> bool:
        return True


def test_the_bar_falls_back_to_one_line_per_evaluation_without_a_width(monkeypatch):
    stream = Terminal()
    monkeypatch.setattr(progress, "terminal_width", lambda s: 0)
    with progress.Progress("small", 4, enabled=True, position=(3, 12), stream=stream) as bar:
        assert bar.mode == "lines"
        for r in (1, 2):
            bar.evaluated({"round": r, "test_accuracy": 0.25 * r, "sim_time": 1.5 * r})
            bar.advance()
    assert stream.getvalue().splitlines() == [
        "run 3/12 small: round 1/4, accuracy 0.250, simulated 1.5 s",
        "run 3/12 small: round 2/4, accuracy 0.500, simulated 3.0 s",
    ]


def test_the_bar_names_the_sweep_position(monkeypatch):
    stream = Terminal()
    monkeypatch.setattr(progress, "terminal_width", lambda s: 120)
    with progress.Progress("small", 4, enabled=True, position=(3, 12), stream=stream) as bar:
        assert bar.mode == "bar"
        bar.advance()
    assert "run 3/12 small" in stream.getvalue()
    quiet = progress.Progress("small", 4, enabled=True, stream=io.StringIO())  # not a terminal
    assert quiet.mode == "off"
    assert progress.Progress("x", 4, enabled=False, stream=Terminal()).mode == "off"
    assert progress.Progress("x", 4, enabled=True, position=(1, 1), stream=io.StringIO()).label == "x"


def test_a_sweep_passes_each_run_its_position(tmp_path, monkeypatch):
    labels = []
    real = progress.Progress

    class Recording(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            labels.append(self.label)

    monkeypatch.setattr("fedsim.coordinator.Progress", Recording)
    specs = loads(SMALL.replace("rounds = 4", "rounds = 1") + '\n[sweep]\nseed = [1, 2, 3]\n')
    run_all(specs, tmp_path, RunOptions(progress=False))
    assert labels == ["run 1/3 small-seed=1", "run 2/3 small-seed=2", "run 3/3 small-seed=3"]
