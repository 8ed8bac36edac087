"""Experiment tracking: every evaluation row, the resolved scenario and the run's plots, sent to
TensorBoard, MLflow or Weights & Biases as well as to the run folder.

Trackers watch the run's `History` (they are its row observers) rather than being called by the
algorithms, so every method is tracked the same way and none of them knows about tracking. Each
backend is an optional extra and is imported only when a scenario asks for it; a missing one is a
one-line error naming the extra. None of them needs the network by default: TensorBoard writes
event files into the run folder, MLflow a file store in OUT/mlruns, W&B an offline run in the run
folder (`wandb sync` uploads it later).

A resumed run starts its tracker records afresh and sends the rows restored from the checkpoint
first (TensorBoard purges the earlier session's events, MLflow deletes the earlier run, W&B starts
a new offline run), so the records always equal metrics.csv, row for row.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Protocol

from . import __version__
from .errors import FedsimError

EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
PLOTS = ("convergence.png",)
STATE_FILE = "tracking.json"  # ids of the tracker runs of this run folder, for --resume


class Tracker(Protocol):
    """A History observer that also hears when the run starts and ends."""

    def start(self, rows: list[dict[str, Any]]) -> None: ...

    def row(self, row: dict[str, Any]) -> None: ...

    def finish(self, run_dir: Path, failed: bool) -> None: ...


class TrackingUnavailable(FedsimError):
    """A [tracking] backend whose extra is not installed."""


def check_available(backends: list[str] | tuple[str, ...]) -> None:
    """Raise one line naming the extra to install for the first backend that is missing."""
    import importlib

    for backend in backends:
        try:
            importlib.import_module(_MODULES[backend])
        except ImportError:
            raise TrackingUnavailable(
                f"tracking with {backend} needs its extra: pip install 'fedsim[{EXTRAS[backend]}]' with the pip "
                "of fedsim's own environment (e.g. .venv/bin/pip)",
                key="tracking.backends",
            ) from None


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved scenario as `dotted.key = value` parameters, lists and tables as text."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, sort_keys=True)
    return out


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric columns; `round` is the step, not a metric."""
    return {k: float(v) for k, v in row.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def open_trackers(spec: Any, run_dir: Path, rows: list[dict[str, Any]]) -> list[Tracker]:
    """Start the trackers a scenario's [tracking] table asks for (none without one)."""
    cfg = spec.scenario.tracking
    if cfg is None or not cfg.backends:
        return []
    check_available(cfg.backends)
    state_path = run_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    trackers: list[Tracker] = []
    for backend in dict.fromkeys(cfg.backends):
        cls = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}[backend]
        trackers.append(cls(spec, run_dir, state))
    for tracker in trackers:
        tracker.start(rows)
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    return trackers


def finish_trackers(trackers: list[Tracker], run_dir: Path, failed: bool = False) -> None:
    for tracker in trackers:
        tracker.finish(run_dir, failed)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The libraries' own deprecation chatter is theirs, not the user's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class TensorBoardTracker:
    """Event files in RUN/tensorboard: scalars per round, the scenario as text and hyperparameters,
    the plots as images. `tensorboard --logdir OUT` shows every run of a sweep side by side."""

    def __init__(self, spec: Any, run_dir: Path, state: dict[str, Any]):
        with _quiet():
            from torch.utils.tensorboard import SummaryWriter
        self.spec = spec
        self.log_dir = run_dir / "tensorboard"
        resumed = self.log_dir.is_dir() and any(self.log_dir.iterdir())
        # purge_step=0 tells readers to drop what an earlier, killed session wrote.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=0 if resumed else None)
        state["tensorboard"] = {"log_dir": str(self.log_dir)}

    def start(self, rows: list[dict[str, Any]]) -> None:
        import tomli_w
        from torch.utils.tensorboard.summary import hparams

        resolved = self.spec.as_dict()
        self.writer.add_text("scenario", "```toml\n" + tomli_w.dumps(resolved) + "```", 0)
        params = flat_params(resolved)
        for summary in hparams(params, {"hparams/final_accuracy": 0.0}):
            self.writer.file_writer.add_summary(summary)
        for row in rows:
            self.row(row)

    def row(self, row: dict[str, Any]) -> None:
        for name, value in metrics_of(row).items():
            self.writer.add_scalar(name, value, int(row["round"]))
        self.writer.flush()

    def finish(self, run_dir: Path, failed: bool) -> None:
        import matplotlib.image

        for name in PLOTS:
            path = run_dir / name
            if path.is_file():
                image = matplotlib.image.imread(str(path))
                self.writer.add_image(Path(name).stem, image[..., :3], 0, dataformats="HWC")
        self.writer.close()


