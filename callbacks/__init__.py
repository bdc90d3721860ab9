"""Lightning callbacks of marble-pl, installed as ``marble_pl.callbacks``."""

from marble_pl.callbacks.coefficient_ema import CoefficientEMA

__all__ = ["CoefficientEMA"]
