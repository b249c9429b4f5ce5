"""Helpers shared by the model builders and by the runtimes that move model state around.

Shapes are found by running the module on the ``meta`` device (no memory, no compute), so they
work for any input size and in ``--dry-run`` where nothing is allocated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from fslsage.data.base import CLASSIFICATION, LANGUAGE_MODELING, DatasetInfo
from fslsage.models.base import SplitModel


def incompatible(model: str, info: DatasetInfo, reason: str) -> ValueError:
    """The one error every builder raises for a dataset it cannot handle."""
    return ValueError(
        f"model {model!r} cannot be used with dataset {info.name!r} "
        f"(task {info.task!r}, input shape {tuple(info.input_shape)}, "
        f"{info.num_classes} classes): {reason}"
    )


def require_images(model: str, info: DatasetInfo) -> int:
    """Checks for image classification data (C, H, W) and returns the channel count."""
    if info.task != CLASSIFICATION:
        raise incompatible(model, info, f"needs a {CLASSIFICATION!r} dataset")
    if len(info.input_shape) != 3:
        raise incompatible(model, info, "needs images of shape (C, H, W)")
    if info.num_classes < 2:
        raise incompatible(model, info, "needs at least 2 classes")
    return int(info.input_shape[0])


def dummy_input(info: DatasetInfo, batch: int = 1, device: torch.device | str = "meta") -> Tensor:
    """A zero batch shaped like the dataset's samples: token ids (long) or float images."""
    dtype = torch.long if info.task == LANGUAGE_MODELING else torch.float32
    return torch.zeros((batch, *info.input_shape), dtype=dtype, device=device)


def output_shape(module: nn.Module, x: Tensor) -> tuple[int, ...]:
    """Per-sample output shape of ``module(x)``, computed on ``meta`` whatever device the module
    lives on: its parameters and buffers are swapped for meta stand-ins, so nothing is allocated
    and no state (e.g. BN running statistics) is touched."""
    with torch.no_grad():
        out = functional_call(module, _meta_state(module), (x.to("meta"),), tie_weights=False)
    return tuple(out.shape[1:])


def _meta_state(module: nn.Module) -> dict[str, Tensor]:
    """Meta stand-ins for every parameter and buffer of ``module`` (trainable ones stay so)."""
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    return {
        name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
        for name, t in named
    }


def probe_shape(
    model: str, info: DatasetInfo, module: nn.Module, in_shape: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """`output_shape` of a builder's part for one dataset sample (or a float input of per-sample
    shape ``in_shape``); an input its layers cannot take (too small for a kernel, wrong channel
    count) becomes the builder's ValueError naming the model and the dataset."""
    # batch 2: BatchNorm in training mode refuses a single value per channel
    if in_shape is None:
        x = dummy_input(info, batch=2)
    else:
        x = torch.zeros((2, *in_shape), device="meta")
    try:
        return output_shape(module, x)
    except RuntimeError as err:
        raise incompatible(model, info, f"its layers cannot take this input ({err})") from None


def flatten_linear(in_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """The smallest auxiliary head: flatten z and map it linearly to the logits."""
    return nn.Sequential(nn.Flatten(1), nn.Linear(math.prod(in_shape), num_classes))


def cut_shape(split: SplitModel, info: DatasetInfo) -> tuple[int, ...]:
    """Per-sample shape of the smashed data z = client(x) for this dataset (runs on meta)."""
    return probe_shape("split model", info, split.client)


def training_flops(module: nn.Module, x: Tensor) -> int:
    """FLOPs of one forward and backward pass of ``module`` on the batch ``x`` (matrix products
    and convolutions, as PyTorch's flop counter counts them). Runs on meta like `output_shape`,
    in eval mode so a batch of one passes BatchNorm; a float input gets a gradient too, as the
    cut-layer activations do on the S-Server and in an auxiliary model."""
    meta_state = _meta_state(module)
    x = x.to("meta")
    if x.is_floating_point():
        x = x.detach().requires_grad_(True)
    was_training = module.training
    module.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            out = functional_call(module, meta_state, (x,), tie_weights=False)
            if out.requires_grad:
                out.float().sum().backward()
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())


def _communicated_vars(module: nn.Module) -> dict[str, Tensor]:
    return {
        name: t
        for name, t in module.state_dict(keep_vars=True).items()
        if not isinstance(t, nn.Parameter) or t.requires_grad
    }


def communicated_state(module: nn.Module) -> dict[str, Tensor]:
    """What crosses the network when ``module`` is sent: trainable parameters and persistent
    buffers (BatchNorm statistics and ``num_batches_tracked`` included), under their
    ``state_dict`` names so the receiver can ``load_state_dict(..., strict=False)``. Frozen
    weights (everything but LoRA in the GPT-2 client and server) never change and stay home.
    The tensors are detached views of the module's own: clone before changing them."""
    return {name: t.detach() for name, t in _communicated_vars(module).items()}


def state_bytes(module: nn.Module) -> int:
    """Bytes of `communicated_state` (numel × element size); a tensor shared under two names is
    sent once. Works on meta modules, so the ledger can be built without allocating."""
    unique = {id(t): t for t in _communicated_vars(module).values()}
    return sum(t.numel() * t.element_size() for t in unique.values())
