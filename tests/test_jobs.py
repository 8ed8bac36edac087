"""JobPool: lazily batched jobs for event-driven methods."""

from __future__ import annotations

import dataclasses

import torch

from fedsim.jobs import JobPool
from fedsim.training import ClientResult, TrainJob


class Recorder:
    """An executor that records what it was asked to train and returns the inputs' rows."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict, list[TrainJob]]] = []

    def train(self, tensors, jobs):
        self.calls.append((tensors, jobs))
        return [ClientResult(j.client_id, {n: t[j.row] for n, t in tensors.items()}, 1, {}) for j in jobs]


def test_jobs_from_one_model_share_a_row_and_keep_every_other_field():
    a = {"w": torch.zeros(2)}
    b = {"w": torch.ones(2)}
    pool = JobPool(Recorder())  # type: ignore[arg-type]
    jobs = {
        "x": TrainJob(0, 3, steps=5, inputs={"c": torch.tensor(1.0)}, state={"s": torch.tensor(2.0)}),
        "y": TrainJob(1, 3, steps=7),
        "z": TrainJob(2, 4),
    }
    pool.start("x", jobs["x"], dict(a))
    pool.start("y", jobs["y"], dict(b))
    pool.start("z", jobs["z"], dict(a))  # another dict, the same tensors as x's: one row
    assert torch.equal(pool.result("z").params["w"], a["w"])
    tensors, sent = pool.executor.calls[0]
    assert tensors["w"].shape == (2, 2) and [j.row for j in sent] == [0, 1, 0]
    for job, original in zip(sent, jobs.values()):
        for f in dataclasses.fields(TrainJob):
            if f.name != "row":
                assert getattr(job, f.name) is getattr(original, f.name), f.name
    assert torch.equal(pool.result("y").params["w"], b["w"]) and len(pool.executor.calls) == 1
