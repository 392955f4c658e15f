"""benchmarks/shapes_distill.py: the commands it starts (stage 2 from the same seed's AC-DMD run), that a
finished run is skipped, and that a method of the other phase is refused."""

from pathlib import Path

import pytest
from bench_scripts import load_benchmark


def _driver():
    return load_benchmark("shapes_distill")


def test_stage2_runs_start_from_the_ac_dmd_run_of_their_seed(tmp_path):
    cmds = dict(_driver().commands("stage2", ["rtdmd", "bp_only"], [0, 3], tmp_path, Path("configs/shapes"), 60.0,
                                   ["stage2.num_iters=5"]))
    assert sorted(cmds) == ["bp_only_s0", "bp_only_s3", "rtdmd_s0", "rtdmd_s3"]
    argv = cmds["bp_only_s3"]
    assert argv[1:5] == ["-m", "tiltflow.cli", "train", "--config"] and argv[5] == "configs/shapes/bp_only.yaml"
    assert {"seed=3", f"run_dir={tmp_path / 'bp_only_s3'}", "time_limit_s=60.0",
            f"init_from={tmp_path / 'ac_dmd_s3'}"} <= set(argv)
    assert argv[-1] == "stage2.num_iters=5"  # overrides last: they win
    elsewhere = dict(_driver().commands("stage2", ["rtdmd"], [2], tmp_path, Path("c"), 0.0, [], tmp_path / "s1"))
    assert f"init_from={tmp_path / 's1' / 'ac_dmd_s2'}" in elsewhere["rtdmd_s2"]
    assert f"run_dir={tmp_path / 'rtdmd_s2'}" in elsewhere["rtdmd_s2"]
    stage1 = dict(_driver().commands("stage1", ["ac_dmd"], [1], tmp_path, Path("c"), 0.0, []))
    assert not any(a.startswith("init_from=") for a in stage1["ac_dmd_s1"])


def test_finished_runs_are_skipped_and_other_phases_methods_refused(tmp_path, capsys):
    driver = _driver()
    for name in ("ac_dmd_s0", "dmd2_s0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "final_metrics.json").write_text("{}")
    assert driver.main(["--phase", "stage1", "--seeds", "0", "--root", str(tmp_path)]) == 0  # nothing to start
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as err:
        driver.main(["--phase", "stage1", "--methods", "rtdmd", "--root", str(tmp_path)])
    assert err.value.code == 2 and "not stage1 methods" in capsys.readouterr().err


def test_finish_exports_paused_runs_at_their_checkpoint_step(tmp_path, monkeypatch):
    from tiltflow.storage import save_atomic

    driver = _driver()
    (tmp_path / "ac_dmd_s0").mkdir()
    save_atomic({"step": 37, "model": None, "algo": None}, tmp_path / "ac_dmd_s0" / "checkpoint.pt")
    started = []

    class Done:  # a process that finished at once
        def __init__(self, argv, **kw):
            started.append(argv)

        def wait(self):
            return 0

    monkeypatch.setattr(driver.subprocess, "Popen", Done)
    rc = driver.main(["--phase", "stage1", "--methods", "ac_dmd", "--seeds", "0", "1", "--root", str(tmp_path),
                      "--finish", "stage1.num_iters=2000"])
    assert rc == 0 and len(started) == 1  # ac_dmd_s1 has no checkpoint: nothing to finish
    assert started[0][-2:] == ["stage1.num_iters=2000", "stage1.num_iters=37"]  # the checkpoint's step wins
