"""Strict configs (tiltflow/config): unknown keys, wrong types and invalid values are ConfigErrors that name
the dotted path; overrides are YAML; stage presets sit under the user's own values; YAML round trips."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tiltflow.config.gmm import GMMRunConfig
from tiltflow.config.loader import ConfigError, apply_overrides, from_dict, load_config, read_yaml, to_yaml
from tiltflow.config.schema import STAGE_PRESETS, Stage2Config

DEFAULT_YAML = Path(__file__).resolve().parents[2] / "tiltflow" / "configs" / "gmm" / "default.yaml"

# Two prompts in R^2, one linear reward: the smallest problem every test below starts from.
PROBLEM = {
    "dim": 2,
    "prompts": [
        {"weights": [0.5, 0.5], "means": [[1.0, 0.0], [-1.0, 0.0]],
         "covs": [[[0.1, 0.0], [0.0, 0.1]], [[0.2, 0.05], [0.05, 0.1]]]},
        {"weights": [1.0], "means": [[0.0, 1.0]], "covs": [[[0.3, 0.0], [0.0, 0.3]]]},
    ],
    "rewards": [{"type": "linear", "a": [1.0, 0.5]}],
}


def base_tree(**top) -> dict:
    return {"problem": copy.deepcopy(PROBLEM), **top}


def load(tmp_path: Path, tree: dict, overrides: list[str] = ()) -> GMMRunConfig:
    """The public path: a YAML file, dotted overrides, stage presets."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(GMMRunConfig, path, overrides, presets=STAGE_PRESETS, preset_key="stage")


def error_of(tmp_path: Path, tree: dict, overrides: list[str] = ()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, tree, overrides)
    return info.value


def test_valid_tree_loads(tmp_path):
    cfg = load(tmp_path, base_tree(seed=3))
    assert cfg.seed == 3 and len(cfg.problem.prompts) == 2 and cfg.stage == "ac_dmd"


def test_config_error_is_a_value_error_with_path():
    err = ConfigError("stage2.beta", "bad")
    assert isinstance(err, ValueError)
    assert err.path == "stage2.beta"
    assert "stage2.beta" in str(err)


# --- unknown keys ------------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path):
    err = error_of(tmp_path, base_tree(sead=1))
    assert err.path == "sead"
    assert "'sead'" in str(err) and "unknown key" in str(err)
    assert "'seed'" in str(err) and "'stage2'" in str(err)  # the valid keys are listed


def test_unknown_nested_key_from_override(tmp_path):
    err = error_of(tmp_path, base_tree(), ["stage2.betaa=0.5"])
    assert err.path == "stage2.betaa"
    assert "'stage2.betaa'" in str(err)
    assert "'beta'" in str(err) and "'group_size'" in str(err)


def test_unknown_key_deep_in_a_list(tmp_path):
    tree = base_tree()
    tree["problem"]["prompts"][1]["weightz"] = [1.0]
    err = error_of(tmp_path, tree)
    assert err.path == "problem.prompts[1].weightz"
    assert "'weights'" in str(err) and "'covs'" in str(err)


def test_unknown_key_in_doubly_nested_section(tmp_path):
    err = error_of(tmp_path, base_tree(), ["stage1.fake.lrr=0.1"])
    assert err.path == "stage1.fake.lrr"
    assert "'consistency_gamma'" in str(err)


# --- wrong types -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "path", "given", "expected"),
    [
        ("stage2.num_iters=abc", "stage2.num_iters", "'abc'", "integer"),
        ("stage2.num_iters=true", "stage2.num_iters", "True", "integer"),  # bool is not an int here
        ("stage2.num_iters=2.5", "stage2.num_iters", "2.5", "integer"),
        ("stage2.beta=abc", "stage2.beta", "'abc'", "number"),
        ("stage2.beta=false", "stage2.beta", "False", "number"),
        ("stage1.subinterval=1", "stage1.subinterval", "1", "true or false"),
        ("stage2.mode=fast", "stage2.mode", "'fast'", "'reference' | 'exact'"),
        ("stage2.w_pg=abc", "stage2.w_pg", "'abc'", "float | NoneType"),
        ("run_dir=3", "run_dir", "3", "string"),
        ("model=5", "model", "5", "mapping"),
        ("problem.rewards=linear", "problem.rewards", "'linear'", "list of RewardSpec"),
    ],
)
def test_wrong_type_names_path_given_and_expected(tmp_path, override, path, given, expected):
    err = error_of(tmp_path, base_tree(), [override])
    assert err.path == path
    msg = str(err)
    assert f"'{path}'" in msg and given in msg and expected in msg


