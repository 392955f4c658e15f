"""Shared pieces of the reliability tests: the tiny 2-D gmm problem (as in tests/integration), a teacher
trained once, and the argv of `tiltflow train` for it (helpers: reliability_helpers.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from reliability_helpers import run_to_end

from tiltflow.worlds.registry import load_run_config

_COV = [[0.1, 0.0], [0.0, 0.1]]

# Two prompts of two modes each in R^2, a linear reward; networks, batches and pools as small as they go.
TINY = {
    "world": "gmm",
    "stage": "ac_dmd",
    "seed": 0,
    "checkpoint_every": 1,
    "log_every": 1,
    "problem": {
        "dim": 2,
        "prompts": [
            {"weights": [0.5, 0.5], "means": [[1.5, 0.0], [-1.5, 0.0]], "covs": [_COV, _COV]},
            {"weights": [0.6, 0.4], "means": [[0.0, 1.5], [0.0, -1.5]], "covs": [_COV, _COV]},
        ],
        "rewards": [{"type": "linear", "a": [1.0, 0.5]}],
    },
    "model": {"hidden": 32, "depth": 2, "embed": 8},
    "teacher": {"kind": "neural", "train_steps": 50, "batch_size": 64, "sample_steps": 8},
    "sampler": {"num_steps": 4, "eta": 0.9},
    "stage1": {"num_iters": 6, "batch_size": 32, "n_fake": 2, "lr": 1e-3},
    "stage2": {"num_iters": 6, "num_prompts": 4, "group_size": 8, "lr": 1e-3},
    "eval": {"num_samples": 64, "every": 0, "reference_pool": 256, "curve_samples": 64, "plots": False},
}


@pytest.fixture(scope="session")
def tiny_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reliability_config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(TINY), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory, tiny_yaml) -> Path:
    """A neural teacher (50 flow-matching steps) trained once for every reliability test."""
    from tiltflow.worlds.gmm.runs import run_teacher
    from tiltflow.worlds.gmm.world import build_gmm

    out = tmp_path_factory.mktemp("reliability_teacher")
    cfg = load_run_config(tiny_yaml, [f"run_dir={out}", f"teacher_run={out}"])
    run_teacher(cfg, build_gmm(cfg.problem), progress=False)
    return out


@pytest.fixture
def make_cfg(tiny_yaml, teacher_run):
    """make_cfg(stage, run_dir, *overrides) -> GMMRunConfig through the public loader."""

    def make(stage: str, run_dir: Path, *overrides: str):
        return load_run_config(tiny_yaml, [f"stage={stage}", f"run_dir={run_dir}", f"teacher_run={teacher_run}",
                                           *overrides])

    return make


@pytest.fixture
def train_args(tiny_yaml, teacher_run):
    """train_args(stage, run_dir, *overrides) -> the argv of `tiltflow train` for the tiny problem."""

    def make(stage: str, run_dir: Path, *overrides: str) -> list[str]:
        return ["train", "--config", str(tiny_yaml), f"stage={stage}", f"run_dir={run_dir}",
                f"teacher_run={teacher_run}", *overrides]

    return make


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_yaml, teacher_run) -> dict[str, Path]:
    """Uninterrupted stage-1 and stage-2 runs of the tiny problem (6 iterations each, a checkpoint a step)."""
    root = tmp_path_factory.mktemp("reference")
    base = ["train", "--config", str(tiny_yaml), f"teacher_run={teacher_run}"]
    run_to_end([*base, "stage=ac_dmd", f"run_dir={root / 's1'}"], root / "s1.log")
    run_to_end([*base, "stage=rtdmd", f"run_dir={root / 's2'}", f"init_from={root / 's1'}"], root / "s2.log")
    return {"ac_dmd": root / "s1", "rtdmd": root / "s2"}
