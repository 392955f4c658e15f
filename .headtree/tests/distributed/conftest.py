"""The distributed tests reuse the integration tests' tiny 2-D gmm problem and its trained teacher, and share the
tiny SD3 (diffusers world) runs that several of them compare with (diffusers_runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from integration.conftest import TINY, make_cfg, teacher_run, tiny_yaml  # noqa: F401  (fixtures)


class DiffusersRuns:
    """The diffusers world's runs of test_fsdp_worlds.py (DIFFUSERS + STAGES), each trained once per session,
    on first use, and only read afterwards (no test writes into them):

    - one(stage): in one process; "ac_dmd" is stage 1, "rtdmd" stage 2 from one("ac_dmd") (init_from);
    - two(stage, *extra): the same run on 2 gloo ranks (torchrun) with parallel.same_data_on_every_rank=true
      and the overrides `extra`, as (run_dir, what each rank returned and wrote: test_fsdp_worlds.torchrun's
      record). Both stages' 2-rank runs with the same `extra` are trained in one torchrun job, one after the
      other on the same ranks (test_fsdp_worlds.torchrun_runs: one start of fresh interpreters for both).

    test_fsdp_worlds.py checks two(stage) against one(stage); test_fsdp_checkpointing.py compares two(stage)
    with two(stage, "parallel.activation_checkpointing=true"); test_dcp_checkpoint.py starts its LoRA run from
    one("ac_dmd") and compares it with one("rtdmd"). Each of these tests (modules) trained its own copies
    before."""

    STAGES = ("ac_dmd", "rtdmd")

    def __init__(self, root: Path):
        self.root = root
        self._one: dict[str, Path] = {}
        self._two: dict[tuple[str, ...], dict[str, tuple[Path, dict[int, dict]]]] = {}

    def overrides(self, stage: str) -> list[str]:
        from test_fsdp_worlds import DIFFUSERS, STAGES

        return [*DIFFUSERS, *STAGES, f"stage={stage}",
                *([f"init_from={self.one('ac_dmd')}"] if stage == "rtdmd" else [])]

    def one(self, stage: str) -> Path:
        if stage not in self._one:
            from tiltflow.training.spine import train
            from tiltflow.worlds.registry import load_run_config

            run_dir = self.root / f"one_{stage}" / "run"
            train(load_run_config(None, [*self.overrides(stage), f"run_dir={run_dir}"]), progress=False)
            self._one[stage] = run_dir
        return self._one[stage]

    def two(self, stage: str, *extra: str) -> tuple[Path, dict[int, dict]]:
        if extra not in self._two:
            from test_fsdp_worlds import torchrun_runs

            job = self.root / f"two{len(self._two)}"
            job.mkdir()
            run_dirs = {s: job / s / "run" for s in self.STAGES}  # each run its own parent: its ranks' records
            runs = [[*self.overrides(s), *extra, f"run_dir={run_dirs[s]}", "parallel.same_data_on_every_rank=true"]
                    for s in self.STAGES]
            records = torchrun_runs(job, "diffusers", *runs)
            self._two[extra] = {s: (run_dirs[s], rec) for s, rec in zip(self.STAGES, records)}
        return self._two[extra][stage]


@pytest.fixture(scope="session")
def diffusers_runs(tmp_path_factory) -> DiffusersRuns:
    return DiffusersRuns(tmp_path_factory.mktemp("diffusers_runs"))
