"""Flow-matching conventions (METHOD.md section 1): pure math, no nn.Module."""

from tiltflow.flow.conventions import (
    eps_from_v,
    few_step_sigmas,
    forward_kernel,
    interpolate,
    time_shift,
    v_from_x0,
    x0_from_v,
)

__all__ = ["eps_from_v", "few_step_sigmas", "forward_kernel", "interpolate", "time_shift", "v_from_x0", "x0_from_v"]
