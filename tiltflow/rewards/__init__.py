"""Rewards: the Reward protocol, weighted RewardSets, and scorers (heavy imports are lazy)."""

from tiltflow.rewards.base import Reward, RewardOutput, RewardSet, RewardSetOutput

__all__ = ["Reward", "RewardOutput", "RewardSet", "RewardSetOutput"]
