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
    - two(stage): the same run on 2 gloo ranks (torchrun) with parallel.same_data_on_every_rank=true, as
      (run_dir, what each rank returned and wrote: test_fsdp_worlds.torchrun's record).

    test_fsdp_worlds.py checks two(stage) against one(stage); test_fsdp_checkpointing.py compares two(stage)
    with the same 2-rank run under activation checkpointing; test_dcp_checkpoint.py starts its LoRA run from
    one("ac_dmd") and compares it with one("rtdmd"). Each of these runs was made by each test (module) before."""

    def __init__(self, root: Path):
        self.root = root
        self._one: dict[str, Path] = {}
        self._two: dict[str, tuple[Path, dict[int, dict]]] = {}

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

    def two(self, stage: str) -> tuple[Path, dict[int, dict]]:
        if stage not in self._two:
            from test_fsdp_worlds import torchrun

            cwd = self.root / f"two_{stage}"  # each run its own parent: the ranks' records go next to the run
            cwd.mkdir()
            run_dir = cwd / "run"
            ranks = torchrun(cwd, "diffusers", *self.overrides(stage), f"run_dir={run_dir}",
                             "parallel.same_data_on_every_rank=true")
            self._two[stage] = (run_dir, ranks)
        return self._two[stage]


@pytest.fixture(scope="session")
def diffusers_runs(tmp_path_factory) -> DiffusersRuns:
    return DiffusersRuns(tmp_path_factory.mktemp("diffusers_runs"))
