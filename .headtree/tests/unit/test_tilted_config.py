"""Config of DM toward the diffused tilted target (stage2.dm_target: tilted, METHOD.md 5.6): the
rtdmd_exact preset, the estimator resolved against the rewards, and the settings that cannot go together."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from tiltflow.algorithms.rtdmd import tilt_settings
from tiltflow.config.gmm import GMMRunConfig
from tiltflow.config.loader import ConfigError, from_dict, load_config, read_yaml, to_yaml
from tiltflow.config.schema import STAGE_PRESETS, resolve_tilt_estimator
from tiltflow.rewards.base import RewardSet
from tiltflow.worlds.gmm.rewards import HalfspaceReward, LinearReward, QuadraticReward
from tiltflow.worlds.gmm.world import GMMTask

_COV = [[0.1, 0.0], [0.0, 0.1]]
LINEAR = {"type": "linear", "a": [1.0, 0.5]}
QUADRATIC = {"type": "quadratic", "A": [[1.0, 0.0], [0.0, 1.0]], "b": [1.0, 0.0]}
HALFSPACE = {"type": "halfspace", "a": [0.0, 1.0], "c": 0.0}


def tree(*rewards: dict, **top) -> dict:
    problem = {"dim": 2, "prompts": [{"weights": [0.5, 0.5], "means": [[1.0, 0.0], [-1.0, 0.0]],
                                      "covs": [_COV, _COV]}], "rewards": [copy.deepcopy(r) for r in rewards]}
    return {"problem": problem, **top}


def load(tmp_path: Path, data: dict, overrides: list[str] = ()) -> GMMRunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(GMMRunConfig, path, overrides, presets=STAGE_PRESETS, preset_key="stage")


def error_of(tmp_path: Path, data: dict, overrides: list[str] = ()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data, overrides)
    return info.value


def test_preset_has_no_reward_terms_and_tilts_the_dm_target(tmp_path):
    s2 = load(tmp_path, tree(LINEAR, stage="rtdmd_exact")).stage2
    assert s2.dm_target == "tilted" and s2.weights() == (1.0, 0.0, 0.0)
    assert s2.dm_depth == 0 and s2.dm_scaling == "normalized" and s2.dm_reduction == "sum"


@pytest.mark.parametrize(("rewards", "expected"), [
    ((LINEAR,), "linear_shift"),
    ((LINEAR, LINEAR), "linear_shift"),
    ((QUADRATIC,), "shifted_proposal"),
    ((LINEAR, QUADRATIC), "shifted_proposal"),
    ((HALFSPACE,), "split_snis"),
    ((LINEAR, HALFSPACE), "split_snis"),
])
def test_auto_resolves_to_the_estimator_that_fits_and_is_saved(tmp_path, rewards, expected):
    cfg = load(tmp_path, tree(*rewards, stage="rtdmd_exact"))
    assert cfg.stage2.tilt_estimator == expected
    assert from_dict(GMMRunConfig, yaml.safe_load(to_yaml(cfg))) == cfg  # the run dir's config.yaml says it


def test_teacher_target_leaves_the_estimator_alone(tmp_path):
    cfg = load(tmp_path, tree(QUADRATIC, stage="rtdmd"), ["stage2.tilt_estimator=linear_shift"])
    assert cfg.stage2.dm_target == "teacher" and cfg.stage2.tilt_estimator == "linear_shift"


def test_linear_shift_with_a_curved_reward_names_both_settings(tmp_path):
    err = error_of(tmp_path, tree(QUADRATIC, stage="rtdmd_exact"), ["stage2.tilt_estimator=linear_shift"])
    assert err.path == "stage2.tilt_estimator" and "problem.rewards" in str(err) and "quadratic" in str(err)


def test_shifted_proposal_with_a_non_differentiable_reward_names_both_settings(tmp_path):
    err = error_of(tmp_path, tree(HALFSPACE, stage="rtdmd_exact"), ["stage2.tilt_estimator=shifted_proposal"])
    assert err.path == "stage2.tilt_estimator" and "problem.rewards" in str(err) and "halfspace" in str(err)


@pytest.mark.parametrize(("stage", "overrides", "path"), [
    ("rtdmd", ["stage2.dm_target=tilted"], "stage2.w_pg"),  # the reference weights count the tilt twice
    ("rtdmd_fullchain", ["stage2.dm_target=tilted"], "stage2.w_pg"),  # null = beta
    ("rtdmd_exact", ["stage2.w_bp=0.1"], "stage2.w_bp"),
    ("rtdmd_exact", ["stage2.w_pg=null"], "stage2.w_pg"),
    ("rtdmd_exact", ["stage2.dm_scaling=fisher"], "stage2.dm_scaling"),
    ("rtdmd_exact", ["stage2.tilt_num_pairs=0"], "stage2.tilt_num_pairs"),
    ("rtdmd_exact", ["stage2.tilt_posterior_steps=0"], "stage2.tilt_posterior_steps"),
])
def test_settings_that_do_not_go_with_the_tilted_target(tmp_path, stage, overrides, path):
    err = error_of(tmp_path, tree(LINEAR, stage=stage), overrides)
    assert err.path == path
    if path in ("stage2.w_pg", "stage2.w_bp"):
        assert "stage2.dm_target" in str(err) and "twice" in str(err)


def test_the_old_name_is_a_config_error_naming_the_new_preset(tmp_path):
    err = error_of(tmp_path, tree(LINEAR, stage="rtdmd_tilted"))
    assert err.path == "stage" and "rtdmd_exact" in str(err)


@pytest.mark.parametrize(("overrides", "path"), [
    (["stage2.mode=exact"], "stage2.mode"),  # a config written for the old rtdmd_exact
    (["stage2.dm_target=teacher"], "stage2.dm_target"),
])
def test_rtdmd_exact_in_its_old_meaning_names_rtdmd_fullchain(tmp_path, overrides, path):
    err = error_of(tmp_path, tree(LINEAR, stage="rtdmd_exact"), overrides)
    assert err.path == path and "rtdmd_fullchain" in str(err)


def test_fullchain_keeps_the_old_rtdmd_exact_preset_and_the_fisher_option(tmp_path):
    cfg = load(tmp_path, tree(LINEAR, stage="rtdmd_fullchain"), ["stage2.dm_scaling=fisher"])
    s2 = cfg.stage2
    assert s2.mode == "exact" and s2.dm_target == "teacher" and s2.weights() == (1.0, 1.0, 1.0)
    assert s2.advantage == "raw" and s2.ppo_clip is None and s2.dm_depth == 0 and s2.dm_scaling == "fisher"
    err = error_of(tmp_path, tree(LINEAR, stage="rtdmd_exact"), ["stage2.dm_scaling=fisher"])
    assert err.path == "stage2.dm_scaling" and "rtdmd_fullchain" in str(err)


def test_resolution_rules():
    assert resolve_tilt_estimator("auto", linear=True, differentiable=True) == "linear_shift"
    assert resolve_tilt_estimator("split_snis", linear=True, differentiable=True) == "split_snis"
    with pytest.raises(ConfigError):
        resolve_tilt_estimator("linear_shift", linear=False, differentiable=True)


class _Teacher:
    def velocity(self, x, sigma, cond):  # pragma: no cover - not called
        raise AssertionError


class _Roles:
    teacher = _Teacher()


def test_algorithm_resolves_auto_from_the_task(tmp_path):
    """Worlds whose config does not resolve 'auto' get it resolved by the algorithm from the Task."""
    cfg = load(tmp_path, tree(LINEAR, stage="rtdmd_exact")).stage2
    cfg.tilt_estimator = "auto"
    cases = [([LinearReward([1.0, 0.5]), LinearReward([0.0, 2.0], name="linear_1")], [1.0, 0.5], "linear_shift"),
             ([QuadraticReward(torch.eye(2), [0.0, 0.0])], [1.0], "shifted_proposal"),
             ([HalfspaceReward([0.0, 1.0], 0.0)], [1.0], "split_snis")]
    for rewards, weights, expected in cases:
        task = GMMTask(1, 2, RewardSet(rewards, weights))
        tilt = tilt_settings(cfg, task, _Roles())  # type: ignore[arg-type]
        assert tilt.estimator == expected and tilt.exact_posterior is None
        if expected == "linear_shift":
            assert torch.equal(tilt.linear_a, torch.tensor([1.0, 1.5], dtype=torch.float64))
    cfg.tilt_estimator = "linear_shift"
    with pytest.raises(ConfigError, match="stage2.tilt_estimator"):
        tilt_settings(cfg, GMMTask(1, 2, RewardSet([QuadraticReward(torch.eye(2), [0.0, 0.0])])), _Roles())


def test_the_recorded_problems_resolve(tmp_path):
    root = Path(__file__).resolve().parents[2] / "tiltflow" / "configs" / "gmm"
    want = {"default": "linear_shift", "d8_linear": "linear_shift", "quadratic": "shifted_proposal",
            "mixed_rewards": "split_snis", "bounded": "shifted_proposal"}
    for name, expected in want.items():
        data = read_yaml(root / f"{name}.yaml")
        data["stage"] = "rtdmd_exact"
        assert load(tmp_path, data).stage2.tilt_estimator == expected, name
