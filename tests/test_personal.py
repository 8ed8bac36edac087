"""Personalised FL pieces: FedRep/FedPer's head and body by name, FedBN's local batch-norm tensors,
and the per-client accuracy summary (mean, 10th percentile, worst)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsim import split_by_prefix, summarize_client_accuracy
from fedsim.algorithms.fedbn import batchnorm_names
from fedsim.algorithms.fedrep import fedrep_trainable, head_and_body, last_linear
from fedsim.models import mlp


def test_prefixes_match_whole_module_names():
    names = ["fc.weight", "fc.bias", "fc2.weight", "3.bias", "30.bias", "enc.fc.weight"]
    assert split_by_prefix(names, ["fc"]) == (["fc.weight", "fc.bias"], ["fc2.weight", "3.bias", "30.bias", "enc.fc.weight"])
    assert split_by_prefix(names, ["3", "enc"]) == (["3.bias", "enc.fc.weight"], ["fc.weight", "fc.bias", "fc2.weight", "30.bias"])
    assert split_by_prefix(names, ["fc2.weight"])[0] == ["fc2.weight"]
    with pytest.raises(ValueError, match="prefix 'fc3' matches no parameter"):
        split_by_prefix(names, ["fc", "fc3"])


def test_fedrep_head_is_the_last_linear_layer_by_default():
    model = mlp((60,), 10, hidden=[32, 16])  # Flatten, Linear, ReLU, Linear, ReLU, Linear
    assert last_linear(model) == "5"
    head, body = head_and_body(model)
    assert head == ["5.weight", "5.bias"]
    assert body == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert head_and_body(model, ["3", "5"]) == (["3.weight", "3.bias", "5.weight", "5.bias"], ["1.weight", "1.bias"])
    with pytest.raises(ValueError, match="covers every parameter"):
        head_and_body(model, ["1", "3", "5"])
    with pytest.raises(ValueError, match="no linear layer"):
        last_linear(nn.Sequential(nn.Conv1d(1, 1, 3)))


def test_fedrep_trains_the_head_then_the_body():
    head, body = ["5.weight", "5.bias"], ["1.weight", "1.bias"]
    schedule = [fedrep_trainable(s, 3, head, body) for s in range(5)]
    assert schedule == [head, head, head, body, body]


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.block = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4, affine=False))
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 2)
        self.head = nn.Linear(4, 3)


def test_fedbn_keeps_exactly_the_batchnorm_tensors_local():
    model = BNNet()
    names = batchnorm_names(model)
    assert names == [
        "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
        "block.2.running_mean", "block.2.running_var", "block.2.num_batches_tracked",
    ]
    assert set(names) <= set(model.state_dict())
    assert batchnorm_names(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))) == []
    assert batchnorm_names(nn.BatchNorm1d(3)) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def test_client_accuracy_summary_by_hand():
    acc = [0.5, 0.9, 0.7, 0.1, 1.0, 0.3, 0.6, 0.8, 0.4, 0.2]
    # sorted: 0.1, 0.2, ...; the 10th percentile sits at rank 0.1 * 9 = 0.9: 0.1 + 0.9 * 0.1 = 0.19
    summary = summarize_client_accuracy(acc)
    assert summary == pytest.approx({"client_accuracy_mean": 0.55, "client_accuracy_p10": 0.19, "client_accuracy_worst": 0.1}, abs=1e-12)
    assert summarize_client_accuracy(torch.tensor(acc)) == pytest.approx(summary, abs=1e-7)
    assert summarize_client_accuracy(np.array([0.75])) == {"client_accuracy_mean": 0.75, "client_accuracy_p10": 0.75, "client_accuracy_worst": 0.75}
    with pytest.raises(ValueError, match="no clients"):
        summarize_client_accuracy([])
    with pytest.raises(ValueError, match="non-finite"):
        summarize_client_accuracy([0.5, float("nan")])
