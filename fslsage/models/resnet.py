"""ResNet-18 split as in the FSL-SAGE paper: the client keeps the stem and the first two stages.

The network is torchvision's own ResNet-18 (7×7 stride-2 stem + max-pool, ImageNet layout, as
the paper's reference code uses on 32×32 CIFAR), so the parameter and buffer counts, and hence
the communication ledger, match the paper's. The auxiliary heads are built from torchvision's
BasicBlock with the same initialisation, in the variants of the paper's ablation.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from fslsage.data.base import DatasetInfo
from fslsage.models.base import MODELS, SplitModel
from fslsage.models.common import flatten_linear, probe_shape, require_images

# variant -> stages (planes, blocks) after the cut, each with stride 2, then avgpool + fc.
_AUX_STAGES: dict[str, tuple[tuple[int, int], ...]] = {
    "layer": ((256, 2),),  # one ResNet stage like layer3 (the paper's default)
    "half": ((256, 1),),  # one BasicBlock of layer3
    "full": ((256, 2), (512, 2)),  # layer3 + layer4: the server's architecture
    "pooled_linear": (),  # global average pool + linear (the reference code's "linear")
}
AUX_VARIANTS = ("layer", "linear", "half", "full", "pooled_linear")


def _init_like_torchvision(module: nn.Module) -> nn.Module:
    """torchvision's ResNet initialisation, so fresh heads start like the server's layers."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A ResNet stage of BasicBlocks, as torchvision's ``ResNet._make_layer`` builds it."""
    from torchvision.models import resnet as tv_resnet  # here: its import costs every process 2 s

    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = nn.Sequential(
            tv_resnet.conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes)
        )
    first = tv_resnet.BasicBlock(in_planes, planes, stride, downsample)
    return nn.Sequential(first, *(tv_resnet.BasicBlock(planes, planes) for _ in range(blocks - 1)))


def resnet_head(
    in_planes: int, stages: tuple[tuple[int, int], ...], num_classes: int
) -> nn.Sequential:
    """Stride-2 stages (named layer3, layer4, ... as in ResNet) + global pool + linear."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (planes, blocks) in enumerate(stages):
        layers[f"layer{3 + i}"] = _stage(in_planes, planes, blocks, stride=2)
        in_planes = planes
    layers["avgpool"] = nn.AdaptiveAvgPool2d((1, 1))
    layers["flatten"] = nn.Flatten(1)
    layers["fc"] = nn.Linear(in_planes, num_classes)
    return _init_like_torchvision(nn.Sequential(layers))


def _check_variant(variant: str) -> None:
    if variant not in AUX_VARIANTS:
        raise ValueError(
            f"model 'resnet18': unknown aux_variant {variant!r}; allowed: {', '.join(AUX_VARIANTS)}"
        )


def resnet18_aux(variant: str, cut: tuple[int, ...], num_classes: int) -> nn.Module:
    """The auxiliary head on z of shape ``cut`` = (C, H, W)."""
    _check_variant(variant)
    if variant == "linear":
        return flatten_linear(cut, num_classes)
    return resnet_head(cut[0], _AUX_STAGES[variant], num_classes)


@MODELS.register("resnet18")
def resnet18(info: DatasetInfo, aux_variant: str = "layer") -> SplitModel:
    """Client = conv1, bn1, relu, maxpool, layer1, layer2 (cut 128×H/8×W/8, 128×4×4 on 32×32);
    server = layer3, layer4, avgpool, fc. ``aux_variant``: "layer" (default; one stage like
    layer3), "half" (one block), "full" (layer3 + layer4), "linear" (flatten + linear) or
    "pooled_linear" (global pool + linear, the reference code's linear aux)."""
    in_channels = require_images("resnet18", info)
    _check_variant(aux_variant)  # before the comparatively slow construction
    from torchvision.models import resnet as tv_resnet  # here: its import costs every process 2 s

    net = tv_resnet.resnet18(num_classes=info.num_classes)
    if in_channels != 3:
        net.conv1 = _init_like_torchvision(
            nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        )
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2")
    client = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
    server = nn.Sequential(
        OrderedDict(
            layer3=net.layer3,
            layer4=net.layer4,
            avgpool=net.avgpool,
            flatten=nn.Flatten(1),
            fc=net.fc,
        )
    )
    cut = probe_shape("resnet18", info, client)
    return SplitModel(client, server, resnet18_aux(aux_variant, cut, info.num_classes))
