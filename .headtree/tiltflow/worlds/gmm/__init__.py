"""The analytic `gmm` world (WORLDS.md section 1): Gaussian-mixture teachers with exact velocities, rewards
with exact tilted targets (METHOD.md 3), a SIR reference sampler, metrics and plots."""

from tiltflow.worlds.gmm.metrics import energy_distance, kl_estimate, knn_entropy, mode_tv, sliced_wasserstein2
from tiltflow.worlds.gmm.mixture import ConditionalGMM, GaussianMixture
from tiltflow.worlds.gmm.plots import metric_curves, scatter_over_density
from tiltflow.worlds.gmm.reference import effective_sample_size, sir_mode_weights, sir_resample
from tiltflow.worlds.gmm.rewards import HalfspaceReward, LinearReward, QuadraticReward
from tiltflow.worlds.gmm.targets import (
    HalfspaceTiltedTarget,
    Target,
    expected_reward,
    monte_carlo_reward,
    tilt_linear,
    tilt_quadratic,
)

__all__ = ["ConditionalGMM", "GaussianMixture", "HalfspaceReward", "HalfspaceTiltedTarget", "LinearReward",
           "QuadraticReward", "Target", "effective_sample_size", "energy_distance", "expected_reward", "kl_estimate",
           "knn_entropy", "metric_curves", "mode_tv", "monte_carlo_reward", "scatter_over_density", "sir_mode_weights",
           "sir_resample", "sliced_wasserstein2", "tilt_linear", "tilt_quadratic"]
