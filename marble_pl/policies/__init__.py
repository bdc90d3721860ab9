"""Model families as classes: :class:`~marble_pl.policies.base.Policy` and its registry.

A family registers itself on import (``@register_policy("<PipelineClassName>")``); import it
here so :func:`build_policy` finds it. See :mod:`marble_pl.policies.base` for what a family
implements.
"""

from marble_pl.policies import flux, sd3  # noqa: F401  (register FluxPipeline, StableDiffusion3Pipeline)
from marble_pl.policies.base import (
    DEFAULT_PIPELINE,
    Conditioning,
    Policy,
    build_policy,
    pipeline_class_name,
    policy_class,
    register_policy,
)
from marble_pl.policies.flux import FluxPolicy
from marble_pl.policies.sd3 import SD3Policy

__all__ = [
    "DEFAULT_PIPELINE",
    "Conditioning",
    "FluxPolicy",
    "Policy",
    "SD3Policy",
    "build_policy",
    "pipeline_class_name",
    "policy_class",
    "register_policy",
]
