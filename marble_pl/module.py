"""``MarbleModule``: one MARBLE training step per batch, with Lightning's manual optimisation.

``training_step`` reads as ARCHITECTURE §2: rollout with the sampling policy ``v_old`` -> K
rewards -> per-reward advantages ``r`` -> DiffusionNFT loss -> per-reward gradients -> balance
(OSQP) -> coefficient EMA -> one update -> ``v_old <- EMA(v_theta)``. The math is in the pure
modules; this file wires its units together: the model family (:mod:`marble_pl.policies`), the
scores (:mod:`marble_pl.scoring`), the gradient space (:mod:`marble_pl.spaces`), the balance's
cadence (:mod:`marble_pl.cadence`), the update guard (:mod:`marble_pl.updates`), the step's
metrics (:mod:`marble_pl.step_log`) and the checkpoints (:mod:`marble_pl.checkpointing`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from marble_pl.advantages import StdMode
from marble_pl.balance import BalanceOn, Normalization
from marble_pl.balancers import Balancer, resolve_balancer
from marble_pl.cadence import StepBalance
from marble_pl.checkpointing import (
    apply_configured_optimizer_settings,
    check_lora_keys,
    load_run_state,
    lora_only,
    run_state,
)
from marble_pl.checks import check_old_policy_decay, check_resolution
from marble_pl.gradients import GradientSpace
from marble_pl.loss_scaling import check_loss_scaling, grad_scaler, scaled_clip, skipped_update
from marble_pl.models import DEFAULT_LORA_TARGETS, SAMPLING_ADAPTER
from marble_pl.monitors import GradientContext, GradientWatch, ScoredBatch, StepRecord
from marble_pl.objective import StepBatch, TrainingPairs
from marble_pl.policies import Conditioning, Policy, build_policy
from marble_pl.ranks import Ranks
from marble_pl.rewards.base import Metadata
from marble_pl.rollout import RolloutConfig, RolloutOutput
from marble_pl.schedules import DIFFUSIONNFT_DECAY, DecaySchedule, warmup_decay
from marble_pl.scoring import NonFiniteRewardError, Scorer
from marble_pl.seeding import per_sample, step_generators, validation_generators
from marble_pl.settings import (
    COUNTERS,
    MODULE_SETTINGS_DOC,
    balance_cadence,
    check_micro_batch_size,
    check_reward_weights,
    check_settings,
    module_rewards,
    rollout_configs,
)
from marble_pl.spaces import build_space
from marble_pl.step_log import StepLogger
from marble_pl.timesteps import TimestepSampling, check_timesteps, draw_timesteps
from marble_pl.updates import UpdateGuard, grad_norm, trains_any_reward

BalancerName = Literal["marble", "weighted_sum", "single"]
LossForm = Literal["reference", "plain"]
NonFinitePolicy = Literal["error", "drop"]

__all__ = ["MarbleModule", "StepRecord", "GradientContext", "NonFiniteRewardError"]


def _metric_key(name: str) -> str:
    """A ModuleDict key for a reward name (which may contain '.')."""
    return name.replace(".", "_")


class MarbleModule(LightningModule):
    """Multi-reward DiffusionNFT fine-tuning of a diffusion transformer's LoRA, balanced by MARBLE.

    The model family is a :class:`~marble_pl.policies.Policy`; the settings (``model.*``) are
    documented in :data:`marble_pl.settings.MODULE_SETTINGS_DOC` (``marble fit --help``).
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-3.5-medium",
        family: str | None = None,
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
        distilled_guidance: float | None = None,
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
        schedule = check_old_policy_decay(old_policy_decay)
        old_policy_decay = schedule.as_plain()  # hparams/checkpoints hold plain data only
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "balancer"])
        hp = self.hparams
        check_settings(hp, optimizer, lr_scheduler)
        self.balancer = resolve_balancer(
            balancer,
            reward_weights=reward_weights,
            single_reward=single_reward,
            normalization=normalization,
        )
        # hparams and checkpoints hold plain data: a name, or the balancer class's spec
        self.hparams["balancer"] = balancer if isinstance(balancer, str) else self.balancer.spec()
        self.old_policy_schedule = schedule
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the LoRA weights only, not the base model
        self.rewards = module_rewards(rewards, random_weights)
        self.reward_names: list[str] = [rw.name for rw in self.rewards]
        self.balancer.bind(self.reward_names)
        check_reward_weights(reward_weights, self.reward_names)
        self.rollout_config, self.eval_rollout_config = rollout_configs(hp)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.val_rewards = torch.nn.ModuleDict(
            {_metric_key(name): MeanMetric() for name in self.reward_names}
        )
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.last_step: StepRecord | None = None
        self.last_timing: dict[str, float] = {}
        self.policy: Policy | None = None
        self._configured = False
        self.timesteps_count = check_timesteps(
            timesteps_per_image, timestep_sampling, num_inference_steps
        )
        self.balancing = StepBalance(self, build_space(gradient_space, self), balance_cadence(hp))
        self.scorer, self.step_log, self.guard = Scorer(self), StepLogger(self), UpdateGuard(self)
        self.ranks = Ranks(self)

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
            data = getattr(self._trainer, "datamodule", None)
            check_micro_batch_size(hp.micro_batch_size, data, self.timesteps_count)
        path = hp.pretrained_model_name_or_path
        if self._configured or (hp.build_tiny_if_missing and not Path(path).is_dir()):
            return
        sizes = build_policy(hp).resolution_sizes()
        if sizes is not None:
            check_resolution(hp.resolution, *sizes)

    def configure_model(self) -> None:
        """Load the model family's policy (:mod:`marble_pl.policies`): its parts, the trained
        LoRA and the sampling-policy copy, registered here so Lightning moves them."""
        if self._configured:
            return
        hp = self.hparams
        self.policy = build_policy(hp)
        if hp.build_tiny_if_missing:
            self.policy.build_tiny_once(hp.pretrained_model_name_or_path, self._trainer)
        self.policy.load()
        for name, part in self.policy.modules().items():
            setattr(self, name, part)
        self.lora_params = self.policy.lora_params
        self._configured = True

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
        """``draw(g_i)`` stacked over this rank's samples (:mod:`marble_pl.seeding`)."""
        return per_sample(self._sample_generators(n, stream), draw, self.device)

    def _sample_generators(self, n: int, stream: int) -> list[torch.Generator]:
        """One CPU generator per sample of this rank, seeded by (seed, step, stream, GLOBAL index)."""
        start = self.global_rank * n
        return step_generators(self.hparams.seed, self.global_step, stream, start, n)

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

    def score(
        self, images: Tensor, prompts: Sequence[str], metadata: Metadata | None = None
    ) -> Tensor:
        """``R [N, K]``: every reward on every image (:meth:`Scorer.score`)."""
        return self.scorer.score(images, prompts, metadata)

    def applicability(self, prompts: Sequence[str], metadata: Metadata | None = None) -> Tensor:
        """``[N, K]`` bool: the samples each reward scores (:meth:`Scorer.applicability`)."""
        return self.scorer.applicability(prompts, metadata)

    def velocity(self, x_t: Tensor, t: Tensor, *cond: Tensor) -> Tensor:
        """``v(x_t, t | cond)`` in float32 from the policy with whichever adapter is active."""
        return self.policy.velocity(x_t, t, *cond)

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
        bad = self.scorer.check_finite(rewards, applicable)
        r_each, r, mask = self.scorer.estimators(rewards, group_ids, bad, applicable)  # r: trains
        r_each, r = r_each.to(out.latents.dtype), r.to(out.latents.dtype)
        t2 = time.perf_counter()

        # 4. Training pairs: T timesteps per image, fresh noise each, x_t on the forward process.
        #    Each reward's loss is averaged over the pairs it applies to (global count): w [N, J].
        pairs = self.training_pairs(out.latents)
        each = self.scorer.loss_mask(applicable, pairs.count)  # per reward
        train = each if mask is applicable else self.scorer.loss_mask(mask, pairs.count)
        step = StepBatch(pairs, self.policy.condition(out), r, train.weights, train.present)
        scored = ScoredBatch(rewards, group_ids, bad, r_each, applicable, each)
        watch = GradientWatch(self, scored, step)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)

        # 5-7. Per-reward gradients in the gradient space -> balance (OSQP) -> coefficient EMA,
        #      or the earlier coefficients, as the cadence says (marble_pl.cadence).
        unclipped = partial(self.scorer.unclipped, scored)  # for clip_combined_advantage
        plan = self.balancing.plan(step, unclipped, monitored=bool(watch.monitors))
        watch.before(plan)

        # 8. ONE update along d = sum_k lambda_bar_k g_k (+ the KL gradient), all micro-batches.
        loss, kl = self.balancing.apply(plan, step)
        watch.after(plan)
        if self.optimizer_step_or_skip(opt, trains_any_reward(plan.weights, step.present)):
            self.update_adapter_averages()  # 9. v_old <- EMA(v_theta) on the LoRA weights.
        t3 = time.perf_counter()

        self.last_step = StepRecord(
            rewards, r_each, r, plan.gram, plan.raw, plan.weights, plan.grads, plan.direction,
            plan.result, applicable, train.weights,
        )  # fmt: skip
        times = (t1 - t0, t2 - t1, t3 - t2)
        self.last_timing = dict(zip(("rollout_s", "reward_s", "update_s"), times, strict=True))
        unused = bad | ~applicable  # scores that are no reward's signal: not in the means
        self.step_log.log_step(rewards, unused, loss, kl, plan, times, n)
        self.step_log.log_applicability(rewards, unused, each.counts, metadata, n)
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

        A NaN/inf or all-zero gradient skips the update (:meth:`~marble_pl.updates.UpdateGuard.skip_reason`): parameters
        without ``.grad`` are left alone by torch optimizers (weights AND state), and the step
        still counts, so ``max_steps``, schedules and seeds stay aligned.
        """
        clip = self.hparams.gradient_clip_norm
        skip = self.guard.skip_reason(grad_norm(self.lora_params), trains)
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

    # ------------------------------------------------------------------ logging

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
        """One CPU generator per validation prompt, seeded by ``(seed, prompt index)`` only: the
        same noise at every validation, so ``val/reward`` moves only when the policy does."""
        return validation_generators(self.hparams.seed, indices)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the LoRA weights (trained and sampling adapters) and the solver warm start."""
        checkpoint["state_dict"] = lora_only(checkpoint["state_dict"])
        checkpoint["marble"] = run_state(self.counters, self.balancer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore counters and warm start; the CONFIGURED optimizer hyperparameters win.

        Lightning restores the optimizer's param groups as saved, which would silently keep the
        old ``lr`` / ``weight_decay`` / ``betas`` of a run resumed with new ones. The moments stay
        as saved; ``lr`` stays as saved when an LR scheduler owns it.
        """
        check_lora_keys(self, checkpoint)
        apply_configured_optimizer_settings(
            checkpoint, self.optimizer_factory, self.lr_scheduler_factory
        )
        load_run_state(checkpoint.get("marble", {}), self.counters, self.balancer)

    def sampling_decay(self, step: int | None = None) -> float:
        """The decay of ``v_old <- decay * v_old + (1 - decay) * v_theta`` at ``step``.

        ``step`` defaults to ``self.global_step``, which after the optimizer step of
        ``training_step`` already counts that step: the first update uses ``schedule(1)``, as
        DiffusionNFT's ``return_decay(global_step)`` after its increment.
        """
        return self.old_policy_schedule(self.global_step if step is None else step)


MarbleModule.__init__.__doc__ = MODULE_SETTINGS_DOC  # the LightningCLI's help of each setting
