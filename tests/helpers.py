"""Shared test helpers: the demo config with overrides, a local runtime over it."""

from __future__ import annotations

from pathlib import Path

import yaml

from fslsage.config import Config, validate

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
PAPER = ROOT / "configs" / "paper" / "cifar10_resnet18.yaml"


def demo_config(**overrides) -> Config:
    raw = yaml.safe_load(DEMO.read_text())
    raw.update(overrides)
    return validate(raw)


def paper_config(**overrides) -> Config:
    raw = yaml.safe_load(PAPER.read_text())
    raw.pop("search", None)
    raw.update(overrides)
    return validate(raw)


def synchronous_algorithms() -> list[str]:
    """Every registered algorithm that runs rounds of `train_round` (gas runs an event loop)."""
    from fslsage.algorithms import ALGORITHMS

    return [name for name in ALGORITHMS.names() if not ALGORITHMS.get(name).asynchronous]