class MLflowTracker:
    """One MLflow run per fedsim run, in an experiment named after the scenario: metrics with the
    round as step, the resolved scenario as parameters (dotted keys), the plots as artifacts."""

    def __init__(self, spec: Any, run_dir: Path, state: dict[str, Any]):
        cfg = spec.scenario.tracking
        self.spec = spec
        self.uri = cfg.mlflow_uri or (run_dir.parent.resolve() / "mlruns").as_uri()
        if self.uri.startswith("file:"):
            # MLflow 3 keeps its file store behind this switch; the file store is what works
            # offline with nothing to install or start. Set for this process, so that an
            # MlflowClient opened in the same notebook reads the store too.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        with _quiet():
            from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=self.uri)
        name = cfg.experiment or spec.scenario.name
        with _quiet():
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            old = state.get("mlflow", {}).get("run_id")
            if old:  # a resumed run: its earlier records are replaced by a complete new run
                with contextlib.suppress(Exception):
                    self.client.delete_run(old)
            run = self.client.create_run(experiment_id, run_name=spec.run_name,
                                         tags={"fedsim.version": __version__, "fedsim.source": spec.source})
        self.run_id = run.info.run_id
        state["mlflow"] = {"tracking_uri": self.uri, "experiment_id": experiment_id, "run_id": self.run_id}

    def start(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flat_params(self.spec.as_dict()).items()]
        with _quiet():
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        for row in rows:
            self.row(row)

    def row(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(row["round"])
        stamp = int(1000 * float(row.get("wall_time", 0.0)))  # never the wall clock: rows are reproducible
        metrics = [Metric(k, v, stamp, step) for k, v in metrics_of(row).items()]
        with _quiet():
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, run_dir: Path, failed: bool) -> None:
        with _quiet():
            for name in PLOTS:
                if (run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir / name))
            for name in ("summary.json", "scenario.toml"):
                if (run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir / name))
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbTracker:
    """A W&B run per fedsim run, offline by default (files in RUN/wandb, uploaded later with
    `wandb sync`): the rows as history with the round as step, the resolved scenario as config,
    the plots as an artifact."""

    def __init__(self, spec: Any, run_dir: Path, state: dict[str, Any]):
        cfg = spec.scenario.tracking
        self.spec = spec
        with _quiet():
            import wandb
        self.wandb = wandb
        settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False,
                                  x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True)
        with _quiet():
            self.run = wandb.init(
                project=cfg.experiment or spec.scenario.name, name=spec.run_name, group=spec.scenario.name,
                dir=str(run_dir.resolve()), mode=cfg.wandb_mode, config=spec.as_dict(), settings=settings,
                reinit="create_new",
            )
        state["wandb"] = {"run_id": self.run.id, "mode": cfg.wandb_mode}

    def start(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.row(row)

    def row(self, row: dict[str, Any]) -> None:
        values = {k: (v if math.isfinite(v) else float("nan")) for k, v in metrics_of(row).items()}
        self.run.log(values, step=int(row["round"]))

    def finish(self, run_dir: Path, failed: bool) -> None:
        wandb = self.wandb
        with _quiet():
            artifact = wandb.Artifact(f"plots-{self.run.id}", type="plots")
            found = False
            for name in PLOTS:
                if (run_dir / name).is_file():
                    artifact.add_file(str(run_dir / name))
                    found = True
            if found:
                self.run.log_artifact(artifact)
            self.run.finish(exit_code=1 if failed else 0)
