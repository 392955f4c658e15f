"""Rewards: the Reward protocol, weighted RewardSets, and scorers (heavy imports are lazy)."""

from tiltflow.rewards.base import Reward, RewardOutput, RewardSet, RewardSetOutput
from tiltflow.rewards.registry import KNOWN_REWARDS, build_reward, build_reward_set

__all__ = ["KNOWN_REWARDS", "Reward", "RewardOutput", "RewardSet", "RewardSetOutput", "build_reward",
           "build_reward_set"]
