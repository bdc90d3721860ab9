"""Shared pytest fixtures: tiny SD3 pipelines built offline into a session temp directory."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD3 pipeline (no T5, seed 0) saved with ``save_pretrained``, built once."""
    from marble_pl.models import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"), seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_t5_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny SD3 pipeline with a small T5 encoder and T5 tokenizer (seed 0)."""
    from marble_pl.models import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3_t5"), seed=0, with_t5=True)


@pytest.fixture(autouse=True)
def _seeded_global_rngs() -> None:
    """Every test starts from the same global RNG state (torch, numpy, random), so its draws
    (peft's LoRA A, an unseeded ``randn``) do not depend on which tests ran before it."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
