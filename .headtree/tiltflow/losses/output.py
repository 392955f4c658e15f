"""The small result type every loss returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LossOutput:
    loss: Tensor
    # Detached scalars, left on the device: reading one is a host sync, so the algorithm reads them all at
    # once at the end of its step (tiltflow.algorithms.common.MeanMetrics).
    metrics: dict[str, Tensor | float] = field(default_factory=dict)
