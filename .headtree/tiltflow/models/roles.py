"""The three roles every world provides (METHOD.md 4): the frozen teacher, the few-step generator and the
fake score that tracks it, with the parameters each trainable role owns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tiltflow.models.base import Backbone


@dataclass
class Roles:
    teacher: Backbone
    generator: Backbone
    fake: Backbone
    generator_params: list[nn.Parameter]
    fake_params: list[nn.Parameter]