def test_wrong_type_inside_a_list_names_the_index(tmp_path):
    tree = base_tree()
    tree["problem"]["prompts"][0]["weights"] = [0.5, "x"]
    err = error_of(tmp_path, tree)
    assert err.path == "problem.prompts[0].weights[1]"
    assert "'x'" in str(err) and "number" in str(err)


# --- invalid values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "path", "fragment"),
    [
        (["stage2.beta=-0.5"], "stage2.beta", "-0.5"),
        (["stage2.beta=0"], "stage2.beta", "expected > 0"),
        (["stage2.beta=.nan"], "stage2.beta", "nan"),
        (["stage2.group_size=1"], "stage2.group_size", "got 1, expected >= 2"),
        (["sampler.eta=1.5"], "sampler.eta", "[0, 1]"),
        (["sampler.eta=-0.1"], "sampler.eta", "[0, 1]"),
        (["sampler.num_steps=1"], "sampler.num_steps", ">= 2"),
        (["stage2.w_dm=-1"], "stage2.w_dm", ">= 0"),
        (["teacher.cond_dropout=1.0"], "teacher.cond_dropout", "[0, 1)"),
        (["stage1.tau_min=0.9", "stage1.tau_max=0.5"], "stage1", "tau_min < tau_max"),
        (["stage=rtdmd_fullchain", "stage2.ppo_clip=0.2"], "stage2.ppo_clip", "null"),
        (["stage=rtdmd_fullchain", "stage2.advantage=normalized"], "stage2.advantage", "raw"),
        # Values that used to be accepted and then failed mid-run (ZeroDivisionError, ValueError from
        # AdamW / EMA / subgrpo_steps, or a silent no-op step): now caught at load time.
        (["checkpoint_every=0"], "checkpoint_every", ">= 1"),
        (["log_every=0"], "log_every", ">= 1"),
        (["stage2.ema_every=0"], "stage2.ema_every", ">= 1"),
        (["stage2.accumulation=0"], "stage2.accumulation", ">= 1"),
        (["stage1.ema_decay=1.0"], "stage1.ema_decay", "[0, 1)"),
        (["stage2.ema_decay=-0.1"], "stage2.ema_decay", "[0, 1)"),
        (["stage2.lr=-1e-3"], "stage2.lr", "> 0"),
        (["stage1.lr=0"], "stage1.lr", "> 0"),
        (["stage1.fake.lr=.nan"], "stage1.fake.lr", "> 0"),
        (["teacher.lr=.inf"], "teacher.lr", "> 0"),
        (["stage=rtdmd", "stage2.num_trained_steps=-1"], "stage2.num_trained_steps", ">= 0"),
        (["stage=rtdmd", "stage2.dm_depth=-1"], "stage2.dm_depth", ">= 0"),
        (["stage=rtdmd", "stage2.num_trained_steps=4"], "stage2.num_trained_steps", "sampler.num_steps"),
        (["stage=rtdmd", "sampler.num_steps=3", "stage2.dm_depth=4"], "stage2.dm_depth", "sampler.num_steps = 3"),
    ],
)
def test_invalid_value_names_path(tmp_path, overrides, path, fragment):
    err = error_of(tmp_path, base_tree(), overrides)
    assert err.path == path
    assert fragment in str(err)


def test_stage2_cross_checks_do_not_apply_to_stage1(tmp_path):
    # dm_depth and num_trained_steps only matter to stage-2 trainers.
    cfg = load(tmp_path, base_tree(stage="ac_dmd"), ["sampler.num_steps=2", "stage2.dm_depth=4"])
    assert cfg.stage2.dm_depth == 4


def test_non_positive_definite_covariance_names_prompt_and_component(tmp_path):
    tree = base_tree()
    tree["problem"]["prompts"][1]["covs"][0] = [[1.0, 2.0], [2.0, 1.0]]  # eigenvalues 3, -1
    err = error_of(tmp_path, tree)
    assert err.path == "problem.prompts[1].covs[0]"
    assert "'problem.prompts[1].covs[0]'" in str(err) and "positive definite" in str(err)


def test_non_symmetric_covariance(tmp_path):
    tree = base_tree()
    tree["problem"]["prompts"][0]["covs"][1] = [[1.0, 0.5], [0.0, 1.0]]
    err = error_of(tmp_path, tree)
    assert err.path == "problem.prompts[0].covs[1]" and "symmetric" in str(err)


