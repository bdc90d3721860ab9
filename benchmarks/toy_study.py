"""Toy multi-reward study: every balancer in every gradient space with every EMA guard, K = 3, 5.

The claim under test (ARCHITECTURE §5, the MARBLE paper): with K conflicting rewards whose
rollouts are *specialists* (good for one reward, irrelevant to the others), a weighted-sum reward
leaves some reward behind and the gradient of the worst-aligned reward points against the applied
update in most batches, while a Gram balancer (one advantage estimator per reward, weights from
the per-reward gradients' Gram) raises every reward. The study is a grid of
(balancer, gradient space, coefficient EMA) run with the LIBRARY's code, so its tables pick the
library's defaults (the EMA guard in particular).

The toy, all on CPU:

* **Data and prompts.** ``2K`` Gaussian modes on a circle of radius 2 in the plane. Each of
  ``--prompts`` prompts is a different mixture of the modes (the "prompt" is an index, embedded).
  Even modes sit on the K reward regions, odd modes are neutral (no reward at all).
* **Rewards.** ``R_k(x) = s_k * max(0, 1 - |x - c_k|^2 / rho^2)^2``: a compact bump on reward
  region k, exactly flat (zero) elsewhere, so a sample is a specialist for at most one reward.
  The scales ``s_k`` differ, as real reward models' ranges do (PickScore ~ 20, CLIP score
  ~ 0.3, ...): by default the first K of ``1 0.3 0.1 0.5 0.2`` (repeated beyond 5), for each K of
  ``--k`` (default ``3 5``); ``--reward-scales`` gives one K explicitly (``1 1 1``: the symmetric
  toy). The weighted sum uses uniform weights on the raw rewards, which is what users do today.
* **Model.** A velocity-field MLP ``v(x_t, t, prompt)``, pre-trained by flow matching
  (``x_t = (1 - t) x0 + t eps``, target ``eps - x0``) on the mixture; then frozen, with LoRA
  adapters on every linear layer as the only trainable parameters. Each adapter holds its ``A``
  and ``B`` as bias-free ``nn.Linear`` submodules (``B = 0`` at start, so the fine-tuned model
  starts as the base), the layout the ``gramian`` space's per-sample taps need. The sampling
  policy ``v_old`` is a second copy of the LoRA weights, updated by EMA after every step.
* **RL step** (ARCHITECTURE §2): rollout with ``v_old`` (Euler ODE, ``--sampler-steps``), rewards
  ``R [N, K]``, per-reward group advantages and ``r = optimality(A)`` (a mixing balancer: one
  estimator on ``R @ w``; ``--advantage-std``: the group-centred rewards over the group's std, or
  over the whole batch's std per reward, DiffusionNFT's default), forward process at
  ``--timesteps`` random ``t`` per rollout (``U(0, 1)``, or with ``--timestep-sampling sampler``
  distinct points of the sampler's grid), ``v_theta`` and ``v_old``, DiffusionNFT loss
  (reference x0-space form), then the row's balance and AdamW on the applied gradient
  ``d = sum_k lambda_k g_k`` (the same vector as ``MarbleModule``'s one backward of the loss with
  ``r_bar = r @ lambda``, the loss being affine in ``r``; the weighted sum: the gradient of the
  mixed-reward loss), and ``v_old <- EMA(v_theta)``.

The grid (each axis a CLI option):

* **Balancers** (``--balancers``, :mod:`marble_pl.balancers` resolved from the spec a config
  would hold): ``weighted_sum`` (``WeightedSum()``, uniform: it mixes the rewards, so it has no
  space and no EMA), ``marble`` (``MinNormBalancer()``: the OSQP min-norm QP) and torchjd's
  Gramian weightings through ``GramianWeighting``: ``UPGrad``, ``MGDA``, ``DualProj``,
  ``PCGrad``, ``IMTL-G``, ``Aligned-MTL`` (needs ``marble-pl[balancers]``; missing ones are
  skipped with a message).
* **Spaces** (``--spaces``), where the balance's Gram comes from, as ``gradient_space``:
  ``parameters`` (exact: K backwards, ``gram(g)``), ``gramian`` (exact: two backwards whatever K,
  :class:`~marble_pl.gramian.LinearGradientTaps` on the LoRA linears and
  :func:`~marble_pl.gramian.affine_reward_grads` on the per-pair split ``l = r a + b``; every step
  also runs the K backwards and records ``max |M_gramian - M_parameters| / max diag
  M_parameters``) and ``output`` (the closed-form output-space Gram, ``nft_output_stats`` +
  ``output_gram``: a different Gram, not the parameters'). Rows in ``gramian`` space run for the
  balancers of ``--gramian-balancers`` only (default ``marble``; ``all`` for every one): their
  Gram equals the parameters Gram, so their trajectories are the parameters rows' (the report
  checks both).
* **Coefficient EMA** (``--ema``), the library's ``CoefficientEMA`` callback (decay
  ``--coef-decay``, bias-corrected) with its guard, which acts when ``lambda_bar`` would push a
  reward backwards on the balance's own Gram (``min_k (M lambda_bar)_k < 0``,
  :func:`~marble_pl.balance.conflicts`): ``reset`` applies this batch's raw weights,
  ``project`` the Euclidean projection of ``lambda_bar`` onto ``{lambda in simplex : M lambda >=
  0}`` (:func:`~marble_pl.balance.project_to_safe_set`), ``off`` ``lambda_bar`` regardless (not in
  the default grid); ``none`` is no EMA at all (the raw weights every step). The torchjd
  weightings get the same EMA as MARBLE.

Every row starts from the same base, the same LoRA initialisation and the same rollout noise
stream, with the same number of steps. Recorded per step: each reward's rollout mean, the cosine
of every exact per-reward gradient ``g_k`` (the parameter-space one, from the per-reward ``r`` on
the same batch in every row; in ``gramian`` space the taps' own exact ``g_k``) with the applied
update and the worst one, whether the guard fired, the weights, the balancer's fallbacks and, in
``gramian`` space, the Gram difference. Reported over ``--seeds``, one markdown table per K: the
fraction of batches whose worst cosine is negative (below ``-NEG_COS_TOL``: round-off of a zero
inner product is not a conflict), the same over batches where every reward has signal (some
non-zero advantage), the median worst cosine, the fraction of steps the guard fired, how much
the applied weights move per step (L1; what the EMA is there to damp), each reward's change (mean rollout reward over the last 10 % of steps minus the base model's mean on a
large evaluation sample; mean ± std over seeds) and the seeds in which every reward went up. One
PNG per K shows the gains by row. Nothing is asserted or hard-coded: the tables are whatever the
run measures.

**Guard study** (``--guard-study``, K = 3 unless ``--k``): instead of the grid, the rows of
:data:`GUARD_ROWS` in parameters space, which pick the EMA guard's default: no EMA; the paper
authors' EMA constants (``ema07``: decay 0.7, no bias correction, first ``lambda*`` raw, no
guard); the default guard (``project``); the margin guard (``margin``: every cosine >=
``--guard-margin``); and with a balance every 10th step (``Variant.every``; in between the EMA's
``between``: ``lambda_bar``, checked on the last balanced Gram where the mode checks it) the
authors' own balance (``marble_unit`` / ``official``: the QP on unit-norm gradients, the fresh
``lambda*`` on a solve, ``lambda_bar`` between), ``project`` with and without that stale check
(``project_unchecked``) and ``margin``. Its table adds the worst cosine on the steps between
balanced ones, below the margin, its 10th percentile and the mean of ``Δ_k / s_k``.

Usage::

    python benchmarks/toy_study.py                       # the default grid, K = 3 and 5, 3 seeds
    python benchmarks/toy_study.py --guard-study --seeds 0 1 2 3 4 5 6 7   # the guard's rows
    python benchmarks/toy_study.py --smoke --out /tmp/t  # seconds per K
    python benchmarks/toy_study.py --balancers weighted_sum marble --k 3   # a slice of the grid

``--jobs`` forks worker processes (default: one per usable core); every run seeds its own
generators, so the tables do not depend on it. The default grid is 46 rows per K (1 + 7 Gram
balancers x 2 spaces x 3 EMA modes + MARBLE's 3 gramian rows), 300 steps each, per seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from marble_pl.callbacks.coefficient_ema import CoefficientEMA
from torch import Tensor, nn

from marble_pl.advantages import group_advantages, optimality
from marble_pl.balance import gram
from marble_pl.balancers import Balancer, resolve_balancer
from marble_pl.errors import ConfigError
from marble_pl.gradients import assign_flat_grad, cosines, parameter_grads, update_direction
from marble_pl.gramian import LinearGradientTaps, affine_reward_grads, affine_split
from marble_pl.nft import nft_errors, nft_loss, nft_output_stats, output_gram
from marble_pl.timesteps import draw_timesteps

__all__ = [
    "BALANCERS",
    "SPACES",
    "EMA_MODES",
    "NEG_COS_TOL",
    "ToyConfig",
    "ToyTask",
    "Variant",
    "LoRALinear",
    "VelocityField",
    "default_scales",
    "variants",
    "make_balancer",
    "make_task",
    "pretrain",
    "sample",
    "training_times",
    "run_variant",
    "summarize",
    "format_results",
    "main",
]

#: Balancer name -> the ``model.balancer`` spec :func:`resolve_balancer` builds it from.
BALANCERS: dict[str, dict[str, Any]] = {
    "weighted_sum": {"class_path": "WeightedSum"},
    "marble": {"class_path": "MinNormBalancer"},
    **{
        name: {"class_path": "GramianWeighting", "init_args": {"weighting": name}}
        for name in ("UPGrad", "MGDA", "DualProj", "PCGrad", "IMTL-G", "Aligned-MTL")
    },
}
#: Balancers of the guard study only (``--guard-study``): the paper authors' QP on unit-norm
#: gradients, its alpha applied to the raw advantages (``normalization: unit``).
EXTRA_BALANCERS: dict[str, dict[str, Any]] = {
    "marble_unit": {"class_path": "MinNormBalancer", "init_args": {"normalization": "unit"}},
}
SPACES = ("parameters", "gramian", "output")
EMA_MODES = ("none", "off", "reset", "project", "margin", "project_unchecked", "ema07", "official")
DEFAULT_EMA = ("none", "reset", "project")
#: ``CoefficientEMA`` settings of each EMA mode (``none``: no EMA). ``decay`` defaults to
#: ``--coef-decay`` and ``margin`` to ``--guard-margin``; ``project_unchecked`` differs from
#: ``project`` between balanced steps only (``lambda_bar`` applied without the stale check);
#: ``ema07`` is the paper authors' EMA constants applied as marble-pl applies ``lambda_bar``;
#: ``official`` their alpha EMA exactly (the fresh ``lambda*`` on a solve, ``lambda_bar`` between).
EMA_SETTINGS: dict[str, dict[str, Any]] = {
    "off": {"guard": "off"},
    "reset": {"guard": "reset"},
    "project": {"guard": "project"},
    "margin": {"guard": "project", "margin": None},
    "project_unchecked": {"guard": "project", "check_between": False},
    "ema07": {"decay": 0.7, "bias_correction": False, "start": "first", "guard": "off"},
    "official": {
        "decay": 0.7,
        "bias_correction": False,
        "start": "first",
        "guard": "off",
        "apply": "fresh_on_solve",
    },
}
#: The guard study's rows (``--guard-study``, K = 3, parameters space): (balancer, EMA mode,
#: balance every n steps).
GUARD_ROWS: tuple[tuple[str, str, int], ...] = (
    ("marble", "none", 1),
    ("marble", "ema07", 1),
    ("marble", "project", 1),
    ("marble", "margin", 1),
    ("marble_unit", "official", 10),
    ("marble", "official", 10),
    ("marble", "project_unchecked", 10),
    ("marble", "project", 10),
    ("marble", "margin", 10),
)
#: Reward scales for K rewards: the first K of these, repeated beyond 5.
SCALE_CYCLE = (1.0, 0.3, 0.1, 0.5, 0.2)
#: A worst cosine counts as negative below this: a zero inner product's round-off is not a
#: conflict (the guard's own tolerance, ``conflicts(rtol=1e-9)``, is relative to the Gram).
NEG_COS_TOL = 1e-6


def default_scales(k: int) -> list[float]:
    """The default reward scales for ``k`` rewards (:data:`SCALE_CYCLE`)."""
    return [SCALE_CYCLE[i % len(SCALE_CYCLE)] for i in range(k)]


@dataclass(frozen=True)
class Variant:
    """One row of the grid; ``space`` and ``ema`` are None for a mixing balancer."""

    balancer: str
    space: str | None = None
    ema: str | None = None
    every: int = 1
    """Balance every n-th step; in between, the EMA's ``lambda_bar`` (``between``) applies."""

    @property
    def key(self) -> str:
        """``balancer/space/ema`` (``weighted_sum`` alone), ``/every<n>`` for a cadence."""
        if self.space is None:
            return self.balancer
        tail = f"/every{self.every}" if self.every > 1 else ""
        return f"{self.balancer}/{self.space}/{self.ema}{tail}"


