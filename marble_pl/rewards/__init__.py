"""Rewards: the Reward protocol, a registry of named rewards, and cheap built-in rewards."""

from marble_pl.rewards import builtin as _builtin  # noqa: F401  (registers the built-ins)
from marble_pl.rewards.aesthetic import Aesthetic
from marble_pl.rewards.base import Reward
from marble_pl.rewards.clip_score import CLIPScore
from marble_pl.rewards.geneval import GenEvalReward
from marble_pl.rewards.geneval_remote import GenEvalRemote
from marble_pl.rewards.hpsv2 import HPSv2
from marble_pl.rewards.imagereward import ImageReward
from marble_pl.rewards.ocr import OCRReward
from marble_pl.rewards.pickscore import PickScore
from marble_pl.rewards.pretrained import PretrainedReward, RewardLoadError
from marble_pl.rewards.registry import (
    available_rewards,
    build_reward,
    build_rewards,
    register_reward,
)

__all__ = [
    "Aesthetic",
    "CLIPScore",
    "GenEvalRemote",
    "GenEvalReward",
    "HPSv2",
    "ImageReward",
    "OCRReward",
    "PickScore",
    "PretrainedReward",
    "Reward",
    "RewardLoadError",
    "available_rewards",
    "build_reward",
    "build_rewards",
    "register_reward",
]
