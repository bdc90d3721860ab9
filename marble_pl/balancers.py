"""Balancers as classes: a ``[K, K]`` Gram in, coefficients on the simplex out.

One small interface (:class:`Balancer`) so that the module never branches on the balancer's name:
a config picks the class by ``class_path`` (jsonargparse / LightningCLI), e.g.::

    model:
      balancer:
        class_path: marble_pl.balancers.GramianWeighting
        init_args: {weighting: UPGrad}

The old names (``marble``, ``weighted_sum``, ``single``) still work through
:func:`resolve_balancer`. A balancer either needs the per-reward gradients' Gram
(:attr:`Balancer.needs_gram`: MARBLE's min-norm QP, torchjd's weightings) or mixes the rewards
before the advantages (:meth:`Balancer.mix`: the weighted sum and single-reward baselines), in
which case the update trains one estimator on ``R @ w`` with weight 1.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar, get_args

import numpy as np
import torch
from torch import Tensor

from marble_pl.balance import (
    GRAD_EPS,
    BalanceResult,
    MinNormSolver,
    Normalization,
    active_rewards,
    applied_weights,
    gradient_scales,
    rescale_gram,
)
from marble_pl.errors import ConfigError

__all__ = [
    "LEGACY_NAMES",
    "Balancer",
    "EqualAlpha",
    "GramianWeighting",
    "MinNormBalancer",
    "SingleReward",
    "WeightedSum",
    "resolve_balancer",
]

LEGACY_NAMES: tuple[str, ...] = ("marble", "weighted_sum", "single")
"""The string values ``model.balancer`` took before balancers were classes."""

_EXTRA_HINT = 'pip install "marble-pl[balancers]"'


def _as_array(x: np.ndarray | Tensor | Sequence[float]) -> np.ndarray:
    """A float64 numpy copy of an array or tensor (the module hands over torch tensors)."""
    if isinstance(x, Tensor):
        return x.detach().double().cpu().numpy()
    return np.array(x, dtype=np.float64)


def _as_gram(gram: np.ndarray | Tensor) -> np.ndarray:
    """``gram`` as a float64 ``[K, K]`` array (non-finite values are left to the caller)."""
    m = _as_array(gram)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square [K, K] matrix, got shape {m.shape}")
    return m


def _plain(value: Any) -> Any:
    """Plain data (lists, dicts, numbers, strings) for hparams and checkpoints."""
    if isinstance(value, np.ndarray | Tensor):
        return _as_array(value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    """`` Did you mean 'x'?`` for the closest choice (case-insensitive), or nothing."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
    return f" Did you mean {by_lower[close[0]]!r}?" if close else ""


