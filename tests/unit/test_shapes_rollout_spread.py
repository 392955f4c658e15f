"""benchmarks/shapes_rollout_spread.py: rollout-mode groups share their initial noise (with a deterministic
sampler a group's samples are then identical), independent ones do not; the per-group statistics."""

import numpy as np
from bench_scripts import load_benchmark

from tiltflow.flow.conventions import few_step_sigmas


def test_rollout_groups_share_their_initial_noise():
    spread = load_benchmark("shapes_rollout_spread")
    sigmas = few_step_sigmas(4)

    def velocity(chunk):
        return lambda x, sig: -x  # any fixed velocity: the samples then differ only by their noise

    def draw(mode):
        images = spread.draw_groups(velocity, sigmas, (3, 4, 4), ["a", "b", "c"], 4, mode, 3, 0.0, 0,
                                    lambda x: (x + 1) / 2)
        return images.reshape(3, 4, -1).astype(np.int64)

    rollout, independent = draw("rollout"), draw("independent")
    assert (rollout == rollout[:, :1]).all()  # eta 0: only the shared initial noise matters
    assert not (rollout[0] == rollout[1]).all()  # groups differ from each other
    assert all(not (independent[k] == independent[k, :1]).all() for k in range(3))


def test_group_stats():
    spread = load_benchmark("shapes_rollout_spread")
    verdicts = np.array([[0, 0], [1, 0], [1, 1]], dtype=float)
    graded = np.array([[0.5, 0.5], [1.0, 0.5], [1.0, 1.0]])
    s = spread.group_stats(verdicts, graded)
    assert (s["groups"], s["all_fail"], s["pass_fail_spread"], s["graded_spread"]) == (3, 1, 1, 1)
    assert np.isclose(s["graded_within_group_std"], 0.25 / 3)  # only the middle group spreads: std 0.25
    assert np.isclose(s["graded_across_group_std"], np.std([0.5, 0.75, 1.0]))
    assert np.isclose(s["pass_rate"], 0.5) and np.isclose(s["graded_mean"], 0.75)
