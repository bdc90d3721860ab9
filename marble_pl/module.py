"""``MarbleModule``: one MARBLE training step per batch, with Lightning's manual optimisation.

``training_step`` reads as ARCHITECTURE §2: rollout with the sampling policy ``v_old`` -> K
rewards -> per-reward advantages ``r`` -> DiffusionNFT loss -> per-reward gradients -> balance
(OSQP) -> coefficient EMA -> one update -> ``v_old <- EMA(v_theta)``. The math is in the pure
modules; this file wires them to the models, the optimizer and the logger.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from marble_pl.advantages import (
    StdMode,
    batch_moments,
    group_advantages,
    optimality,
    pooled_std,
)
from marble_pl.balance import BalanceCadence, BalanceOn, BalanceResult, Normalization
from marble_pl.balancers import Balancer, resolve_balancer
from marble_pl.cadence import StepBalance
from marble_pl.checks import (
    check_choices,
    check_guidance,
    check_old_policy_decay,
    check_optimizer,
    check_ranges,
    check_resolution,
    probe_optimizer,
)
from marble_pl.errors import CheckpointError, ConfigError, MarbleUserError
from marble_pl.gradients import (
    GradientSpace,
    masked_mean_weights,
)
from marble_pl.loss_scaling import (
    check_loss_scaling,
    grad_scaler,
    is_overflow,
    scaled_clip,
    skipped_update,
)
from marble_pl.models import (
    DEFAULT_LORA_TARGETS,
    SAMPLING_ADAPTER,
    is_lora_key,
    lora_init_weights,
)
from marble_pl.monitors import GradientContext, GradientWatch, ScoredBatch, StepRecord
from marble_pl.nft import check_beta
from marble_pl.objective import LossMask, StepBatch, TrainingPairs
from marble_pl.policies import Conditioning, Policy, build_policy
from marble_pl.rewards import PretrainedReward, build_rewards
from marble_pl.rewards.base import Metadata
from marble_pl.rollout import RolloutConfig, RolloutOutput
from marble_pl.schedules import DIFFUSIONNFT_DECAY, DecaySchedule, warmup_decay
from marble_pl.spaces import build_space
from marble_pl.timesteps import TimestepSampling, check_timesteps, draw_timesteps

BalancerName = Literal["marble", "weighted_sum", "single"]
LossForm = Literal["reference", "plain"]
NonFinitePolicy = Literal["error", "drop"]

__all__ = ["MarbleModule", "StepRecord", "GradientContext", "NonFiniteRewardError"]


def _metric_key(name: str) -> str:
    """A ModuleDict key for a reward name (which may contain '.')."""
    return name.replace(".", "_")


class NonFiniteRewardError(MarbleUserError, FloatingPointError):
    """A reward model returned NaN/inf; the message names the reward and the fix."""


class MarbleModule(LightningModule):
    """Multi-reward DiffusionNFT fine-tuning of a diffusion transformer's LoRA (a model family's
    :class:`~marble_pl.policies.Policy`), balanced by MARBLE.

    Args:
        pretrained_model_name_or_path: hub id or local directory of a diffusers pipeline; its
            ``model_index.json`` ``_class_name`` picks the family (:mod:`marble_pl.policies`).
        local_files_only: never touch the network when loading (as ``from_pretrained``).
        build_tiny_if_missing: build a tiny random pipeline at that path first when it holds
            none (the offline CPU run of ``configs/tiny.yaml``).
        load_t5: load the T5 text encoder (the third text encoder) when the pipeline has one.
        rewards: reward names or specs (``{"name": ..., **kwargs}`` or ``class_path``), see
            :mod:`marble_pl.rewards`.
        balancer: a :class:`~marble_pl.balancers.Balancer` (YAML: ``class_path`` +
            ``init_args``): ``MinNormBalancer`` (MARBLE's OSQP min-norm QP), ``WeightedSum``
            (one advantage estimator on ``R @ w``: today's practice), ``SingleReward`` (the
            speed reference) or ``GramianWeighting`` (torchjd's UPGrad, MGDA, ...; extra
            ``marble-pl[balancers]``). The names ``marble``, ``weighted_sum`` and ``single``
            are shortcuts for the first three, configured by the next three settings.
        reward_weights: the ``weighted_sum`` shortcut's weights (uniform when None).
        single_reward: index of the reward the ``single`` shortcut trains on.
        gradient_space: where the per-reward gradients and their Gram live. ``gramian``: exact
            LoRA-parameter gradients from two backwards whatever K is (per-sample taps on the
            LoRA layers, :mod:`marble_pl.gramian`); ``parameters``: the same vectors from K
            backwards; ``output``: gradients with respect to the transformer's output, in
            closed form (one backward; a different Gram, so its guarantees hold in output
            space only).
        normalization: the ``marble`` shortcut's gradient normalisation before the QP: ``none``,
            ``l2`` or ``loss``.
        beta: DiffusionNFT's guidance strength, in (0, 1].
        a_max: advantage clip (DiffusionNFT's ``adv_clip_max``); ``r`` in [0, 1].
        advantage_std: the advantages' standard deviation, per reward (the mean is always the
            prompt's group's). ``global``: that of the global batch, every data-parallel rank's
            rollouts (one all-gather); DiffusionNFT's default (``sample.global_std = True``).
            ``group``: each group's own (GRPO-style; it inflates near-ties within a group).
            ``global`` is the default because the toy study (``benchmarks/toy_study.py
            --advantage-std`` in its version of commit 9373154, 3 seeds) shows no clear
            difference: guarded MARBLE's reward gains
            +0.104 / +0.062 / +0.016 with ``global`` against +0.101 / +0.058 / +0.016 with
            ``group`` (every gap under one seed std), every reward up in 3 of 3 seeds and 0 % of
            batches with a negative worst cosine either way; so it follows DiffusionNFT.
        advantage_eps: added to the standard deviation.
        loss_form: ``reference`` (DiffusionNFT's x0-space adaptive-weighted loss, scaled by
            ``a_max / beta``) or ``plain`` (mean squared velocity error).
        kl_beta: weight of ``mean (v_theta - v_ref)^2`` against the frozen base model (0: off).
        old_policy_decay: the sampling policy's EMA ``v_old <- decay * v_old + (1 - decay) *
            v_theta`` after each step: a number (constant decay) or a
            :class:`~marble_pl.schedules.DecaySchedule` ``{hold_steps, slope, max_decay}``,
            decay 0 for ``hold_steps`` steps then ``min(slope * (step - hold_steps), max_decay)``.
            Default: DiffusionNFT's SD 3.5 (multi-reward) ramp ``{0, 0.001, 0.5}``.
            :meth:`sampling_decay` gives the value of the current step.
        lora_rank, lora_alpha, lora_target_modules: the LoRA adapter (peft).
        lora_init: the LoRA's initialisation, B = 0 either way: ``default`` (peft's, A
            Kaiming-uniform) or ``gaussian`` (A ~ N(0, 1/rank^2), peft's ``"gaussian"``: the
            official MARBLE and DiffusionNFT recipes).
        num_inference_steps, guidance_scale, resolution, noise_level: rollout sampler settings.
            ``guidance_scale`` must be <= 1 (no CFG): the loss's ``v_old`` is unguided, as in
            DiffusionNFT, so guided rollouts would come from another policy (a ``ConfigError``).
        solver: the deterministic sampler of rollouts, validation and sample grids: ``euler``
            (diffusers' flow-matching Euler step) or ``dpm2`` (DiffusionNFT's second-order
            multistep DPM-Solver++ on the same sigmas, :mod:`marble_pl.solvers`; the official
            MARBLE recipe's rollouts; needs ``noise_level: 0``).
        t_min, t_max: training timesteps ``t ~ U(t_min, t_max)``.
        optimizer: optimizer over the LoRA parameters (AdamW by default).
        lr_scheduler: optional LR scheduler, stepped every training step.
        gradient_clip_norm: clip the applied gradient's norm (None: off).
        nonfinite_rewards: ``error`` stops with a message naming the reward; ``drop`` gives those
            samples ``r = 0.5`` (no push) for that reward and counts them in a metric. Only
            where the reward applies (:meth:`Reward.applicable`): elsewhere its score (NaN by the
            official convention) is no signal at all, neither an error nor a drop: the sample
            gets ``r = 0.5`` for it and is left out of its group means, its standard deviation
            and its loss's mean (each reward's loss is averaged over the samples it applies to,
            sum / n_valid over the global batch), and a reward with no sample in the batch, or a
            zero or non-finite gradient, leaves the balance with weight 0. Logged:
            ``rewards/<name>/applicable`` and, with a ``source`` in the prompts' metadata,
            ``reward_by_source/<name>/<source>``.
        max_sequence_length: T5 tokens (default 256).
        weights_dtype: dtype of the frozen base model's weights (``bfloat16`` halves their memory on a
            GPU); the LoRA parameters are always kept in float32 for the optimizer.
        gradient_checkpointing: recompute the transformer's activations in the backward pass.
        max_nonfinite_steps: stop with an error after this many NaN/inf updates in a row (each one
            is skipped and counted in ``updates/skipped_nonfinite``).
        timesteps_per_image: training timesteps per rollout image, each with fresh noise: a count
            (``int``) or a fraction of ``num_inference_steps`` (``float``; DiffusionNFT: 0.9).
        timestep_sampling: ``sampler`` (distinct entries of the sampler's own shifted schedule,
            as DiffusionNFT) or ``uniform`` (``t ~ U(t_min, t_max)``).
        micro_batch_size: (image, timestep) pairs per forward/backward; their gradients
            accumulate into ONE optimizer step per rollout batch (None: all pairs at once).
            With more than one micro-batch the balance still sees the whole batch: a no-grad
            forward pass gathers its Gram first (one extra forward of the trained policy).
        rollout_chunk_size: prompts sampled per rollout call (None: the whole batch at once);
            the rollouts do not depend on it (each sample's noise has its own seed).
        lagged_balance: with several micro-batches in ``output`` space, apply the coefficients of
            the earlier batches (``lambda_bar``) and fold this batch's Gram, which the update's
            own forwards give, into them afterwards: no extra forward pass, a one-step lag and
            no guard (the Gram is only known after the update). False: the exact balance of
            the batch, at the cost of one no-grad forward pass of the trained policy.
        balance_every_n_steps: amortize the balance across steps: the per-reward gradients and
            their Gram only every n-th step (``global_step % n == 0``); in between, the earlier
            coefficients (``lambda_bar``, the coefficient EMA's value) are applied with ONE
            backward, as the weighted sum costs. 1: every step. Gradient monitors log on the
            balanced steps only.
        balance_on: ``batch``: a balanced step solves once on the whole batch's gradients.
            ``first_micro_batch`` (the paper authors' amortized balance): a balanced step solves
            on its first micro-batch's gradients only, which apply that fresh ``lambda`` (as
            the coefficient EMA returns it); its other micro-batches apply the cached one
            (``lambda_bar``); the first ``balance_warmup_steps`` steps solve on every
            micro-batch (:class:`~marble_pl.balance.BalanceCadence`). Gradient monitors do not
            see these steps.
        balance_warmup_steps: with ``balance_on: first_micro_batch``, the steps that solve on
            every micro-batch (the authors' ``amortize_warmup``: 1).
        clip_combined_advantage: where cached coefficients apply (between balanced steps, the
            micro-batches that do not solve), clip the combined advantage ``sum_k lambda_k
            A_k`` at ``a_max`` (the paper authors' amortized step) instead of combining the
            per-reward clipped ones (False). The two differ only where some ``|A_k| > a_max``.
        eval_ema_decay: keep an EMA of the trained adapter (a third LoRA adapter, float32) and
            evaluate with it (validation, sample grids): ``decay_t = min((1 + t) / (10 + t),
            eval_ema_decay)`` after update ``t`` (1 for the first: 2/11), as DiffusionNFT's
            evaluation EMA (0.9). ``LoraExport`` and ``marble export`` then write this EMA
            (``lora/``) and the trained adapter beside it (``lora_raw/``). None: evaluate (and
            export) the trained adapter itself.
        eval_num_inference_steps: sampler steps of validation and sample grids (deterministic,
            as DiffusionNFT evaluates at 40); None: the rollout's ``num_inference_steps``.
        seed: base seed of the per-step rollout and timestep generators (exact resume).
        random_weights: build every pipeline component and every pretrained reward model at its
            REAL architecture with random weights instead of loading them
            (:mod:`marble_pl.random_weights`: configs from the local directory or cache, else
            the published ones shipped in :mod:`marble_pl.architectures`; nothing is
            downloaded). Shapes, memory and time are real, images and scores are noise: for
            ``marble preflight`` and benchmarks where no weights can be had.
        architecture_overrides: with ``random_weights``, config entries changed per component,
            e.g. ``{transformer: {num_layers: 2, dual_attention_layers: [0]}}``.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-3.5-medium",
        local_files_only: bool = False,
        build_tiny_if_missing: bool = False,
        load_t5: bool = True,
        weights_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        rewards: Sequence[str | dict[str, Any]] = ("brightness", "saturation", "compressibility"),
        balancer: BalancerName | Balancer = "marble",
        reward_weights: Sequence[float] | None = None,
        single_reward: int = 0,
        gradient_space: GradientSpace = "output",
        normalization: Normalization = "none",
        beta: float = 1.0,
        a_max: float = 5.0,
        advantage_std: StdMode = "global",
        advantage_eps: float = 1e-4,
        loss_form: LossForm = "reference",
        kl_beta: float = 0.0,
        old_policy_decay: float | DecaySchedule = DIFFUSIONNFT_DECAY,
        lora_rank: int = 32,
        lora_alpha: float = 64.0,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        lora_init: Literal["default", "gaussian"] = "default",
        num_inference_steps: int = 10,
        guidance_scale: float = 1.0,
        resolution: int = 512,
        noise_level: float = 0.0,
        solver: Literal["euler", "dpm2"] = "euler",
        t_min: float = 0.0,
        t_max: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_norm: float | None = 1.0,
        nonfinite_rewards: NonFinitePolicy = "error",
        max_sequence_length: int = 256,
        max_nonfinite_steps: int = 3,
        timesteps_per_image: int | float = 1,
        timestep_sampling: TimestepSampling = "sampler",
        micro_batch_size: int | None = None,
        rollout_chunk_size: int | None = None,
        lagged_balance: bool = False,
        balance_every_n_steps: int = 1,
        balance_on: BalanceOn = "batch",
        balance_warmup_steps: int = 1,
        clip_combined_advantage: bool = False,
        eval_ema_decay: float | None = None,
        eval_num_inference_steps: int | None = None,
        seed: int = 0,
        random_weights: bool = False,
        architecture_overrides: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if architecture_overrides and not random_weights:
            raise ConfigError(
                "model.architecture_overrides changes the architecture of a randomly initialised "
                "model: set model.random_weights: true, or drop the overrides"
            )
        schedule = check_old_policy_decay(old_policy_decay)
        old_policy_decay = schedule.as_plain()  # hparams/checkpoints hold plain data only
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "balancer"])
        # hparams and checkpoints hold plain data: a name, or the balancer class's spec
        self.balancer = resolve_balancer(
            balancer,
            reward_weights=reward_weights,
            single_reward=single_reward,
            normalization=normalization,
        )
        self.hparams["balancer"] = balancer if isinstance(balancer, str) else self.balancer.spec()
        self.old_policy_schedule = schedule
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the LoRA weights only, not the base model
        check_beta(beta)
        check_choices(gradient_space, loss_form, nonfinite_rewards, weights_dtype)
        check_ranges(
            a_max=a_max,
            t_min=t_min,
            t_max=t_max,
            max_nonfinite_steps=max_nonfinite_steps,
            kl_beta=kl_beta,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_target_modules=lora_target_modules,
            resolution=resolution,
            gradient_clip_norm=gradient_clip_norm,
        )
        check_guidance(guidance_scale)
        lora_init_weights(lora_init)
        check_optimizer(optimizer, lr_scheduler)

        self.rewards = build_rewards(list(rewards))
        for reward in self.rewards:  # pretrained rewards: real shapes, random weights too
            if random_weights and isinstance(reward, PretrainedReward):
                reward.random_weights = True
        self.reward_names: list[str] = [rw.name for rw in self.rewards]
        self.balancer.bind(self.reward_names)
        k = len(self.reward_names)
        if reward_weights is not None and len(reward_weights) != k:  # whatever the balancer
            raise ConfigError(
                f"model.reward_weights has {len(reward_weights)} entries for {k} rewards "
                f"{self.reward_names}: give one weight per reward, in the same order"
            )
        try:
            self.rollout_config = RolloutConfig(
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                noise_level=noise_level,
                solver=solver,
            )
            self.eval_rollout_config = replace(
                self.rollout_config,
                num_inference_steps=eval_num_inference_steps or num_inference_steps,
                noise_level=0.0,
            )
        except ValueError as err:  # its messages start with the field, as model.<field> is named
            raise ConfigError(f"model.{err}") from err
        if eval_num_inference_steps is not None and eval_num_inference_steps < 1:
            raise ConfigError(
                f"model.eval_num_inference_steps must be >= 1 (DiffusionNFT: 40), or null, got "
                f"{eval_num_inference_steps}"
            )
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.val_rewards = torch.nn.ModuleDict(
            {_metric_key(name): MeanMetric() for name in self.reward_names}
        )
        self.counters = {
            "qp_fallbacks": 0,
            "nonfinite_rewards": 0,
            "skipped_nonfinite": 0,
            "skipped_zero_grad": 0,
            "skipped_no_reward": 0,
            "nonfinite_streak": 0,
        }
        self.last_step: StepRecord | None = None
        self.last_timing: dict[str, float] = {}
        self.policy: Policy | None = None
        self._configured = False
        self.timesteps_count = check_timesteps(
            timesteps_per_image, timestep_sampling, num_inference_steps
        )
        if balance_every_n_steps < 1:
            raise ConfigError(
                f"model.balance_every_n_steps must be >= 1 (1: balance every step), got "
                f"{balance_every_n_steps}"
            )
        try:
            cadence = BalanceCadence(balance_every_n_steps, balance_on, balance_warmup_steps)
        except ValueError as err:
            raise ConfigError(
                f"model.balance_on / balance_warmup_steps: {err} (balance_on: batch or "
                "first_micro_batch; balance_warmup_steps >= 0)"
            ) from err
        self.balancing = StepBalance(self, build_space(gradient_space, self), cadence)
        for name, value in (
            ("micro_batch_size", micro_batch_size),
            ("rollout_chunk_size", rollout_chunk_size),
        ):
            if value is not None and value < 1:
                raise ConfigError(
                    f"model.{name} must be >= 1, or null for all at once, got {value}"
                )

    # ------------------------------------------------------------------ models

    def setup(self, stage: str) -> None:
        """Check ``model.resolution`` against the model's configs, before its weights load.

        Lightning calls ``setup`` before ``configure_model``. Only the transformer's and the VAE's
        ``config.json`` are read; a path the tiny pipeline is still to be built at (or configs
        that cannot be read) is checked after loading, in ``configure_model``.
        """
        hp = self.hparams
        check_loss_scaling(grad_scaler(self._trainer), hp.gradient_space, hp.weights_dtype)
        if stage == "fit":
            self._check_micro_batch_size(getattr(self._trainer, "datamodule", None))
        path = hp.pretrained_model_name_or_path
        if self._configured or (hp.build_tiny_if_missing and not Path(path).is_dir()):
            return
        sizes = build_policy(hp).resolution_sizes()
        if sizes is not None:
            check_resolution(hp.resolution, *sizes)

    def _check_micro_batch_size(self, data: Any) -> None:
        """Say so when a micro-batch is larger than a step's (image, timestep) pairs: the step
        then runs as ONE micro-batch, which is not what the setting asked for."""
        size = self.hparams.micro_batch_size
        batch, group = getattr(data, "batch_size", None), getattr(data, "group_size", None)
        if size is None or not isinstance(batch, int) or not isinstance(group, int):
            return
        pairs = batch * group * self.timesteps_count
        if size > pairs:
            rank_zero_warn(
                f"model.micro_batch_size is {size} but a step has only {pairs} (image, timestep) "
                f"pairs per process ({batch} prompts x {group} images x {self.timesteps_count} "
                f"timesteps): each step runs as one micro-batch of {pairs}; set "
                f"--model.micro_batch_size to at most {pairs} (or null) to silence this"
            )

    def configure_model(self) -> None:
        """Load the model family's policy (:mod:`marble_pl.policies`): its parts, the trained
        LoRA and the sampling-policy copy, registered here so Lightning moves them."""
        if self._configured:
            return
        hp = self.hparams
        self.policy = build_policy(hp)
        if hp.build_tiny_if_missing:
            self._ensure_tiny_model(hp.pretrained_model_name_or_path)
        self.policy.load()
        for name, part in self.policy.modules().items():
            setattr(self, name, part)
        self.lora_params = self.policy.lora_params
        self._configured = True

    def _ensure_tiny_model(self, path: str) -> None:
        """Build a missing tiny pipeline on global rank 0 while the other ranks wait at a barrier.

        Ranks racing to build (or loading a folder still being written) load a half-built one.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            self.policy.build_tiny(path)
            return
        if trainer.is_global_zero:
            self.policy.build_tiny(path)
        trainer.strategy.barrier("marble_ensure_tiny_model")

    def train(self, mode: bool = True) -> MarbleModule:
        """Keep the policy's frozen parts (VAE, text encoders) in eval mode whatever Lightning
        asks."""
        super().train(mode)
        for frozen in self.policy.frozen_modules() if self.policy is not None else ():
            frozen.eval()
        return self

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.lora_params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ pieces of a step

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Text conditioning of ``prompts`` from the policy's frozen encoders."""
        return self.policy.encode(prompts)

    def _per_sample(self, n: int, stream: int, draw: Callable[[torch.Generator], Tensor]) -> Tensor:
        """Stack ``draw(g_i)`` over this rank's samples, ``g_i`` seeded by the GLOBAL sample index.

        So a sample's noise, timestep and rollout do not depend on how the global batch is split
        over data-parallel ranks, nor on what ran before (exact resume).
        """
        return torch.stack([draw(gen) for gen in self._sample_generators(n, stream)]).to(
            self.device
        )

    def _sample_generators(self, n: int, stream: int) -> list[torch.Generator]:
        """One CPU generator per sample of this rank, seeded by (seed, step, stream, GLOBAL index)."""
        start = self.global_rank * n
        base = (self.hparams.seed * 1_000_003 + self.global_step * 7919 + stream * 104_729) % (
            2**31
        )
        return [
            torch.Generator(device="cpu").manual_seed(base * 2**31 + i)
            for i in range(start, start + n)
        ]

    def sample(
        self,
        prompts: Sequence[str],
        generator: torch.Generator | list[torch.Generator],
        adapter: str | None = SAMPLING_ADAPTER,
        noise: Tensor | None = None,
        config: RolloutConfig | None = None,
    ) -> RolloutOutput:
        """Roll out one image per prompt with the given adapter (``v_old`` by default) and
        sampler settings (the training rollout's by default; :attr:`eval_rollout_config`)."""
        return self.policy.sample(prompts, generator, adapter, noise, config or self.rollout_config)

    @torch.no_grad()
    def score(
        self, images: Tensor, prompts: Sequence[str], metadata: Metadata | None = None
    ) -> Tensor:
        """``R [N, K]``: every reward on every image (float32); ``metadata``: one dict per image
        (the prompt's source and fields), passed to the rewards that take it."""
        return torch.stack(
            [rw(images, prompts, metadata=metadata).float() for rw in self.rewards], dim=1
        )

    def applicability(self, prompts: Sequence[str], metadata: Metadata | None = None) -> Tensor:
        """``[N, K]`` bool: the samples each reward scores (:meth:`Reward.applicable`).

        Decided from the prompts and their metadata alone (OCR: quoted text; GenEval: an
        ``include`` field), so it is known before scoring and agrees on every rank. A reward
        does not apply elsewhere: its score there is ignored (NaN by the official convention),
        which is neither an error nor a drop.
        """
        n, cols = len(prompts), []
        for name, reward in zip(self.reward_names, self.rewards, strict=True):
            col = torch.as_tensor(reward.applicable(prompts, metadata))
            if col.shape != (n,):
                raise ValueError(
                    f"reward {name!r}: applicable() returned shape {tuple(col.shape)} for {n} "
                    f"prompts: return a bool tensor of shape [{n}], one entry per prompt"
                )
            cols.append(col.to(torch.bool).cpu())
        return torch.stack(cols, dim=1).to(self.device)

    def estimators(
        self, rewards: Tensor, group_ids: Tensor, bad: Tensor, applicable: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(r_each [N, K], r [N, J], mask [N, J])``: one estimator per reward, and the one(s)
        the update trains on with the samples each applies to: ``r_each`` and ``applicable``
        themselves, or the baselines' ONE estimator on ``R @ w`` (:meth:`Balancer.mix`)."""
        r_each = self.optimality_probabilities(rewards, group_ids, bad, None, applicable)
        mix = self.balancer.mix()
        if mix is None:
            return r_each, r_each, applicable
        r = self.optimality_probabilities(rewards, group_ids, bad, mix, applicable)
        return r_each, r, self.mixed_applicability(applicable, mix)

    @staticmethod
    def mixed_applicability(applicable: Tensor, combine: np.ndarray) -> Tensor:
        """``[N, 1]``: the samples ``R @ w`` applies to: some reward with ``w_k > 0`` applies."""
        w = torch.as_tensor(combine, device=applicable.device) > 0
        return (applicable & w).any(1, keepdim=True)

    def loss_mask(self, mask: Tensor, count: int) -> LossMask:
        """Each column's loss averaged over its valid pairs (``mask [N, J]``, ``count`` timesteps
        per image), with the count taken over every data-parallel rank (one small all-reduce;
        every rank must call this)."""
        counts = self._all_reduce_sum(mask.sum(0).to(torch.float64))
        weights = masked_mean_weights(mask, counts * count).to(torch.float32)
        return LossMask(mask, counts, weights)

    def _check_finite(self, rewards: Tensor, applicable: Tensor | None = None) -> Tensor:
        """Apply the non-finite policy: a clear error, or a mask of the rows to neutralise.

        Only where the reward applies: a NaN where it does not is its "not applicable".
        """
        bad = ~torch.isfinite(rewards)
        if applicable is not None:
            bad &= applicable.to(bad.device)
        if not bad.any():
            return bad
        names = [self.reward_names[k] for k in bad.any(0).nonzero().flatten().tolist()]
        if self.hparams.nonfinite_rewards == "error":
            raise NonFiniteRewardError(
                f"reward(s) {names} returned NaN/inf for {int(bad.sum())} of {bad.numel()} scores at "
                f"step {self.global_step}. Fix the reward model, or set "
                "`model.nonfinite_rewards: drop` to give those samples no push (counted in "
                "`rewards/nonfinite`)."
            )
        self.counters["nonfinite_rewards"] += int(bad.sum())
        return bad

    def optimality_probabilities(
        self,
        rewards: Tensor,
        group_ids: Tensor,
        bad: Tensor,
        combine: np.ndarray | None = None,
        applicable: Tensor | None = None,
        clip: bool = True,
    ) -> Tensor:
        """``r``: ``[N, K]``, one estimator per reward; or ``[N, 1]`` on ``R @ combine``.

        ``clip=False``: ``r = 0.5 + 0.5 A / a_max`` without clipping ``A`` (outside ``[0, 1]``
        where ``|A| > a_max``), for a combination clipped afterwards.

        ``combine`` is the weighted sum's ``w`` (a one-hot for ``single``). Dropped (non-finite)
        scores get their group's mean before the advantages and ``r = 0.5`` after. With
        ``advantage_std: global`` the standard deviation is that of the global batch, every
        data-parallel rank's rewards (one small all-gather; every rank must call this).

        ``applicable`` (``[N, K]`` bool, all True when None): a reward's group means and
        standard deviation use the samples it applies to only, and the others get ``r = 0.5``
        for it (advantage 0). ``R @ w`` renormalises ``w`` per sample over the rewards that
        apply to it, ``sum_k w_k a_ik R_ik / sum_k w_k a_ik``; a sample none of whose weighted
        rewards applies is outside the combined estimator (``r = 0.5``). Applicability is a
        property of the prompt, so a group's samples share their weights and the group-centred
        combination compares like with like.
        """
        hp = self.hparams
        app = torch.ones_like(bad) if applicable is None else applicable.to(bad.device)
        valid = app & ~bad
        clean = torch.where(valid, rewards, torch.zeros_like(rewards))
        if bad.any():
            clean = self._fill_group_mean(clean, bad, group_ids, valid)
        mask = app
        if combine is not None:
            w = torch.as_tensor(combine, dtype=clean.dtype, device=clean.device)
            bad = bad[:, w > 0].any(1, keepdim=True)
            mask = self.mixed_applicability(app, combine)
            if app.all():
                clean = (clean @ w).unsqueeze(1)
            else:  # renormalise w per sample over the rewards that apply to it
                wm = app.to(clean.dtype) * w
                total = wm.sum(1, keepdim=True)
                clean = (clean * wm).sum(1, keepdim=True) / torch.where(mask, total, 1.0)
        keep = None if mask.all() else mask  # the unmasked path when every reward applies
        sigma = self._global_std(clean, keep) if hp.advantage_std == "global" else None
        adv = group_advantages(
            clean,
            group_ids,
            eps=hp.advantage_eps,
            std=hp.advantage_std,
            global_std=sigma,
            mask=keep,
        )
        r = optimality(adv, hp.a_max) if clip else 0.5 + 0.5 * adv / hp.a_max
        return torch.where(bad | ~mask, torch.full_like(r, 0.5), r)

    @staticmethod
    def _fill_group_mean(
        values: Tensor, bad: Tensor, group_ids: Tensor, valid: Tensor | None = None
    ) -> Tensor:
        """Each dropped score takes the mean of its group's valid scores of that reward."""
        valid = ~bad if valid is None else valid
        out = values.clone()
        for g in group_ids.unique():
            rows = group_ids == g
            for k in range(values.shape[1]):
                ok = rows & valid[:, k]
                fill = values[ok, k].mean() if ok.any() else values.new_zeros(())
                out[rows & bad[:, k], k] = fill
        return out

    def velocity(self, x_t: Tensor, t: Tensor, *cond: Tensor) -> Tensor:
        """``v(x_t, t | cond)`` in float32 from the policy with whichever adapter is active."""
        return self.policy.velocity(x_t, t, *cond)

    @staticmethod
    def trains_any_reward(weights: np.ndarray, present: np.ndarray) -> bool:
        """Whether the update trains some reward: one with a nonzero coefficient has samples."""
        w = np.asarray(weights, dtype=np.float64)
        return bool(np.any((w != 0) & np.asarray(present, dtype=bool)))

    def _grad_norm(self) -> float:
        """Norm of the gradient about to be applied (identical on every rank after the sync)."""
        norms = [p.grad.detach().double().norm() for p in self.lora_params if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0

    def _skip_reason(self, norm: float, trains: bool = True) -> str | None:
        """``None`` to step, else why this update is skipped (counted in ``updates/skipped_*``).

        A non-finite gradient (NaN/inf loss) skips the step; ``max_nonfinite_steps`` of them in a
        row stop the run with an error, rather than silently training on nothing. An all-zero
        gradient (every reward constant within its groups, say) skips the step too, and so does
        one that trains no reward (``trains`` False: no reward with a coefficient has a sample,
        or none has a usable gradient; the KL term alone is not applied).
        """
        if is_overflow(norm, grad_scaler(self._trainer)):  # fp16: the scaler backs off
            self.counters["skipped_overflow"] = self.counters.get("skipped_overflow", 0) + 1
            return "overflow"
        if not math.isfinite(norm):
            self.counters["skipped_nonfinite"] += 1
            self.counters["nonfinite_streak"] += 1
            if self.counters["nonfinite_streak"] >= self.hparams.max_nonfinite_steps:
                raise FloatingPointError(
                    f"the update was NaN/inf in {self.counters['nonfinite_streak']} steps in a row "
                    f"(up to step {self.global_step}): lower the learning rate, check the rewards "
                    "for extreme values, or use `trainer.precision: 32-true` to rule out "
                    "overflow; `model.max_nonfinite_steps` sets how many are tolerated."
                )
            return "nonfinite"
        self.counters["nonfinite_streak"] = 0
        if norm == 0.0:
            self.counters["skipped_zero_grad"] += 1
            return "zero"
        if not trains:
            self.counters["skipped_no_reward"] += 1
            return "no_reward"
        return None

    def _all_reduce_sum(self, x: Tensor) -> Tensor:
        """Sum over data-parallel ranks (identity on one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.trainer.strategy.reduce(x, reduce_op="sum")

    def _broadcast(self, weights: np.ndarray) -> np.ndarray:
        """Rank 0's coefficients on every rank, so all ranks apply the very same update."""
        if self._trainer is None or self.trainer.world_size == 1:
            return weights
        return np.asarray(self.trainer.strategy.broadcast(weights, src=0))

    def _all_reduce_mean(self, x: Tensor) -> Tensor:
        """Mean over data-parallel ranks, as DDP averages gradients (identity on one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self._all_reduce_sum(x) / self.trainer.world_size

    # ------------------------------------------------------------------ the step

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One MARBLE step on a batch of prompts (ARCHITECTURE §2), one optimizer update."""
        prompts, group_ids = batch["prompts"], batch["group_ids"].to(self.device)
        metadata, n, t0 = batch.get("metadata"), len(prompts), time.perf_counter()

        # 1. Rollout with the sampling policy v_old (no grad), per-sample seeded noise.
        out = self.rollout_batch(prompts)
        t1 = time.perf_counter()

        # 2-3. K rewards -> per-reward advantages -> optimality probabilities r.
        rewards = self.score(out.images, prompts, metadata)
        applicable = self.applicability(prompts, metadata)  # [N, K]: where each reward applies
        bad = self._check_finite(rewards, applicable)
        r_each, r, mask = self.estimators(rewards, group_ids, bad, applicable)  # r: what trains
        r_each, r = r_each.to(out.latents.dtype), r.to(out.latents.dtype)
        t2 = time.perf_counter()

        # 4. Training pairs: T timesteps per image, fresh noise each, x_t on the forward process.
        #    Each reward's loss is averaged over the pairs it applies to (global count): w [N, J].
        pairs = self.training_pairs(out.latents)
        each = self.loss_mask(applicable, pairs.count)  # per reward
        train = each if mask is applicable else self.loss_mask(mask, pairs.count)  # r's columns
        step = StepBatch(pairs, self.policy.condition(out), r, train.weights, train.present)
        watch = GradientWatch(
            self, ScoredBatch(rewards, group_ids, bad, r_each, applicable, each), step
        )
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)

        # 5-7. Per-reward gradients in the gradient space -> balance (OSQP) -> coefficient EMA,
        #      or the earlier coefficients, as the cadence says (marble_pl.cadence).
        unclipped = partial(  # r without the per-reward clip (clip_combined_advantage)
            self.optimality_probabilities, rewards, group_ids, bad, None, applicable, clip=False
        )
        plan = self.balancing.plan(step, unclipped, monitored=bool(watch.monitors))
        watch.before(plan)

        # 8. ONE update along d = sum_k lambda_bar_k g_k (+ the KL gradient), all micro-batches.
        loss, kl = self.balancing.apply(plan, step)
        watch.after(plan)
        if self.optimizer_step_or_skip(opt, self.trains_any_reward(plan.weights, step.present)):
            self.update_adapter_averages()  # 9. v_old <- EMA(v_theta) on the LoRA weights.
        t3 = time.perf_counter()

        self.last_step = StepRecord(
            rewards, r_each, r, plan.gram, plan.raw, plan.weights, plan.grads, plan.direction,
            plan.result, applicable, train.weights,
        )  # fmt: skip
        times = (t1 - t0, t2 - t1, t3 - t2)
        self.last_timing = dict(zip(("rollout_s", "reward_s", "update_s"), times, strict=True))
        unused = bad | ~applicable  # scores that are no reward's signal: not in the means
        self._log_step(rewards, unused, loss, kl, plan.raw, plan.weights, plan.result, times, n)
        self._log_applicability(rewards, unused, each.counts, metadata, n)
        return loss.detach()

    # ------------------------------------------------------------------ stages of a step

    def rollout_batch(self, prompts: Sequence[str]) -> RolloutOutput:
        """Roll out the batch with ``v_old``, ``rollout_chunk_size`` prompts per call.

        Every random draw (initial noise, the SDE's step noise) comes from the sample's own
        generator, seeded by its global index: a sample's rollout does not depend on the chunking,
        on the data-parallel split, nor on what ran before.
        """
        n = len(prompts)
        shape = self.policy.latent_shape(self.rollout_config)
        noise = self._per_sample(n, 0, lambda g: torch.randn(shape, generator=g))
        sde = self._sample_generators(n, 3)  # the SDE's per-step noise, per sample too
        size = self.hparams.rollout_chunk_size or n
        outs = [
            self.sample(prompts[i : i + size], sde[i : i + size], noise=noise[i : i + size])
            for i in range(0, n, size)
        ]
        if len(outs) == 1:
            return outs[0]
        return RolloutOutput(
            **{f.name: torch.cat([getattr(o, f.name) for o in outs]) for f in fields(RolloutOutput)}
        )

    def training_pairs(self, x0: Tensor) -> TrainingPairs:
        """``T`` timesteps per image (seeded by the image's global index), fresh noise each."""
        hp = self.hparams
        n, count = x0.shape[0], self.timesteps_count
        sigmas = self.policy.schedule_sigmas(hp.num_inference_steps, tuple(x0.shape[1:]))
        t = self._per_sample(
            n,
            1,
            lambda g: draw_timesteps(g, count, hp.timestep_sampling, sigmas, hp.t_min, hp.t_max),
        ).to(x0.dtype)  # [N, T]
        eps = self._per_sample(n, 2, lambda g: torch.randn((count, *x0.shape[1:]), generator=g))
        eps = eps.to(x0.dtype).flatten(0, 1)  # [N * T, ...], image-major
        x0_p = x0.repeat_interleave(count, dim=0)
        t = t.flatten()
        tt = t.view(-1, *([1] * (x0.ndim - 1)))
        image = torch.arange(n, device=x0.device).repeat_interleave(count)
        return TrainingPairs((1 - tt) * x0_p + tt * eps, t, eps - x0_p, image, count)

    def optimizer_step_or_skip(self, opt: Any, trains: bool = True) -> bool:
        """Clip and step on the accumulated gradient; False when the update was skipped.

        A NaN/inf or all-zero gradient skips the update (:meth:`_skip_reason`): parameters
        without ``.grad`` are left alone by torch optimizers (weights AND state), and the step
        still counts, so ``max_steps``, schedules and seeds stay aligned.
        """
        clip = self.hparams.gradient_clip_norm
        skip = self._skip_reason(self._grad_norm(), trains)
        scaler = grad_scaler(self._trainer)  # fp16: the gradients are still scaled here
        if skip is None and clip is not None:
            clip = scaled_clip(clip, scaler)
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        with skipped_update(opt, scaler, skip):
            opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return skip is None

    def update_adapter_averages(self) -> None:
        """``v_old <- EMA(v_theta)`` (:meth:`sampling_decay`), and the evaluation EMA if on."""
        eval_decay = self.hparams.eval_ema_decay
        if eval_decay is not None:  # global_step already counts this update: DiffusionNFT's
            eval_decay = warmup_decay(self.global_step, eval_decay)  # ema.step(global_step)
        self.policy.update_adapter_averages(self.sampling_decay(), eval_decay)

    @property
    def eval_adapter(self) -> str:
        """The adapter validation and sample grids sample with (the EMA one when kept)."""
        return self.policy.eval_adapter

    def _no_sync_unless(self, last: bool) -> Any:
        """DDP's ``no_sync`` for all but the last micro-batch: gradients all-reduce once."""
        model = getattr(self.trainer.strategy, "model", None) if self._trainer is not None else None
        if last or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()

    # ------------------------------------------------------------------ logging

    def effective_weights(self, weights: np.ndarray) -> np.ndarray:
        """Per-reward weights of an update: ``lambda`` (marble), ``w`` (weighted_sum), one-hot (single)."""
        return self.balancer.effective_weights(weights)

    def _logger_writes_this_step(self) -> bool:
        """Whether Lightning's logger writes this step's metrics (``log_every_n_steps``).

        Called after the optimizer step, when ``global_step`` already counts this step. The
        per-reward detail metrics (K of each) are only assembled on those steps: on the others
        ``self.log`` would store them for nothing, a cost that grows with K.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        every = max(int(trainer.log_every_n_steps), 1)
        return trainer.global_step % every == 0 or bool(trainer.should_stop)

    def _log_step(
        self,
        rewards: Tensor,
        bad: Tensor,
        loss: Tensor,
        kl: Tensor | None,
        raw: np.ndarray,
        weights: np.ndarray,
        result: BalanceResult | None,
        times: tuple[float, float, float],
        n: int,
    ) -> None:
        details = self._logger_writes_this_step()
        log = {"loss": float(loss.detach())}
        for k, name in enumerate(self.reward_names):
            ok = ~bad[:, k]
            vals = rewards[ok, k]
            if not vals.numel():  # no score of this reward in the batch (not applicable)
                continue
            self.log(f"reward/{name}/mean", float(vals.mean()), prog_bar=True, batch_size=n)
            log[f"reward/{name}/std"] = float(vals.std()) if vals.numel() > 1 else 0.0
        if not details:  # nothing below would reach the logger this step: skip its cost
            return
        raw, weights = self.effective_weights(raw), self.effective_weights(weights)
        for name, lam, lam_bar in zip(self.reward_names, raw, weights, strict=True):
            log[f"lambda/{name}"] = float(lam)
            log[f"lambda_ema/{name}"] = float(lam_bar)
        if result is not None:
            log["qp/solve_ms"] = result.solve_seconds * 1e3
            log["qp/status"] = float(not result.fallback)  # 1: the balancer solved its problem
            log["qp/fallbacks"] = float(self.counters["qp_fallbacks"])
        if kl is not None:
            log["kl"] = float(kl.detach())
        ema = self.balancing.ema()
        if ema is not None and result is not None:
            log["lambda/guarded"] = float(ema.guarded)
        if ema is not None:
            log["lambda/guarded_between"] = float(ema.guarded_between)
            log["lambda/guard_infeasible"] = float(ema.infeasible)
        log["rewards/nonfinite"] = float(self.counters["nonfinite_rewards"])
        log["updates/skipped_nonfinite"] = float(self.counters["skipped_nonfinite"])
        log["updates/skipped_zero_grad"] = float(self.counters["skipped_zero_grad"])
        log["updates/skipped_no_reward"] = float(self.counters["skipped_no_reward"])
        rollout_s, reward_s, update_s = times
        log.update(
            {
                "time/rollout_s": rollout_s,
                "time/reward_s": reward_s,
                "time/update_s": update_s,
                "throughput/images_per_s": n / max(rollout_s + reward_s + update_s, 1e-9),
            }
        )
        self.log_dict(log, batch_size=n)

    def _log_applicability(
        self,
        rewards: Tensor,
        unused: Tensor,
        counts: Tensor,
        metadata: Metadata | None,
        n: int,
    ) -> None:
        """``rewards/<name>/applicable``: the global batch's samples each reward applies to;
        ``reward_by_source/<name>/<source>``: this rank's mean score per prompt source (metadata
        ``source``, when the batch has it), over the samples the reward scored."""
        if not self._logger_writes_this_step():
            return
        log = {
            f"rewards/{name}/applicable": float(count)
            for name, count in zip(self.reward_names, counts.tolist(), strict=True)
        }
        sources = [str((m or {}).get("source", "")) for m in (metadata or [])]
        for source in sorted(set(sources) - {""}):
            rows = torch.tensor([s == source for s in sources], device=rewards.device)
            tag = re.sub(r"[^A-Za-z0-9_.\-]", "_", source)
            for k, name in enumerate(self.reward_names):
                vals = rewards[rows & ~unused[:, k], k]
                if vals.numel():
                    log[f"reward_by_source/{name}/{tag}"] = float(vals.mean())
        self.log_dict(log, batch_size=n)

    # ------------------------------------------------------------------ validation

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Score the trained policy on fixed prompts and seeds: ``val/reward/<name>``.

        Each image's noise comes from its own generator, seeded by the prompt's index in the
        validation file (``batch["indices"]``), so an image does not depend on the batch it is
        in nor on the data-parallel split. Means are torchmetrics ``MeanMetric`` states: exact
        over all batches and ranks (the data module shards the prompts without repeats).
        """
        prompts = batch["prompts"]
        indices = batch.get("indices")
        if indices is None:  # a data module without indices: consecutive batches of equal size
            indices = torch.arange(len(prompts)) + batch_idx * len(prompts)
        out = self.sample(
            prompts,
            self.validation_generators(indices),
            adapter=self.eval_adapter,
            config=self.eval_rollout_config,
        )
        rewards = self.score(out.images, prompts, batch.get("metadata"))
        applicable = self.applicability(prompts, batch.get("metadata"))
        for k, name in enumerate(self.reward_names):
            metric = self.val_rewards[_metric_key(name)]
            values = rewards[:, k]
            metric.update(values[values.isfinite() & applicable[:, k]])
            self.log(f"val/reward/{name}", metric, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        """``val/reward_mean``: the mean of the ``val/reward/<name>`` means (each reward on its
        own scale; one with no scored prompt left out), for best-checkpoint selection
        (``ModelCheckpoint(monitor="val/reward_mean", mode="max")``)."""
        with warnings.catch_warnings():  # a reward that scored nothing: torchmetrics warns
            warnings.simplefilter("ignore")
            means = torch.stack([m.compute().float().cpu() for m in self.val_rewards.values()])
        finite = means[means.isfinite()]
        value = finite.mean() if finite.numel() else torch.tensor(float("nan"))
        self.log("val/reward_mean", value, on_step=False, on_epoch=True, sync_dist=False)

    def validation_generators(self, indices: Tensor) -> list[torch.Generator]:
        """One CPU generator per validation prompt, seeded by ``(seed, prompt index)`` only.

        The same prompt gets the same noise at every validation, so ``val/reward`` moves only
        when the policy does.
        """
        base = (self.hparams.seed * 1_000_003 + 7919) % (2**31)
        return [torch.Generator(device="cpu").manual_seed(base * 2**31 + int(i)) for i in indices]

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the LoRA weights (trained and sampling adapters) and the solver warm start."""
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if is_lora_key(k)
        }
        checkpoint["marble"] = {
            "counters": dict(self.counters),
            "balancer": self.balancer.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore counters and warm start; the CONFIGURED optimizer hyperparameters win.

        Lightning restores the optimizer's param groups as saved, which would silently keep the
        old ``lr`` / ``weight_decay`` / ``betas`` of a run resumed with new ones. The moments stay
        as saved; ``lr`` stays as saved when an LR scheduler owns it.
        """
        self._check_lora_keys(checkpoint)
        self._apply_configured_optimizer_settings(checkpoint)
        state = checkpoint.get("marble", {})
        self.counters.update(state.get("counters", {}))
        if "balancer" in state:
            self.balancer.load_state_dict(state["balancer"])
        elif state.get("qp_warm_start") is not None:  # checkpoints written before balancers
            self.balancer.warm_start = np.asarray(state["qp_warm_start"], dtype=np.float64)

    def _check_lora_keys(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose LoRA tensors do not fit this module, naming them.

        ``strict_loading`` is off (checkpoints hold no base weights), so without this check
        missing or extra LoRA tensors would be dropped silently. An evaluation EMA adapter that
        the checkpoint lacks (``eval_ema_decay`` turned on at resume) starts from the trained one.
        """
        saved = checkpoint.get("state_dict") or {}
        expected = {k: v.shape for k, v in self.state_dict().items() if is_lora_key(k)}
        for key in expected:
            twin = Policy.eval_twin(key)
            if key not in saved and twin != key and twin in saved:
                saved[key] = saved[twin].clone()
        got = {k: v.shape for k, v in saved.items() if is_lora_key(k)}
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

    def _apply_configured_optimizer_settings(self, checkpoint: dict[str, Any]) -> None:
        """Overwrite the saved param groups' hyperparameters with the configured optimizer's."""
        states = checkpoint.get("optimizer_states") or []
        if not states:
            return
        configured = probe_optimizer(self.optimizer_factory).param_groups[0]
        owned_by_scheduler = (
            {"lr", "initial_lr"} if self.lr_scheduler_factory is not None else set()
        )
        for group in states[0].get("param_groups", []):
            for key, value in configured.items():
                if key != "params" and key not in owned_by_scheduler:
                    group[key] = value

    def _global_std(self, rewards: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[K]``: population std of ``rewards`` over every data-parallel rank's batch.

        Each rank's ``(count, mean, M2)`` per reward are all-gathered and pooled exactly
        (:func:`~marble_pl.advantages.pooled_std`); the per-prompt means stay per rank, as groups
        never span ranks. On one process it is the std of this batch. ``mask``: each reward's
        values where it applies only (0 for a reward that applies nowhere).
        """
        moments = batch_moments(rewards, mask)  # [3, K] float64
        if self._trainer is not None and self.trainer.world_size > 1:
            moments = self.trainer.strategy.all_gather(moments)  # [W, 3, K]
        return pooled_std(moments, allow_empty=True)

    def sampling_decay(self, step: int | None = None) -> float:
        """The decay of ``v_old <- decay * v_old + (1 - decay) * v_theta`` at ``step``.

        ``step`` defaults to ``self.global_step``, which after the optimizer step of
        ``training_step`` already counts that step: the first update uses ``schedule(1)``, as
        DiffusionNFT's ``return_decay(global_step)`` after its increment.
        """
        return self.old_policy_schedule(self.global_step if step is None else step)