@dataclass
class ToyConfig:
    """Every knob of the study (the CLI fills it; defaults are the reported setting)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ks: list[int] = field(default_factory=lambda: [3, 5])
    balancers: list[str] = field(default_factory=lambda: list(BALANCERS))
    spaces: list[str] = field(default_factory=lambda: list(SPACES))
    ema: list[str] = field(default_factory=lambda: list(DEFAULT_EMA))
    gramian_balancers: list[str] = field(default_factory=lambda: ["marble"])
    steps: int = 300
    prompts: int = 4
    group_size: int = 16
    sampler_steps: int = 8
    timesteps: int = 4
    timestep_sampling: str = "uniform"
    reward_scales: list[float] = field(default_factory=lambda: default_scales(3))
    reward_radius: float = 1.0
    mode_std: float = 0.3
    radius: float = 2.0
    task_seed: int = 1234
    hidden: int = 64
    lora_rank: int = 4
    pretrain_steps: int = 1500
    pretrain_batch: int = 512
    pretrain_lr: float = 3e-3
    lr: float = 1e-3
    beta: float = 1.0
    a_max: float = 5.0
    advantage_std: str = "global"
    old_decay: float = 0.5
    coef_decay: float = 0.9
    guard_margin: float = 0.05
    guard_study: bool = False
    clip_norm: float = 1.0
    eval_samples: int = 2048
    threads: int = 1
    jobs: int = 1
    """Worker processes; the CLI's default is one per usable CPU core."""

    @property
    def k(self) -> int:
        """Number of rewards of this configuration."""
        return len(self.reward_scales)

    def for_k(self, k: int) -> ToyConfig:
        """This configuration with ``k`` rewards (the default scales unless they already fit)."""
        if k == self.k:
            return replace(self, ks=[k])
        return replace(self, ks=[k], reward_scales=default_scales(k))


