"""Worlds by name. Built-in worlds are imported only when asked for (the diffusers world needs diffusers);
another package or a test registers its own with `register_world`."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tiltflow.config.loader import ConfigError, from_dict, user_tree
from tiltflow.config.schema import STAGE_PRESETS

_WORLDS: dict[str, Any] = {
    "gmm": "tiltflow.worlds.gmm.runs:GMMWorld",
    "diffusers": "tiltflow.worlds.diffusers_world:DiffusersWorld",
    "shapes": "tiltflow.worlds.shapes.world:ShapesWorld",
}


def register_world(name: str, world: type) -> None:
    """Make `world: name` in a config build runs with `world` (a class with `config_class` and `build`)."""
    for attr in ("config_class", "build"):
        if not hasattr(world, attr):
            raise TypeError(f"world {name!r}: {world.__name__} has no {attr!r}")
    _WORLDS[name] = world


def known_worlds() -> list[str]:
    return sorted(_WORLDS)


def get_world(name: str) -> Any:
    """The world class registered under `name`."""
    entry = _WORLDS.get(name)
    if entry is None:
        raise ConfigError("world", f"unknown world {name!r}; known worlds: {', '.join(known_worlds())}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = _WORLDS[name] = getattr(importlib.import_module(module), attr)
    return entry


def load_run_config(path: str | Path | None, overrides: Sequence[str] = (), default_world: str = "gmm") -> Any:
    """Strict load of any world's run config: file (with its bases), dotted overrides, and the stage's
    preset under them; the world named in the file picks the config class."""
    tree = user_tree(path, overrides, STAGE_PRESETS, "stage")
    world = tree.get("world", default_world)
    if not isinstance(world, str):
        raise ConfigError("world", f"got {world!r}, expected a world name ({', '.join(known_worlds())})")
    return from_dict(get_world(world).config_class, tree)