def test_ragged_covariance_is_a_config_error(tmp_path):
    tree = base_tree()
    tree["problem"]["prompts"][0]["covs"][1] = [[1.0, 0.0], [0.0]]
    err = error_of(tmp_path, tree)
    assert err.path == "problem.prompts[0].covs[1]"


def test_covariance_of_wrong_dimension(tmp_path):
    tree = base_tree()
    tree["problem"]["prompts"][1]["covs"][0] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    err = error_of(tmp_path, tree)
    assert err.path == "problem.prompts[1].covs[0]" and "dim = 2" in str(err)


def test_mean_of_wrong_dimension(tmp_path):
    tree = base_tree()
    tree["problem"]["prompts"][0]["means"][1] = [1.0, 2.0, 3.0]
    err = error_of(tmp_path, tree)
    assert err.path == "problem.prompts[0].means[1]"
    assert "got length 3" in str(err) and "dim = 2" in str(err)


def test_number_of_means_must_match_weights(tmp_path):
    tree = base_tree()
    tree["problem"]["prompts"][0]["means"] = [[1.0, 0.0]]
    err = error_of(tmp_path, tree)
    assert err.path == "problem.prompts[0].means"


def test_reward_vector_of_wrong_dimension(tmp_path):
    err = error_of(tmp_path, base_tree(), ["problem.rewards=[{type: linear, a: [1.0]}]"])
    assert err.path == "problem.rewards[0].a" and "dim = 2" in str(err)


def test_quadratic_reward_matrix_of_wrong_dimension(tmp_path):
    rewards = "problem.rewards=[{type: quadratic, A: [[1, 0, 0], [0, 1, 0], [0, 0, 1]], b: [0.0, 0.0]}]"
    err = error_of(tmp_path, base_tree(), [rewards])
    assert err.path == "problem.rewards[0].A" and "dim = 2" in str(err)


def test_no_prompts_or_no_rewards(tmp_path):
    tree = base_tree()
    tree["problem"]["prompts"] = []
    assert error_of(tmp_path, tree).path == "problem.prompts"
    tree = base_tree()
    tree["problem"]["rewards"] = []
    assert error_of(tmp_path, tree).path == "problem.rewards"


