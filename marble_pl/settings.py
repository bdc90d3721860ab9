"""The ``model.*`` settings of :class:`~marble_pl.module.MarbleModule`: checks and what they build.

Every check that needs no model raises a :class:`~marble_pl.errors.ConfigError` naming the
setting and the fix, when the module is constructed (before any weight loads). The settings
themselves are documented in ``docs/settings.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from marble_pl.balance import BalanceCadence
from marble_pl.checks import check_choices, check_guidance, check_optimizer, check_ranges
from marble_pl.errors import ConfigError
from marble_pl.models import lora_init_weights
from marble_pl.nft import check_beta
from marble_pl.policies.base import check_distilled_guidance, family_class
from marble_pl.rewards import PretrainedReward, Reward, build_rewards
from marble_pl.rollout import RolloutConfig

__all__ = [
    "COUNTERS",
    "MODULE_SETTINGS_DOC",
    "balance_cadence",
    "check_micro_batch_size",
    "check_reward_weights",
    "check_settings",
    "module_rewards",
    "rollout_configs",
]

COUNTERS = (
    "qp_fallbacks",
    "nonfinite_rewards",
    "skipped_nonfinite",
    "skipped_zero_grad",
    "skipped_no_reward",
    "nonfinite_streak",
)
"""The module's event counters (logged, kept in checkpoints)."""


def check_settings(hp: Mapping[str, Any], optimizer: Any, lr_scheduler: Any) -> None:
    """Check every setting that needs no model and no reward (one ``ConfigError`` each)."""
    if hp["architecture_overrides"] and not hp["random_weights"]:
        raise ConfigError(
            "model.architecture_overrides changes the architecture of a randomly initialised "
            "model: set model.random_weights: true, or drop the overrides"
        )
    check_beta(hp["beta"])
    check_choices(
        hp["gradient_space"], hp["loss_form"], hp["nonfinite_rewards"], hp["weights_dtype"]
    )
    keys = ("a_max", "t_min", "t_max", "max_nonfinite_steps", "kl_beta", "lora_rank")
    keys += ("lora_alpha", "lora_target_modules", "resolution", "gradient_clip_norm")
    check_ranges(**{key: hp[key] for key in keys}, distilled_guidance=hp["distilled_guidance"])
    if hp["family"] is not None:  # auto: checked when the family is chosen (build_policy)
        check_distilled_guidance(family_class(hp["family"]), hp["distilled_guidance"])
    check_guidance(hp["guidance_scale"])
    lora_init_weights(hp["lora_init"])
    check_optimizer(optimizer, lr_scheduler)
    steps = hp["eval_num_inference_steps"]
    if steps is not None and steps < 1:
        raise ConfigError(
            f"model.eval_num_inference_steps must be >= 1 (DiffusionNFT: 40), or null, got {steps}"
        )
    for name in ("micro_batch_size", "rollout_chunk_size"):
        value = hp[name]
        if value is not None and value < 1:
            raise ConfigError(f"model.{name} must be >= 1, or null for all at once, got {value}")


def check_micro_batch_size(size: int | None, data: Any, timesteps: int) -> None:
    """Say so when a micro-batch is larger than a step's (image, timestep) pairs: the step
    then runs as ONE micro-batch, which is not what the setting asked for."""
    batch, group = getattr(data, "batch_size", None), getattr(data, "group_size", None)
    if size is None or not isinstance(batch, int) or not isinstance(group, int):
        return
    pairs = batch * group * timesteps
    if size > pairs:
        rank_zero_warn(
            f"model.micro_batch_size is {size} but a step has only {pairs} (image, timestep) "
            f"pairs per process ({batch} prompts x {group} images x {timesteps} "
            f"timesteps): each step runs as one micro-batch of {pairs}; set "
            f"--model.micro_batch_size to at most {pairs} (or null) to silence this"
        )


def module_rewards(specs: Sequence[str | dict[str, Any]], random_weights: bool) -> list[Reward]:
    """The configured rewards; pretrained ones at real shape with random weights when asked."""
    rewards = build_rewards(list(specs))
    for reward in rewards:
        if random_weights and isinstance(reward, PretrainedReward):
            reward.random_weights = True
    return rewards


def check_reward_weights(weights: Sequence[float] | None, names: Sequence[str]) -> None:
    """One weight per reward when ``model.reward_weights`` is given (whatever the balancer)."""
    k = len(names)
    if weights is not None and len(weights) != k:
        raise ConfigError(
            f"model.reward_weights has {len(weights)} entries for {k} rewards "
            f"{list(names)}: give one weight per reward, in the same order"
        )


def rollout_configs(hp: Mapping[str, Any]) -> tuple[RolloutConfig, RolloutConfig]:
    """The training rollout's sampler and the evaluation's (deterministic, its own steps)."""
    steps = hp["num_inference_steps"]
    try:
        train = RolloutConfig(
            num_inference_steps=steps,
            guidance_scale=hp["guidance_scale"],
            height=hp["resolution"],
            width=hp["resolution"],
            noise_level=hp["noise_level"],
            solver=hp["solver"],
        )
        evaluation = replace(
            train, num_inference_steps=hp["eval_num_inference_steps"] or steps, noise_level=0.0
        )
    except ValueError as err:  # its messages start with the field, as model.<field> is named
        raise ConfigError(f"model.{err}") from err
    return train, evaluation


def balance_cadence(hp: Mapping[str, Any]) -> BalanceCadence:
    """Which steps and micro-batches solve the balance (``balance_every_n_steps``, ...)."""
    every = hp["balance_every_n_steps"]
    if every < 1:
        raise ConfigError(
            f"model.balance_every_n_steps must be >= 1 (1: balance every step), got {every}"
        )
    try:
        return BalanceCadence(every, hp["balance_on"], hp["balance_warmup_steps"])
    except ValueError as err:
        raise ConfigError(
            f"model.balance_on / balance_warmup_steps: {err} (balance_on: batch or "
            "first_micro_batch; balance_warmup_steps >= 0)"
        ) from err


MODULE_SETTINGS_DOC = """The module's settings, ``model.*`` in a config (``marble fit --help``).

Args:
    pretrained_model_name_or_path: hub id or local directory of a diffusers pipeline; its
        ``model_index.json`` ``_class_name`` picks the family (:mod:`marble_pl.policies`)
        unless ``family`` names it.
    family: the model family: ``sd3``, ``flux`` (or a registered pipeline class, e.g.
        ``FluxPipeline``); null: the pipeline's ``model_index.json`` ``_class_name``, else,
        for a path with none yet, a guess from its name (said in a notice). A family that
        contradicts a readable ``model_index.json`` is an error.
    distilled_guidance: the value of a guidance-distilled denoiser's guidance input
        embedding (FLUX.1-dev; not classifier-free guidance, one forward per step), > 0;
        null: the family's own (FLUX.1-dev: 3.5). An error for a family without one (SD3).
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
