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

Usage::

    python benchmarks/qp.py                      # K = 2..16, 200 Grams per family and K
    python benchmarks/qp.py --smoke --out qp.md  # a few seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from marble_pl.balance import MinNormSolver, frank_wolfe_min_norm, project_to_simplex

__all__ = ["QPRow", "make_sequence", "slsqp_min_norm", "bench_k", "format_table", "main"]

#: Parameters per gradient (a small LoRA); large enough that random gradients are generic.
DIM = 4096
#: Typical LoRA gradient norm (ARCHITECTURE §6: OSQP needs the Gram scaled at this size).
NORM = 1e-5
#: Relative drift of every gradient per step along a sequence.
DRIFT = 0.03
#: Relative gaps are taken against ``max(f_ref, GAP_FLOOR * mean diag M)`` (the minimum can be 0).
GAP_FLOOR = 1e-8
FAMILIES = ("full", "rank-deficient")


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
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [
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
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    p = argparse.ArgumentParser(
        description=(
            "Time MARBLE's OSQP min-norm QP (cold and warm-started) against SLSQP and pairwise "
            "Frank-Wolfe on LoRA-scale Gram matrices, and report the objective gap."
        )
    )
    p.add_argument(
        "--repeats", type=int, default=200, help="Grams per family (full, rank-deficient) per K"
    )
    p.add_argument(
        "--ks", type=int, nargs="+", default=list(range(2, 17)), help="numbers of rewards K"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for the gradients")
    p.add_argument("--smoke", action="store_true", help="tiny run (K = 2, 5; 5 Grams per family)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this .md file")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats = min(args.repeats, 5)
        args.ks = [2, 5]
    if args.repeats < 1 or any(k < 2 for k in args.ks):
        p.error("--repeats must be >= 1 and every K >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> list[QPRow]:
    """Run the benchmark, print the markdown table (and write it to ``--out``); return the rows."""
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
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
