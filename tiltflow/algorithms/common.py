"""What the algorithms need from a world: a Task (prompts, conditioning, decoding, rewards) and Roles
(teacher, generator, fake score and their trainable parameters)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from tiltflow.models.base import Backbone, guided_velocity
from tiltflow.models.ema import EMA
from tiltflow.rewards.base import RewardSet


class Task(Protocol):
    sample_shape: tuple[int, ...]
    rewards: RewardSet
    cfg_scale: float
    device: torch.device

    def sample_prompts(self, n: int, generator: torch.Generator) -> list[Any]: ...

    def encode(self, prompts: Sequence[Any]) -> Any: ...

    def encode_uncond(self, n: int) -> Any: ...

    def decode(self, x: Tensor) -> Tensor: ...


@dataclass
class Roles:
    teacher: Backbone
    generator: Backbone
    fake: Backbone
    generator_params: list[nn.Parameter]
    fake_params: list[nn.Parameter]


def step_generator(seed: int, step: int, salt: str = "") -> torch.Generator:
    """A torch.Generator seeded from (seed, step, salt), so a resumed run redraws the same numbers."""
    digest = hashlib.sha256(f"{seed}/{step}/{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def randn(shape: Sequence[int], generator: torch.Generator, like: Tensor | None = None,
          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    if like is not None:
        device, dtype = like.device, like.dtype
    return torch.randn(tuple(shape), generator=generator, dtype=dtype).to(device)


def teacher_velocity(task: Task, roles: Roles, x: Tensor, sigma: Tensor, cond: Any, uncond: Any) -> Tensor:
    return guided_velocity(roles.teacher, x, sigma, cond, uncond, task.cfg_scale)


@dataclass
class TrainState:
    """The checkpointable optimiser state of a two-network algorithm: generator and fake-score
    optimisers and the generator EMA."""

    gen_opt: torch.optim.Optimizer
    fake_opt: torch.optim.Optimizer
    ema: EMA

    def state_dict(self) -> dict:
        return {"gen_opt": self.gen_opt.state_dict(), "fake_opt": self.fake_opt.state_dict(),
                "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gen_opt.load_state_dict(state["gen_opt"])
        self.fake_opt.load_state_dict(state["fake_opt"])
        self.ema.load_state_dict(state["ema"])


def optimizer_step(opt: torch.optim.Optimizer, loss: Tensor, params: list[nn.Parameter], clip: float) -> float:
    """zero_grad, backward, clip the gradient norm, step; returns the norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    opt.step()
    return norm


def check_finite(name: str, value: Tensor, step: int) -> None:
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"non-finite {name} = {float(value.detach())} at step {step}; stopping "
                                 "(the last checkpoint is left intact)")
