"""What a checkpoint holds of a MARBLE run, and the checks when one is loaded.

Checkpoints keep the LoRA tensors only (every adapter; no base weights), the counters and the
balancer's state. Loading refuses a LoRA that does not fit the configured model, naming the
tensors, and lets the configured optimizer's hyperparameters win over the saved ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from marble_pl.balancers import Balancer
from marble_pl.checks import probe_optimizer
from marble_pl.errors import CheckpointError
from marble_pl.policies import Policy

__all__ = [
    "apply_configured_optimizer_settings",
    "check_lora_keys",
    "load_run_state",
    "lora_only",
    "run_state",
]


def lora_only(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The LoRA tensors of a state dict (trained, sampling and evaluation adapters)."""
    return {k: v for k, v in state_dict.items() if Policy.is_lora_key(k)}


def run_state(counters: dict[str, int], balancer: Balancer) -> dict[str, Any]:
    """The checkpoint's ``marble`` entry: the counters and the balancer's warm start."""
    return {"counters": dict(counters), "balancer": balancer.state_dict()}


def load_run_state(state: dict[str, Any], counters: dict[str, int], balancer: Balancer) -> None:
    """Restore :func:`run_state` (checkpoints written before balancers: the QP warm start)."""
    counters.update(state.get("counters", {}))
    if "balancer" in state:
        balancer.load_state_dict(state["balancer"])
    elif state.get("qp_warm_start") is not None:
        balancer.warm_start = np.asarray(state["qp_warm_start"], dtype=np.float64)


def check_lora_keys(module: LightningModule, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint whose LoRA tensors do not fit this module, naming them.

    ``strict_loading`` is off (checkpoints hold no base weights), so without this check
    missing or extra LoRA tensors would be dropped silently. An evaluation EMA adapter that
    the checkpoint lacks (``eval_ema_decay`` turned on at resume) starts from the trained one.
    """
    saved = checkpoint.get("state_dict") or {}
    expected = {k: v.shape for k, v in module.state_dict().items() if Policy.is_lora_key(k)}
    for key in expected:
        twin = Policy.eval_twin(key)
        if key not in saved and twin != key and twin in saved:
            saved[key] = saved[twin].clone()
    got = {k: v.shape for k, v in saved.items() if Policy.is_lora_key(k)}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or extra or shapes:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        problems = [
            f"{len(keys)} {what}: {few(keys)}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", extra),
                ("of another shape", shapes),
            )
            if keys
        ]
        raise CheckpointError(
            "the checkpoint's LoRA does not fit the configured model ("
            + "; ".join(problems)
            + "): use the config the checkpoint was trained with (its run folder's config.yaml)"
        )


def apply_configured_optimizer_settings(
    checkpoint: dict[str, Any],
    optimizer_factory: OptimizerCallable,
    lr_scheduler_factory: LRSchedulerCallable | None,
) -> None:
    """Overwrite the saved param groups' hyperparameters with the configured optimizer's."""
    states = checkpoint.get("optimizer_states") or []
    if not states:
        return
    configured = probe_optimizer(optimizer_factory).param_groups[0]
    owned_by_scheduler = {"lr", "initial_lr"} if lr_scheduler_factory is not None else set()
    for group in states[0].get("param_groups", []):
        for key, value in configured.items():
            if key != "params" and key not in owned_by_scheduler:
                group[key] = value
