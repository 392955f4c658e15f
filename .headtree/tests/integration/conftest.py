"""Shared pieces of the CPU integration tests: a tiny 2-D problem and one neural teacher trained once."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tiltflow.config.gmm import GMMRunConfig
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
    "stage1": {"num_iters": 3, "batch_size": 32, "n_fake": 2, "lr": 1e-3},
    # weight_decay 0: a parameter can only move through a gradient (AdamW's decay would move it anyway).
    "stage2": {"num_iters": 3, "num_prompts": 4, "group_size": 8, "lr": 1e-3, "weight_decay": 0.0},
    "eval": {"num_samples": 64, "every": 0, "reference_pool": 256, "curve_samples": 64, "plots": False},
}


@pytest.fixture(scope="session")
def tiny_yaml(tmp_path_factory) -> Path:
    """The tiny problem as a YAML file (run_dir and teacher_run are left to the tests)."""
    path = tmp_path_factory.mktemp("tiny_config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(TINY), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory, tiny_yaml) -> Path:
    """A neural teacher (50 flow-matching steps) trained once and shared: teacher_run=<this dir>."""
    from tiltflow.worlds.gmm.runs import run_teacher
    from tiltflow.worlds.gmm.world import build_gmm

    out = tmp_path_factory.mktemp("teacher")
    cfg = load_run_config(tiny_yaml, [f"run_dir={out}", f"teacher_run={out}"])
    run_teacher(cfg, build_gmm(cfg.problem), progress=False)
    assert (out / "teacher.pt").exists()
    return out


@pytest.fixture
def make_cfg(tiny_yaml, teacher_run):
    """make_cfg(stage, run_dir, *overrides) -> GMMRunConfig through the public loader (presets included)."""

    def make(stage: str, run_dir: Path, *overrides: str) -> GMMRunConfig:
        return load_run_config(tiny_yaml, [f"stage={stage}", f"run_dir={run_dir}", f"teacher_run={teacher_run}",
                                           *overrides])

    return make