class Balancer(ABC):
    """Gram in, coefficients out; plus how the K rewards become the optimality probabilities r.

    Subclasses store each ``__init__`` argument under its own name (that is what :meth:`spec`
    reads) and implement :meth:`__call__`; a balancer that mixes the rewards sets ``needs_gram =
    False`` and overrides :meth:`mix`.
    """

    needs_gram: ClassVar[bool] = True
    """False: the weights do not depend on the Gram (no per-reward gradients needed)."""

    k: int | None = None
    names: tuple[str, ...] = ()
    _last: np.ndarray | None = None
    _applied: np.ndarray | None = None
    _subset: bool = False
    """True while :meth:`balance` solves on the rewards left in the QP (a smaller Gram)."""

    def bind(self, reward_names: Sequence[str]) -> None:
        """Validate against the K rewards (a ConfigError names the setting); called once."""
        names = tuple(str(n) for n in reward_names)
        if not names:
            raise ConfigError(
                "model.rewards is empty: a balancer needs at least one reward to train on"
            )
        self.k, self.names = len(names), names

    def _bound_k(self) -> int:
        if self.k is None:
            raise RuntimeError(f"{type(self).__name__}.bind(reward_names) must be called first")
        return self.k

    def mix(self) -> np.ndarray | None:
        """None: one advantage estimator per reward (``r`` is ``[N, K]``); else ``w`` [K] on the
        simplex: ONE estimator on ``R @ w`` (``r`` is ``[N, 1]``, applied with weight 1)."""
        return None

    def fixed_weights(self) -> np.ndarray | None:
        """None, or ``[K]`` weights on the simplex applied to the per-reward estimators every
        step without any Gram (:class:`EqualAlpha`; only read when :attr:`needs_gram` is False)."""
        return None

    @abstractmethod
    def __call__(
        self, gram: np.ndarray | Tensor, losses: np.ndarray | Tensor | None = None
    ) -> BalanceResult:
        """``[K, K]`` Gram (and per-reward losses) -> weights on the simplex (sum 1).

        Only called when :attr:`needs_gram`. The weights must sum to 1 because the update's loss
        is affine in ``r``: ``r_bar = r @ lambda`` is then itself an optimality probability.
        """

    def balance(
        self,
        gram: np.ndarray | Tensor,
        losses: np.ndarray | Tensor | None = None,
        present: np.ndarray | None = None,
        grad_eps: float = GRAD_EPS,
    ) -> BalanceResult:
        """:meth:`__call__` on the rewards that take part (:func:`~marble_pl.balance.active_rewards`).

        The weights of a solve that trains some reward are kept as :attr:`last_applied` (the
        coefficients of the update's own space, which steps between balanced ones apply).

        A reward that applies to no sample of the batch (``present[k]`` False), or whose
        gradient norm is ``<= grad_eps`` or not finite, leaves the QP with weight 0 and the
        others are balanced among themselves (the paper authors' rule); the result's ``active``
        says which took part. When none is left the weights are all 0 (the module skips that
        update) with status ``no_sample`` (no reward applies to any sample), ``nonfinite_gram``
        (some gradient not finite), ``zero_gram`` (every gradient exactly zero) or
        ``no_active_reward`` (the norms are all ``<= grad_eps``). The warm start of the rewards
        left out is kept for the next full solve. A balancer configured for K rewards (a
        torchjd ``pref_vector``, say) that cannot solve a smaller problem falls back as it
        documents.
        """
        result = self._balance_active(gram, losses, present, grad_eps)
        if result.status not in ("nonfinite_gram", "zero_gram") and result.weights.any():
            self._applied = np.asarray(result.weights, dtype=np.float64).copy()
        return result

    def _balance_active(
        self,
        gram: np.ndarray | Tensor,
        losses: np.ndarray | Tensor | None,
        present: np.ndarray | None,
        grad_eps: float,
    ) -> BalanceResult:
        """:meth:`balance` without the bookkeeping of :attr:`last_applied`."""
        m = _as_gram(gram)
        k = m.shape[0]
        keep = active_rewards(m, present, grad_eps)
        if keep.all():
            return replace(self(m, losses), active=keep)
        if not keep.any():
            if present is not None and not np.any(present):
                status = "no_sample"
            elif not np.all(np.isfinite(m)):
                status = "nonfinite_gram"
            elif not m.any():
                status = "zero_gram"
            else:
                status = "no_active_reward"
            return BalanceResult(np.zeros(k), status, 0.0, False, active=keep)
        idx = np.flatnonzero(keep)
        previous = self.warm_start
        if previous is not None and previous.shape == (k,):
            sub = previous[idx]
            self.warm_start = sub / sub.sum() if sub.sum() > 0 else None
        host = None if losses is None else _as_array(losses)[idx]
        self._subset = True
        try:
            result = self(m[np.ix_(idx, idx)], host)
        finally:
            self._subset = False
        weights = np.zeros(k)
        weights[idx] = result.weights
        solved = self.warm_start
        if solved is not None and solved.shape == (idx.size,):
            full = np.zeros(k) if previous is None or previous.shape != (k,) else previous.copy()
            full[idx] = solved * (full[idx].sum() if full[idx].sum() > 0 else 1.0)
            self.warm_start = full / full.sum()
        else:
            self.warm_start = previous
        return replace(result, weights=weights, active=keep)

    def effective_weights(self, weights: np.ndarray) -> np.ndarray:
        """Per-reward weights of an update, for logging: :meth:`mix` when mixing, else ``weights``."""
        w = self.mix()
        return np.asarray(weights if w is None else w, dtype=np.float64)

    @property
    def warm_start(self) -> np.ndarray | None:
        """The last weights (None before the first call, or when not applicable); settable."""
        return None if self._last is None else self._last.copy()

    @warm_start.setter
    def warm_start(self, value: np.ndarray | Sequence[float] | None) -> None:
        self._last = None if value is None else _as_array(value)

    @property
    def last_applied(self) -> np.ndarray | None:
        """The last :meth:`balance`'s weights, in the space the update applies them (raw
        advantages), unlike :attr:`warm_start` (the solver's own space). Before any (or from a
        checkpoint that did not hold them): the warm start where it lives in that space
        (:meth:`_warm_start_is_applied`), else None."""
        if self._applied is not None:
            return self._applied.copy()
        return self.warm_start if self._warm_start_is_applied() else None

    def _warm_start_is_applied(self) -> bool:
        """Whether :attr:`warm_start` holds weights as the update applies them."""
        return True

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume exactly (warm start, last applied), as plain data."""
        w, a = self.warm_start, self._applied
        state: dict[str, Any] = {"warm_start": None if w is None else w.tolist()}
        if a is not None:
            state["last_applied"] = a.tolist()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.warm_start = state.get("warm_start")
        applied = state.get("last_applied")
        self._applied = None if applied is None else _as_array(applied)

    def spec(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}`` as plain data (hparams, checkpoints)."""
        cls = type(self)
        init_args = {}
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if not hasattr(self, name):
                raise TypeError(
                    f"{cls.__name__} does not store its init argument {name!r} under that name: "
                    f"store it (self.{name} = {name}) or override spec()"
                )
            init_args[name] = _plain(getattr(self, name))
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec()["init_args"].items())
        return f"{type(self).__name__}({args})"

    def _degenerate(self, m: np.ndarray) -> BalanceResult | None:
        """Uniform weights for a Gram with nothing to balance (the module skips that step).

        A non-finite Gram (NaN/inf gradient) or a zero one (every gradient zero) gives uniform
        weights with ``fallback=False``, as the module has always done: the update is skipped
        after the backward, so these weights are never applied and the warm start is kept.
        """
        k = m.shape[0]
        if self.k is not None and k != self.k and not (self._subset and k < self.k):
            raise ValueError(f"gram is {k}x{k} but {self.k} rewards were bound {list(self.names)}")
        if not np.all(np.isfinite(m)):
            return BalanceResult(np.full(k, 1.0 / k), "nonfinite_gram", 0.0, False)
        if float(np.trace(m)) <= 0.0:
            return BalanceResult(np.full(k, 1.0 / k), "zero_gram", 0.0, False)
        return None


