"""The `fedsim` command line: run, validate, list, plot.

User mistakes (FedsimError) end as one line on stderr with exit code 2 and no traceback; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__, registry
from .errors import FedsimError

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
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
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

    lst = sub.add_parser("list", help="list the registered names of one kind (or all)")
    lst.add_argument("kind", nargs="?", choices=sorted(KINDS), help="which kind (default: all)")
    lst.add_argument("name", nargs="?", help="one of them: its keys with defaults and allowed values")

    plot = sub.add_parser("plot", help="plot runs side by side, grouped by a scenario key")
    plot.add_argument("runs", nargs="*", help="run folders, folders of runs, or runs.csv files")
    plot.add_argument("--partition", metavar="SCENARIO",
                      help="instead: draw each client's label distribution in SCENARIO's federation")
    plot.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="with --partition: override a scenario key")
    plot.add_argument("--by", default="algorithm.name", help="dotted scenario key to group by (default: algorithm.name)")
    plot.add_argument("--x", default="round", choices=["round", "sim_time", "bytes_sent", "wall_time"])
    plot.add_argument("--metric", default="test_accuracy", help="metrics.csv column (default: test_accuracy)")
    plot.add_argument("-o", "--output", help="image file to write (default: convergence.png)")
    plot.add_argument("--title", help="figure title (default: METRIC by KEY)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FedsimError as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedsim: interrupted; the rows written so far are kept", file=sys.stderr)
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from .api import load_specs
    from .coordinator import RunOptions, resume, run_all
    from .executor_choice import check_options
    from .resources import check
    from .tracking import check_available

    if args.workers is not None and args.workers < 1:
        raise FedsimError("--workers: expected an integer >= 1")
    track = [b.strip() for item in args.track for b in item.split(",") if b.strip()]
    for backend in track:
        if backend not in ("tensorboard", "mlflow", "wandb"):
            raise FedsimError(f"--track: expected tensorboard, mlflow or wandb, got {backend!r}")
    options = RunOptions(executor=args.executor, workers=args.workers, address=args.address,
                         progress=not args.no_progress)
    if args.resume:
        if args.scenario or args.overrides or track or args.plugins:
            raise FedsimError("--resume takes the run folder alone (its scenario.toml is the scenario)")
        print(f"{resume(args.resume, options)}: metrics.csv, summary.json, convergence.png")
        return 0
    if not args.scenario:
        raise FedsimError("run: give a SCENARIO file, or --resume RUN_DIR")
    specs = load_specs(Path(args.scenario), overrides=args.overrides, plugins=args.plugins, track=track)
    from .preflight import preflight

    for spec in specs:
        try:
            check_options(spec.scenario.system, args.executor, args.workers, args.address)
        except FedsimError as exc:
            raise exc.located(file=spec.source) from None
        if spec.scenario.tracking is not None:
            check_available(spec.scenario.tracking.backends)
        preflight(spec, force=args.force, executor=args.executor, workers=args.workers)
    dirs = run_all(specs, args.out, options)
    for d in dirs:
        print(f"{d}: metrics.csv, summary.json, convergence.png")
    if len(dirs) > 1:
        print(f"index of runs: {Path(args.out) / 'runs.csv'}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .preflight import preflight
    from .scenario import load

    specs = load(args.scenario, args.overrides, plugins=args.plugins)
    from .preflight import preflight

    for spec in specs:
        preflight(spec, load_undescribed=True)
    print(f"{args.scenario}: ok ({len(specs)} run{'s' if len(specs) != 1 else ''})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .listing import describe, summaries

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


def cmd_plot(args: argparse.Namespace) -> int:
    if args.partition:
        return _plot_partition(args)
    if not args.runs:
        raise FedsimError("plot: give run folders, or --partition SCENARIO")
    from .plotting import plot_runs

    out = plot_runs(args.runs, by=args.by, out=args.output or "convergence.png", x=args.x, metric=args.metric,
                    title=args.title)
    print(out if args.output else f"{out} (the default; choose the file with -o)")
    return 0


def _plot_partition(args: argparse.Namespace) -> int:
    from .partition_plot import plot_partition
    from .scenario import load

    if args.runs:
        raise FedsimError("plot --partition takes a scenario file alone, not run folders")
    specs = load(args.partition, args.overrides)
    out, stats = plot_partition(specs[0], args.output)
    note = f" (the first of {len(specs)} sweep points)" if len(specs) > 1 else ""
    print(f"{out}{note}: mean label entropy {stats['label_entropy_mean']:.3f} bits, "
          f"mean EMD {stats['label_emd_mean']:.3f}")
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "list": cmd_list, "plot": cmd_plot}


if __name__ == "__main__":
    sys.exit(main())
