"""The rtdmd_exact stage (DM toward the diffused tilted target, METHOD.md 5.6) on the tiny 2-D problem:
every estimator trains the generator and the fake score and leaves the teacher alone, logs only the DM
term, and records the estimator that ran; the analytic teacher hands its exact posterior to split-SNIS."""

from __future__ import annotations

import json

import pytest
import torch

from tiltflow.algorithms.rtdmd import tilt_settings
from tiltflow.storage import load
from tiltflow.training.spine import train
from tiltflow.worlds.gmm.posterior import GMMPosterior
from tiltflow.worlds.gmm.runs import GMMWorld


@pytest.mark.parametrize(("overrides", "estimator"), [
    ([], "linear_shift"),
    (["stage2.tilt_estimator=split_snis", "stage2.tilt_posterior_steps=4"], "split_snis"),
    (["stage2.tilt_estimator=shifted_proposal", "stage2.tilt_posterior_steps=4"], "shifted_proposal"),
    (["teacher.kind=analytic", "stage2.tilt_estimator=split_snis"], "split_snis"),
])
def test_tilted_stage_trains_generator_and_fake_only(make_cfg, tmp_path, teacher_run, overrides, estimator):
    teacher_file = (teacher_run / "teacher.pt").read_bytes()
    run_dir = tmp_path / "tilted"
    cfg = make_cfg("rtdmd_exact", run_dir, *overrides)
    assert cfg.stage2.tilt_estimator == estimator
    start = {k: v.clone() for k, v in load(teacher_run / "teacher.pt")["model"].items()}  # gen and fake start here
    train(cfg, progress=False)

    assert "tilt_estimator: " + estimator in (run_dir / "config.yaml").read_text()
    final = load(run_dir / "final.pt")
    for role in ("generator_raw", "fake"):
        moved = [k for k in start if not torch.equal(start[k], final[role][k])]
        assert moved, f"{role} did not change"
    assert (teacher_run / "teacher.pt").read_bytes() == teacher_file
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*recs)
    assert "dm_loss" in keys and not keys & {"pg_loss", "bp_loss"}
    assert ("tilt_ess" in keys) == (estimator != "linear_shift")
    ess = [r["tilt_ess"] for r in recs if "tilt_ess" in r]
    assert all(1.0 <= e <= 2 * cfg.stage2.tilt_num_pairs + 1e-4 for e in ess)  # (sum w)^2 / sum w^2 in [1, 2M]


def test_analytic_teacher_offers_its_exact_posterior_and_cfg_withdraws_it(make_cfg, tmp_path):
    for guidance, exact in ((1.0, True), (2.0, False)):
        cfg = make_cfg("rtdmd_exact", tmp_path / "r", "teacher.kind=analytic", "stage2.tilt_estimator=split_snis",
                       f"teacher.guidance_scale={guidance}")
        setup = GMMWorld().build(cfg, progress=False)
        tilt = tilt_settings(cfg.stage2, setup.task, setup.models.roles())
        assert (tilt.exact_posterior is not None) == exact
        if exact:
            assert isinstance(tilt.exact_posterior(torch.zeros(3, dtype=torch.long)), GMMPosterior)


def test_demo_runs_the_tilted_method_and_explains_its_row(tiny_yaml, tmp_path):
    from tiltflow.config.loader import user_tree
    from tiltflow.config.schema import STAGE_PRESETS
    from tiltflow.demo import run_demo
    from tiltflow.worlds.registry import load_run_config

    cfg = load_run_config(tiny_yaml, [f"run_dir={tmp_path}"])
    results = run_demo(cfg, user_tree(tiny_yaml, [], STAGE_PRESETS, "stage"), tmp_path / "demo",
                       log=lambda _: None, progress=False, methods=["rtdmd_exact"])
    assert list(results) == ["ac_dmd", "rtdmd_exact"]  # stage 2 starts from the AC-DMD student
    assert "linear_shift" in (tmp_path / "demo" / "rtdmd_exact" / "config.yaml").read_text()
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| rtdmd_exact |" in report and "- rtdmd_exact: DM toward the diffused tilted target" in report


def test_demo_bounded_section_runs_reference_and_exact_and_locates_them(tiny_yaml, tmp_path):
    """The full demo's bounded part on the tiny problem with r = tanh(a.x) and the analytic teacher: stage 2
    from the main run's AC-DMD student (same mixtures), the reference recipe (also stopped early) and the
    exact mode, each with an effective beta on the grid, written to bounded/ and summarised in report.md."""
    from tiltflow.config.loader import user_tree
    from tiltflow.config.schema import STAGE_PRESETS
    from tiltflow.demo import run_demo
    from tiltflow.worlds.gmm.effective_beta import DEFAULT_GRID
    from tiltflow.worlds.registry import load_run_config

    cfg = load_run_config(tiny_yaml, [f"run_dir={tmp_path}"])
    bounded = load_run_config(tiny_yaml, [f"run_dir={tmp_path}", "teacher.kind=analytic", "stage2.num_iters=4",
                                          "problem.rewards=[{type: tanh, a: [0.5, 0.25]}]"])
    run_demo(cfg, user_tree(tiny_yaml, [], STAGE_PRESETS, "stage"), tmp_path / "demo", log=lambda _: None,
             progress=False, methods=["ac_dmd"], bounded=bounded)
    out = tmp_path / "demo" / "bounded"
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["ac_dmd", "rtdmd_reference@1", "rtdmd_reference@2", "rtdmd_reference",
                             "rtdmd_exact"]
    assert not (out / "ac_dmd").exists()  # the main run's student was reused
    eff = json.loads((out / "effective_beta.json").read_text())
    for name in results.keys() - {"ac_dmd"}:
        assert eff[name]["beta_energy"] in DEFAULT_GRID and len(eff[name]["energy_curve"]) == len(DEFAULT_GRID)
    assert "tilt_estimator: shifted_proposal" in (out / "rtdmd_exact" / "config.yaml").read_text()
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## The bounded problem" in report and "| rtdmd_exact |" in report
    assert "## Effective beta" in (out / "report.md").read_text()
