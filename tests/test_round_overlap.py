"""An evaluation that overlaps the next round's training changes nothing a run records: the same
rows (every column but wall time), the same exit code and error, the same rows kept on failure."""

from __future__ import annotations

import pandas as pd

from fedsim import (
    Aggregator, LocalSGDConfig, RunContext, ServerRounds, SGDTrainer, WeightedMean, register_aggregator,
    register_algorithm,
)
from fedsim.cli import main
from tests.conftest import SMALL


@register_aggregator("test_raises_in_round_3")
class RaisesInRound3(Aggregator):
    def __call__(self, global_params, batch, *, round):
        if round == 3:
            raise RuntimeError("boom")
        return {k: (batch.weights().to(v.dtype).reshape(-1, *[1] * (v.dim() - 1)) * v).sum(0) for k, v in batch.params.items()}


class NaNAtRound3(SGDTrainer):
    """Every client of round 3 sends a non-finite model."""

    def train(self, model, params, x, y, job, rng):
        out = super().train(model, params, x, y, job, rng)
        if job.round == 3:
            out.params = {k: v * float("nan") for k, v in out.params.items()}
        return out


class NaNConfig(LocalSGDConfig):
    clients_per_round: int = 4


@register_algorithm("test_nan_at_round_3")
def nan_at_round_3(cfg: NaNConfig, ctx: RunContext) -> ServerRounds:
    return ServerRounds(ctx, trainer=NaNAtRound3.from_config(cfg), aggregator=ctx.rule(WeightedMean()),
                        clients_per_round=cfg.clients_per_round)


def run_both(tmp_path, monkeypatch, capsys, text: str, *args: str) -> list[tuple[int, pd.DataFrame, str]]:
    """The run with overlap, then without (ServerRounds offering no snapshot)."""
    out = []
    for label in ("overlap", "in-turn"):
        path = tmp_path / f"{label}.toml"
        path.write_text(text)
        if label == "in-turn":
            monkeypatch.setattr(ServerRounds, "evaluation", lambda self: None)
        code = main(["run", str(path), "--out", str(tmp_path / label), "--no-progress", *args])
        err = capsys.readouterr().err.replace(str(path), "SCENARIO")
        frame = pd.read_csv(tmp_path / label / "small" / "metrics.csv").drop(columns="wall_time")
        out.append((code, frame, err))
    return out


def test_overlapping_evaluation_records_the_same_rows(tmp_path, monkeypatch, capsys):
    calls = []
    original = ServerRounds.evaluation

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(ServerRounds, "evaluation", counted)
    text = SMALL.replace("rounds = 4", "rounds = 9\ncheckpoint_every = 4")
    (a_code, a, _), (b_code, b, _) = run_both(tmp_path, monkeypatch, capsys, text)
    assert a_code == b_code == 0 and len(calls) == 9  # every evaluated round was offered a snapshot
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert list(a["round"]) == list(range(10))


def test_divergence_stops_at_the_same_round_with_the_same_error(tmp_path, monkeypatch, capsys):
    text = SMALL.replace("rounds = 4", "rounds = 12").replace("lr = 0.1", "lr = 500.0")
    (a_code, a, a_err), (b_code, b, b_err) = run_both(tmp_path, monkeypatch, capsys, text)
    assert a_code == b_code == 3 and a_err == b_err and "diverged" in a_err
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert len(a) < 13


def test_a_rule_raising_mid_run_keeps_the_rows_before_it(tmp_path, monkeypatch, capsys):
    text = SMALL + '\n[aggregator]\nname = "test_raises_in_round_3"\n'
    (a_code, a, a_err), (b_code, b, b_err) = run_both(tmp_path, monkeypatch, capsys, text)
    assert a_code == b_code == 1 and a_err == b_err and "round 3" in a_err
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert list(a["round"]) == [0, 1, 2]


def test_a_non_finite_update_is_reported_at_the_same_evaluation(tmp_path, monkeypatch, capsys):
    text = SMALL.replace("rounds = 4", "rounds = 8").replace('name = "fedavg"', 'name = "test_nan_at_round_3"')
    (a_code, a, a_err), (b_code, b, b_err) = run_both(tmp_path, monkeypatch, capsys, text)
    assert a_code == b_code == 3 and a_err == b_err and "non-finite update in round 3" in a_err
    assert "evaluation of round 3" in a_err
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert list(a["round"]) == [0, 1, 2, 3]