class MinNormBalancer(Balancer):
    """MARBLE's default: the min-norm point of the (normalised) gradients' convex hull (OSQP).

    ``normalization`` divides each gradient by a scale first (``none``, ``l2`` and ``unit``
    norms, ``loss`` values). ``l2`` and ``loss`` map the QP's weights back onto the raw
    gradients (:func:`~marble_pl.balance.to_raw_weights`: the normalised min-norm direction),
    renormalised to the simplex; ``unit`` applies the QP's alpha itself to the raw per-reward
    advantages, as the paper authors' ``normalize_grads=True``
    (:func:`~marble_pl.balance.applied_weights`). The returned weights are those applied;
    status, solve time and fallback are the QP's. The warm start is the QP's own solution
    (normalised space).
    """

    def __init__(
        self,
        normalization: Normalization = "none",
        eps_abs: float = 1e-9,
        eps_rel: float = 1e-9,
        max_iter: int = 10_000,
    ) -> None:
        choices = get_args(Normalization)
        if normalization not in choices:
            raise ConfigError(
                f"normalization={normalization!r} is not one of {list(choices)}: use 'none' "
                "(raw gradients), 'l2' (unit-norm gradients, their min-norm direction), 'unit' "
                "(the QP on unit-norm gradients, its alpha on the raw advantages: the paper "
                "authors') or 'loss' (divided by the loss)"
            )
        self.normalization = normalization
        self.eps_abs, self.eps_rel, self.max_iter = float(eps_abs), float(eps_rel), int(max_iter)
        self.solver = MinNormSolver(eps_abs=eps_abs, eps_rel=eps_rel, max_iter=max_iter)

    def __call__(
        self, gram: np.ndarray | Tensor, losses: np.ndarray | Tensor | None = None
    ) -> BalanceResult:
        m = _as_gram(gram)
        degenerate = self._degenerate(m)
        if degenerate is not None:
            return degenerate
        scales = gradient_scales(
            m, self.normalization, None if losses is None else _as_array(losses)
        )
        result = self.solver(rescale_gram(m, scales))
        raw = applied_weights(result.weights, scales, self.normalization)
        return BalanceResult(raw, result.status, result.solve_seconds, result.fallback)

    def _warm_start_is_applied(self) -> bool:
        """The QP's solution is the applied alpha without rescaling (``none``) or by design
        (``unit``); ``l2`` and ``loss`` map it onto the raw gradients first."""
        return self.normalization in ("none", "unit")

    @property
    def warm_start(self) -> np.ndarray | None:
        """The QP's last solution (in the normalised space, where the next solve starts)."""
        w = self.solver.last_weights
        return None if w is None else w.copy()

    @warm_start.setter
    def warm_start(self, value: np.ndarray | Sequence[float] | None) -> None:
        self.solver.last_weights = None if value is None else _as_array(value)


