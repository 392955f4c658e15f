"""The shapes world's rewards (WORLDS.md 2, METHOD.md 5.5): the trained CLIP reward model through CLIPScore
(differentiable) and the verifier's pass/fail (not differentiable: it feeds only the policy gradient, as
GenEval does in the paper)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tiltflow.rewards.base import RewardOutput, RewardSet
from tiltflow.worlds.shapes.scene import parse
from tiltflow.worlds.shapes.verifier import detect, partial_credit, to_uint8, verify


class VerifierReward:
    """1 where the verifier passes the sample for its caption, else 0."""

    name = "verifier"
    differentiable = False

    def __call__(self, samples: Tensor, prompts: Sequence[Any]) -> RewardOutput:
        images = to_uint8(samples)
        verdicts = [verify(img, str(p)) for img, p in zip(images, prompts)]
        scores = torch.tensor([float(v.passed) for v in verdicts], device=samples.device)
        return RewardOutput(scores=scores, extras={"reasons": [v.reason for v in verdicts]})


class PartialVerifierReward:
    """The fraction of the caption's checks the sample meets (verifier.partial_credit): 1 exactly where the
    verifier passes, and a graded score where it fails, so that GRPO sees a difference inside a group whose
    samples all fail (not differentiable either)."""

    name = "verifier_partial"
    differentiable = False

    def __call__(self, samples: Tensor, prompts: Sequence[Any]) -> RewardOutput:
        images = to_uint8(samples)
        scores = [partial_credit(parse(str(p)), detect(img)) for img, p in zip(images, prompts)]
        return RewardOutput(scores=torch.tensor(scores, device=samples.device))


def build_rewards(choices: Sequence[Any], models_dir: str | Path, device: str | torch.device) -> RewardSet:
    from tiltflow.worlds.shapes.reward_model import load_clip_reward

    made = {"verifier": VerifierReward, "verifier_partial": PartialVerifierReward,
            "clip": lambda: load_clip_reward(Path(models_dir) / "reward_model", device=str(device))}
    rewards = [made[c.name]() for c in choices]
    return RewardSet(rewards, [c.weight for c in choices])
