"""A reward placed on another device (its options' device) than the samples: RewardSet brings its scores
back to the samples' device, sums them with a reward on the samples' device, and the gradient of the total
reaches the samples. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tiltflow.rewards.base import RewardOutput, RewardSet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class MeanOn:
    differentiable = True

    def __init__(self, name: str, device: str, scale: float):
        self.name, self.device, self.scale = name, torch.device(device), scale

    def __call__(self, samples, prompts):
        return RewardOutput(scores=self.scale * samples.to(self.device).mean(dim=(1, 2, 3)))


def test_rewards_on_two_devices_sum_on_the_samples_device_with_gradient():
    samples = torch.rand(3, 3, 8, 8, device="cuda", requires_grad=True)
    rewards = RewardSet([MeanOn("here", "cuda", 1.0), MeanOn("there", "cpu", 2.0)], [1.0, 0.5])
    out = rewards(samples, ["a"] * 3)
    assert out.total.device == samples.device and out.per_reward["there"].device == samples.device
    expected = 2.0 * samples.detach().mean(dim=(1, 2, 3))  # 1 * m + 0.5 * (2 m)
    torch.testing.assert_close(out.total.detach(), expected)
    out.total.sum().backward()
    torch.testing.assert_close(samples.grad, torch.full_like(samples, 2.0 / (3 * 8 * 8)))
