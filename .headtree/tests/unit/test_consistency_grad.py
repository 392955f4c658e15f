"""stage1.fake.consistency_grad (docs/method.md 4.3): "anchor" differentiates h0 only and runs the
transitions' pass without a graph; "both" also differentiates h(x'_1), h(x'_2)."""

import types

import pytest
import torch

from tiltflow.algorithms.dm import FakeSettings, TauRange, fake_loss
from tiltflow.config.schema import FakeConfig

pytestmark = pytest.mark.usefixtures("float64_default")


class TinyFake(torch.nn.Module):
    """v(x, tau) from a small MLP; records whether each call's output carries a graph."""

    def __init__(self, detach_second: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(4, 16, generator=g) * 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(16, 3, generator=g) * 0.5)
        self.detach_second = detach_second
        self.graphs: list[bool] = []

    def velocity(self, x, tau, cond):
        h = torch.tanh(torch.cat([x, tau[:, None]], 1) @ self.w1) @ self.w2
        if self.detach_second and len(self.graphs) == 1:
            h = h.detach()
        self.graphs.append(h.requires_grad)
        return h


def _grad(grad_mode: str, *, detach_second: bool = False, gamma: float = 10.0):
    fake = TinyFake(detach_second)
    cfg = FakeConfig(consistency_gamma=gamma, consistency_delta_max=0.2, consistency_grad=grad_mode)
    settings = FakeSettings.of(cfg, TauRange(0.01, 0.02, 0.98), eta=0.9)
    x_s = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
    out = fake_loss(types.SimpleNamespace(fake=fake), x_s, 0.0, None, settings, torch.Generator().manual_seed(2))
    out.loss.backward()
    return out.loss.detach(), torch.cat([fake.w1.grad.flatten(), fake.w2.grad.flatten()]), fake.graphs


def test_anchor_is_the_stop_gradient_of_the_transitions():
    loss_a, grad_a, graphs_a = _grad("anchor")
    loss_b, grad_b, graphs_b = _grad("both")
    loss_sg, grad_sg, _ = _grad("both", detach_second=True)  # "both" with h(x'_i) detached by hand
    assert graphs_a == [True, False] and graphs_b == [True, True]
    assert torch.equal(loss_a, loss_b) and torch.equal(loss_a, loss_sg)  # same draws, same value
    # The same float64 operations in the same order: equal up to the backward's summation order (~1e-15).
    assert torch.allclose(grad_a, grad_sg, rtol=1e-12, atol=1e-14)
    # The transitions' gradient is not negligible at gamma = 10, so a mode that ignored the option would fail.
    assert (grad_a - grad_b).norm() > 1e-3 * grad_b.norm()


def test_modes_agree_without_the_consistency_term():
    _, grad_a, graphs_a = _grad("anchor", gamma=0.0)
    _, grad_b, _ = _grad("both", gamma=0.0)
    assert graphs_a == [True] and torch.equal(grad_a, grad_b)
