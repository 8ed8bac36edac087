"""The Python API for notebooks and scripts: `fedsim.run(...)` and `fedsim.load_runs(...)`.

It is the command line without the shell: the same loading, checks and run folders as `fedsim run`
(a run started here can be resumed, plotted or tracked like any other), with results handed back
as pandas objects instead of paths to read. Errors are the same `FedsimError`s the command line
prints as one line.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pandas as pd

from .errors import FedsimError, ScenarioError

Scenario = str | Path | Mapping[str, Any]


@dataclass
class RunResult:
    """One finished run: its folder and what it wrote there."""

    run_dir: Path
    metrics: pd.DataFrame  # metrics.csv: one row per evaluation
    summary: dict[str, Any]  # summary.json
    scenario: dict[str, Any]  # the resolved scenario.toml, every default filled in
    swept: dict[str, Any] = field(default_factory=dict)  # this point's values of the sweep's keys

    @property
    def name(self) -> str:
        return self.run_dir.name

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunResult":
        run_dir = Path(run_dir)
        summary = _read_json(run_dir / "summary.json")
        return cls(
            run_dir=run_dir,
            metrics=pd.read_csv(run_dir / "metrics.csv"),
            summary=summary,
            scenario=tomllib.loads((run_dir / "scenario.toml").read_text()),
            swept=dict(summary.get("swept", {})),
        )

    def __repr__(self) -> str:
        acc = self.summary.get("final_accuracy")
        acc_text = f", final accuracy {acc:.4f}" if isinstance(acc, float) else ""
        return f"RunResult({str(self.run_dir)!r}, {len(self.metrics)} evaluations{acc_text})"


class SweepResult(Sequence[RunResult]):
    """The runs of a sweep, in sweep order; indexable like a list of `RunResult`."""

    def __init__(self, runs: list[RunResult]):
        self.runs = runs

    def __getitem__(self, i: Any) -> Any:
        return self.runs[i]

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[RunResult]:
        return iter(self.runs)

    @property
    def run_dirs(self) -> list[Path]:
        return [r.run_dir for r in self.runs]

    @property
    def metrics(self) -> pd.DataFrame:
        """Every run's rows in one tidy frame, a column per swept key (see `load_runs`)."""
        return load_runs(self.run_dirs)

    @property
    def summary(self) -> pd.DataFrame:
        """One row per run: its folder, its swept values and its summary.json."""
        rows = [{"run": r.name, **r.swept, **{k: v for k, v in r.summary.items() if k not in ("swept",)}}
                for r in self.runs]
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"SweepResult({len(self.runs)} runs: {', '.join(r.name for r in self.runs)})"


def run(
    scenario: Scenario,
    *,
    out: str | Path = "runs",
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    executor: str | None = None,
    workers: int | None = None,
    address: str | None = None,
    track: Iterable[str] = (),
    plugins: Iterable[str] = (),
    progress: bool = False,
    force: bool = False,
    rerun: bool = False,
) -> RunResult | SweepResult:
    """Run a scenario given as a file path, TOML text or a dict, as `fedsim run` would.

    `overrides` sets keys by dotted path (`{"algorithm.lr": 0.1}`, or `--set` strings); `track`
    adds tracking backends (`["mlflow"]`); `plugins` imports modules first (`--plugin`). Returns a
    `RunResult` for a scenario without a sweep, a `SweepResult` (one `RunResult` per point) with one.
    """
    from .coordinator import RunOptions, run_all
    from .executor_choice import check_options
    from .preflight import require_extras
    from .resources import check

    specs = load_specs(scenario, overrides=overrides, plugins=plugins, track=track)
    for spec in specs:
        check_options(spec.scenario.system, executor, workers, address)
        try:
            require_extras(spec)
            check(spec, force=force)
        except FedsimError as exc:
            raise exc.located(file=spec.source) from None
    options = RunOptions(executor=executor, workers=workers, address=address, progress=progress)
    results = [RunResult.read(d) for d in run_all(specs, out, options, rerun=rerun)]
    if len(specs) == 1 and not specs[0].swept:
        return results[0]
    return SweepResult(results)


