"""GAS's AlexNet-style split: a light two-conv client, three convs and three fc on the server.

GAS keeps label-wise Gaussian statistics of the 64×8×8 cut activations (on 32×32 inputs), so the
cut is kept small; the auxiliary head (for aux-based algorithms on this model) is linear on z.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from fslsage.data.base import DatasetInfo
from fslsage.models.base import MODELS, SplitModel
from fslsage.models.common import flatten_linear, probe_shape, require_images


def _conv(in_channels: int, out_channels: int) -> tuple[nn.Conv2d, nn.ReLU]:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU()


@MODELS.register("alexnet_gas")
def alexnet_gas(info: DatasetInfo) -> SplitModel:
    """Client: conv3×3 32 + ReLU + maxpool2, conv3×3 64 + ReLU + maxpool2 (64×8×8 on 32×32).
    Server: conv3×3 128, 256, 256 (ReLU) + maxpool2, then fc → 512 → 128 → classes.
    Aux: linear on the flattened z."""
    in_channels = require_images("alexnet_gas", info)
    client = nn.Sequential(
        *_conv(in_channels, 32), nn.MaxPool2d(2), *_conv(32, 64), nn.MaxPool2d(2)
    )
    cut = probe_shape("alexnet_gas", info, client)
    features = nn.Sequential(
        *_conv(cut[0], 128), *_conv(128, 256), *_conv(256, 256), nn.MaxPool2d(2), nn.Flatten(1)
    )
    n_features = math.prod(probe_shape("alexnet_gas", info, features, cut))
    classifier = nn.Sequential(
        nn.Linear(n_features, 512),
        nn.ReLU(),
        nn.Linear(512, 128),
        nn.ReLU(),
        nn.Linear(128, info.num_classes),
    )
    server = nn.Sequential(OrderedDict(features=features, classifier=classifier))
    return SplitModel(client, server, flatten_linear(cut, info.num_classes))
