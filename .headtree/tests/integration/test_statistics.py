"""Statistics (issue A): on a small problem, RTDMD (exact mode) gets much closer to the reward-tilted target
than the stage-1 student it starts from, which matches the untilted teacher.

Margins, fixed before running: stage 2 must cut the mode-mass TV to p_tilde by at least 0.1 (absolute) and
halve the energy distance to p_tilde, and must move the mean reward at least half-way from the stage-1
student's towards E_p_tilde[r].
"""

import pytest

from tiltflow.training.spine import train
from tiltflow.worlds.gmm.evaluate import build_reference
from tiltflow.worlds.gmm.runs import GMMWorld
from tiltflow.worlds.gmm.world import build_gmm
from tiltflow.worlds.registry import load_run_config

_COV = [[0.09, 0.0], [0.0, 0.09]]
PROBLEM = {
    "dim": 2,
    "prompts": [
        {"weights": [0.25] * 4, "means": [[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]], "covs": [_COV] * 4},
        {"weights": [0.5, 0.5], "means": [[0.0, 2.0], [0.0, -2.0]], "covs": [_COV] * 2},
    ],
    "rewards": [{"type": "linear", "a": [1.0, 0.5]}],
}


@pytest.mark.slow
def test_rtdmd_moves_the_student_to_the_tilted_target(tmp_path):
    import yaml

    tree = {"problem": PROBLEM, "model": {"hidden": 96, "depth": 3, "embed": 16},
            "teacher": {"kind": "analytic", "train_steps": 1500, "batch_size": 512},
            "stage1": {"num_iters": 400, "batch_size": 256, "lr": 1e-3, "n_fake": 4, "fake": {"lr": 3e-3}},
            "stage2": {"beta": 0.5, "num_iters": 250, "num_prompts": 16, "group_size": 16, "lr": 3e-4},
            "eval": {"num_samples": 1500, "every": 0, "reference_pool": 20000}, "log_every": 50,
            "checkpoint_every": 1000}
    path = tmp_path / "problem.yaml"
    path.write_text(yaml.safe_dump(tree))

    def cfg(stage, name, *extra):
        return load_run_config(path, [f"stage={stage}", f"run_dir={tmp_path / name}",
                                      f"teacher_run={tmp_path / 'teacher'}", *extra])

    s1_cfg = cfg("ac_dmd", "s1")
    ref = build_reference(s1_cfg, build_gmm(s1_cfg.problem), None)
    s1 = train(s1_cfg, world=GMMWorld(reference=ref), progress=False)
    s2 = train(cfg("rtdmd_fullchain", "s2", f"init_from={tmp_path / 's1'}"), world=GMMWorld(reference=ref),
               progress=False)
    assert (tmp_path / "s2" / "samples.png").is_file() and (tmp_path / "s2" / "curves.png").is_file()
    assert s2["mode_tv"] <= s1["mode_tv"] - 0.1, (s1, s2)
    assert s2["energy_distance"] <= 0.5 * s1["energy_distance"], (s1, s2)
    gap = s2["reward_target"] - s1["reward_mean"]
    assert s2["reward_mean"] - s1["reward_mean"] >= 0.5 * gap, (s1, s2)
