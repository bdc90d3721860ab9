"""Toy multi-reward study: MARBLE against the weighted sum on a tiny conditional flow model.

The claim under test (ARCHITECTURE §5, the MARBLE paper): with K conflicting rewards whose
rollouts are *specialists* (good for one reward, irrelevant to the others), a weighted-sum reward
leaves some reward behind and the gradient of the worst-aligned reward points against the applied
update in most batches, while MARBLE (one advantage estimator per reward, min-norm QP over the
per-reward gradients, EMA on the coefficients) raises every reward and keeps every cosine positive.

The toy, all on CPU in a few minutes:

* **Data and prompts.** ``2K`` Gaussian modes on a circle of radius 2 in the plane. Each of
  ``--prompts`` prompts is a different mixture of the modes (the "prompt" is an index, embedded).
  Even modes sit on the K reward regions, odd modes are neutral (no reward at all).
* **Rewards.** ``R_k(x) = s_k * max(0, 1 - |x - c_k|^2 / rho^2)^2``: a compact bump on reward
  region k, exactly flat (zero) elsewhere, so a sample is a specialist for at most one reward.
  The scales ``s_k`` (``--reward-scales``, default ``1 0.3 0.1``) differ, as real reward models'
  ranges do (PickScore ~ 20, CLIP score ~ 0.3, ...); the weighted sum uses uniform weights on the
  raw rewards, which is what users do today. ``--reward-scales 1 1 1`` gives the symmetric toy.
* **Model.** A velocity-field MLP ``v(x_t, t, prompt)``, pre-trained by flow matching
  (``x_t = (1 - t) x0 + t eps``, target ``eps - x0``) on the mixture; then frozen, with LoRA
  adapters (``B = 0`` at start, so the fine-tuned model starts as the base) on every linear layer
  as the only trainable parameters. The sampling policy ``v_old`` is a second copy of the LoRA
  weights, updated by EMA after every step.
* **RL step** (ARCHITECTURE §2, parameter-space gradients): rollout with ``v_old`` (Euler ODE,
  ``--sampler-steps``), rewards ``R [N, K]``, per-reward group advantages and ``r = optimality(A)``
  (and, for the weighted sum, one estimator on ``R @ w``; ``--advantage-std``: the group-centred
  rewards over the group's std, or over the whole batch's std per reward, DiffusionNFT's
  default), forward process at ``--timesteps`` random ``t`` per rollout (``U(0, 1)``, or with
  ``--timestep-sampling sampler`` distinct points of the sampler's grid), ``v_theta`` and
  ``v_old``, DiffusionNFT loss (reference x0-space form), per-reward gradients ``g_k``
  (K backwards), and the applied gradient:

  - ``weighted_sum``: the gradient of the loss with the weighted-sum ``r``;
  - ``marble``: ``d = sum_k lambda_bar_k g_k`` with ``lambda*`` from the OSQP min-norm QP on the
    parameter-space Gram and ``lambda_bar`` its EMA (``--coef-decay``, as the training default);
  - ``marble_guarded``: as ``marble``, but a step whose ``lambda_bar`` would push some reward
    backwards (``min_k (M lambda_bar)_k < 0``) applies ``lambda*`` instead: the library default,
    ``CoefficientEMA(guard=True)``;
  - ``marble_no_ema``: the ablation of the coefficient EMA, ``d = sum_k lambda*_k g_k`` with this
    batch's QP solution (the only variant with the per-batch guarantee ``<g_k, d> >= |d|^2``);
  - ``marble_lagged``: ``lagged_balance``: the EMA of EARLIER batches' ``lambda*`` is applied and
    this batch's ``lambda*`` folded in afterwards (no guard), as ``MarbleModule`` does with several
    micro-batches to save the extra forward pass.

  Then AdamW on ``d`` and ``v_old <- EMA(v_theta)``. All methods start from the same base, the same
  LoRA initialisation and the same rollout noise stream, with the same number of steps.

Recorded per step: each reward's rollout mean, the cosine of every ``g_k`` with the applied update
(``g_k`` computed with the per-reward ``r`` on the same batch in every method) and the worst one.
Reported over ``--seeds``: the fraction of batches whose worst cosine is negative, and each
reward's final change (mean over the last 10 % of steps minus the base model's mean on a large
evaluation sample), mean and standard deviation over seeds. Nothing is asserted or hard-coded:
the tables are whatever the run measures.

Usage::

    python benchmarks/toy_study.py                       # 3 seeds, ~40 s on 2 cores
    python benchmarks/toy_study.py --smoke --out /tmp/t  # seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from marble_pl.advantages import group_advantages, optimality
from marble_pl.balance import EMA, MinNormSolver, conflicts, gram
from marble_pl.gradients import assign_flat_grad, cosines, parameter_grads, update_direction
from marble_pl.nft import nft_loss, nft_output_stats, output_gram
from marble_pl.timesteps import draw_timesteps

__all__ = [
    "ToyConfig",
    "ToyTask",
    "LoRALinear",
    "VelocityField",
    "make_task",
    "pretrain",
    "sample",
    "run_method",
    "summarize",
    "main",
]

METHODS = (
    "weighted_sum",
    "marble",
    "marble_guarded",
    "marble_no_ema",
    "marble_lagged",
    "marble_output",
)


@dataclass
class ToyConfig:
    """Every knob of the study (the CLI fills it; defaults are the reported setting)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: int = 300
    prompts: int = 4
    group_size: int = 16
    sampler_steps: int = 8
    timesteps: int = 4
    timestep_sampling: str = "uniform"
    reward_scales: list[float] = field(default_factory=lambda: [1.0, 0.3, 0.1])
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
    clip_norm: float = 1.0
    eval_samples: int = 2048
    threads: int = 1

    @property
    def k(self) -> int:
        """Number of rewards."""
        return len(self.reward_scales)


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
    """``y = W x + b + (alpha / rank) B A x`` with a frozen base and a trainable low-rank part."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        self.rank = rank
        self.lora_a = nn.Parameter(torch.zeros(rank, in_features), requires_grad=False)
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank), requires_grad=False)
        self.scaling = 1.0

    def attach_lora(self, gen: torch.Generator) -> None:
        """Freeze the base; ``A ~ N(0, 1 / in)``, ``B = 0`` (so the output is unchanged)."""
        self.base.requires_grad_(False)
        with torch.no_grad():
            self.lora_a.copy_(
                torch.randn(self.lora_a.shape, generator=gen) / math.sqrt(self.lora_a.shape[1])
            )
            self.lora_b.zero_()
        self.lora_a.requires_grad_(True)
        self.lora_b.requires_grad_(True)

    def forward(self, x: Tensor) -> Tensor:
        """Base output plus the low-rank residual."""
        return self.base(x) + self.scaling * ((x @ self.lora_a.t()) @ self.lora_b.t())


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

    def attach_lora(self, gen: torch.Generator) -> list[nn.Parameter]:
        """Freeze everything, add the LoRA adapters, return the trainable parameters."""
        self.requires_grad_(False)
        for layer in self.layers:
            layer.attach_lora(gen)
        return self.lora_params()

    def lora_params(self) -> list[nn.Parameter]:
        """The LoRA ``A`` and ``B`` of every layer, in a fixed order."""
        return [p for layer in self.layers for p in (layer.lora_a, layer.lora_b)]


def pretrain(model: VelocityField, task: ToyTask, cfg: ToyConfig, gen: torch.Generator) -> float:
    """Plain flow matching on the prompts' mixtures; returns the final loss (last 100 steps)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
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
        x = x - (ts[i] - ts[i + 1]) * model(x, t, prompt)
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


