"""The `fedsim` command line: run, validate, list, plot.

User mistakes (FedsimError) end as one line on stderr with exit code 2 and no traceback; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from . import __version__, registry
from .errors import FedsimError
from .limits import MAX_RUNS

KINDS = {
    "algorithms": registry.algorithms,
    "aggregators": registry.aggregators,
    "topologies": registry.topologies,
    "datasets": registry.datasets,
    "models": registry.models,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description="Simulate federated and decentralized learning.")
    parser.add_argument("--version", action="version", version=f"fedsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="simulate the runs a scenario file describes")
    run.add_argument("scenario", nargs="?", help="scenario TOML file (not with --resume)")
    run.add_argument("--resume", metavar="DIR",
                     help="continue a killed run (OUT/RUN_NAME) from its last checkpoint, or a whole sweep (OUT)")
    run.add_argument("--rerun", action="store_true",
                     help="run again into folders that hold a finished or unfinished run (default: skip finished runs)")
    run.add_argument("--max-runs", type=int, default=MAX_RUNS, metavar="N",
                     help=f"refuse sweeps of more than N runs (default: {MAX_RUNS:,})")
    run.add_argument("--out", default="runs", help="folder for run folders (default: runs)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario key by its dotted path, e.g. --set algorithm.lr=0.1")
    run.add_argument("--workers", type=int, help="Ray actors (default: one per CPU)")
    run.add_argument("--address", help="join an existing Ray cluster at this address")
    run.add_argument("--executor", choices=["auto", "inline", "ray"],
                     help="where clients train (default: the scenario's system.executor, auto)")
    run.add_argument("--track", action="append", default=[], metavar="BACKEND",
                     help="also send rows, scenario and plots to tensorboard, mlflow or wandb (repeatable, or comma-separated)")
    run.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                     help="import this module first, so that the names it registers work (repeatable)")
    run.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    run.add_argument("--force", action="store_true", help="run even if the memory estimate exceeds what is available")

    validate = sub.add_parser("validate", help="check a scenario file without running it")
    validate.add_argument("scenario")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                          help="import this module first, so that the names it registers work (repeatable)")
    validate.add_argument("--max-runs", type=int, default=MAX_RUNS, metavar="N",
                          help=f"refuse sweeps of more than N runs (default: {MAX_RUNS:,})")
    validate.add_argument("--no-plugins", action="store_true",
                          help="import no plug-in code (module:Name, [plugins] modules, --plugin); what needs it goes unchecked")

    lst = sub.add_parser("list", help="list the registered names of one kind (or all)")
    lst.add_argument("kind", nargs="?", choices=sorted(KINDS), help="which kind (default: all)")
    lst.add_argument("name", nargs="?", help="one of them: its keys with defaults and allowed values")
    lst.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                     help="import this module first, so that the names it registers are listed (repeatable)")

    plot = sub.add_parser("plot", help="plot runs side by side, grouped by a scenario key")
    plot.add_argument("runs", nargs="*", help="run folders, folders of runs, or runs.csv files")
    plot.add_argument("--partition", metavar="SCENARIO",
                      help="instead: draw each client's label distribution in SCENARIO's federation")
    plot.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="with --partition: override a scenario key")
    plot.add_argument("--by", default="algorithm.name", help="dotted scenario key to group by (default: algorithm.name)")
    plot.add_argument("--x", default="round", choices=["round", "sim_time", "bytes_sent", "wall_time"])
    plot.add_argument("--metric", default="test_accuracy", help="metrics.csv column (default: test_accuracy)")
    plot.add_argument("-o", "--output",
                      help="image file to write (default: convergence.png, with --partition partition.png)")
    plot.add_argument("--title", help="figure title (default: METRIC by KEY)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    made = _output_folder_to_make(args)
    try:
        return COMMANDS[args.command](args)
    except FedsimError as exc:
        if made is not None:  # refused before anything was written (no cluster there, ...): leave no trace
            with contextlib.suppress(OSError):
                made.rmdir()  # only if still empty
        print(f"fedsim: error: {exc}", file=sys.stderr)
        if getattr(exc, "hard_exit", False):  # Ray is stuck connecting in a thread: do not wait for it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        again = ""
        if args.command == "run":  # a single run's folder or a sweep's: --resume takes either
            again = f"; continue with `fedsim run --resume {getattr(args, 'resume', None) or args.out}`"
        print(f"fedsim: interrupted; the rows written so far are kept{again}", file=sys.stderr)
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from .coordinator import RunOptions, SweepError, resume, resume_sweep, run_all
    from .executor_choice import check_options
    from .scenario import expand, prepare_raw, read_toml

    if args.workers is not None and args.workers < 1:
        raise FedsimError("--workers: expected an integer >= 1")
    if args.max_runs < 1:
        raise FedsimError("--max-runs: expected an integer >= 1")
    track = [b.strip() for item in args.track for b in item.split(",") if b.strip()]
    for backend in track:
        if backend not in ("tensorboard", "mlflow", "wandb"):
            raise FedsimError(f"--track: expected tensorboard, mlflow or wandb, got {backend!r}")
    options = RunOptions(executor=args.executor, workers=args.workers, address=args.address,
                         progress=not args.no_progress)
    if args.resume:
        if args.scenario or args.overrides or track or args.plugins:
            raise FedsimError("--resume takes the run folder alone (its scenario.toml is the scenario)")
        target = Path(args.resume)
        if not (target / "scenario.toml").exists() and (target / "runs.csv").is_file():
            dirs = resume_sweep(target, options)
        else:
            dirs = [resume(target, options)]
        _print_dirs(dirs)
        return 0
    if not args.scenario:
        raise FedsimError("run: give a SCENARIO file, or --resume RUN_DIR")
    # the scenario as run: the file with --set, --plugin and --track applied (a sweep keeps it, so
    # that `--resume OUT` can finish the sweep), then expanded into its points
    raw = read_toml(args.scenario)
    raw = prepare_raw(raw, args.scenario, list(args.overrides) + _track_items(raw, track), plugins=args.plugins,
                      copy_raw=False)
    specs = expand(raw, args.scenario, max_runs=args.max_runs)
    from .preflight import preflight

    for spec in specs:
        try:
            check_options(spec.scenario.system, args.executor, args.workers, args.address)
        except FedsimError as exc:
            raise exc.located(file=spec.source) from None
        # the command line's --executor and --workers count in the memory estimate as the scenario's would
        preflight(spec, force=args.force, executor=args.executor, workers=args.workers)
    try:
        dirs = run_all(specs, args.out, options, rerun=args.rerun, sweep=raw if "sweep" in raw else None)
    except SweepError as exc:
        _print_dirs(exc.dirs)
        raise
    _print_dirs(dirs)
    if len(specs) > 1 or any(spec.swept for spec in specs):
        print(f"index of runs: {Path(args.out) / 'runs.csv'}")
    return 0


def _track_items(raw: dict, track: list[str]) -> list[tuple[str, object]]:
    """--track adds backends to the scenario's own [tracking] list (as fedsim.api does), so that the
    resolved scenario records them and --resume tracks the same way."""
    if not track:
        return []
    table = raw.get("tracking") if isinstance(raw.get("tracking"), dict) else {}
    listed = list(table.get("backends", [])) if isinstance(table.get("backends", []), list) else []
    return [("tracking.backends", listed + [b for b in track if b not in listed])]


def _print_dirs(dirs: list[Path]) -> None:
    for d in dirs:
        print(f"{d}: metrics.csv, summary.json, convergence.png")


def cmd_validate(args: argparse.Namespace) -> int:
    from .preflight import preflight
    from .scenario import load, unchecked_plugins

    if args.max_runs < 1:
        raise FedsimError("--max-runs: expected an integer >= 1")
    skipped: list[str] = []
    if args.no_plugins:
        specs, skipped = unchecked_plugins(args.scenario, args.overrides, plugins=args.plugins,
                                           max_runs=args.max_runs)
    else:
        specs = load(args.scenario, args.overrides, plugins=args.plugins, max_runs=args.max_runs)
    if not skipped:  # the run-time checks (data, partition, graph, memory) need the plug-ins' code
        for spec in specs:
            preflight(spec, load_undescribed=True)
    note = (f"; not imported (--no-plugins), so unchecked with their keys and the data, graph and memory "
            f"checks: {', '.join(skipped)}" if skipped else "")
    print(f"{args.scenario}: ok ({len(specs)} run{'s' if len(specs) != 1 else ''}{note})")
    return 0


def _output_folder_to_make(args: argparse.Namespace) -> Path | None:
    """The `--out` folder `run` will create, or None when it exists already (or is not asked)."""
    if args.command != "run" or getattr(args, "resume", None):
        return None
    out = Path(args.out)
    try:
        return None if out.exists() else out
    except OSError:  # a name the file system refuses (too long, ...): `run` says so in one line
        return None


def cmd_list(args: argparse.Namespace) -> int:
    from .listing import describe, summaries

    if args.plugins:
        from .plugins import import_modules

        try:
            import_modules(args.plugins)
        except FedsimError as exc:
            raise exc.located(key="--plugin") from None
    if args.name:
        if not args.kind:
            raise FedsimError("list: give the kind before the name, e.g. fedsim list algorithms fedcompass")
        print(describe(args.kind, KINDS[args.kind], args.name))
    elif args.kind:
        print(summaries(args.kind, KINDS[args.kind]))
    else:
        for kind in sorted(KINDS):
            print(f"{kind}: {', '.join(KINDS[kind].names())}")
    return 0


# `plot` without -o writes into the working directory and says so, as `run` says where its folders are
DEFAULT_PLOT = "convergence.png"
DEFAULT_PARTITION_PLOT = "partition.png"
DEFAULT_NOTE = " (the default; choose the file with -o)"


def cmd_plot(args: argparse.Namespace) -> int:
    if args.partition:
        return _plot_partition(args)
    if not args.runs:
        raise FedsimError("plot: give run folders, or --partition SCENARIO")
    from .plotting import plot_runs

    out = plot_runs(args.runs, by=args.by, out=args.output or DEFAULT_PLOT, x=args.x, metric=args.metric,
                    title=args.title)
    print(out if args.output else f"{out}{DEFAULT_NOTE}")
    return 0


def _plot_partition(args: argparse.Namespace) -> int:
    from .partition_plot import plot_partition
    from .scenario import load

    if args.runs:
        raise FedsimError("plot --partition takes a scenario file alone, not run folders")
    specs = load(args.partition, args.overrides)
    out, stats = plot_partition(specs[0], args.output or DEFAULT_PARTITION_PLOT)
    note = "" if args.output else DEFAULT_NOTE
    note += f" (the first of {len(specs)} sweep points)" if len(specs) > 1 else ""
    print(f"{out}{note}: mean label entropy {stats['label_entropy_mean']:.3f} bits, "
          f"mean EMD {stats['label_emd_mean']:.3f}")
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "list": cmd_list, "plot": cmd_plot}


if __name__ == "__main__":
    sys.exit(main())
