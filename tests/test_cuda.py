"""Vectorised training on a CUDA GPU: the same numbers as on the CPU (to 1e-5 per client, 1e-4 on
curves: the GPU's kernels round differently), and nothing left on the GPU after a run. These run
only where torch sees a GPU; elsewhere they are skipped with that reason."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim import vectorized
from fedsim.cli import main
from fedsim.data import build_federated_data
from fedsim.models import build_model
from fedsim.stacked_linear import LinearStack
from fedsim.training import SGDTrainer, TrainJob, get_params
from tests.conftest import SMALL

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

DATA = SimpleNamespace(dataset="synthetic", num_clients=6, partition="quantity", quantity_sigma=1.0, min_examples=5,
                       samples_per_client=40, synthetic_alpha=0.5, synthetic_beta=0.5, test_size=50)


@pytest.mark.parametrize("engine", ["stacked", "vmap"])
@pytest.mark.parametrize("options", [{}, {"momentum": 0.9, "weight_decay": 1e-3}, {"sam_rho": 0.05}])
def test_a_chunk_on_the_gpu_matches_the_cpu(engine, options):
    data = build_federated_data(DATA, seed=0)
    model = build_model("mlp", {"hidden": [16]}, data.feature_shape, 10, 0)
    trainer = SGDTrainer(lr=0.1, batch_size=8, local_epochs=2, **options)
    params = [get_params(model)] * 6
    chunk = [data.client(c) for c in range(6)]
    jobs = [TrainJob(c, 1) for c in range(6)]
    rngs = lambda: [np.random.default_rng(c) for c in range(6)]  # noqa: E731
    stack = (lambda: LinearStack.of(model, data.feature_shape)) if engine == "stacked" else (lambda: None)
    cpu = vectorized.train_chunk(model, trainer, params, chunk, jobs, rngs(), "cpu", stack())
    gpu = vectorized.train_chunk(model.to("cuda"), trainer, params, chunk, jobs, rngs(), torch.device("cuda"), stack())
    model.to("cpu")
    for a, b in zip(cpu, gpu):
        assert abs(a.train_loss - b.train_loss) <= 1e-5 * abs(a.train_loss)
        for k in a.params:
            assert b.params[k].device.type == "cpu"
            assert (a.params[k] - b.params[k]).norm() <= 1e-5 * a.params[k].norm(), k


def test_curves_on_the_gpu_agree_with_the_cpu_and_leave_no_memory(write_scenario, tmp_path):
    gc.collect()
    before = torch.cuda.memory_allocated()
    frames = []
    for device in ("cpu", "cuda"):
        path = write_scenario(SMALL.replace("[system]", f'[system]\ndevice = "{device}"\nvectorize = true'),
                              name=f"{device}.toml")
        assert main(["run", str(path), "--out", str(tmp_path / device), "--no-progress"]) == 0
        frames.append(pd.read_csv(tmp_path / device / "small" / "metrics.csv"))
    pd.testing.assert_series_equal(frames[0]["test_loss"], frames[1]["test_loss"], rtol=1e-4)
    gc.collect()
    assert torch.cuda.memory_allocated() == before
