"""Rewards: the Reward protocol, a registry of named rewards, and cheap built-in rewards."""

from marble_pl.rewards import builtin as _builtin  # noqa: F401  (registers the built-ins)
from marble_pl.rewards.base import Reward
from marble_pl.rewards.registry import (
    available_rewards,
    build_reward,
    build_rewards,
    register_reward,
)

__all__ = ["Reward", "available_rewards", "build_reward", "build_rewards", "register_reward"]
