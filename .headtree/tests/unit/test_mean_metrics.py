"""MeanMetrics keeps device scalars as they come and reads them once, in result(): adding a metric is no
host read (no aten._local_scalar_dense, which float() and .item() dispatch to), and the result equals the
per-value float() reading it replaced, bit for bit (float32 -> float64 is exact)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tiltflow.algorithms.common import MeanMetrics


class CountReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_metrics_are_read_once_and_equal_the_float_reading():
    g = torch.Generator().manual_seed(0)
    steps = [{"loss": torch.rand((), generator=g) * 3, "grad_norm": torch.rand((), generator=g, dtype=torch.float64),
              "ratio_max_dev": torch.rand((), generator=g).to(torch.bfloat16), "skipped_updates": 2.0}
             for _ in range(5)]
    metrics = MeanMetrics()
    with CountReads() as mode:
        for step in steps:
            metrics.add(step)
    assert mode.reads == 0
    got = metrics.result()

    expected = {}
    for k in steps[0]:
        values = [float(s[k]) for s in steps]
        expected[k] = max(values) if "_max_" in k else sum(values) / len(values)  # the sum in the same order
    assert got == expected
