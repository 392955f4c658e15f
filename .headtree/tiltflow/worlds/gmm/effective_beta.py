"""Where a method settles on a problem whose tilt family p_beta = p exp(beta r) / Z is known exactly: the
beta whose exact tilt is closest to the method's samples (issue 10, item 3: the reference recipe's
effective beta on the bounded problem).

Two readings, both reported:
- `beta_energy`: the grid beta minimising the energy distance (tiltflow.worlds.gmm.metrics.energy_distance,
  averaged over prompts) between the method's samples and exact samples of p_beta; the whole curve is kept.
- `beta_reward`: the beta whose exact E_p_beta[r] equals the method's mean reward (bisection on the closed
  form or quadrature), which says nothing about the shape but has no sampling noise.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from tiltflow.config.gmm import ProblemSpec
from tiltflow.flow.rng import step_generator
from tiltflow.worlds.gmm.metrics import energy_distance
from tiltflow.worlds.gmm.mixture import ConditionalGMM
from tiltflow.worlds.gmm.targets import Target
from tiltflow.worlds.gmm.world import build_rewards, exact_target

# Up to 20: exact samples of p_beta come from rejection sampling from p, whose acceptance rate Z e^{-beta}
# falls to ~2e-3 at beta = 20 on the bounded problem (5e-6 at 50).
DEFAULT_GRID = ([round(0.1 * i, 2) for i in range(0, 31)] + [3.25 + 0.25 * i for i in range(12)]
                + [7.0, 8.0, 10.0, 12.0, 15.0, 20.0])


def tilts(gmm: ConditionalGMM, problem: ProblemSpec, beta: float) -> list[Target]:
    targets = [exact_target(gmm.mixture(c), problem, beta) for c in range(gmm.num_prompts)]
    if any(t is None for t in targets):
        raise ValueError("the effective beta needs a single reward with an exact tilted target")
    return targets  # type: ignore[return-value]


def exact_reward(gmm: ConditionalGMM, problem: ProblemSpec, beta: float, num_samples: int = 400_000) -> float:
    """E_p_beta[r] averaged over prompts: the target's closed form / quadrature if it has one (tanh, half-space
    targets; Gaussian-mixture targets of linear rewards), else Monte Carlo with a fixed seed."""
    rewards = build_rewards(problem)
    out = []
    for c, t in enumerate(tilts(gmm, problem, beta)):
        closed = getattr(t, "expected_reward", None)
        if closed is not None:
            out.append(closed())
        else:
            x, _ = t.sample(num_samples, step_generator(0, c, "effective-beta-reward"))
            out.append(float(rewards(x.float(), [c] * x.shape[0]).total.double().mean()))
    return sum(out) / len(out)


def effective_beta(samples: Sequence[Tensor], gmm: ConditionalGMM, problem: ProblemSpec, reward_mean: float,
                   grid: Sequence[float] = DEFAULT_GRID, n: int | None = None, seed: int = 4242) -> dict:
    """samples: the method's (n_c, d) samples per prompt; reward_mean: their mean reward (averaged over
    prompts). Exact tilt samples use the same seed at every beta (common random numbers)."""
    curve = []
    for beta in grid:
        dists = []
        for c, t in enumerate(tilts(gmm, problem, beta)):
            m = n or samples[c].shape[0]
            x, _ = t.sample(m, step_generator(seed, c, "effective-beta"))
            dists.append(energy_distance(samples[c].double(), x))
        curve.append(sum(dists) / len(dists))
    i = min(range(len(grid)), key=curve.__getitem__)
    lo, hi = float(min(grid)), float(max(grid))
    r_lo, r_hi = exact_reward(gmm, problem, lo), exact_reward(gmm, problem, hi)
    if not r_lo <= reward_mean <= r_hi:
        beta_reward = None  # outside what the tilt family reaches on the grid's range
    else:
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if exact_reward(gmm, problem, mid) < reward_mean else (lo, mid)
        beta_reward = 0.5 * (lo + hi)
    return {"beta_energy": float(grid[i]), "energy_at_beta_energy": curve[i], "beta_reward": beta_reward,
            "grid": [float(b) for b in grid], "energy_curve": curve,
            "distance": "energy distance to exact p_beta samples, averaged over prompts"}