class WeightedSum(Balancer):
    """Baseline (today's practice): one advantage estimator on ``R @ w``, ``w`` normalised.

    ``weights`` are non-negative with a positive sum, one per reward in ``model.rewards``'
    order; None gives uniform weights. Where some rewards do not apply to a sample
    (:meth:`~marble_pl.rewards.Reward.applicable`), its combined score is the weighted mean of
    those that do, ``sum_k w_k a_ik R_ik / sum_k w_k a_ik`` (``w`` renormalised per sample); a
    sample none of whose weighted rewards applies is left out of the estimator (``r = 0.5``)
    and of the loss's mean. :class:`SingleReward` is the one-hot case: its reward's samples only.
    """

    needs_gram: ClassVar[bool] = False
    setting: str = "model.balancer.init_args.weights"
    """How a config names ``weights`` (error messages); ``model.reward_weights`` for the old form."""

    def __init__(self, weights: list[float] | None = None) -> None:
        self.weights = None if weights is None else [float(w) for w in weights]
        self._w: np.ndarray | None = None

    def bind(self, reward_names: Sequence[str]) -> None:
        super().bind(reward_names)
        k = self._bound_k()
        if self.weights is None:
            self._w = np.full(k, 1.0 / k)
            return
        w = np.asarray(self.weights, dtype=np.float64)
        if w.size != k:
            raise ConfigError(
                f"{self.setting} has {w.size} entries for {k} rewards {list(self.names)}: "
                "give one weight per reward, in the same order"
            )
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ConfigError(
                f"{self.setting}={self.weights} must be finite and non-negative with a positive "
                f"sum: give each of {list(self.names)} a weight >= 0, at least one > 0"
            )
        self._w = w / w.sum()

    def mix(self) -> np.ndarray:
        self._bound_k()
        assert self._w is not None
        return self._w.copy()

    def __call__(
        self, gram: np.ndarray | Tensor, losses: np.ndarray | Tensor | None = None
    ) -> BalanceResult:
        """The fixed weights (the module does not call this: ``needs_gram`` is False)."""
        return BalanceResult(self.mix(), "fixed", 0.0, False)


class EqualAlpha(Balancer):
    """Ablation (the paper authors' ``equal_alpha``): ``alpha = 1/K`` on the per-reward
    advantages every step, never solved (no per-reward gradients needed).

    Unlike :class:`WeightedSum` (one estimator on ``R @ w``), each reward keeps its own
    advantage estimator; the update combines them with equal coefficients.
    """

    needs_gram: ClassVar[bool] = False

    def fixed_weights(self) -> np.ndarray:
        k = self._bound_k()
        return np.full(k, 1.0 / k)

    def __call__(
        self, gram: np.ndarray | Tensor, losses: np.ndarray | Tensor | None = None
    ) -> BalanceResult:
        """``1/K`` each, whatever the Gram (the module does not call this)."""
        return BalanceResult(self.fixed_weights(), "fixed", 0.0, False)


