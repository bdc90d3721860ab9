"""Benchmark of the MARBLE min-norm QP: OSQP (cold and warm) against independent solvers.

For every K the script builds Gram matrices ``M = g g^T`` from random per-reward gradients at
LoRA-like scale (gradient norms around 1e-5), in two families:

* ``full``: a shared direction with a random (possibly negative) coefficient plus independent
  noise, norms spread over a decade, so some rewards conflict and some constraints are active;
* ``rank-deficient``: the K gradients live in a subspace of dimension ``max(1, K // 3)``
  (duplicated or collinear rewards), so ``M`` is singular and the minimum may be 0.

Each family is a *sequence* of slowly changing Grams (each gradient drifts by a few percent per
step, like consecutive training steps). Every Gram is solved four ways:

* ``cold``: a new :class:`~marble_pl.balance.MinNormSolver` per call (no warm start);
* ``warm``: one solver along the sequence, as in training: each call is warm-started from the
  previous solution ``x`` (OSQP's workspace is set up afresh every call either way, so a resumed
  run solves bit for bit like an uninterrupted one; only the warm start differs from ``cold``);
* ``SLSQP``: :func:`scipy.optimize.minimize` on the same trace-normalised problem;
* ``FW``: the package's pairwise Frank-Wolfe (:func:`~marble_pl.balance.frank_wolfe_min_norm`).

The relative objective gap is ``(f_osqp - f_ref) / max(f_ref, 1e-8 * mean diag M)`` with
``f = lambda^T M lambda`` evaluated on the raw Gram in float64 and ``f_ref`` the better of SLSQP and
Frank-Wolfe: positive means OSQP is worse than the independent solvers. The floor matters only for
rank-deficient Grams whose minimum is 0 (the origin lies in the gradients' hull), where a relative
gap is meaningless; the table also gives the gap divided by the mean diagonal (scale-free). Times are wall-clock
milliseconds of the whole call (OSQP setup included for both).

``--hard`` runs a separate stress test instead: independent (not drifting) Grams whose gradient
norms span :data:`HARD_SPREAD` orders of magnitude (the largest and smallest norm are pinned at the
two ends, the rest log-uniform between) and, in half of them, 1 to ``max(1, K // 4)`` exactly zero
gradient rows (``M_kk = 0``). Each is solved cold by :class:`~marble_pl.balance.MinNormSolver`.
Per K the table gives the OSQP fallbacks (Frank-Wolfe used), the status counts, the median and
max time of all calls and the median of those that ran OSQP (not answered exactly up front), and
the worst relative objective gap against an exact reference (:func:`hard_reference`: Wolfe's
algorithm checked by Frank-Wolfe), floored on the objective's own scale (:func:`hard_gap`; the
trace-based floor of the main table would hide every error here, the minimum being below
``1e-24 * mean diag M``).

Usage::

    python benchmarks/qp.py                      # K = 2..16, 200 Grams per family and K
    python benchmarks/qp.py --smoke --out qp.md  # a few seconds
    python benchmarks/qp.py --hard               # hard Grams, K = 2, 5, 8, 16, 200 per K
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from marble_pl.balance import MinNormSolver, frank_wolfe_min_norm, project_to_simplex

__all__ = [
    "QPRow",
    "HardRow",
    "make_sequence",
    "make_hard_gram",
    "slsqp_min_norm",
    "wolfe_min_norm",
    "hard_gap",
    "hard_reference",
    "bench_k",
    "bench_hard_k",
    "format_table",
    "format_hard_table",
    "main",
]

#: Parameters per gradient (a small LoRA); large enough that random gradients are generic.
DIM = 4096
#: Typical LoRA gradient norm (ARCHITECTURE §6: OSQP needs the Gram scaled at this size).
NORM = 1e-5
#: Relative drift of every gradient per step along a sequence.
DRIFT = 0.03
#: Relative gaps are taken against ``max(f_ref, GAP_FLOOR * mean diag M)`` (the minimum can be 0).
GAP_FLOOR = 1e-8
FAMILIES = ("full", "rank-deficient")
#: Hard Grams: gradient norms span this many orders of magnitude (``M``'s diagonal twice as many).
HARD_SPREAD = 12.0
#: Numbers of rewards of the hard-Gram table.
HARD_KS = (2, 5, 8, 16)
#: Hard-Gram gaps are relative to ``max(f_ref, HARD_GAP_FLOOR * (sum_k lambda_k ||g_k||)^2)``,
#: the main table's floor on the scale of the terms whose cancellation gives ``f`` (whose float64
#: round-off, ``~K eps`` of that scale, stays below 1e-6 of the floor).
HARD_GAP_FLOOR = GAP_FLOOR


@dataclass
class QPRow:
    """One table row: timings (ms) and accuracy for one K over both Gram families."""

    k: int
    n: int
    cold_median_ms: float
    cold_p90_ms: float
    warm_median_ms: float
    warm_p90_ms: float
    slsqp_median_ms: float
    fw_median_ms: float
    max_rel_gap: float
    max_diag_gap: float
    fallbacks: int


def _base_gradients(k: int, family: str, rng: np.random.Generator) -> np.ndarray:
    """``[K, DIM]`` gradients of the given family, each row with norm ``NORM * 10**U(-0.5, 0.5)``."""
    if family == "full":
        shared = rng.standard_normal(DIM)
        coeff = rng.normal(0.5, 1.0, size=(k, 1))
        g = coeff * shared + rng.standard_normal((k, DIM))
    elif family == "rank-deficient":
        rank = max(1, k // 3)
        g = rng.standard_normal((k, rank)) @ rng.standard_normal((rank, DIM))
    else:
        raise ValueError(f"unknown Gram family {family!r}, expected one of {FAMILIES}")
    norms = NORM * 10.0 ** rng.uniform(-0.5, 0.5, size=(k, 1))
    return g / np.linalg.norm(g, axis=1, keepdims=True) * norms


def make_sequence(
    k: int, family: str, length: int, rng: np.random.Generator, drift: float = DRIFT
) -> list[np.ndarray]:
    """``length`` Gram matrices ``[K, K]`` from gradients that drift slowly from step to step.

    Rank-deficient gradients drift inside their subspace, so every Gram of the sequence stays
    singular.
    """
    g = _base_gradients(k, family, rng)
    if family == "rank-deficient":
        rank = max(1, k // 3)
        _, _, vt = np.linalg.svd(g, full_matrices=False)
        basis = vt[:rank]
        coords = g @ basis.T
    grams = []
    for _ in range(length):
        grams.append(g @ g.T)
        if family == "rank-deficient":
            step = rng.standard_normal(coords.shape)
            coords = coords + drift * step * np.linalg.norm(coords, axis=1, keepdims=True) / (
                np.sqrt(rank)
            )
            g = coords @ basis
        else:
            step = rng.standard_normal(g.shape)
            g = g + drift * step * np.linalg.norm(g, axis=1, keepdims=True) / np.sqrt(DIM)
    return grams


def make_hard_gram(k: int, rng: np.random.Generator, spread: float = HARD_SPREAD) -> np.ndarray:
    """A ``[K, K]`` Gram with gradient norms over ``spread`` decades and maybe zero gradients.

    Directions as in the ``full`` family (a shared direction with a random, possibly negative,
    coefficient plus noise: some rewards conflict). Norms are ``NORM * 10**e`` with one ``e = 0``,
    one ``e = -spread`` and the rest uniform in between; then, with probability 1/2, 1 to
    ``max(1, K // 4)`` random rows are set to exactly zero (a reward with no gradient).
    """
    shared = rng.standard_normal(DIM)
    coeff = rng.normal(0.5, 1.0, size=(k, 1))
    g = coeff * shared + rng.standard_normal((k, DIM))
    exponents = rng.uniform(-spread, 0.0, size=k)
    order = rng.permutation(k)
    exponents[order[0]], exponents[order[1]] = 0.0, -spread
    g = g / np.linalg.norm(g, axis=1, keepdims=True) * (NORM * 10.0**exponents)[:, None]
    if rng.random() < 0.5:
        zeros = int(rng.integers(1, max(1, k // 4) + 1))
        g[rng.choice(k, size=zeros, replace=False)] = 0.0
    return g @ g.T


def wolfe_min_norm(m: np.ndarray, max_iter: int = 1000, tol: float = 1e-12) -> np.ndarray:
    """Exact reference for badly scaled Grams: Wolfe's (1976) min-norm-point algorithm.

    An active-set method that is finite in exact arithmetic: it keeps a "corral" ``S`` of
    vertices, moves to the minimum-norm point of their affine hull (a bordered linear system) and
    drops vertices whose weight would turn negative. The linear systems use the unit-diagonal
    cosine matrix ``M_jk / (n_j n_k)`` and a constraint row normalised to max 1, so norms over many
    decades stay exact; a zero gradient row is the answer itself. Stops when no vertex improves
    by more than ``tol * n_j * ||d||`` (a cosine-level KKT test, free of the scale).
    """
    k = m.shape[0]
    diag = np.clip(np.diag(m), 0.0, None)
    first = int(np.argmin(diag))
    w = np.zeros(k)
    w[first] = 1.0
    if diag[first] == 0.0:
        return w
    inv = 1.0 / np.sqrt(diag)
    cos = m * np.outer(inv, inv)
    corral = [first]
    for _ in range(max_iter):
        mw = m @ w
        f = float(w @ mw)
        j = int(np.argmin(mw))
        if f <= 0.0 or f - mw[j] <= tol * np.sqrt(diag[j] * f) or j in corral:
            break
        corral.append(j)
        while True:
            idx = np.array(corral)
            a = inv[idx] / inv[idx].max()
            n = idx.size
            kkt = np.zeros((n + 1, n + 1))
            kkt[:n, :n] = cos[np.ix_(idx, idx)]
            kkt[:n, n] = kkt[n, :n] = a
            rhs = np.zeros(n + 1)
            rhs[n] = 1.0
            mu = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:n]
            v = np.zeros(k)
            v[idx] = inv[idx] * mu
            v /= v.sum()
            if np.all(v[idx] > 0.0):
                w = v
                break
            # Step towards v until the first weight hits zero; drop that vertex.
            bad = idx[v[idx] <= 0.0]
            ratios = w[bad] / (w[bad] - v[bad])
            leaving = int(np.argmin(ratios))
            w = np.clip(w + ratios[leaving] * (v - w), 0.0, None)
            w[bad[leaving]] = 0.0
            corral = [i for i in corral if w[i] > 0.0]
            w /= w.sum()
    return w


def slsqp_min_norm(m: np.ndarray) -> np.ndarray:
    """Independent reference: SLSQP on ``min x^T M x`` over the simplex (trace-normalised M)."""
    k = m.shape[0]
    scale = max(float(np.trace(m)) / k, 1e-300)
    mm = m / scale
    res = minimize(
        lambda x: float(x @ mm @ x),
        np.full(k, 1.0 / k),
        jac=lambda x: 2.0 * (mm @ x),
        bounds=[(0.0, 1.0)] * k,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones(k)}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return project_to_simplex(res.x)


def _objective(m: np.ndarray, x: np.ndarray) -> float:
    return float(x @ m @ x)


def _ms(fn, *args):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn(*args)
    return out, 1e3 * (time.perf_counter() - start)


def bench_k(k: int, repeats: int, rng: np.random.Generator) -> tuple[QPRow, dict[str, list[float]]]:
    """Run all four solvers on ``repeats`` Grams of each family for one K."""
    times: dict[str, list[float]] = {"cold": [], "warm": [], "slsqp": [], "fw": []}
    gaps: list[float] = []
    abs_gaps: list[float] = []
    fallbacks = 0
    for family in FAMILIES:
        warm_solver = MinNormSolver()
        for m in make_sequence(k, family, repeats, rng):
            cold, t_cold = _ms(MinNormSolver(), m)
            warm, t_warm = _ms(warm_solver, m)
            x_slsqp, t_slsqp = _ms(slsqp_min_norm, m)
            x_fw, t_fw = _ms(frank_wolfe_min_norm, m / (np.trace(m) / k))
            for name, value in zip(times, (t_cold, t_warm, t_slsqp, t_fw), strict=True):
                times[name].append(value)
            fallbacks += int(cold.fallback) + int(warm.fallback)
            f_ref = min(_objective(m, x_slsqp), _objective(m, x_fw))
            diag = float(np.trace(m)) / k
            for res in (cold, warm):
                diff = _objective(m, res.weights) - f_ref
                gaps.append(diff / max(f_ref, GAP_FLOOR * diag))
                abs_gaps.append(diff / diag)
    row = QPRow(
        k=k,
        n=len(times["cold"]),
        cold_median_ms=float(np.median(times["cold"])),
        cold_p90_ms=float(np.percentile(times["cold"], 90)),
        warm_median_ms=float(np.median(times["warm"])),
        warm_p90_ms=float(np.percentile(times["warm"], 90)),
        slsqp_median_ms=float(np.median(times["slsqp"])),
        fw_median_ms=float(np.median(times["fw"])),
        max_rel_gap=float(np.max(gaps)),
        max_diag_gap=float(np.max(abs_gaps)),
        fallbacks=fallbacks,
    )
    return row, times


@dataclass
class HardRow:
    """One row of the hard-Gram table (``--hard``): K, fallbacks, statuses, times, worst gap."""

    k: int
    n: int
    with_zero_rows: int
    fallbacks: int
    statuses: dict[str, int] = field(default_factory=dict)
    median_ms: float = 0.0
    max_ms: float = 0.0
    osqp_median_ms: float = float("nan")
    max_rel_gap: float = 0.0


def hard_gap(m: np.ndarray, weights: np.ndarray, reference: np.ndarray) -> float:
    """``(f - f_ref) / max(f_ref, HARD_GAP_FLOOR * max(s_ref, min_k+ M_kk))``.

    ``s = (sum_k lambda_k ||g_k||)^2`` bounds the terms whose cancellation gives ``f = ||d||^2``,
    so that floor sits at the objective's float64 round-off whatever the norms. With a zero
    gradient ``f_ref = 0 = s_ref``; the floor is then the smallest positive ``M_kk`` (the best
    nonzero vertex's objective, the scale the answer lives at) times ``HARD_GAP_FLOOR``.
    """
    f, f_ref = _objective(m, weights), _objective(m, reference)
    diag = np.clip(np.diag(m), 0.0, None)
    s_ref = float(reference @ np.sqrt(diag)) ** 2
    smallest = float(np.min(diag[diag > 0.0], initial=np.inf))
    floor = HARD_GAP_FLOOR * max(s_ref, smallest if np.isfinite(smallest) else 0.0)
    return (f - f_ref) / max(f_ref, floor, 1e-300)


def hard_reference(m: np.ndarray) -> np.ndarray:
    """The better of Wolfe's exact algorithm and pairwise Frank-Wolfe run for its full 10^4
    iterations (``tol=0``), both OSQP-free; the second guards the first against a silent error
    (a worse reference would hide OSQP's)."""
    k = m.shape[0]
    candidates = [
        wolfe_min_norm(m),
        frank_wolfe_min_norm(m / max(float(np.trace(m)) / k, 1e-300), max_iter=10_000, tol=0.0),
    ]
    return min(candidates, key=lambda x: _objective(m, x))


def bench_hard_k(k: int, repeats: int, rng: np.random.Generator) -> HardRow:
    """Solve ``repeats`` hard Grams cold (a new solver each) and compare with the reference."""
    times: list[float] = []
    osqp_times: list[float] = []  # the calls that ran OSQP (not answered exactly up front)
    statuses: Counter[str] = Counter()
    fallbacks = with_zero_rows = 0
    worst = 0.0
    for _ in range(repeats):
        m = make_hard_gram(k, rng)
        result, ms = _ms(MinNormSolver(), m)
        times.append(ms)
        if result.status not in EXACT_STATUSES:
            osqp_times.append(ms)
        statuses[result.status] += 1
        fallbacks += int(result.fallback)
        with_zero_rows += int(np.any(np.diag(m) == 0.0))
        worst = max(worst, hard_gap(m, result.weights, hard_reference(m)))
    return HardRow(
        k=k,
        n=repeats,
        with_zero_rows=with_zero_rows,
        fallbacks=fallbacks,
        statuses=dict(sorted(statuses.items())),
        median_ms=float(np.median(times)),
        max_ms=float(np.max(times)),
        osqp_median_ms=float(np.median(osqp_times)) if osqp_times else float("nan"),
        max_rel_gap=worst,
    )


#: Statuses answered without OSQP (their time is not an OSQP solve).
EXACT_STATUSES = ("zero_gradient", "zero_gram", "single")

HARD_COLUMNS = (
    "K",
    "Grams",
    "with zero rows",
    "fallbacks",
    "statuses",
    "median ms",
    "max ms",
    "OSQP-call median ms",
    "max rel. gap vs reference",
)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: a header of ``columns``, then one line per row of cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def format_hard_table(rows: Sequence[HardRow]) -> str:
    """The hard-Gram rows as a markdown table (one row per K)."""
    cells = [
        [
            str(r.k),
            str(r.n),
            str(r.with_zero_rows),
            str(r.fallbacks),
            ", ".join(f"{name}: {count}" for name, count in r.statuses.items()),
            f"{r.median_ms:.3f}",
            f"{r.max_ms:.3f}",
            f"{r.osqp_median_ms:.3f}",
            f"{r.max_rel_gap:.2e}",
        ]
        for r in rows
    ]
    return markdown_table(HARD_COLUMNS, cells)


COLUMNS = (
    "K",
    "Grams",
    "cold median ms",
    "cold p90 ms",
    "warm median ms",
    "warm p90 ms",
    "SLSQP median ms",
    "FW median ms",
    "max rel. objective gap",
    "max gap / mean diag",
    "fallbacks",
)


def format_table(rows: Sequence[QPRow]) -> str:
    """The rows as a markdown table (one row per K)."""
    cells = [
        [
            str(r.k),
            str(r.n),
            f"{r.cold_median_ms:.3f}",
            f"{r.cold_p90_ms:.3f}",
            f"{r.warm_median_ms:.3f}",
            f"{r.warm_p90_ms:.3f}",
            f"{r.slsqp_median_ms:.3f}",
            f"{r.fw_median_ms:.3f}",
            f"{r.max_rel_gap:.2e}",
            f"{r.max_diag_gap:.2e}",
            str(r.fallbacks),
        ]
        for r in rows
    ]
    return markdown_table(COLUMNS, cells)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    p = argparse.ArgumentParser(
        description=(
            "Time MARBLE's OSQP min-norm QP (cold and warm-started) against SLSQP and pairwise "
            "Frank-Wolfe on LoRA-scale Gram matrices, and report the objective gap."
        )
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=200,
        help="Grams per family (full, rank-deficient) per K; with --hard, hard Grams per K",
    )
    p.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=None,
        help=f"numbers of rewards K (default 2..16; with --hard {' '.join(map(str, HARD_KS))})",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for the gradients")
    p.add_argument("--smoke", action="store_true", help="tiny run (K = 2, 5; 5 Grams per family)")
    p.add_argument(
        "--hard",
        action="store_true",
        help=(
            f"instead: independent Grams with zero-gradient rows and norms over {HARD_SPREAD:g} "
            "decades; report fallbacks, statuses, solve times and the gap to an exact reference"
        ),
    )
    p.add_argument("--out", type=Path, default=None, help="also write the table to this .md file")
    args = p.parse_args(argv)
    if args.ks is None:
        args.ks = list(HARD_KS) if args.hard else list(range(2, 17))
    if args.smoke:
        args.repeats = min(args.repeats, 5)
        args.ks = [2, 5]
    if args.repeats < 1 or any(k < 2 for k in args.ks):
        p.error("--repeats must be >= 1 and every K >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> list[QPRow] | list[HardRow]:
    """Run the benchmark, print the markdown table (and write it to ``--out``); return the rows."""
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows: list[QPRow] | list[HardRow]
    if args.hard:
        rows = [bench_hard_k(k, args.repeats, rng) for k in args.ks]
        header = (
            f"OSQP min-norm QP on hard Grams, {args.repeats} per K: gradient norms over "
            f"{HARD_SPREAD:g} decades below {NORM:g}, zero-gradient rows in about half, dim {DIM}, "
            f"seed {args.seed}; gap floor {HARD_GAP_FLOOR:g} * max((sum lambda ||g||)^2, min M_kk > 0)\n\n"
        )
        table = format_hard_table(rows)
    else:
        rows = [bench_k(k, args.repeats, rng)[0] for k in args.ks]
        header = (
            f"OSQP min-norm QP, {2 * args.repeats} Grams per K ({args.repeats} full + "
            f"{args.repeats} rank-deficient), gradient norms ~{NORM:g}, dim {DIM}, seed {args.seed}\n\n"
        )
        table = format_table(rows)
    print(header + table, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + table)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
