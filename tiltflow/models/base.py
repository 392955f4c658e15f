"""The backbone protocol shared by every world, and classifier-free guidance as a helper."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Backbone(Protocol):
    """Anything that predicts the velocity v = eps - x0 at noise level sigma (B,) for condition cond."""

    def velocity(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor: ...


def guided_velocity(backbone: Backbone, x: Tensor, sigma: Tensor, cond: Any, uncond: Any, scale: float) -> Tensor:
    """Standard CFG: v_u + scale * (v_c - v_u). scale = 1 is the conditional model (one pass).

    This is the standard parameterisation (DMD2's code uses guidance = scale - 1 on the difference
    added to v_c; scale here equals that guidance + 1).
    """
    if scale == 1.0:
        return backbone.velocity(x, sigma, cond)
    v_c = backbone.velocity(x, sigma, cond)
    v_u = backbone.velocity(x, sigma, uncond)
    return v_u + scale * (v_c - v_u)
