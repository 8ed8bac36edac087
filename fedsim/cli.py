"""The `fedsim` command line: run, validate, list, plot.

User mistakes (FedsimError) end as one line on stderr with exit code 2 and no traceback; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import registry
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
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="simulate the runs a scenario file describes")
    run.add_argument("scenario", nargs="?", help="scenario TOML file (not with --resume)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    run.add_argument("--out", default="runs", help="folder for run folders (default: runs)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario key by its dotted path, e.g. --set algorithm.lr=0.1")
    run.add_argument("--workers", type=int, help="Ray actors (default: one per CPU)")
    run.add_argument("--address", help="join an existing Ray cluster at this address")
    run.add_argument("--executor", choices=["inline", "ray"], help="where clients train (default: ray)")
    run.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    run.add_argument("--force", action="store_true", help="run even if the memory estimate exceeds what is available")

    validate = sub.add_parser("validate", help="check a scenario file without running it")
    validate.add_argument("scenario")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    lst = sub.add_parser("list", help="list the registered names of one kind (or all)")
    lst.add_argument("kind", nargs="?", choices=sorted(KINDS), help="which kind (default: all)")

    plot = sub.add_parser("plot", help="plot runs side by side, grouped by a scenario key")
    plot.add_argument("runs", nargs="*", help="run folders, folders of runs, or runs.csv files")
    plot.add_argument("--partition", metavar="SCENARIO",
                      help="instead: draw each client's label distribution in SCENARIO's federation")
    plot.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="with --partition: override a scenario key")
    plot.add_argument("--by", default="algorithm.name", help="dotted scenario key to group by (default: algorithm.name)")
    plot.add_argument("--x", default="round", choices=["round", "sim_time", "bytes_sent", "wall_time"])
    plot.add_argument("--metric", default="test_accuracy", help="metrics.csv column (default: test_accuracy)")
    plot.add_argument("-o", "--output", default="convergence.png", help="image file to write")
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
    from .coordinator import RunOptions, resume, run_all
    from .scenario import load

    if args.workers is not None and args.workers < 1:
        raise FedsimError("--workers: expected an integer >= 1")
    options = RunOptions(executor=args.executor, workers=args.workers, address=args.address,
                         progress=not args.no_progress)
    if args.resume:
        if args.scenario or args.overrides:
            raise FedsimError("--resume takes the run folder alone (its scenario.toml is the scenario)")
        print(f"{resume(args.resume, options)}: metrics.csv, summary.json, convergence.png")
        return 0
    if not args.scenario:
        raise FedsimError("run: give a SCENARIO file, or --resume RUN_DIR")
    specs = load(args.scenario, args.overrides)
    from .preflight import preflight

    for spec in specs:
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

    specs = load(args.scenario, args.overrides)
    for spec in specs:
        preflight(spec, load_undescribed=True)
    print(f"{args.scenario}: ok ({len(specs)} run{'s' if len(specs) != 1 else ''})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for kind in [args.kind] if args.kind else sorted(KINDS):
        print(f"{kind}: {', '.join(KINDS[kind].names())}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    if args.partition:
        return _plot_partition(args)
    if not args.runs:
        raise FedsimError("plot: give run folders, or --partition SCENARIO")
    from .plotting import plot_runs

    out = plot_runs(args.runs, by=args.by, out=args.output, x=args.x, metric=args.metric, title=args.title)
    print(out)
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
