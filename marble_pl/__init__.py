"""marble-pl: MARBLE multi-reward RL fine-tuning of flow-matching text-to-image models.

The math lives in small pure modules (:mod:`~marble_pl.advantages`, :mod:`~marble_pl.nft`,
:mod:`~marble_pl.balance`, :mod:`~marble_pl.gradients`); the Lightning glue stays thin.
"""

from marble_pl.notices import install_logging_filters

__version__ = "0.1.0"

install_logging_filters()
