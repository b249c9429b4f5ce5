"""Split models: a registry of builders ``builder(info, **model_args) -> SplitModel``.

Also what the runtimes need to know about a model without training it: the shape of the smashed
data (`cut_shape`) and what crosses the network when a part is sent (`communicated_state`,
`state_bytes`). All of it works on ``torch.device("meta")`` models for dry runs.
"""

from __future__ import annotations

import difflib
import inspect

from fslsage.data.base import DatasetInfo
from fslsage.models import alexnet_gas, digits_cnn, gpt2, resnet, simple_conv  # noqa: F401
from fslsage.models.base import MODELS, ModelBuilder, SplitModel
from fslsage.models.common import (
    communicated_state,
    cut_shape,
    dummy_input,
    state_bytes,
    training_flops,
)


class ModelArgError(TypeError, ValueError):
    """A model_arg the builder does not take. A TypeError like any unexpected keyword, and a
    ValueError like every other configuration mistake, so either ``except`` catches it."""


def model_arg_names(name: str) -> list[str]:
    """The model_args the builder ``name`` accepts (its keyword parameters after ``info``)."""
    params = list(inspect.signature(MODELS.get(name)).parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_model(name: str, info: DatasetInfo, **model_args) -> SplitModel:
    """Builds model ``name`` for the dataset. Raises UnknownNameError for an unknown model,
    ModelArgError for a model_arg the builder does not take, ValueError for a dataset it
    cannot handle."""
    builder = MODELS.get(name)
    allowed = model_arg_names(name)
    for arg in model_args:
        if arg not in allowed:
            close = difflib.get_close_matches(arg, allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModelArgError(
                f"model {name!r} got unknown model_arg {arg!r}{hint}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            )
    return builder(info, **model_args)


__all__ = [
    "MODELS",
    "ModelArgError",
    "ModelBuilder",
    "SplitModel",
    "build_model",
    "communicated_state",
    "cut_shape",
    "dummy_input",
    "model_arg_names",
    "state_bytes",
    "training_flops",
]
