"""CSE-FSL's CIFAR network: two conv + pool + LRN blocks on the client, an MLP on the server.

The auxiliary model is a single linear layer on the 2304 smashed features, as in CSE-FSL.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from fslsage.data.base import DatasetInfo
from fslsage.models.base import MODELS, SplitModel
from fslsage.models.common import flatten_linear, probe_shape, require_images


def _lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75)


@MODELS.register("simple_conv")
def simple_conv(info: DatasetInfo) -> SplitModel:
    """Client: conv5×5 64 (no padding) + ReLU + maxpool(3, 2) + LRN, conv5×5 64 (padding 2) +
    ReLU + LRN + maxpool(3, 2), flattened (2304 = 64·6·6 features on 32×32). Server: MLP
    features → 384 → 192 → classes. Aux: one linear layer features → classes."""
    in_channels = require_images("simple_conv", info)
    client = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 64, kernel_size=5),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(kernel_size=3, stride=2),
            norm1=_lrn(),
            conv2=nn.Conv2d(64, 64, kernel_size=5, padding=2),
            relu2=nn.ReLU(),
            norm2=_lrn(),
            pool2=nn.MaxPool2d(kernel_size=3, stride=2),
            flatten=nn.Flatten(1),
        )
    )
    (features,) = probe_shape("simple_conv", info, client)
    server = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(features, 384),
            relu1=nn.ReLU(),
            fc2=nn.Linear(384, 192),
            relu2=nn.ReLU(),
            fc3=nn.Linear(192, info.num_classes),
        )
    )
    return SplitModel(client, server, flatten_linear((features,), info.num_classes))