def load_specs(scenario: Scenario, *, overrides: Mapping[str, Any] | Iterable[str] | None = None,
               plugins: Iterable[str] = (), track: Iterable[str] = ()) -> list[Any]:
    """Validated run specs from a path, TOML text or a dict (what `run` runs)."""
    from .scenario import load, load_raw, loads

    items: list[Any] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    elif overrides is not None:
        if isinstance(overrides, str):
            raise ScenarioError("overrides: expected a dict of dotted keys or a list of 'key=value' strings, "
                                "got one string")
        items = list(overrides)
    track = list(track)
    plugins = tuple(plugins)
    if isinstance(scenario, Mapping):
        raw_items = items + _track_items(scenario, track)
        return load_raw(scenario, "<scenario dict>", raw_items, plugins=plugins)
    if isinstance(scenario, str) and _looks_like_toml(scenario):
        raw = tomllib.loads(scenario) if _parses(scenario) else None
        if raw is None:
            return loads(scenario, plugins=plugins)  # reports the TOML error as one line
        return load_raw(raw, "<scenario text>", items + _track_items(raw, track), plugins=plugins)
    if not isinstance(scenario, (str, Path)):
        raise ScenarioError(f"expected a scenario file path, TOML text or a dict, got {type(scenario).__name__}")
    if not track:
        return load(scenario, items, plugins=plugins)
    from .scenario import read_toml

    raw = read_toml(scenario)
    return load_raw(raw, str(scenario), items + _track_items(raw, track), plugins=plugins)


def _track_items(raw: Mapping[str, Any], track: list[str]) -> list[tuple[str, Any]]:
    """`track` adds backends to the scenario's own [tracking] list (so the resolved scenario
    records them, and --resume tracks the same way)."""
    if not track:
        return []
    table = raw.get("tracking") if isinstance(raw.get("tracking"), Mapping) else {}
    listed = list(table.get("backends", [])) if isinstance(table.get("backends", []), list) else []
    return [("tracking.backends", listed + [b for b in track if b not in listed])]


def _looks_like_toml(text: str) -> bool:
    return "\n" in text or ("=" in text and not Path(text).exists())


def _parses(text: str) -> bool:
    try:
        tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError):
        return False
    return True


def load_runs(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Every run's metrics.csv in one tidy frame, ready for seaborn or `groupby`.

    `paths` are run folders, folders of runs or runs.csv files (as for `fedsim plot`). Columns:
    the metrics, `run` (the folder's name), `run_dir`, and one column per swept key: each sweep's
    keys, plus every scenario key whose value differs between the runs loaded (so runs of
    different scenario files compare too), typed as in the scenario.
    """
    from .plotting import find_runs
    from .tracking import flat_params

    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs = find_runs(list(paths))
    if not runs:
        raise FedsimError("no runs found in the paths given")
    metas = []
    for run_dir in runs:
        try:
            scenario = tomllib.loads((run_dir / "scenario.toml").read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise FedsimError(f"cannot read the run's scenario.toml ({exc.__class__.__name__})",
                              file=str(run_dir)) from None
        swept = _read_json(run_dir / "summary.json").get("swept", {})
        metas.append((run_dir, flat_params(scenario), swept))
    keys: list[str] = []
    for _, _, swept in metas:
        keys += [k for k in swept if k not in keys]
    all_params = sorted({k for _, params, _ in metas for k in params})
    for key in all_params:
        if key == "name" or key in keys:
            continue
        values = {json.dumps(params.get(key), sort_keys=True, default=str) for _, params, _ in metas}
        if len(values) > 1:
            keys.append(key)
    frames = []
    for run_dir, params, swept in metas:
        df = pd.read_csv(run_dir / "metrics.csv")
        df.insert(0, "run", run_dir.name)
        df.insert(1, "run_dir", str(run_dir))
        for key in keys:
            df[key] = params[key] if key in params else swept.get(key)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
