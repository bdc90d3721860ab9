"""The OCR reward's rule (DiffusionNFT ``flow_grpo/ocr.py``, used by MARBLE): pure functions.

The target is the text after the prompt's first double quote, up to the next one
(``prompt.split('"')[1]``). Target and recognised text lose their spaces (``" "`` only) and are
lower-cased; the distance is 0 when the target is a substring of the recognised text, else their
Levenshtein distance, capped at ``len(target)``; the reward is ``1 - distance / len(target)``.

Where upstream fails, ours says so: a prompt without a quote (upstream: ``IndexError``) and an
empty target (upstream: ``ZeroDivisionError``) are not applicable, scored NaN; a failed
recognition (``None``) scores 0, upstream's penalty for an OCR exception.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from Levenshtein import distance as levenshtein
from torch import Tensor

__all__ = ["has_target", "normalize", "ocr_distance", "ocr_score", "ocr_scores", "quoted_target"]


def quoted_target(prompt: str) -> str | None:
    """The text after the first ``"`` up to the next one (to the end if none); None without."""
    parts = prompt.split('"')
    return parts[1] if len(parts) > 1 else None


def normalize(text: str) -> str:
    """Spaces removed (only ``" "``, as upstream) and lower-cased."""
    return text.replace(" ", "").lower()


def has_target(prompt: str) -> bool:
    """Whether the OCR reward applies: the prompt quotes a target with a non-space character."""
    target = quoted_target(prompt)
    return target is not None and normalize(target) != ""


def ocr_distance(recognized: str, target: str) -> int:
    """0 if the normalised target is in the normalised text, else their Levenshtein distance,
    capped at the normalised target's length (unrelated extra text costs at most the target)."""
    text, goal = normalize(recognized), normalize(target)
    dist = 0 if goal in text else levenshtein(text, goal)
    return min(dist, len(goal))


def ocr_score(recognized: str | None, prompt: str) -> float:
    """``1 - dist / len(target)`` in ``[0, 1]``; NaN where the prompt has no target, 0 when the
    recognition failed (``None``)."""
    if not has_target(prompt):
        return math.nan
    target = quoted_target(prompt)
    assert target is not None
    if recognized is None:
        return 0.0
    return 1.0 - ocr_distance(recognized, target) / len(normalize(target))


def ocr_scores(recognized: Sequence[str | None], prompts: Sequence[str]) -> Tensor:
    """:func:`ocr_score` of each (text, prompt) pair as a float32 ``[N]`` tensor."""
    if len(recognized) != len(prompts):
        raise ValueError(f"got {len(recognized)} recognised texts for {len(prompts)} prompts")
    return torch.tensor(
        [ocr_score(text, prompt) for text, prompt in zip(recognized, prompts, strict=True)],
        dtype=torch.float32,
    )
