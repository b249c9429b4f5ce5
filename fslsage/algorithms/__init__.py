"""Registered federated split learning algorithms, one file each."""

from fslsage.registry import Registry

ALGORITHMS: Registry = Registry("algorithm")

# Importing registers them.
from fslsage.algorithms import (  # noqa: E402, F401
    cse_fsl,
    fedavg,
    fsl_sage,
    sl,
    splitfed_v1,
    splitfed_v2,
)
