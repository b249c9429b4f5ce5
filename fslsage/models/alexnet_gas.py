"""GAS's AlexNet split, layer for layer as the authors' code builds it (github eejiarong/GAS,
utils/network.py: AlexNetDownCifar / AlexNetUpCifar): a light two-conv client, three convs and
three fully connected layers on the server.

As there, each pooling comes before its ReLU, the server's first two convs and its three fc
layers have no ReLU, and the server pools 3×3 with stride 2 (8×8 → 3×3 on 32×32 inputs).
GAS keeps label-wise Gaussian statistics of the 64×8×8 cut activations, so the cut is small;
the auxiliary head (for aux-based algorithms on this model) is linear on z.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from fslsage.data.base import DatasetInfo
from fslsage.models.base import MODELS, SplitModel
from fslsage.models.common import flatten_linear, probe_shape, require_images


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


@MODELS.register("alexnet_gas")
def alexnet_gas(info: DatasetInfo) -> SplitModel:
    """Client: conv3×3 32, maxpool2, ReLU, conv3×3 64, maxpool2, ReLU (64×8×8 on 32×32).
    Server: conv3×3 128, conv3×3 256, conv3×3 256, maxpool3 stride 2, ReLU (256×3×3), then
    fc → 1024 → 512 → classes with no activation between them.
    Aux: linear on the flattened z."""
    in_channels = require_images("alexnet_gas", info)
    client = nn.Sequential(
        _conv(in_channels, 32), nn.MaxPool2d(2), nn.ReLU(),
        _conv(32, 64), nn.MaxPool2d(2), nn.ReLU(),
    )  # fmt: skip
    cut = probe_shape("alexnet_gas", info, client)
    features = nn.Sequential(
        _conv(cut[0], 128), _conv(128, 256), _conv(256, 256),
        nn.MaxPool2d(kernel_size=3, stride=2), nn.ReLU(), nn.Flatten(1),
    )  # fmt: skip
    n_features = math.prod(probe_shape("alexnet_gas", info, features, cut))
    classifier = nn.Sequential(
        nn.Linear(n_features, 1024), nn.Linear(1024, 512), nn.Linear(512, info.num_classes)
    )
    server = nn.Sequential(OrderedDict(features=features, classifier=classifier))
    return SplitModel(client, server, flatten_linear(cut, info.num_classes))
