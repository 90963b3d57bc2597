"""Draft-head training settings (a plain dataclass: the CLI imports it without jax)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of ``jaxinfer train-draft`` (see :mod:`jaxinfer.train.eagle_train`)."""

    steps: int = 600
    batch_size: int = 8
    max_rows: int = 256
    lr: float = 1e-3
    warmup: int = 40
    weight_decay: float = 0.01
    clip: float = 1.0
    ce_weight: float = 0.1
    unroll: int = 2
    seed: int = 0
