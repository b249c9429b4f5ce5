"""Session fixtures shared by the test modules."""

from __future__ import annotations

import pytest

# Imported before any test captures output: Ray's log handlers keep the stream they find at
# import, and a test's captured stream is closed once that test ends.
import ray


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting one costs seconds), on
    loopback only, as the project starts one."""
    from actors.common import start_local_ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
