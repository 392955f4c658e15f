"""Build rewards by name: "clip_score", "pickscore", "aesthetic", "hpsv2", "imagereward", "remote".

Scorer modules are imported only when built, so listing or parsing specs stays light. A name of the form
"package.module:factory" builds a user reward with that factory instead.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tiltflow.rewards.base import Reward, RewardSet

_FACTORIES: dict[str, str] = {
    "clip_score": "tiltflow.rewards.clip_score:build_clip_score",
    "pickscore": "tiltflow.rewards.pickscore:build_pickscore",
    "aesthetic": "tiltflow.rewards.aesthetic:build_aesthetic",
    "hpsv2": "tiltflow.rewards.hpsv2:build_hpsv2",
    "imagereward": "tiltflow.rewards.imagereward:build_imagereward",
    "remote": "tiltflow.rewards.remote:RemoteReward",
}
KNOWN_REWARDS: tuple[str, ...] = tuple(_FACTORIES)


@dataclass
class RewardSpec:
    """One reward of a RewardSet: registry name, weight and the factory's keyword arguments."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


def _factory(name: str) -> Callable[..., Any]:
    target = _FACTORIES.get(name, name if ":" in name else None)
    if target is None:
        raise ValueError(
            f"unknown reward {name!r}; known rewards: {', '.join(KNOWN_REWARDS)} (or 'package.module:factory')"
        )
    module_name, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward {name!r}: cannot import {target!r} ({err})") from err


def build_reward(name: str, /, **kwargs: Any) -> Reward:
    """Build one reward; unknown names and unknown keyword arguments raise ValueError naming the options.

    `name` is positional-only, so factories may take their own `name` (the reward's display name).
    """
    factory = _factory(name)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not takes_any:
        accepted = [p for p in params if p != "self"]
        raise ValueError(f"reward {name!r} got unknown arguments {unknown}; accepted: {accepted}")
    reward = factory(**kwargs)
    if not isinstance(reward, Reward):
        raise TypeError(
            f"reward {name!r}: factory returned {type(reward).__name__}, which lacks name, differentiable or __call__"
        )
    return reward


def accepts(name: str, argument: str) -> bool:
    """Whether the factory of reward `name` takes keyword `argument` (used to pass --device along)."""
    return argument in inspect.signature(_factory(name)).parameters


def parse_kwargs(text: str, *, what: str) -> dict[str, Any]:
    """A JSON object from the command line."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{what} must be a JSON object, got {text!r} ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {text!r}")
    return value


def parse_reward_spec(text: str) -> RewardSpec:
    """ "NAME" or "NAME=JSON": the JSON object's "weight" is the RewardSet weight, other keys go to the factory.

    Example: 'pickscore={"weight": 0.5, "model": "/models/pickscore"}'.
    """
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"reward spec {text!r} has no name; expected NAME or NAME=JSON")
    kwargs = parse_kwargs(rest, what=f"reward spec {name!r}") if sep else {}
    weight = kwargs.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"reward spec {name!r}: weight must be a number, got {weight!r}")
    return RewardSpec(name=name, weight=float(weight), kwargs=kwargs)


def build_reward_set(
    specs: Sequence[RewardSpec | str | Mapping[str, Any]], defaults: Mapping[str, Any] | None = None
) -> RewardSet:
    """A RewardSet from specs: RewardSpec, "NAME[=JSON]" strings, or mappings {"reward": NAME, "weight": w,
    **factory kwargs} (a factory's own "name" kwarg sets the reward's display name).

    defaults: keyword arguments given to every factory that accepts them, unless its spec sets them
    (e.g. {"device": "cuda"}).
    """
    parsed = [_as_spec(s) for s in specs]
    rewards, weights = [], []
    for spec in parsed:
        kwargs = {k: v for k, v in (defaults or {}).items() if accepts(spec.name, k)}
        kwargs.update(spec.kwargs)
        rewards.append(build_reward(spec.name, **kwargs))
        weights.append(spec.weight)
    return RewardSet(rewards, weights)


def _as_spec(spec: RewardSpec | str | Mapping[str, Any]) -> RewardSpec:
    if isinstance(spec, RewardSpec):
        return spec
    if isinstance(spec, str):
        return parse_reward_spec(spec)
    if isinstance(spec, Mapping) and isinstance(spec.get("reward"), str):
        kwargs = {k: v for k, v in spec.items() if k not in ("reward", "weight")}
        return RewardSpec(name=spec["reward"], weight=float(spec.get("weight", 1.0)), kwargs=kwargs)
    raise ValueError(
        f"reward spec must be a RewardSpec, 'NAME[=JSON]' or a mapping with 'reward' (the registry name), got {spec!r}"
    )
