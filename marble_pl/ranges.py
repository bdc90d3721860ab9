"""Numeric ``model.*`` settings in range: pure Python, no torch, so ``marble`` can answer a bad
value before the heavy imports (:mod:`marble_pl.precheck`) and ``MarbleModule.__init__`` checks
the same rules when it is built from Python.

Each raises a :class:`~marble_pl.errors.ConfigError` naming the setting as a config writes it
(``model.lora_rank``) and the values that work.
"""

from __future__ import annotations

from collections.abc import Sequence

from marble_pl.errors import ConfigError

__all__ = ["check_beta", "check_guidance", "check_ranges"]


def check_beta(beta: float) -> None:
    """Raise a clear error unless ``0 < beta <= 1`` (DiffusionNFT's guidance strength)."""
    if not 0 < beta <= 1:
        raise ConfigError(
            f"model.beta must be in (0, 1] (DiffusionNFT uses 0.1 .. 1.0), got {beta}"
        )


def check_ranges(
    *,
    a_max: float,
    t_min: float,
    t_max: float,
    max_nonfinite_steps: int,
    kl_beta: float,
    lora_rank: int,
    lora_alpha: float,
    lora_target_modules: Sequence[str],
    resolution: int,
    gradient_clip_norm: float | None,
    distilled_guidance: float | None = None,
) -> None:
    """Numeric settings are in range; each message says which values work."""
    problems = [
        (
            not a_max > 0,
            f"model.a_max must be > 0 (DiffusionNFT's adv_clip_max, e.g. 5.0), got {a_max}",
        ),
        (
            not 0.0 <= t_min < t_max <= 1.0,
            f"need 0 <= model.t_min < model.t_max <= 1, got t_min={t_min}, t_max={t_max}",
        ),
        (
            max_nonfinite_steps < 1,
            f"model.max_nonfinite_steps must be >= 1 (e.g. 3), got {max_nonfinite_steps}",
        ),
        (not kl_beta >= 0, f"model.kl_beta must be >= 0 (0 turns the KL term off), got {kl_beta}"),
        (
            lora_rank < 1,
            f"model.lora_rank must be >= 1 (the LoRA rank, e.g. 16 or 32), got {lora_rank}",
        ),
        (
            not lora_alpha > 0,
            f"model.lora_alpha must be > 0 (the LoRA scale is lora_alpha / lora_rank, often "
            f"2 x lora_rank), got {lora_alpha}",
        ),
        (
            not lora_target_modules,
            "model.lora_target_modules is empty: list the transformer's linear layers to "
            "adapt, or drop the setting for the default",
        ),
        (
            resolution < 1,
            f"model.resolution must be a positive number of pixels (e.g. 512 for SD3.5), "
            f"got {resolution}",
        ),
        (
            gradient_clip_norm is not None and not gradient_clip_norm > 0,
            f"model.gradient_clip_norm must be > 0, or null to turn clipping off, "
            f"got {gradient_clip_norm}",
        ),
        (
            distilled_guidance is not None and not distilled_guidance > 0,
            f"model.distilled_guidance must be > 0 (FLUX.1-dev's is 3.5), or null for the "
            f"family's own, got {distilled_guidance}",
        ),
    ]
    for failed, message in problems:
        if failed:
            raise ConfigError(message)


def check_guidance(guidance_scale: float) -> None:
    """Training rolls out without classifier-free guidance: the loss's ``v_old`` is unguided."""
    if guidance_scale > 1.0:
        raise ConfigError(
            f"model.guidance_scale={guidance_scale} samples the rollouts with classifier-free "
            "guidance, but the DiffusionNFT loss uses the unguided v_old, so the rollout policy "
            "would differ from the policy in the loss: use model.guidance_scale: 1.0 "
            "(DiffusionNFT trains CFG-free)"
        )
