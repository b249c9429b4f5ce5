"""A small CNN for the embedded 1×8×8 ``digits`` dataset: fast on a laptop CPU, >95% accurate."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from fslsage.data.base import DatasetInfo
from fslsage.models.base import MODELS, SplitModel
from fslsage.models.common import flatten_linear, probe_shape, require_images


@MODELS.register("digits_cnn")
def digits_cnn(info: DatasetInfo) -> SplitModel:
    """Client: conv3×3 16 + ReLU, conv3×3 32 + ReLU, maxpool2 (32×4×4 on 8×8). Server: conv3×3
    32 + GroupNorm + ReLU, fc 128 + LayerNorm + ReLU, fc classes. Aux: flatten + linear."""
    in_channels = require_images("digits_cnn", info)
    client = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 16, kernel_size=3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, kernel_size=3, padding=1),
            relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
        )
    )
    cut = probe_shape("digits_cnn", info, client)
    # A norm before each server ReLU: under strongly label-skewed uploads (alpha=0.1)
    # Adam steps otherwise drive every unit of a plain conv+ReLU dead within one round, for
    # every algorithm. Per-sample and the same in train and eval mode, it keeps FSL-SAGE's
    # per-sample gradient targets independent of the batch.
    conv = nn.Sequential(
        nn.Conv2d(cut[0], 32, kernel_size=3, padding=1),
        nn.GroupNorm(4, 32),
        nn.ReLU(),
        nn.Flatten(1),
    )
    (features,) = probe_shape("digits_cnn", info, conv, cut)
    server = nn.Sequential(
        OrderedDict(
            conv=conv,
            fc1=nn.Linear(features, 128),
            norm=nn.LayerNorm(128),
            relu=nn.ReLU(),
            fc2=nn.Linear(128, info.num_classes),
        )
    )
    return SplitModel(client, server, flatten_linear(cut, info.num_classes))
