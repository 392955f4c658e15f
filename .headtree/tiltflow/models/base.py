"""The backbone protocol shared by every world, and classifier-free guidance as a helper."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Backbone(Protocol):
    """Anything that predicts the velocity v = eps - x0 at noise level sigma (B,) for condition cond."""

    def velocity(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor: ...


def cfg_conditions(backbone: Any, cond: Any, uncond: Any) -> Any:
    """The conditioning of CFG as one pass at batch 2B ([cond; uncond]), or None for two passes.

    A backbone opts in with a method `cfg_conditions(cond, uncond)`; a role backbone (tiltflow.models.lora)
    through the adapter it runs (`backbone.adapter`). Anything else (the gmm world's backbones) gets None.
    """
    join = getattr(cfg_owner(backbone), "cfg_conditions", None)
    return join(cond, uncond) if callable(join) else None


def cfg_owner(backbone: Any) -> Any:
    """What decides how `backbone` runs CFG (cfg_conditions, and the batched_cfg switch of the adapters):
    the backbone itself, or the adapter a role backbone runs through; None when neither."""
    if hasattr(backbone, "cfg_conditions"):
        return backbone
    return getattr(backbone, "adapter", None)


def guided_velocity(backbone: Backbone, x: Tensor, sigma: Tensor, cond: Any, uncond: Any, scale: float) -> Tensor:
    """Standard CFG: v_u + scale * (v_c - v_u). scale = 1 is the conditional model (one pass).

    Where the backbone offers it (cfg_conditions), v_c and v_u come from one pass at batch 2B, rows
    [cond; uncond], split in halves; otherwise from two passes at batch B.

    This is the standard parameterisation (DMD2's code uses guidance = scale - 1 on the difference
    added to v_c; scale here equals that guidance + 1).
    """
    if scale == 1.0:
        return backbone.velocity(x, sigma, cond)
    joined = cfg_conditions(backbone, cond, uncond)
    if joined is not None:
        both = sigma if torch.as_tensor(sigma).ndim == 0 else torch.cat([sigma, sigma])  # per row, or one level
        v_c, v_u = backbone.velocity(torch.cat([x, x]), both, joined).chunk(2)
    else:
        v_c = backbone.velocity(x, sigma, cond)
        v_u = backbone.velocity(x, sigma, uncond)
    return v_u + scale * (v_c - v_u)
