"""Fuzzing the strict config loader (issue 11, item 4) with hypothesis: random config trees (real keys with
values of any type or range, unknown keys), random dotted overrides and random YAML text either load or
raise ConfigError (a one-line message naming the key), never another exception."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiltflow.config.gmm import GMMRunConfig
from tiltflow.config.loader import ConfigError, from_dict
from tiltflow.worlds.registry import load_run_config

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["1e-3", "nan", "-inf", "linear", "stop", "skip", "ac_dmd", "gmm"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=12)


def field_values(tp, depth: int = 0) -> st.SearchStrategy:
    """Values for a field of type `tp`: mostly of the right shape (so validation runs deep), any range."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and depth < 4:
        return trees(tp, depth + 1)
    if origin is typing.Literal:
        return st.one_of(st.sampled_from(args), values)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[field_values(a, depth) for a in args if a is not type(None)], st.none())
    if origin is list:
        return st.lists(field_values(args[0], depth), max_size=3)
    if tp is float:
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), values)
    if tp is int:
        return st.one_of(st.integers(-3, 10), values)
    if tp is bool:
        return st.one_of(st.booleans(), values)
    return values


def trees(cls, depth: int = 0) -> st.SearchStrategy:
    """A mapping for dataclass `cls`: a random subset of its fields, sometimes an unknown key."""
    hints = typing.get_type_hints(cls)
    known = {f.name: field_values(hints[f.name], depth) for f in dataclasses.fields(cls)}
    return st.fixed_dictionaries({}, optional={**known, "not_a_key": values})


def loads_or_config_error(build) -> None:
    try:
        build()
    except ConfigError as err:
        message = str(err)
        assert message.startswith("config error at '") and "\n" not in message, message


@FUZZ
@given(trees(GMMRunConfig))
def test_random_trees_load_or_raise_config_error(tree):
    loads_or_config_error(lambda: from_dict(GMMRunConfig, tree))


keys = st.sampled_from(["seed", "stage", "run_dir", "sampler.eta", "sampler.num_steps", "stage1.lr", "stage2.beta",
                        "stage2.w_pg", "checkpoint_keep", "on_nonfinite", "problem.dim", "problem.rewards",
                        "problem.prompts", "model.hidden", "eval.every", "logging.progress_every_s", "a.b.c",
                        "stage1", "stage2.fake.weighting", "checkpoint_retry_wait_s"])
raw = st.one_of(st.text(max_size=12), st.sampled_from(["[1, 2", "{a: 1}", "null", ".nan", "-.inf", "1e999", "'x'",
                                                       "[{type: linear, a: [1, 2]}]", "[[1, 2], 3]", "true"]))
overrides = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", keys, raw), st.text(max_size=10)), max_size=4)


@FUZZ
@given(overrides)
def test_random_overrides_load_or_raise_config_error(items):
    loads_or_config_error(lambda: load_run_config(None, items))


@FUZZ
@given(st.text(max_size=80))
def test_random_yaml_text_loads_or_raises_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text)
    loads_or_config_error(lambda: load_run_config(path))


def test_the_fuzzer_reaches_valid_configs():
    """The strategies are not all-invalid: the empty tree (all defaults) and a small valid one load."""
    cfg = from_dict(GMMRunConfig, {"seed": 3, "sampler": {"eta": 0.5}})
    assert cfg.seed == 3 and math.isclose(cfg.sampler.eta, 0.5)
    with pytest.raises(ConfigError, match="'sampler.eta'"):
        from_dict(GMMRunConfig, {"sampler": {"eta": float("nan")}})


@pytest.mark.parametrize(("tree", "where"), [
    # Found by fuzzing: checks that could not run on the value (a ragged or empty matrix) escaped as
    # ValueError / RuntimeError, and a seed no generator takes loaded.
    ({"problem": {"rewards": [{"type": "quadratic", "A": [[1.0], [1.0, 2.0]], "b": [0.0, 0.0]}]}},
     "problem.rewards[0]"),
    ({"problem": {"rewards": [{"type": "quadratic", "A": [], "b": []}]}}, "problem.rewards[0].A"),  # now checked
    ({"seed": 2**70}, "seed"),
    ({"seed": -1}, "seed"),
])
def test_values_that_once_escaped(tree, where):
    with pytest.raises(ConfigError, match=rf"config error at '{re.escape(where)}'"):
        from_dict(GMMRunConfig, tree)
