"""Few-step samplers (METHOD.md section 2): the CPS step, a stateless sampler, noise plans."""

from tiltflow.sampling.cps import StepOutput, cps_step, gaussian_log_prob
from tiltflow.sampling.noise import NoisePlan, group_noise
from tiltflow.sampling.sampler import Trajectory, sample

__all__ = ["NoisePlan", "StepOutput", "Trajectory", "cps_step", "gaussian_log_prob", "group_noise", "sample"]