class SingleReward(Balancer):
    """Baseline: only ``rewards[index]`` trains (the single-reward speed reference)."""

    needs_gram: ClassVar[bool] = False
    setting: str = "model.balancer.init_args.index"
    """How a config names ``index`` (error messages); ``model.single_reward`` for the old form."""

    def __init__(self, index: int = 0) -> None:
        self.index = int(index)

    def bind(self, reward_names: Sequence[str]) -> None:
        super().bind(reward_names)
        k = self._bound_k()
        if not 0 <= self.index < k:
            raise ConfigError(
                f"{self.setting}={self.index} is out of range for rewards {list(self.names)}: "
                f"use an index from 0 to {k - 1}"
            )

    def mix(self) -> np.ndarray:
        w = np.zeros(self._bound_k())
        w[self.index] = 1.0
        return w

    def __call__(
        self, gram: np.ndarray | Tensor, losses: np.ndarray | Tensor | None = None
    ) -> BalanceResult:
        """The one-hot weights (the module does not call this: ``needs_gram`` is False)."""
        return BalanceResult(self.mix(), "fixed", 0.0, False)


def _torchjd_aggregation() -> Any:
    """``torchjd.aggregation``, imported on first use: torchjd is the optional ``balancers`` extra."""
    try:
        return importlib.import_module("torchjd.aggregation")
    except ImportError as err:
        raise ConfigError(
            f"GramianWeighting needs torchjd, which is not installed ({err}): run {_EXTRA_HINT}"
        ) from err


def _key(name: str) -> str:
    """``UPGrad``, ``upgrad``, ``UPGradWeighting`` and ``IMTL-G`` all name the same weighting."""
    name = name.strip()
    if name.endswith("Weighting"):
        name = name[: -len("Weighting")]
    return name.replace("-", "").replace("_", "").lower()


def gramian_weightings() -> dict[str, type]:
    """torchjd's weightings that work from the Gram alone, by short name (``UPGrad``: class).

    The others (``Mean``, ``Sum``, ``Random``, ``MoDo``, ...) take the Jacobian itself, which a
    balancer never sees.
    """
    agg = _torchjd_aggregation()
    try:  # private in torchjd 0.18; without it, accept every Weighting
        base = importlib.import_module("torchjd.aggregation._weighting_bases")._GramianWeighting
    except (ImportError, AttributeError):
        base = agg.Weighting
    found = {}
    for attr in sorted(dir(agg)):
        cls = getattr(agg, attr)
        gramian = inspect.isclass(cls) and issubclass(cls, base) and cls is not base
        if attr.endswith("Weighting") and gramian and not inspect.isabstract(cls):
            found[attr[: -len("Weighting")]] = cls
    return found


