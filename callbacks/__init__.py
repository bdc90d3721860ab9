"""Lightning callbacks of marble-pl, installed as ``marble_pl.callbacks``.

Each is configured from YAML by its ``class_path`` (``marble_pl.callbacks.<Name>``); the class
docstrings list the arguments.
"""

from marble_pl.callbacks.coefficient_ema import CoefficientEMA
from marble_pl.callbacks.gradient_cosine import GradientCosineMonitor
from marble_pl.callbacks.interrupt_checkpoint import InterruptCheckpoint
from marble_pl.callbacks.lora_export import LoraExport
from marble_pl.callbacks.preemption import PreemptionSignal
from marble_pl.callbacks.progress import MarbleProgressBar, MarbleTQDMProgressBar
from marble_pl.callbacks.reward_histograms import RewardHistograms
from marble_pl.callbacks.sample_grid import SampleGrid

__all__ = [
    "CoefficientEMA",
    "GradientCosineMonitor",
    "InterruptCheckpoint",
    "LoraExport",
    "MarbleProgressBar",
    "MarbleTQDMProgressBar",
    "PreemptionSignal",
    "RewardHistograms",
    "SampleGrid",
]