def variants(cfg: ToyConfig) -> list[Variant]:
    """The grid's rows: mixing balancers once, Gram balancers x spaces x EMA modes (the guard
    study: :data:`GUARD_ROWS` in parameters space)."""
    if cfg.guard_study:
        return [Variant(b, "parameters", e, n) for b, e, n in GUARD_ROWS if b in cfg.balancers]
    rows: list[Variant] = []
    for name in cfg.balancers:
        if BALANCERS[name]["class_path"] == "WeightedSum":
            rows.append(Variant(name))
            continue
        for space in cfg.spaces:
            everywhere = "all" in cfg.gramian_balancers or name in cfg.gramian_balancers
            if space == "gramian" and not everywhere:
                continue
            rows.extend(Variant(name, space, mode) for mode in cfg.ema)
    return rows


def make_balancer(name: str, k: int) -> Balancer:
    """The library balancer of row ``name``, bound to ``k`` rewards."""
    balancer = resolve_balancer(copy.deepcopy({**BALANCERS, **EXTRA_BALANCERS}[name]))
    balancer.bind([f"reward{i}" for i in range(k)])
    return balancer


def available_balancers(names: Sequence[str], k: int) -> list[str]:
    """The balancers of ``names`` that build here; a message on stderr for each that does not
    (torchjd's weightings need the ``balancers`` extra)."""
    ok = []
    for name in names:
        try:
            make_balancer(name, k)
        except ConfigError as err:
            print(f"skipping balancer {name}: {err}", file=sys.stderr)
            continue
        ok.append(name)
    return ok


@dataclass
class ToyTask:
    """The fixed problem: mode centres, per-prompt mixture weights, reward centres and scales."""

    modes: Tensor  # [2K, 2]
    prompt_weights: Tensor  # [P, 2K]
    reward_centres: Tensor  # [K, 2]
    reward_scales: Tensor  # [K]
    reward_radius: float
    mode_std: float

    def sample_data(self, prompt_ids: Tensor, gen: torch.Generator) -> Tensor:
        """Draw ``x0`` from each prompt's mixture, ``[N, 2]``."""
        probs = self.prompt_weights[prompt_ids]
        comp = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        noise = torch.randn(prompt_ids.shape[0], 2, generator=gen)
        return self.modes[comp] + self.mode_std * noise

    def rewards(self, x: Tensor) -> Tensor:
        """``R [N, K]``: compact bumps, exactly zero outside radius ``rho`` of each centre."""
        d2 = (x.unsqueeze(1) - self.reward_centres.unsqueeze(0)).square().sum(-1)
        bump = (1.0 - d2 / self.reward_radius**2).clamp_min(0.0).square()
        return bump * self.reward_scales


def make_task(cfg: ToyConfig) -> ToyTask:
    """Modes on a circle; even modes are the reward regions, odd ones neutral.

    Prompt mixtures are half uniform, half Dirichlet(1) (fixed by ``task_seed``), so every prompt
    puts some mass on every region and the rollouts in one group land in different regions.
    """
    k = cfg.k
    rng = np.random.default_rng(cfg.task_seed)
    angles = torch.arange(2 * k, dtype=torch.float32) * (2 * math.pi / (2 * k)) + math.pi / 2
    modes = cfg.radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    dirichlet = torch.from_numpy(rng.dirichlet(np.ones(2 * k), size=cfg.prompts)).float()
    weights = 0.5 / (2 * k) + 0.5 * dirichlet
    return ToyTask(
        modes=modes,
        prompt_weights=weights / weights.sum(1, keepdim=True),
        reward_centres=modes[0::2].clone(),
        reward_scales=torch.tensor(cfg.reward_scales, dtype=torch.float32),
        reward_radius=cfg.reward_radius,
        mode_std=cfg.mode_std,
    )


class LoRALinear(nn.Module):
    """``y = W x + b + (alpha / rank) B A x`` with a frozen base and a trainable low-rank part.

    ``A`` and ``B`` are bias-free ``nn.Linear`` submodules (``lora_a``: in -> rank, ``lora_b``:
    rank -> out), as peft's LoRA layers, so that :class:`~marble_pl.gramian.LinearGradientTaps`
    can tap their per-sample weight gradients. Until :meth:`attach_lora` the adapter is off.
    """

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        self.rank = rank
        self.lora_a = nn.Linear(in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_features, bias=False)
        self.lora_a.requires_grad_(False)
        self.lora_b.requires_grad_(False)
        with torch.no_grad():
            self.lora_a.weight.zero_()
            self.lora_b.weight.zero_()
        self.scaling = 1.0
        self.active = False

    def attach_lora(self, gen: torch.Generator) -> None:
        """Freeze the base; ``A ~ N(0, 1 / in)``, ``B = 0`` (so the output is unchanged)."""
        self.base.requires_grad_(False)
        a = self.lora_a.weight
        with torch.no_grad():
            a.copy_(torch.randn(a.shape, generator=gen) / math.sqrt(a.shape[1]))
            self.lora_b.weight.zero_()
        self.lora_a.requires_grad_(True)
        self.lora_b.requires_grad_(True)
        self.active = True

    def forward(self, x: Tensor) -> Tensor:
        """Base output plus the low-rank residual (once attached)."""
        if not self.active:
            return self.base(x)
        return self.base(x) + self.scaling * self.lora_b(self.lora_a(x))