class GramianWeighting(Balancer):
    """torchjd's Gramian weightings (UPGrad, MGDA, DualProj, PCGrad, IMTL-G, Aligned-MTL, ...).

    ``weighting`` is the torchjd class name, with or without the ``Weighting`` suffix
    (``UPGrad`` -> ``torchjd.aggregation.UPGradWeighting``); ``init_args`` its keyword arguments
    (a list for a ``Tensor`` argument such as ``pref_vector``). Needs the ``balancers`` extra.

    The Gram is symmetrised and divided by its mean diagonal (a positive scalar, as
    :class:`~marble_pl.balance.MinNormSolver` does) and fed to torchjd as a float64 tensor: raw
    LoRA Grams (~1e-10) fall under torchjd's absolute thresholds (UPGrad/DualProj's projector
    treats a Gram whose trace is below ``norm_eps=1e-4`` as zero). The weights are then divided by
    their sum so that they lie on the simplex's plane, as the update needs (its loss is affine in
    ``r``): this changes only the step's length, not its direction, and the module's Adam
    optimizer is nearly invariant to that scale. Negative weights (Aligned-MTL, IMTL-G and others
    may give some) are kept, so the result may leave the simplex itself. A non-positive or
    non-finite sum, or a torchjd error, gives uniform weights with ``fallback=True`` and a status
    saying why. The status is ``torchjd:<Name>``; ``losses`` are not used.

    Stateful weightings (GradVac, PCD) keep moving averages across steps that checkpoints do not
    hold: a resumed run restarts them (:meth:`load_state_dict` resets them). PCGrad draws its
    projection order from torch's global generator, so its weights follow the run's seeding.
    """

    def __init__(self, weighting: str = "UPGrad", init_args: dict[str, Any] | None = None) -> None:
        self.weighting = weighting
        self.init_args = dict(init_args or {})
        available = gramian_weightings()
        by_key = {_key(name): name for name in available}
        name = by_key.get(_key(str(weighting)))
        if name is None:
            agg = _torchjd_aggregation()
            jacobian_only = {_key(a) for a in dir(agg) if a.endswith("Weighting")} - set(by_key)
            if _key(str(weighting)) in jacobian_only:
                raise ConfigError(
                    f"torchjd's {weighting!r} weighting needs the Jacobian, not the Gram, so it "
                    f"cannot balance here: use one of {sorted(available)} (or WeightedSum for "
                    "fixed weights)"
                )
            hint = _did_you_mean(str(weighting), sorted(available))
            raise ConfigError(
                f"unknown torchjd weighting {weighting!r} in model.balancer.init_args.weighting."
                f"{hint} Available: {sorted(available)}"
            )
        self.name = name
        self._weighting = self._build(available[name])

    def _build(self, cls: type) -> Any:
        """Instantiate torchjd's class, turning every user mistake into a ConfigError."""
        params = inspect.signature(cls).parameters
        unknown = sorted(set(self.init_args) - set(params))
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no argument {unknown} (model.balancer.init_args.init_args): "
                f"it takes {list(params)}"
            )
        kwargs = {}
        for key, value in self.init_args.items():
            wants_tensor = "Tensor" in str(params[key].annotation)
            if wants_tensor and isinstance(value, list | tuple):
                value = torch.tensor(value, dtype=torch.float64)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except ImportError as err:
            raise ConfigError(
                f"torchjd's {cls.__name__} needs packages the balancers extra does not install: "
                f"{err}"
            ) from err
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"torchjd's {cls.__name__}(**{self.init_args}) failed: {err}; fix "
                "model.balancer.init_args.init_args"
            ) from err

    def bind(self, reward_names: Sequence[str]) -> None:
        """Also try the weighting once on a K x K identity Gram: a wrong ``pref_vector`` length
        (say) is a ConfigError now rather than a fallback at every step."""
        super().bind(reward_names)
        k = self._bound_k()
        try:
            self._weighting(torch.eye(k, dtype=torch.float64))
        except Exception as err:
            raise ConfigError(
                f"torchjd's {self.name}Weighting(**{self.init_args}) fails on {k} rewards "
                f"{list(self.names)}: {type(err).__name__}: {err}; fix "
                "model.balancer.init_args.init_args"
            ) from err
        finally:
            self._reset()

    def _reset(self) -> None:
        reset = getattr(self._weighting, "reset", None)
        if callable(reset):
            reset()

    def __call__(
        self, gram: np.ndarray | Tensor, losses: np.ndarray | Tensor | None = None
    ) -> BalanceResult:
        m = _as_gram(gram)
        degenerate = self._degenerate(m)
        if degenerate is not None:
            return degenerate
        k = m.shape[0]
        m = 0.5 * (m + m.T)
        m = m / (float(np.trace(m)) / k)
        status = f"torchjd:{self.name}"
        start = time.perf_counter()
        try:
            w = _as_array(self._weighting(torch.from_numpy(m)))
        except Exception as err:  # a failing weighting must not stop training
            why = f"{status}: error: {type(err).__name__}: {err}: uniform weights"
            return BalanceResult(np.full(k, 1.0 / k), why, time.perf_counter() - start, True)
        seconds = time.perf_counter() - start
        total = float(w.sum())
        if w.shape != (k,) or not np.all(np.isfinite(w)) or not total > 0.0:
            why = f"{status}: weights {w.tolist()} sum to {total} (not > 0): uniform weights"
            return BalanceResult(np.full(k, 1.0 / k), why, seconds, True)
        weights = w / total
        self._last = weights.copy()
        return BalanceResult(weights, status, seconds, False)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the last weights; a stateful weighting (GradVac, PCD) restarts its averages."""
        super().load_state_dict(state)
        self._reset()


_THIS_MODULE = __name__
_SHORT_NAMES = (
    "MinNormBalancer",
    "WeightedSum",
    "SingleReward",
    "GramianWeighting",
    "EqualAlpha",
)


def _import_class(class_path: str) -> type[Balancer]:
    """``pkg.module.Class`` (or a short class name of this module) as a Balancer subclass."""
    if "." not in class_path:
        if class_path not in _SHORT_NAMES:
            hint = _did_you_mean(class_path, _SHORT_NAMES)
            raise ConfigError(
                f"unknown balancer class {class_path!r} in model.balancer.class_path.{hint} "
                f"This module has {list(_SHORT_NAMES)}; your own: 'package.module.ClassName'"
            )
        class_path = f"{_THIS_MODULE}.{class_path}"
    module_name, _, cls_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as err:
        hint = _did_you_mean(cls_name, _SHORT_NAMES) if module_name == _THIS_MODULE else ""
        raise ConfigError(
            f"model.balancer.class_path={class_path!r} cannot be imported ({err}).{hint}"
        ) from err
    if not (inspect.isclass(cls) and issubclass(cls, Balancer)):
        raise ConfigError(
            f"model.balancer.class_path={class_path!r} is not a marble_pl.balancers.Balancer "
            "subclass: subclass Balancer and implement __call__(gram, losses)"
        )
    return cls


def resolve_balancer(
    spec: str | Mapping[str, Any] | Balancer,
    *,
    reward_weights: Sequence[float] | None = None,
    single_reward: int = 0,
    normalization: Normalization = "none",
) -> Balancer:
    """A :class:`Balancer` from a config value.

    ``marble`` -> ``MinNormBalancer(normalization)``, ``weighted_sum`` ->
    ``WeightedSum(reward_weights)``, ``single`` -> ``SingleReward(single_reward)`` (the keywords
    are the old ``model.*`` settings and only serve those names); ``{"class_path": ...,
    "init_args": {...}}`` (a dotted path or a short class name of this module) is instantiated;
    a Balancer passes through.
    """
    if isinstance(spec, Balancer):
        return spec
    if isinstance(spec, str):
        if spec == "marble":
            return MinNormBalancer(normalization)
        if spec == "weighted_sum":
            balancer: WeightedSum | SingleReward = WeightedSum(
                None if reward_weights is None else list(reward_weights)
            )
            balancer.setting = "model.reward_weights"
            return balancer
        if spec == "single":
            balancer = SingleReward(single_reward)
            balancer.setting = "model.single_reward"
            return balancer
        hint = _did_you_mean(spec, LEGACY_NAMES)
        raise ConfigError(
            f"unknown model.balancer {spec!r}.{hint} Use one of {list(LEGACY_NAMES)} or a class: "
            '{"class_path": "marble_pl.balancers.GramianWeighting", "init_args": '
            '{"weighting": "UPGrad"}}'
        )
    if isinstance(spec, Mapping) and "class_path" in spec:
        extra = sorted(set(spec) - {"class_path", "init_args"})
        if extra:
            raise ConfigError(
                f"model.balancer has unexpected keys {extra}: write "
                '{"class_path": ..., "init_args": {...}}'
            )
        cls = _import_class(str(spec["class_path"]))
        init_args = dict(spec.get("init_args") or {})
        try:
            return cls(**init_args)
        except TypeError as err:
            raise ConfigError(
                f"model.balancer.init_args {init_args} do not fit {cls.__name__}: {err}; it "
                f"takes {list(inspect.signature(cls).parameters)}"
            ) from err
    raise ConfigError(
        f"model.balancer={spec!r} is neither a name {list(LEGACY_NAMES)} nor a "
        '{"class_path": ..., "init_args": {...}} mapping'
    )