# --- files -------------------------------------------------------------------------------------------


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("stage: ac_dmd\nstage2: {beta: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(GMMRunConfig, path)
    assert str(path) in str(info.value) and "malformed YAML" in str(info.value)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(GMMRunConfig, path)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(path)


def test_empty_file_is_an_empty_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert read_yaml(path) == {}


def test_default_problem_loads():
    cfg = load_config(GMMRunConfig, DEFAULT_YAML, presets=STAGE_PRESETS, preset_key="stage")
    assert cfg.world == "gmm" and cfg.problem.dim == 2 and len(cfg.problem.prompts) == 3
    assert cfg.stage2.beta == 0.5


# --- overrides ---------------------------------------------------------------------------------------


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load(tmp_path, base_tree(), [
        "stage2.beta=0.5",
        "stage2.w_pg=null",
        "stage2.num_iters=7",
        "stage1.subinterval=false",
        "problem.rewards=[{type: quadratic, A: [[1, 0], [0, 2]], b: [0.5, -0.5], weight: 2}]",
        "run_dir=runs/x y",
    ])
    assert cfg.stage2.beta == 0.5 and isinstance(cfg.stage2.beta, float)
    assert cfg.stage2.w_pg is None
    assert cfg.stage2.num_iters == 7
    assert cfg.stage1.subinterval is False
    (r,) = cfg.problem.rewards
    assert r.type == "quadratic" and r.A == [[1.0, 0.0], [0.0, 2.0]] and r.b == [0.5, -0.5] and r.weight == 2.0
    assert cfg.run_dir == "runs/x y"


def test_override_wins_over_file_and_empty_value_is_null(tmp_path):
    cfg = load(tmp_path, base_tree(stage2={"beta": 2.0, "w_bp": 0.3}), ["stage2.beta=0.25", "stage2.w_bp="])
    assert cfg.stage2.beta == 0.25 and cfg.stage2.w_bp is None


def test_apply_overrides_creates_nested_mappings():
    assert apply_overrides({}, ["a.b.c=[1, 2]", "a.d=x"]) == {"a": {"b": {"c": [1, 2]}, "d": "x"}}


@pytest.mark.parametrize(
    ("override", "path"),
    [("seed.x=1", "seed"), ("noequals", "noequals"), ("a..b=1", "a..b"), ("stage2.beta=[1", "stage2.beta")],
)
def test_malformed_overrides(override, path):
    with pytest.raises(ConfigError) as info:
        apply_overrides({"seed": 1}, [override])
    assert info.value.path == path


def test_scientific_strings_accepted_for_float_fields(tmp_path):
    # YAML 1.1 reads '1e-3' (no dot) as a string.
    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"
    path = tmp_path / "sci.yaml"
    path.write_text(yaml.safe_dump(base_tree()) + "stage2: {lr: 1e-3, ppo_clip: 2e-5}\nteacher: {lr: 5E-4}\n")
    cfg = load_config(GMMRunConfig, path, ["stage1.lr=3e-4", "stage2.w_bp=1e-6"])
    assert cfg.stage2.lr == 1e-3 and isinstance(cfg.stage2.lr, float)
    assert cfg.stage2.ppo_clip == 2e-5  # an Optional[float] field
    assert cfg.teacher.lr == 5e-4
    assert cfg.stage1.lr == 3e-4
    assert cfg.stage2.w_bp == 1e-6


def test_integer_given_for_float_field_becomes_float(tmp_path):
    cfg = load(tmp_path, base_tree(), ["stage2.beta=2"])
    assert cfg.stage2.beta == 2.0 and type(cfg.stage2.beta) is float


# --- presets -----------------------------------------------------------------------------------------


def test_preset_applied_and_user_values_win(tmp_path):
    before = copy.deepcopy(STAGE_PRESETS)
    cfg = load(tmp_path, base_tree(stage="grpo_only"))
    assert (cfg.stage2.w_dm, cfg.stage2.w_bp, cfg.stage2.w_pg) == (0.0, 0.0, 1.0)
    cfg = load(tmp_path, base_tree(stage="grpo_only", stage2={"w_dm": 0.5}), ["stage2.w_bp=0.25"])
    assert (cfg.stage2.w_dm, cfg.stage2.w_bp) == (0.5, 0.25)
    assert STAGE_PRESETS == before  # loading never mutates the presets


def test_preset_selected_by_override(tmp_path):
    cfg = load(tmp_path, base_tree(), ["stage=rtdmd_fullchain", "stage2.num_trained_steps=2"])
    s2 = cfg.stage2
    assert (s2.mode, s2.advantage, s2.ppo_clip, s2.w_pg, s2.w_bp, s2.dm_depth) == ("exact", "raw", None, None, None, 0)
    assert s2.num_trained_steps == 2  # the user's value, not the preset's 0 (= all)
    assert s2.weights() == (1.0, s2.beta, s2.beta)


def test_dmd2_preset_reaches_nested_sections(tmp_path):
    cfg = load(tmp_path, base_tree(stage="dmd2", stage1={"n_fake": 2}))
    assert cfg.sampler.eta == 1.0 and cfg.stage1.subinterval is False
    assert cfg.stage1.fake.consistency_gamma == 0.0
    assert cfg.stage1.n_fake == 2 and cfg.stage1.fake.lr == 1e-3  # untouched siblings keep their values


def test_no_preset_for_plain_stages(tmp_path):
    assert load(tmp_path, base_tree(stage="rtdmd")).stage2 == Stage2Config()


# --- round trip and derived values -------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["ac_dmd", "rtdmd_fullchain", "dm_bp"])
def test_round_trip_through_yaml(tmp_path, stage):
    cfg = load(tmp_path, base_tree(stage=stage), ["stage2.lr=1e-5", "seed=4"])
    again = from_dict(GMMRunConfig, yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    assert to_yaml(again) == to_yaml(cfg)


def test_round_trip_of_default_problem():
    cfg = load_config(GMMRunConfig, DEFAULT_YAML)
    assert from_dict(GMMRunConfig, yaml.safe_load(to_yaml(cfg))) == cfg


def test_weights_resolve_null_to_beta():
    s2 = Stage2Config(beta=0.5, w_dm=0.1, w_pg=None, w_bp=None)
    assert s2.weights() == (0.1, 0.5, 0.5)
    # Zero is a value, not "unset".
    assert Stage2Config(beta=0.5, w_dm=0.0, w_pg=0.0, w_bp=2.0).weights() == (0.0, 0.0, 2.0)
    assert Stage2Config(beta=3.0, w_pg=None).weights() == (0.001, 3.0, 1e-4)