def _nft_kwargs(t: Tensor, cfg: ToyConfig) -> dict[str, Any]:
    return {"t": t, "adaptive_weight": True, "scale": cfg.a_max / cfg.beta}


def run_method(
    method: str,
    base: VelocityField,
    task: ToyTask,
    cfg: ToyConfig,
    seed: int,
) -> dict[str, Any]:
    """Fine-tune a LoRA on ``base`` with ``method`` for ``cfg.steps`` steps; per-step records.

    ``method`` is ``weighted_sum``, ``marble`` (coefficient EMA with ``cfg.coef_decay``),
    ``marble_guarded`` (that EMA, ``lambda*`` on steps where it would conflict) or
    ``marble_no_ema`` (the raw QP coefficients each step, the ablation of the EMA). Returns lists
    (one entry per step) of the rollout reward means ``[K]``, the cosines ``[K]`` of every
    per-reward gradient with the applied update, the cosines with the *other* direction on the same
    batch (the weighted-sum gradient for the MARBLE methods, the raw min-norm direction for
    ``weighted_sum``), the cosines with the raw min-norm direction, the applied and raw
    coefficients, ``|d_min_norm| / mean |g_k|``, which rewards had any signal (a non-zero
    advantage) in the batch, the QP fallbacks, and the final policy's evaluation rewards.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    k = cfg.k
    policy = copy.deepcopy(base)
    params = policy.attach_lora(torch.Generator().manual_seed(10_000 + seed))
    old = copy.deepcopy(policy)
    old.requires_grad_(False)
    old_params = old.lora_params()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    solver = MinNormSolver()
    coef_ema = EMA(0.0 if method == "marble_no_ema" else cfg.coef_decay, bias_correction=True)
    w_sum = torch.full((k,), 1.0 / k)
    gen = torch.Generator().manual_seed(20_000 + seed)
    prompt = torch.arange(cfg.prompts).repeat_interleave(cfg.group_size)
    groups = prompt.clone()
    rec: dict[str, list[Any]] = {
        "reward_mean": [],
        "cos": [],
        "cos_other": [],
        "weights": [],
        "weights_raw": [],
        "cos_raw": [],
        "min_norm_ratio": [],
        "signal": [],
        "qp_fallback": [],
    }
    for _ in range(cfg.steps):
        noise = torch.randn(prompt.shape[0], 2, generator=gen)
        x0 = sample(old, prompt, noise, cfg.sampler_steps)
        rewards = task.rewards(x0)
        rec["reward_mean"].append(rewards.mean(0).tolist())
        adv = group_advantages(rewards, groups, std=cfg.advantage_std)
        rec["signal"].append((adv != 0).any(dim=0).tolist())
        r = optimality(adv, cfg.a_max)  # [N, K]
        adv_ws = group_advantages(rewards @ w_sum, groups, std=cfg.advantage_std)
        r_ws = optimality(adv_ws, cfg.a_max)  # [N]

        m = cfg.timesteps
        xr = x0.repeat(m, 1)
        pr = prompt.repeat(m)
        t = training_times(cfg, prompt.shape[0], gen)
        eps = torch.randn(xr.shape, generator=gen)
        xt = (1 - t[:, None]) * xr + t[:, None] * eps
        v_target = eps - xr
        v_theta = policy(xt, t, pr)
        with torch.no_grad():
            v_old = old(xt, t, pr)
        kw = _nft_kwargs(t, cfg)
        loss_ws = nft_loss(v_theta, v_old, v_target, r_ws.repeat(m), cfg.beta, **kw).mean()
        g_ws = torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(loss_ws, params, retain_graph=True)]
        )
        losses = nft_loss(v_theta, v_old, v_target, r.repeat(m, 1), cfg.beta, **kw).mean(0)
        grads = parameter_grads(losses, params)  # [K, P]

        m_k = gram(grads)
        m_bal = m_k  # the Gram the balance (and the guard) sees
        if method == "marble_output":  # the amortized Gram: closed form in the model's output
            stats = nft_output_stats(v_theta, v_old, v_target, cfg.beta, **kw)
            m_bal = output_gram(stats, r.repeat(m, 1)).to(m_k.dtype)
        res = solver(m_bal)
        lam_raw = torch.from_numpy(res.weights)
        d_min_norm = update_direction(grads, lam_raw)
        if method == "marble_lagged" and coef_ema.value is not None:
            # MarbleModule(lagged_balance=True): earlier batches' lambda_bar, this batch after.
            smoothed = coef_ema.value.copy()
            coef_ema.update(res.weights)
            lam = torch.from_numpy(smoothed)
            applied = update_direction(grads, lam)
            other = g_ws
            rec["weights"].append(lam.tolist())
        elif method != "weighted_sum":
            smoothed = coef_ema.update(res.weights)
            guarded = method in ("marble_guarded", "marble_output")
            if guarded and conflicts(m_bal, smoothed):
                smoothed = res.weights  # CoefficientEMA(guard=True): lambda* on this step
            lam = torch.from_numpy(smoothed)
            applied = update_direction(grads, lam)
            other = g_ws
            rec["weights"].append(lam.tolist())
        else:
            applied = g_ws
            other = d_min_norm
            rec["weights"].append(w_sum.tolist())
        rec["qp_fallback"].append(bool(res.fallback))
        rec["weights_raw"].append(res.weights.tolist())
        rec["cos_raw"].append(cosines(grads, d_min_norm).tolist())
        rec["min_norm_ratio"].append(float(d_min_norm.norm() / grads.norm(dim=1).mean()))
        rec["cos"].append(cosines(grads, applied).tolist())
        rec["cos_other"].append(cosines(grads, other).tolist())

        norm = float(applied.norm())
        if cfg.clip_norm > 0 and norm > cfg.clip_norm:
            applied = applied * (cfg.clip_norm / norm)
        opt.zero_grad(set_to_none=True)
        assign_flat_grad(params, applied)
        opt.step()
        _ema_(old_params, params, cfg.old_decay)
    rec["final_eval"] = _evaluate(old, task, cfg, seed).tolist()
    return rec


def _evaluate(model: VelocityField, task: ToyTask, cfg: ToyConfig, seed: int) -> Tensor:
    """Mean reward ``[K]`` of ``model``'s samples on a fixed evaluation noise (per seed)."""
    gen = torch.Generator().manual_seed(30_000 + seed)
    n = max(cfg.eval_samples // cfg.prompts, 1)
    prompt = torch.arange(cfg.prompts).repeat_interleave(n)
    noise = torch.randn(prompt.shape[0], 2, generator=gen)
    return task.rewards(sample(model, prompt, noise, cfg.sampler_steps)).mean(0)


def run_seed(cfg: ToyConfig, task: ToyTask, seed: int) -> dict[str, Any]:
    """Pre-train one base model for ``seed`` and fine-tune it with every method of ``cfg``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = VelocityField(cfg.prompts, cfg.hidden, cfg.lora_rank)
    fm_loss = pretrain(base, task, cfg, gen)
    initial = _evaluate(base, task, cfg, seed)
    out: dict[str, Any] = {"seed": seed, "pretrain_loss": fm_loss, "initial": initial.tolist()}
    for method in cfg.methods:
        out[method] = run_method(method, base, task, cfg, seed)
    return out


def _seed_summary(run: dict[str, Any], method: str, tail: int) -> dict[str, Any]:
    rec = run[method]
    means = np.asarray(rec["reward_mean"])
    cos = np.asarray(rec["cos"])
    worst = cos.min(axis=1)
    signal = np.asarray(rec["signal"]).all(axis=1)
    final = means[-tail:].mean(axis=0)
    return {
        "frac_neg_worst_cos": float((worst < 0).mean()),
        "signal_batches": int(signal.sum()),
        "frac_neg_worst_cos_signal": float((worst[signal] < 0).mean()) if signal.any() else 0.0,
        "lambda_raw_std": float(np.asarray(rec["weights_raw"]).std(axis=0).mean()),
        "median_min_norm_ratio": float(np.median(rec["min_norm_ratio"])),
        "median_worst_cos": float(np.median(worst)),
        "frac_neg_worst_cos_other": float((np.asarray(rec["cos_other"]).min(axis=1) < 0).mean()),
        "delta": (final - np.asarray(run["initial"])).tolist(),
        "delta_eval": (np.asarray(rec["final_eval"]) - np.asarray(run["initial"])).tolist(),
        "qp_fallbacks": int(np.sum(rec["qp_fallback"])),
    }


def summarize(runs: Sequence[dict[str, Any]], cfg: ToyConfig) -> dict[str, Any]:
    """Per-seed and across-seed (mean, standard deviation) summaries of every method."""
    tail = max(1, int(round(0.1 * cfg.steps)))
    summary: dict[str, Any] = {"tail_steps": tail, "methods": {}}
    for method in cfg.methods:
        per_seed = [_seed_summary(run, method, tail) for run in runs]
        agg: dict[str, Any] = {"per_seed": per_seed}
        scalars = (
            "frac_neg_worst_cos",
            "frac_neg_worst_cos_signal",
            "signal_batches",
            "median_worst_cos",
            "frac_neg_worst_cos_other",
            "lambda_raw_std",
            "median_min_norm_ratio",
        )
        for key in scalars:
            vals = np.asarray([s[key] for s in per_seed])
            agg[key] = {"mean": float(vals.mean()), "std": float(vals.std())}
        for key in ("delta", "delta_eval"):
            vals = np.asarray([s[key] for s in per_seed])  # [S, K]
            agg[key] = {"mean": vals.mean(0).tolist(), "std": vals.std(0).tolist()}
        deltas = np.asarray([s["delta"] for s in per_seed])
        agg["seeds_all_rewards_up"] = int((deltas > 0).all(axis=1).sum())
        agg["qp_fallbacks"] = int(sum(s["qp_fallbacks"] for s in per_seed))
        summary["methods"][method] = agg
    return summary


def _pm(mean: float, std: float, fmt: str = "+.4f") -> str:
    return f"{mean:{fmt}} ± {std:.4f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def format_results(summary: dict[str, Any], cfg: ToyConfig) -> str:
    """Markdown: one row per method; reward changes are in each reward's own units."""
    k = cfg.k
    n = len(cfg.seeds)
    head = [
        "method",
        "worst cos < 0, all batches",
        "worst cos < 0, batches where every reward has signal [batches]",
        "median worst cos",
        *[f"Δ reward {i} (scale {cfg.reward_scales[i]:g})" for i in range(k)],
        f"seeds with every Δ > 0 (of {n})",
    ]
    lines = [_row(head), "|" + "---|" * len(head)]
    for method in cfg.methods:
        a = summary["methods"][method]
        cells = [
            method,
            _pm(a["frac_neg_worst_cos"]["mean"], a["frac_neg_worst_cos"]["std"], ".3f"),
            _pm(
                a["frac_neg_worst_cos_signal"]["mean"], a["frac_neg_worst_cos_signal"]["std"], ".3f"
            )
            + f" [{a['signal_batches']['mean']:.0f}]",
            _pm(a["median_worst_cos"]["mean"], a["median_worst_cos"]["std"], "+.3f"),
            *[_pm(a["delta"]["mean"][i], a["delta"]["std"][i]) for i in range(k)],
            str(a["seeds_all_rewards_up"]),
        ]
        lines.append(_row(cells))

    head2 = [
        "method",
        *[f"Δ reward {i}, final policy, eval noise" for i in range(k)],
        "worst cos < 0 vs the other direction",
        "std of raw λ*",
        "median norm(d_min_norm) / mean norm(g_k)",
        "QP fallbacks",
    ]
    lines2 = [_row(head2), "|" + "---|" * len(head2)]
    for method in cfg.methods:
        a = summary["methods"][method]
        cells = [
            method,
            *[_pm(a["delta_eval"]["mean"][i], a["delta_eval"]["std"][i]) for i in range(k)],
            _pm(a["frac_neg_worst_cos_other"]["mean"], a["frac_neg_worst_cos_other"]["std"], ".3f"),
            f"{a['lambda_raw_std']['mean']:.3f}",
            f"{a['median_min_norm_ratio']['mean']:.3f}",
            str(a["qp_fallbacks"]),
        ]
        lines2.append(_row(cells))
    return (
        f"Toy study: K = {k} rewards (scales {cfg.reward_scales}), {cfg.prompts} prompts x "
        f"{cfg.group_size} rollouts, {cfg.steps} steps, seeds {cfg.seeds}, advantage std "
        f"{cfg.advantage_std!r}, {cfg.timesteps} training t per rollout "
        f"({cfg.timestep_sampling}); mean ± std over seeds. "
        f"Worst cos = min over rewards of cos(g_k, applied update), g_k from the per-reward "
        f"advantages on the same batch; a reward has signal in a batch when some rollout has a "
        f"non-zero advantage for it. Δ = mean rollout reward over the last {summary['tail_steps']} "
        f"steps minus the base model's mean on {cfg.eval_samples} evaluation samples.\n\n"
        + "\n".join(lines)
        + "\n\nDiagnostics. Δ on the final sampling policy with the fixed evaluation noise; the "
        "worst cosine against the other direction on this method's batches (the weighted-sum "
        "gradient for the MARBLE rows, the raw min-norm direction for weighted_sum); the spread "
        "of the per-batch QP solution; how small the min-norm point is next to the gradients "
        "(small: strongly conflicting rewards).\n\n" + "\n".join(lines2) + "\n"
    )


def plot_curves(runs: Sequence[dict[str, Any]], cfg: ToyConfig, path: Path) -> None:
    """Per-reward rollout means (seed mean, min-max band) and the worst cosine, every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = cfg.k
    fig, axes = plt.subplots(1, k + 1, figsize=(4 * (k + 1), 3.4))
    colours = {
        "weighted_sum": "tab:red",
        "marble": "tab:blue",
        "marble_guarded": "tab:purple",
        "marble_no_ema": "tab:green",
        "marble_lagged": "tab:orange",
        "marble_output": "tab:red",
    }
    steps = np.arange(cfg.steps)
    window = max(1, cfg.steps // 30)

    def smooth(y: np.ndarray) -> np.ndarray:
        if window <= 1:
            return y
        kernel = np.ones(window) / window
        pad = np.pad(y, (window - 1, 0), mode="edge")
        return np.convolve(pad, kernel, mode="valid")

    for method in cfg.methods:
        means = np.stack([np.asarray(run[method]["reward_mean"]) for run in runs])  # [S, T, K]
        worst = np.stack([np.asarray(run[method]["cos"]).min(axis=1) for run in runs])  # [S, T]
        for i in range(k):
            curves = np.stack([smooth(m[:, i]) for m in means])
            ax = axes[i]
            ax.plot(steps, curves.mean(0), color=colours[method], label=method)
            ax.fill_between(steps, curves.min(0), curves.max(0), color=colours[method], alpha=0.2)
        wc = np.stack([smooth(w) for w in worst])
        axes[k].plot(steps, wc.mean(0), color=colours[method], label=method)
        axes[k].fill_between(steps, wc.min(0), wc.max(0), color=colours[method], alpha=0.2)
    for i in range(k):
        axes[i].set_title(f"reward {i} (scale {cfg.reward_scales[i]:g})")
        axes[i].set_xlabel("step")
        axes[i].axhline(np.mean([run["initial"][i] for run in runs]), color="grey", ls=":")
    axes[0].set_ylabel("rollout mean reward")
    axes[k].set_title("worst cosine(g_k, update)")
    axes[k].axhline(0.0, color="grey", ls=":")
    axes[k].set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> tuple[ToyConfig, Path]:
    """Command-line options (``--help`` lists them) -> config and output folder."""
    d = ToyConfig()
    p = argparse.ArgumentParser(
        description=(
            "Toy multi-reward flow-matching study: DiffusionNFT fine-tuning with MARBLE (per-reward "
            "advantages, OSQP min-norm balance, coefficient EMA) against a weighted-sum reward."
        )
    )
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds, help="training seeds")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=d.methods,
        help="methods to compare (marble_guarded: the library's guarded EMA; marble_no_ema: raw QP "
        "coefficients, the EMA ablation)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="RL steps per method and seed")
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
    p.add_argument(
        "--reward-scales",
        type=float,
        nargs="+",
        default=d.reward_scales,
        help="one scale per reward (their number is K >= 2)",
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
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="evaluation samples")
    p.add_argument(
        "--threads", type=int, default=d.threads, help="torch CPU threads (1 is fastest here)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny run (seconds): 1 seed, few steps")
    p.add_argument(
        "--out", type=Path, default=Path("runs/toy_study"), help="output folder (created)"
    )
    a = p.parse_args(argv)
    if len(a.reward_scales) < 2 or any(s <= 0 for s in a.reward_scales):
        p.error("--reward-scales needs at least two positive scales (one per reward)")
    cfg = ToyConfig(
        seeds=list(a.seeds),
        methods=list(dict.fromkeys(a.methods)),
        steps=a.steps,
        prompts=a.prompts,
        group_size=a.group_size,
        sampler_steps=a.sampler_steps,
        timesteps=a.timesteps,
        timestep_sampling=a.timestep_sampling,
        reward_scales=list(a.reward_scales),
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
        eval_samples=a.eval_samples,
        threads=a.threads,
    )
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
    """Run the study, write ``curves.png``, ``results.md``, ``results.json``; return the summary."""
    cfg, out = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        return _run(cfg, out)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: ToyConfig, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    task = make_task(cfg)
    runs = []
    for seed in cfg.seeds:
        runs.append(run_seed(cfg, task, seed))
        print(f"seed {seed} done ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    summary = summarize(runs, cfg)
    elapsed = time.perf_counter() - start
    text = format_results(summary, cfg) + f"\nRuntime: {elapsed:.1f} s.\n"
    print(text, end="")
    (out / "results.md").write_text(text)
    plot_curves(runs, cfg, out / "curves.png")
    payload = {"config": asdict(cfg), "runtime_s": elapsed, "summary": summary, "runs": runs}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
