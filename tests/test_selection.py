from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fairprune.pruning.selection import find_classifier, select_parameters


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.LayerNorm(8))
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.features(x)))


def test_default_selection_conv_linear_weights_without_classifier():
    net = Net()
    params = select_parameters(net)
    assert list(params) == ["features.0.weight", "features.3.weight", "head.1.weight"]
    assert params["features.0.weight"] is net.features[0].weight
    assert find_classifier(net) == "classifier"


def test_options_add_classifier_bias_norm():
    net = Net()
    params = select_parameters(net, prune_classifier=True, prune_bias=True, prune_norm=True)
    expected = [n for n, _ in net.named_parameters()]  # everything
    assert list(params) == expected
    params = select_parameters(net, prune_norm=True)
    assert list(params) == [
        "features.0.weight",
        "features.1.weight",
        "features.3.weight",
        "head.1.weight",
        "head.2.weight",
    ]


def test_types_by_class_and_name_glob():
    net = Net()
    assert list(select_parameters(net, include_types="Conv2d")) == [
        "features.0.weight",
        "features.3.weight",
    ]
    assert list(select_parameters(net, include_types=[nn.Linear], prune_classifier=True)) == [
        "head.1.weight",
        "classifier.weight",
    ]
    assert list(select_parameters(net, exclude_types=["Conv*"])) == ["head.1.weight"]


def test_name_patterns():
    net = Net()
    assert list(select_parameters(net, include_names=["features.*"])) == [
        "features.0.weight",
        "features.3.weight",
    ]
    assert list(select_parameters(net, exclude_names="features.0.*")) == [
        "features.3.weight",
        "head.1.weight",
    ]


def test_shared_parameter_listed_once():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(4, 2))
    assert list(select_parameters(net)) == ["0.weight"]


def test_errors():
    net = Net()
    with pytest.raises(ValueError, match="at least one parameter"):
        select_parameters(net, include_names=["nothing.*"])
    with pytest.raises(TypeError, match="include_types"):
        select_parameters(net, include_types=[3])
    with pytest.raises(TypeError, match="exclude_names"):
        select_parameters(net, exclude_names=[nn.Linear])
    with pytest.raises(TypeError, match="model"):
        select_parameters({"w": torch.zeros(1)})
    with pytest.warns(UserWarning, match="Conv3d"), pytest.raises(ValueError, match="none matched"):
        select_parameters(net, include_types="Conv3d")