class VelocityField(nn.Module):
    """MLP ``v(x_t, t, prompt)``: Fourier features of ``t`` and a prompt embedding."""

    def __init__(self, prompts: int, hidden: int = 64, rank: int = 4, dim: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(prompts, 16)
        self.register_buffer("freqs", torch.arange(1, 9, dtype=torch.float32) * math.pi)
        width_in = dim + 16 + 16 + 1
        self.layers = nn.ModuleList(
            [
                LoRALinear(width_in, hidden, rank),
                LoRALinear(hidden, hidden, rank),
                LoRALinear(hidden, hidden, rank),
                LoRALinear(hidden, dim, rank),
            ]
        )

    def forward(self, x: Tensor, t: Tensor, prompt: Tensor) -> Tensor:
        """Velocity ``[N, dim]`` for points ``x [N, dim]``, times ``t [N]``, prompt ids ``[N]``."""
        tf = t.reshape(-1, 1) * self.freqs
        h = torch.cat([x, tf.sin(), tf.cos(), t.reshape(-1, 1), self.embed(prompt)], dim=1)
        for layer in self.layers[:-1]:
            h = nn.functional.silu(layer(h))
        return self.layers[-1](h)

    @torch.no_grad()
    def frozen_forward(self, x: Tensor, t: Tensor, prompt: Tensor) -> Tensor:
        """:meth:`forward` without autograd, each layer's ``W + B A`` merged first (sampling and
        ``v_old``: the same function, a third of the module calls)."""
        tf = t.reshape(-1, 1) * self.freqs
        h = torch.cat([x, tf.sin(), tf.cos(), t.reshape(-1, 1), self.embed(prompt)], dim=1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            w = layer.base.weight
            if layer.active:
                w = w + layer.scaling * (layer.lora_b.weight @ layer.lora_a.weight)
            h = nn.functional.linear(h, w, layer.base.bias)
            if i < last:
                h = nn.functional.silu(h)
        return h

    def attach_lora(self, gen: torch.Generator) -> list[nn.Parameter]:
        """Freeze everything, add the LoRA adapters, return the trainable parameters."""
        self.requires_grad_(False)
        for layer in self.layers:
            layer.attach_lora(gen)
        return self.lora_params()

    def lora_params(self) -> list[nn.Parameter]:
        """The LoRA ``A`` and ``B`` weights of every layer, in a fixed order."""
        return [p for layer in self.layers for p in (layer.lora_a.weight, layer.lora_b.weight)]


def pretrain(model: VelocityField, task: ToyTask, cfg: ToyConfig, gen: torch.Generator) -> float:
    """Plain flow matching on the prompts' mixtures; returns the final loss (last 100 steps)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=cfg.pretrain_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.pretrain_steps)
    recent: list[float] = []
    for _ in range(cfg.pretrain_steps):
        prompt = torch.randint(0, cfg.prompts, (cfg.pretrain_batch,), generator=gen)
        x0 = task.sample_data(prompt, gen)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.rand(x0.shape[0], generator=gen)
        xt = (1 - t[:, None]) * x0 + t[:, None] * eps
        loss = (model(xt, t, prompt) - (eps - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-100:]
    return float(np.mean(recent))


@torch.no_grad()
def sample(model: VelocityField, prompt: Tensor, noise: Tensor, steps: int) -> Tensor:
    """Euler ODE from ``t = 1`` (noise) to ``t = 0`` (data): ``x <- x - dt * v(x, t)``."""
    x = noise.clone()
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        x = x - (ts[i] - ts[i + 1]) * model.frozen_forward(x, t, prompt)
    return x


@torch.no_grad()
def training_times(cfg: ToyConfig, n: int, gen: torch.Generator) -> Tensor:
    """``[timesteps * n]`` training ``t`` (timestep-major, as the rollouts are repeated): uniform,
    or per rollout ``timesteps`` distinct points of the sampler's grid, as ``MarbleModule``."""
    if cfg.timestep_sampling == "uniform":
        return torch.rand(cfg.timesteps * n, generator=gen)
    if cfg.timesteps > cfg.sampler_steps:
        raise ValueError("--timestep-sampling sampler needs --timesteps <= --sampler-steps")
    grid = torch.linspace(1.0, 0.0, cfg.sampler_steps + 1)[:-1]
    per = torch.stack([draw_timesteps(gen, cfg.timesteps, "sampler", grid) for _ in range(n)])
    return per.t().reshape(-1)


def _ema_(old: Sequence[Tensor], new: Sequence[Tensor], decay: float) -> None:
    for o, n in zip(old, new, strict=True):
        o.mul_(decay).add_(n.detach(), alpha=1.0 - decay)


def _relative_gram_gap(m: Tensor, ref: Tensor) -> float:
    """``max |M - M_ref| / max diag M_ref`` (0 for an all-zero reference)."""
    scale = float(torch.diagonal(ref).max())
    return float((m - ref).abs().max()) / scale if scale > 0 else 0.0


def run_variant(
    variant: Variant, base: VelocityField, task: ToyTask, cfg: ToyConfig, seed: int
) -> dict[str, Any]:
    """Fine-tune a LoRA on ``base`` as ``variant`` says for ``cfg.steps`` steps; per-step records.

    Returns lists (one entry per step) of the rollout reward means ``[K]``, the exact cosines
    ``[K]`` of every per-reward gradient with the applied update, which rewards had any signal (a
    non-zero advantage), whether the EMA guard fired, the applied and raw weights, the balancer's
    fallbacks, in ``gramian`` space the relative Gram gap to the parameters Gram, and the final
    sampling policy's evaluation rewards.
    """
    k = cfg.k
    balancer = make_balancer(variant.balancer, k)
    mix = balancer.mix()
    if mix is None and variant.space not in SPACES:
        raise ValueError(f"{variant.balancer} balances a Gram: give a space of {SPACES}")
    if variant.ema is not None and variant.ema not in EMA_MODES:
        raise ValueError(f"ema must be one of {EMA_MODES}, got {variant.ema!r}")
    policy = copy.deepcopy(base)
    params = policy.attach_lora(torch.Generator().manual_seed(10_000 + seed))
    old = copy.deepcopy(policy)
    old.requires_grad_(False)
    old_params = old.lora_params()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    use_ema = mix is None and variant.ema not in (None, "none")
    ema = make_ema(variant.ema, cfg) if use_ema else None
    taps = LinearGradientTaps(policy, params) if variant.space == "gramian" else None
    torch.manual_seed(40_000 + seed)  # PCGrad's projection order: torch's global generator
    gen = torch.Generator().manual_seed(20_000 + seed)
    prompt = torch.arange(cfg.prompts).repeat_interleave(cfg.group_size)
    groups = prompt.clone()
    rec: dict[str, list[Any]] = {
        "reward_mean": [],
        "cos": [],
        "signal": [],
        "guarded": [],
        "weights": [],
        "weights_raw": [],
        "fallback": [],
        "gram_gap": [],
        "balanced": [],
    }
    last_raw: np.ndarray | None = None
    kw: dict[str, Any] = {"adaptive_weight": True, "scale": cfg.a_max / cfg.beta}
    for step in range(cfg.steps):
        noise = torch.randn(prompt.shape[0], 2, generator=gen)
        x0 = sample(old, prompt, noise, cfg.sampler_steps)
        rewards = task.rewards(x0)
        rec["reward_mean"].append(rewards.mean(0).tolist())
        adv = group_advantages(rewards, groups, std=cfg.advantage_std)
        rec["signal"].append((adv != 0).any(dim=0).tolist())
        m = cfg.timesteps
        r = optimality(adv, cfg.a_max).repeat(m, 1)  # [M N, K]

        xr = x0.repeat(m, 1)
        pr = prompt.repeat(m)
        t = training_times(cfg, prompt.shape[0], gen)
        eps = torch.randn(xr.shape, generator=gen)
        xt = (1 - t[:, None]) * xr + t[:, None] * eps
        v_target = eps - xr
        if taps is not None:
            with taps:
                v_theta = policy(xt, t, pr)
        else:
            v_theta = policy(xt, t, pr)
        v_old = old.frozen_forward(xt, t, pr)

        applied: Tensor | None = None
        if mix is not None:  # one estimator on R @ w: the mixed loss's gradient
            adv_mix = group_advantages(
                rewards @ torch.from_numpy(mix).float(), groups, std=cfg.advantage_std
            )
            r_mix = optimality(adv_mix, cfg.a_max).repeat(m)
            loss_mix = nft_loss(v_theta, v_old, v_target, r_mix, cfg.beta, t=t, **kw).mean()
            applied = torch.cat(
                [g.reshape(-1) for g in torch.autograd.grad(loss_mix, params, retain_graph=True)]
            )
        losses = nft_loss(v_theta, v_old, v_target, r, cfg.beta, t=t, **kw).mean(0)
        grads = parameter_grads(losses, params, retain_graph=taps is not None)  # [K, P]
        gram_gap = float("nan")
        if taps is not None:  # the same vectors from two backwards: l = r a + b per pair
            e_pos, e_neg = nft_errors(v_theta, v_old, v_target, cfg.beta, t=t, adaptive_weight=True)
            a, b = affine_split(e_pos, e_neg, kw["scale"])
            n = float(a.shape[0])
            reference = grads
            grads, _ = affine_reward_grads(taps, a / n, b / n, r)
            gram_gap = _relative_gram_gap(gram(grads), gram(reference))
        rec["gram_gap"].append(gram_gap)

        guarded = False
        balanced = mix is None and (step % variant.every == 0 or last_raw is None)
        if mix is None and not balanced:  # between balanced steps: no solve, lambda_bar
            lam = last_raw
            if ema is not None:
                before = ema.guarded_between
                lam = ema.between()
                guarded = ema.guarded_between > before
            applied = update_direction(grads, torch.from_numpy(np.asarray(lam)))
            rec["weights"].append(np.asarray(lam).tolist())
            rec["weights_raw"].append(np.asarray(last_raw).tolist())
            rec["fallback"].append(False)
        elif mix is None:
            if variant.space == "output":
                stats = nft_output_stats(v_theta, v_old, v_target, cfg.beta, t=t, **kw)
                m_bal = output_gram(stats, r)
            else:
                m_bal = gram(grads)
            m_np = m_bal.double().numpy()
            res = balancer(m_np, losses.detach().double().numpy())
            lam = res.weights
            if ema is not None:
                before = ema.guarded
                lam = ema.update(res.weights, m_np)
                guarded = ema.guarded > before
            applied = update_direction(grads, torch.from_numpy(np.asarray(lam)))
            last_raw = np.asarray(res.weights, dtype=np.float64)
            rec["weights"].append(np.asarray(lam).tolist())
            rec["weights_raw"].append(res.weights.tolist())
            rec["fallback"].append(bool(res.fallback))
        else:
            rec["weights"].append(mix.tolist())
            rec["weights_raw"].append(mix.tolist())
            rec["fallback"].append(False)
        assert applied is not None
        rec["guarded"].append(guarded)
        rec["balanced"].append(bool(balanced or mix is not None))
        rec["cos"].append(cosines(grads, applied).tolist())

        norm = float(applied.norm())
        if cfg.clip_norm > 0 and norm > cfg.clip_norm:
            applied = applied * (cfg.clip_norm / norm)
        opt.zero_grad(set_to_none=True)
        assign_flat_grad(params, applied.float())
        opt.step()
        _ema_(old_params, params, cfg.old_decay)
    rec["final_eval"] = _evaluate(old, task, cfg, seed).tolist()
    rec["infeasible"] = 0 if ema is None else ema.infeasible
    return rec


def make_ema(mode: str, cfg: ToyConfig) -> CoefficientEMA:
    """The library's coefficient EMA of EMA mode ``mode`` (:data:`EMA_SETTINGS`)."""
    kwargs = {"decay": cfg.coef_decay, **EMA_SETTINGS[mode]}
    if kwargs.get("margin", 0.0) is None:
        kwargs["margin"] = cfg.guard_margin
    return CoefficientEMA(**kwargs)


def _evaluate(model: VelocityField, task: ToyTask, cfg: ToyConfig, seed: int) -> Tensor:
    """Mean reward ``[K]`` of ``model``'s samples on a fixed evaluation noise (per seed)."""
    gen = torch.Generator().manual_seed(30_000 + seed)
    n = max(cfg.eval_samples // cfg.prompts, 1)
    prompt = torch.arange(cfg.prompts).repeat_interleave(n)
    noise = torch.randn(prompt.shape[0], 2, generator=gen)
    return task.rewards(sample(model, prompt, noise, cfg.sampler_steps)).mean(0)


# --- running the grid (in this process, or in a pool of forked workers) ---------------------


def _pretrain_job(cfg: ToyConfig, seed: int) -> dict[str, Any]:
    """Pre-train the base model of ``seed``; its state and the base's evaluation rewards."""
    torch.set_num_threads(max(1, cfg.threads))
    task = make_task(cfg)
    torch.manual_seed(seed)
    base = VelocityField(cfg.prompts, cfg.hidden, cfg.lora_rank)
    fm_loss = pretrain(base, task, cfg, torch.Generator().manual_seed(seed))
    initial = _evaluate(base, task, cfg, seed)
    return {"state": base.state_dict(), "pretrain_loss": fm_loss, "initial": initial.tolist()}


def _variant_job(
    cfg: ToyConfig, seed: int, state: dict[str, Tensor], variant: Variant
) -> dict[str, Any]:
    torch.set_num_threads(max(1, cfg.threads))
    base = VelocityField(cfg.prompts, cfg.hidden, cfg.lora_rank)
    base.load_state_dict(state)
    return run_variant(variant, base, make_task(cfg), cfg, seed)


def _map(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], jobs: int) -> list[Any]:
    """``[fn(*c) for c in calls]``, in ``jobs`` forked processes when ``jobs > 1``; the results
    do not depend on ``jobs`` (every run seeds its own generators)."""
    if jobs <= 1 or len(calls) <= 1:
        return [fn(*c) for c in calls]
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(fn, *c) for c in calls]
        return [f.result() for f in futures]


def run_grid(cfg: ToyConfig, rows: Sequence[Variant]) -> list[dict[str, Any]]:
    """Every row of ``rows`` on every seed of ``cfg`` (one K): ``[{seed, initial, <key>: rec}]``."""
    bases = _map(_pretrain_job, [(cfg, s) for s in cfg.seeds], cfg.jobs)
    calls = [(cfg, s, b["state"], v) for s, b in zip(cfg.seeds, bases, strict=True) for v in rows]
    recs = iter(_map(_variant_job, calls, cfg.jobs))
    runs = []
    for seed, b in zip(cfg.seeds, bases, strict=True):
        run: dict[str, Any] = {
            "seed": seed,
            "pretrain_loss": b["pretrain_loss"],
            "initial": b["initial"],
        }
        for v in rows:
            run[v.key] = next(recs)
        runs.append(run)
    return runs


# --- summaries and reports --------------------------------------------------------------------


def _seed_summary(
    run: dict[str, Any], key: str, tail: int, cfg: ToyConfig | None = None
) -> dict[str, Any]:
    rec = run[key]
    means = np.asarray(rec["reward_mean"])
    worst = np.asarray(rec["cos"]).min(axis=1)
    negative = worst < -NEG_COS_TOL
    signal = np.asarray(rec["signal"]).all(axis=1)
    final = means[-tail:].mean(axis=0)
    gaps = np.asarray(rec["gram_gap"], dtype=np.float64)
    weights = np.asarray(rec["weights"], dtype=np.float64)
    jitter = np.abs(np.diff(weights, axis=0)).sum(axis=1) if len(weights) > 1 else np.zeros(1)
    return {
        "frac_neg_worst_cos": float(negative.mean()),
        "signal_batches": int(signal.sum()),
        "frac_neg_worst_cos_signal": float(negative[signal].mean()) if signal.any() else 0.0,
        "median_worst_cos": float(np.median(worst)),
        "min_worst_cos": float(worst.min()),
        "frac_guarded": float(np.mean(rec["guarded"])),
        "weight_jitter": float(jitter.mean()),
        "delta": (final - np.asarray(run["initial"])).tolist(),
        "delta_eval": (np.asarray(rec["final_eval"]) - np.asarray(run["initial"])).tolist(),
        "fallbacks": int(np.sum(rec["fallback"])),
        "max_gram_gap": float(np.nanmax(gaps)) if np.isfinite(gaps).any() else None,
        **_guard_figures(rec, worst, final - np.asarray(run["initial"]), cfg),
    }


def _guard_figures(
    rec: dict[str, Any], worst: np.ndarray, delta: np.ndarray, cfg: ToyConfig | None
) -> dict[str, Any]:
    """The guard study's figures: worst cos < 0 on the steps between balanced ones (None
    without any), worst cos below the margin, its 10th percentile, the mean of Δ_k / scale_k
    and the guard's infeasible count."""
    between = ~np.asarray(rec.get("balanced", [True] * len(worst)), dtype=bool)
    margin = 0.05 if cfg is None else cfg.guard_margin
    scales = np.ones_like(delta) if cfg is None else np.asarray(cfg.reward_scales)
    return {
        "frac_neg_between": float((worst[between] < -NEG_COS_TOL).mean())
        if between.any()
        else None,
        "between_steps": int(between.sum()),
        "frac_below_margin": float((worst < margin - 1e-6).mean()),
        "p10_worst_cos": float(np.percentile(worst, 10)),
        "scaled_delta": float(np.mean(delta / scales)),
        "infeasible": int(rec.get("infeasible", 0)),
    }


SCALARS = (
    "frac_neg_worst_cos",
    "frac_neg_worst_cos_signal",
    "signal_batches",
    "median_worst_cos",
    "frac_guarded",
    "weight_jitter",
)


def summarize(runs: Sequence[dict[str, Any]], cfg: ToyConfig, rows: Sequence[Variant]) -> dict:
    """Per-seed and across-seed (mean, standard deviation) summaries of every row, one K."""
    tail = max(1, int(round(0.1 * cfg.steps)))
    summary: dict[str, Any] = {"k": cfg.k, "tail_steps": tail, "rows": {}}
    for v in rows:
        per_seed = [_seed_summary(run, v.key, tail, cfg) for run in runs]
        agg: dict[str, Any] = {
            "balancer": v.balancer,
            "space": v.space,
            "ema": v.ema,
            "per_seed": per_seed,
        }
        for key in SCALARS:
            vals = np.asarray([s[key] for s in per_seed], dtype=np.float64)
            agg[key] = {"mean": float(vals.mean()), "std": float(vals.std())}
        for key in ("delta", "delta_eval"):
            vals = np.asarray([s[key] for s in per_seed])  # [S, K]
            agg[key] = {"mean": vals.mean(0).tolist(), "std": vals.std(0).tolist()}
        deltas = np.asarray([s["delta"] for s in per_seed])
        agg["seeds_all_rewards_up"] = int((deltas > 0).all(axis=1).sum())
        agg["fallbacks"] = int(sum(s["fallbacks"] for s in per_seed))
        agg["min_worst_cos"] = float(min(s["min_worst_cos"] for s in per_seed))
        gaps = [s["max_gram_gap"] for s in per_seed if s["max_gram_gap"] is not None]
        agg["max_gram_gap"] = max(gaps) if gaps else None
        agg["every"] = v.every
        for key in ("frac_below_margin", "p10_worst_cos", "scaled_delta", "frac_neg_between"):
            vals = np.asarray([s[key] for s in per_seed if s[key] is not None], dtype=np.float64)
            agg[key] = {"mean": float(vals.mean()), "std": float(vals.std())} if vals.size else None
        agg["infeasible"] = int(sum(s["infeasible"] for s in per_seed))
        summary["rows"][v.key] = agg
    summary["gramian_check"] = _gramian_check(summary, rows)
    return summary


def _gramian_check(summary: dict[str, Any], rows: Sequence[Variant]) -> dict[str, Any] | None:
    """Largest Gram gap over the ``gramian`` rows, and how far their results are from the
    matching ``parameters`` rows' (largest |difference| of Δ and of the conflict fractions)."""
    gram_rows = [v for v in rows if v.space == "gramian"]
    if not gram_rows:
        return None
    by_key = summary["rows"]
    gaps = [by_key[v.key]["max_gram_gap"] for v in gram_rows]
    d_delta, d_frac, pairs = 0.0, 0.0, []
    for v in gram_rows:
        twin = replace(v, space="parameters").key
        if twin not in by_key:
            continue
        pairs.append(v.key)
        for a, b in zip(by_key[v.key]["per_seed"], by_key[twin]["per_seed"], strict=True):
            d_delta = max(d_delta, float(np.max(np.abs(np.subtract(a["delta"], b["delta"])))))
            d_frac = max(d_frac, abs(a["frac_neg_worst_cos"] - b["frac_neg_worst_cos"]))
    return {
        "max_gram_gap": max(gaps),
        "rows": [v.key for v in gram_rows],
        "compared_with_parameters": pairs,
        "max_abs_delta_difference": d_delta if pairs else None,
        "max_frac_neg_difference": d_frac if pairs else None,
    }


def _pm(mean: float, std: float, fmt: str = "+.4f", std_fmt: str = ".4f") -> str:
    return f"{mean:{fmt}} ± {std:{std_fmt}}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def format_table(summary: dict[str, Any], cfg: ToyConfig) -> str:
    """Markdown table of one K: one row per (balancer, space, EMA)."""
    k = cfg.k
    n = len(cfg.seeds)
    head = [
        "balancer",
        "space",
        "EMA",
        "worst cos < 0",
        "worst cos < 0, signal batches",
        "median worst cos",
        "guard fired",
        "λ change per step (L1)",
        *[f"Δ reward {i} (scale {cfg.reward_scales[i]:g})" for i in range(k)],
        f"seeds with every Δ > 0 (of {n})",
    ]
    lines = [_row(head), "|" + "---|" * len(head)]
    for agg in summary["rows"].values():
        mixing = agg["space"] is None
        guard = agg["frac_guarded"]
        guard_cell = (
            "—"
            if mixing or agg["ema"] in ("none", "off")
            else _pm(guard["mean"], guard["std"], ".3f", ".3f")
        )
        sig = agg["frac_neg_worst_cos_signal"]
        cells = [
            agg["balancer"],
            "—" if mixing else agg["space"],
            "—" if mixing else agg["ema"],
            _pm(agg["frac_neg_worst_cos"]["mean"], agg["frac_neg_worst_cos"]["std"], ".3f", ".3f"),
            _pm(sig["mean"], sig["std"], ".3f", ".3f") + f" [{agg['signal_batches']['mean']:.0f}]",
            _pm(agg["median_worst_cos"]["mean"], agg["median_worst_cos"]["std"], "+.3f", ".3f"),
            guard_cell,
            f"{agg['weight_jitter']['mean']:.3f}",
            *[_pm(agg["delta"]["mean"][i], agg["delta"]["std"][i]) for i in range(k)],
            str(agg["seeds_all_rewards_up"]),
        ]
        lines.append(_row(cells))
    return "\n".join(lines)


def format_guard_table(summary: dict[str, Any], cfg: ToyConfig) -> str:
    """Markdown table of the guard study: one row per (balancer, EMA mode, cadence)."""
    k, n, margin = cfg.k, len(cfg.seeds), cfg.guard_margin
    head = [
        "balancer",
        "EMA",
        "balance every",
        "worst cos < 0",
        "worst cos < 0, between steps",
        f"worst cos < {margin:g}",
        "median worst cos",
        "10th pct worst cos",
        "guard fired",
        "λ change per step (L1)",
        *[f"Δ reward {i} (scale {cfg.reward_scales[i]:g})" for i in range(k)],
        "mean Δ / scale",
        f"seeds with every Δ > 0 (of {n})",
    ]
    lines = [_row(head), "|" + "---|" * len(head)]
    for agg in summary["rows"].values():
        unguarded = agg["ema"] in ("none", "off", "ema07", "official")
        guard = agg["frac_guarded"]
        between = agg["frac_neg_between"]
        cells = [
            agg["balancer"],
            agg["ema"],
            str(agg["every"]),
            _pm(agg["frac_neg_worst_cos"]["mean"], agg["frac_neg_worst_cos"]["std"], ".3f", ".3f"),
            "—" if between is None else _pm(between["mean"], between["std"], ".3f", ".3f"),
            _pm(agg["frac_below_margin"]["mean"], agg["frac_below_margin"]["std"], ".3f", ".3f"),
            _pm(agg["median_worst_cos"]["mean"], agg["median_worst_cos"]["std"], "+.3f", ".3f"),
            _pm(agg["p10_worst_cos"]["mean"], agg["p10_worst_cos"]["std"], "+.3f", ".3f"),
            "—" if unguarded else _pm(guard["mean"], guard["std"], ".3f", ".3f"),
            f"{agg['weight_jitter']['mean']:.3f}",
            *[_pm(agg["delta"]["mean"][i], agg["delta"]["std"][i]) for i in range(k)],
            _pm(agg["scaled_delta"]["mean"], agg["scaled_delta"]["std"]),
            str(agg["seeds_all_rewards_up"]),
        ]
        lines.append(_row(cells))
    return "\n".join(lines)


def _guard_caption(summary: dict[str, Any], cfg: ToyConfig) -> str:
    infeasible = {key: a["infeasible"] for key, a in summary["rows"].items() if a["infeasible"]}
    return (
        f"### Guard study, K = {cfg.k} rewards (scales {cfg.reward_scales})\n\n"
        f"{cfg.prompts} prompts x {cfg.group_size} rollouts, {cfg.steps} steps, "
        f"{len(cfg.seeds)} seeds ({cfg.seeds[0]}..{cfg.seeds[-1]}), parameters space, "
        f"coefficient EMA decay {cfg.coef_decay} (bias-corrected) unless the mode says "
        f"otherwise, margin {cfg.guard_margin}; mean ± std over seeds. EMA modes: none (raw "
        f"lambda* every step), ema07 (decay 0.7, no bias correction, first lambda* raw, no "
        f"guard, lambda_bar applied), official (the same EMA, the fresh lambda* applied on a "
        f"solve and lambda_bar between solves: the paper authors'), project (the default "
        f"guard; between balanced steps checked on the last balanced Gram), project_unchecked "
        f"(lambda_bar unchecked between balanced steps), margin (project with cos >= "
        f"{cfg.guard_margin}). marble_unit: the QP on unit-norm gradients, its alpha on the raw "
        f"advantages. Worst cos: min over rewards of the exact cos(g_k, applied update), every "
        f"step (between steps too); worst cos < 0 below -{NEG_COS_TOL:g}. mean Δ / scale: the "
        f"mean over rewards of Δ_k / s_k. Δ = mean rollout reward over the last "
        f"{summary['tail_steps']} steps minus the base model's mean on {cfg.eval_samples} "
        f"evaluation samples. Margin guard infeasible (lambda* applied): "
        + (", ".join(f"{key}: {n}" for key, n in infeasible.items()) if infeasible else "never")
        + ".\n\n"
    )


def format_results(summary: dict[str, Any], cfg: ToyConfig) -> str:
    """The report of one K: caption, table, the gramian check and the fallbacks."""
    k = cfg.k
    if cfg.guard_study:
        return _guard_caption(summary, cfg) + format_guard_table(summary, cfg) + "\n"
    text = (
        f"### K = {k} rewards (scales {cfg.reward_scales})\n\n"
        f"{cfg.prompts} prompts x {cfg.group_size} rollouts, {cfg.steps} steps, seeds "
        f"{cfg.seeds}, advantage std {cfg.advantage_std!r}, {cfg.timesteps} training t per "
        f"rollout ({cfg.timestep_sampling}), coefficient EMA decay {cfg.coef_decay}; mean ± std "
        f"over seeds. Worst cos = min over rewards of cos(g_k, applied update) with the exact "
        f"per-reward gradients g_k (parameter space; the taps' own in gramian rows), negative "
        f"below -{NEG_COS_TOL:g}; signal batches: every reward has a non-zero advantage "
        f"[their number]. Guard fired: fraction of steps on which lambda_bar conflicted on the "
        f"balance's Gram and the guard stepped in; λ change per step: the L1 norm of the applied "
        f"weights' change from one step to the next, mean over steps. Δ = mean rollout reward over the last "
        f"{summary['tail_steps']} steps minus the base model's mean on {cfg.eval_samples} "
        f"evaluation samples.\n\n" + format_table(summary, cfg) + "\n"
    )
    check = summary.get("gramian_check")
    if check is not None:
        text += (
            f"\nGramian check: max over every step, seed and gramian row of "
            f"max|M_gramian - M_parameters| / max diag M_parameters = "
            f"{check['max_gram_gap']:.2e} (rows {', '.join(check['rows'])})."
        )
        if check["compared_with_parameters"]:
            text += (
                f" Against the matching parameters rows: largest |Δ difference| "
                f"{check['max_abs_delta_difference']:.2e}, largest difference of the worst-cos "
                f"< 0 fraction {check['max_frac_neg_difference']:.3f}."
            )
        text += "\n"
    fallbacks = {key: a["fallbacks"] for key, a in summary["rows"].items() if a["fallbacks"]}
    text += (
        "\nBalancer fallbacks (uniform or Frank-Wolfe weights): "
        + (", ".join(f"{key}: {n}" for key, n in fallbacks.items()) if fallbacks else "none")
        + ".\n"
    )
    return text


def plot_gains(summary: dict[str, Any], cfg: ToyConfig, path: Path) -> None:
    """Per-reward gains (mean ± std over seeds) and the conflict / guard fractions, every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    k = cfg.k
    rows = list(summary["rows"].values())
    labels = [
        a["balancer"] if a["space"] is None else f"{a['balancer']} / {a['space']} / {a['ema']}"
        for a in rows
    ]
    y = np.arange(len(rows))[::-1]
    space_colour = {None: "tab:red", "parameters": "tab:blue", "gramian": "tab:cyan"}
    colours = [space_colour.get(a["space"], "tab:orange") for a in rows]
    fig, axes = plt.subplots(
        1, k + 1, figsize=(2.6 * (k + 1) + 2.5, 0.2 * len(rows) + 1.6), sharey=True
    )
    for i in range(k):
        ax = axes[i]
        mean = [a["delta"]["mean"][i] for a in rows]
        std = [a["delta"]["std"][i] for a in rows]
        ax.barh(y, mean, xerr=std, color=colours, alpha=0.8, error_kw={"lw": 0.8})
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_title(f"Δ reward {i} (scale {cfg.reward_scales[i]:g})", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(3))
        ax.tick_params(labelsize=7)
    ax = axes[k]
    ax.barh(y + 0.2, [a["frac_neg_worst_cos"]["mean"] for a in rows], 0.4, color="black")
    ax.barh(y - 0.2, [a["frac_guarded"]["mean"] for a in rows], 0.4, color="tab:green")
    ax.set_xlim(0, 1)
    ax.set_title("worst cos < 0 (black), guard fired (green)", fontsize=8)
    ax.tick_params(labelsize=7)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels, fontsize=7)
    fig.suptitle(
        f"Toy study, K = {k}: gains over the base (mean ± std, {len(cfg.seeds)} seeds); "
        "red: weighted sum, blue: parameters, cyan: gramian, orange: output",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def parse_args(argv: Sequence[str] | None = None) -> tuple[ToyConfig, Path]:
    """Command-line options (``--help`` lists them) -> config and output folder."""
    d = ToyConfig()
    p = argparse.ArgumentParser(
        description=(
            "Toy multi-reward flow-matching study: DiffusionNFT fine-tuning with every balancer "
            "(weighted sum, MARBLE's min-norm QP, torchjd's Gramian weightings) in every gradient "
            "space (parameters, gramian, output) with every coefficient-EMA guard, at each K."
        )
    )
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds, help="training seeds")
    p.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=None,
        help="numbers of rewards, one table each (scales: the first K of 1 0.3 0.1 0.5 0.2)",
    )
    p.add_argument(
        "--reward-scales",
        type=float,
        nargs="+",
        default=None,
        help="one scale per reward: a single K = their number (overrides --k)",
    )
    p.add_argument(
        "--balancers",
        nargs="+",
        choices=[*BALANCERS, *EXTRA_BALANCERS],
        default=d.balancers,
        help="balancers",
    )
    p.add_argument("--spaces", nargs="+", choices=SPACES, default=d.spaces, help="Gram spaces")
    p.add_argument(
        "--ema",
        nargs="+",
        choices=EMA_MODES,
        default=d.ema,
        help="coefficient EMA: none (raw weights), off (EMA, no guard), reset or project guard",
    )
    p.add_argument(
        "--gramian-balancers",
        nargs="+",
        choices=["all", *BALANCERS],
        default=d.gramian_balancers,
        help="balancers also run in gramian space (the others are verified through it)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="RL steps per row and seed")
    p.add_argument("--prompts", type=int, default=d.prompts, help="prompts (groups) per step")
    p.add_argument("--group-size", type=int, default=d.group_size, help="rollouts per prompt (G)")
    p.add_argument("--sampler-steps", type=int, default=d.sampler_steps, help="Euler ODE steps")
    p.add_argument("--timesteps", type=int, default=d.timesteps, help="training t per rollout")
    p.add_argument(
        "--timestep-sampling",
        choices=("uniform", "sampler"),
        default=d.timestep_sampling,
        help="training t: U(0, 1), or distinct points of the Euler sampler's grid per rollout "
        "(MarbleModule's timestep_sampling: sampler, DiffusionNFT's recipe)",
    )
    p.add_argument("--reward-radius", type=float, default=d.reward_radius, help="bump radius rho")
    p.add_argument("--task-seed", type=int, default=d.task_seed, help="seed of the prompt mixtures")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank")
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, help="base FM steps")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (LoRA)")
    p.add_argument("--beta", type=float, default=d.beta, help="DiffusionNFT beta in (0, 1]")
    p.add_argument("--a-max", type=float, default=d.a_max, help="advantage clip (adv_clip_max)")
    p.add_argument(
        "--advantage-std",
        choices=("group", "global"),
        default=d.advantage_std,
        help="advantage std: the group's, or the batch's per reward (DiffusionNFT's default)",
    )
    p.add_argument("--old-decay", type=float, default=d.old_decay, help="v_old EMA decay")
    p.add_argument("--coef-decay", type=float, default=d.coef_decay, help="coefficient EMA mu")
    p.add_argument(
        "--guard-margin",
        type=float,
        default=d.guard_margin,
        help="smallest cosine the margin guard accepts (EMA mode margin)",
    )
    p.add_argument(
        "--guard-study",
        action="store_true",
        help="the guard study's rows instead of the grid (official EMA, guards, cadence 10; "
        "K = 3 unless --k)",
    )
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="evaluation samples")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads per process")
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="worker processes, forked (0: one per usable CPU core); the results do not depend "
        "on it",
    )
    p.add_argument("--smoke", action="store_true", help="tiny run (seconds): 1 seed, few steps")
    p.add_argument(
        "--out", type=Path, default=Path("runs/toy_study"), help="output folder (created)"
    )
    a = p.parse_args(argv)
    if a.reward_scales is not None:
        if len(a.reward_scales) < 2 or any(s <= 0 for s in a.reward_scales):
            p.error("--reward-scales needs at least two positive scales (one per reward)")
        ks, scales = [len(a.reward_scales)], list(a.reward_scales)
    else:
        a.k = a.k or ([3] if a.guard_study else d.ks)
        if any(k < 2 for k in a.k):
            p.error("--k needs numbers of rewards >= 2")
        ks = list(dict.fromkeys(a.k))
        scales = default_scales(ks[0])
    cfg = ToyConfig(
        seeds=list(a.seeds),
        ks=ks,
        balancers=list(dict.fromkeys(a.balancers)),
        spaces=[s for s in SPACES if s in a.spaces],
        ema=[e for e in EMA_MODES if e in a.ema],
        gramian_balancers=list(dict.fromkeys(a.gramian_balancers)),
        steps=a.steps,
        prompts=a.prompts,
        group_size=a.group_size,
        sampler_steps=a.sampler_steps,
        timesteps=a.timesteps,
        timestep_sampling=a.timestep_sampling,
        reward_scales=scales,
        reward_radius=a.reward_radius,
        task_seed=a.task_seed,
        lora_rank=a.lora_rank,
        pretrain_steps=a.pretrain_steps,
        lr=a.lr,
        beta=a.beta,
        a_max=a.a_max,
        advantage_std=a.advantage_std,
        old_decay=a.old_decay,
        coef_decay=a.coef_decay,
        guard_margin=a.guard_margin,
        guard_study=a.guard_study,
        eval_samples=a.eval_samples,
        threads=a.threads,
        jobs=a.jobs if a.jobs > 0 else _usable_cores(),
    )
    if a.guard_study and a.balancers == d.balancers:
        cfg.balancers = list(dict.fromkeys(b for b, _, _ in GUARD_ROWS))
    if a.smoke:
        cfg.seeds = cfg.seeds[:1]
        cfg.steps = min(cfg.steps, 12)
        cfg.pretrain_steps = min(cfg.pretrain_steps, 60)
        cfg.pretrain_batch = 128
        cfg.group_size = min(cfg.group_size, 8)
        cfg.eval_samples = min(cfg.eval_samples, 256)
    if cfg.steps < 1 or cfg.group_size < 2 or cfg.prompts < 1:
        p.error("need --steps >= 1, --group-size >= 2 and --prompts >= 1")
    return cfg, a.out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the study; per K write ``results_k<K>.md`` and ``gains_k<K>.png``, and all of it to
    ``results.md``, ``results.json`` (summaries) and ``runs.json`` (per-step curves); return
    ``{"runtime_s", "by_k": {K: summary}}``."""
    cfg, out = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        return _run(cfg, out)
    finally:
        torch.set_num_threads(threads)


def _compact_runs(runs: Sequence[dict[str, Any]], rows: Sequence[Variant]) -> list[dict]:
    """Per-step reward means, worst cosines, whether every reward had signal, and guard flags
    of every run: the records the table's fractions are counted from."""
    return [
        {
            "seed": run["seed"],
            "initial": run["initial"],
            **{
                v.key: {
                    "reward_mean": np.round(np.asarray(run[v.key]["reward_mean"]), 5).tolist(),
                    # unrounded: the conflict threshold is -NEG_COS_TOL
                    "worst_cos": np.asarray(run[v.key]["cos"]).min(1).tolist(),
                    "all_signal": [int(all(s)) for s in run[v.key]["signal"]],
                    "guarded": [int(g) for g in run[v.key]["guarded"]],
                }
                for v in rows
            },
        }
        for run in runs
    ]


def _run(cfg: ToyConfig, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    texts, by_k, configs, curves = [], {}, {}, {}
    for k in cfg.ks:
        kcfg = cfg.for_k(k)
        kcfg.balancers = available_balancers(kcfg.balancers, k)
        rows = variants(kcfg)
        k_start = time.perf_counter()
        runs = run_grid(kcfg, rows)
        summary = summarize(runs, kcfg, rows)
        seconds = time.perf_counter() - k_start
        summary["runtime_s"] = seconds
        print(
            f"K = {k}: {len(rows)} rows x {len(kcfg.seeds)} seeds, {seconds:.1f} s", file=sys.stderr
        )
        text = format_results(summary, kcfg) + f"\nRuntime (K = {k}): {seconds:.1f} s.\n"
        print(text)
        (out / f"results_k{k}.md").write_text(text)
        plot_gains(summary, kcfg, out / f"gains_k{k}.png")
        texts.append(text)
        by_k[k] = summary
        configs[k] = asdict(kcfg)
        curves[k] = _compact_runs(runs, rows)
    elapsed = time.perf_counter() - start
    (out / "results.md").write_text(
        "\n".join(texts) + f"\nTotal runtime: {elapsed:.1f} s ({cfg.jobs} job(s)).\n"
    )
    payload = {"config": asdict(cfg), "configs": configs, "runtime_s": elapsed, "summary": by_k}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "runs.json").write_text(json.dumps(curves))
    return {"runtime_s": elapsed, "by_k": by_k}


if __name__ == "__main__":
    main(sys.argv[1:])
