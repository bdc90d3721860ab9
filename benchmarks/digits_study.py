"""The digits study: every way of balancing the four digits rewards, trained by ``marble fit``.

``python benchmarks/digits_study.py`` (defaults: 100 steps, seeds 0 1 2, two runs at a time)
trains ``configs/digits.yaml`` once per (method, seed) as its own ``marble fit`` process, each
differing from the shipped config only where the method says (below), scores the base model with
``marble validate`` once per seed (the LoRA starts at zero: step 0 is the base), and writes
``docs/results/digits_study.md`` (the tables and the paper's claims as measured),
``digits_study.json`` and ``digits_study_curves.png``. ``--methods``, ``--seeds``, ``--steps``
and ``--jobs`` narrow or widen it; ``--work`` holds the runs (TensorBoard: ``--work``/<method>).

Methods (``model.balancer`` and what goes with it):

* ``marble``: the shipped config, marble-pl's default (the exact gramian, a QP every step,
  CoefficientEMA decay 0.9 with its guard).
* ``official``: the paper authors' balance (configs/marble_sd35.yaml): QP on unit-norm
  gradients every 10th step, EMA 0.7 without bias correction or guard, the clipped combined
  advantage.
* ``equal_alpha``: ``EqualAlpha`` (alpha = 1/K on the per-reward advantages, no QP).
* ``weighted_sum``: ``WeightedSum()``, one advantage estimator on the uniform sum of the rewards
  (what users run today).
* ``upgrad``: torchjd's UPGrad through ``GramianWeighting`` (needs ``marble-pl[balancers]``).
* ``single_<reward>``: ``SingleReward``: only that reward trains (the others are still scored).

Every figure is read back from the runs' TensorBoard event files: ``val/reward/<name>`` (the
held-out validation rows, fixed noise per seed), ``cos/frac_min_negative`` (the share of steps
where the worst reward's gradient points against the applied update, GradientCosineMonitor)
and ``time/{rollout,reward,update}_s``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"
REWARDS = ("digit_confidence", "stroke", "symmetry", "centredness")
SPECIALISTS = ("digit_confidence", "stroke")
EMA = "marble_pl.callbacks.CoefficientEMA"
MONITOR = "marble_pl.callbacks.GradientCosineMonitor"
BUILD = "marble_pl.digits.callback.BuildDigitsModel"
TIMES = ("time/rollout_s", "time/reward_s", "time/update_s")


@dataclass(frozen=True)
class Method:
    """A study row: its name, a one-line description, and its edits to the shipped config."""

    name: str
    about: str
    model: dict[str, Any]
    ema: dict[str, Any] | None  # CoefficientEMA's init_args; None: no coefficient EMA


def methods() -> dict[str, Method]:
    """Every method of the study, by name (single_<reward> for each of the four rewards)."""
    official_ema = {
        "decay": 0.7,
        "bias_correction": False,
        "start": "first",
        "guard": "off",
        "apply": "fresh_on_solve",
    }
    rows = [
        Method("marble", "marble-pl default: exact gramian, QP every step, EMA 0.9", {}, {}),
        Method(
            "official",
            "the authors' balance: unit-norm QP every 10 steps, EMA 0.7, clipped advantage",
            {
                "normalization": "unit",
                "balance_every_n_steps": 10,
                "balance_on": "first_micro_batch",
                "balance_warmup_steps": 1,
                "clip_combined_advantage": True,
            },
            official_ema,
        ),
        Method(
            "equal_alpha",
            "alpha = 1/K on the per-reward advantages, no QP",
            {"balancer": {"class_path": "marble_pl.balancers.EqualAlpha"}},
            None,
        ),
        Method(
            "weighted_sum",
            "one advantage on the uniform sum of the rewards",
            {"balancer": {"class_path": "marble_pl.balancers.WeightedSum"}},
            None,
        ),
        Method(
            "upgrad",
            "torchjd UPGrad on the exact Gram",
            {
                "balancer": {
                    "class_path": "marble_pl.balancers.GramianWeighting",
                    "init_args": {"weighting": "UPGrad"},
                }
            },
            None,
        ),
    ]
    for i, name in enumerate(REWARDS):
        rows.append(
            Method(
                f"single_{name}",
                f"only {name} trains",
                {
                    "balancer": {
                        "class_path": "marble_pl.balancers.SingleReward",
                        "init_args": {"index": i},
                    }
                },
                None,
            )
        )
    return {m.name: m for m in rows}


def run_config(
    method: Method,
    seed: int,
    steps: int,
    work: Path,
    model_dir: Path,
    val_every: int,
    preset: str = "default",
) -> dict[str, Any]:
    """The shipped digits config with the method's edits, this seed, ``steps`` and ``work``."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["seed_everything"] = seed
    trainer = cfg["trainer"]
    trainer.update(
        max_steps=steps,
        val_check_interval=val_every,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer["logger"]["init_args"].update(
        save_dir=str(work), name=method.name, version=f"seed{seed}"
    )
    kept = []
    for cb in trainer["callbacks"]:
        if cb["class_path"] == BUILD:
            cb["init_args"].update(path=str(model_dir), preset=preset)
            kept.append(cb)
        elif cb["class_path"] == MONITOR:
            kept.append(cb)
    if method.ema is not None:
        kept.insert(1, {"class_path": EMA, "init_args": {"decay": 0.9, **method.ema}})
    trainer["callbacks"] = kept
    cfg["model"].update(pretrained_model_name_or_path=str(model_dir), seed=seed, **method.model)
    cfg["data"].update(root=str(ROOT / cfg["data"]["root"]), seed=seed)
    return cfg


def _marble(subcommand: str, cfg: dict[str, Any], path: Path, log: Path) -> float:
    """Write ``cfg`` to ``path``, run ``marble <subcommand>`` on it (one thread); wall seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = cfg["trainer"]["logger"]["init_args"]
    shutil.rmtree(Path(logger["save_dir"], logger["name"], logger["version"]), ignore_errors=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "marble_pl.cli", subcommand, "--config", str(path)]
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=path.parent)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n" + "\n".join(tail))
    return time.perf_counter() - start


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard event files: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def _base_job(seed: int, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Validate the base model (zero LoRA) for one seed's validation noise."""
    cfg = run_config(
        methods()["marble"], seed, args.steps, args.work, model_dir, args.steps, args.preset
    )
    cfg["trainer"]["logger"]["init_args"]["name"] = "base"
    folder = args.work / "configs"
    _marble("validate", cfg, folder / f"base_{seed}.yaml", folder / f"base_{seed}.log")
    logged = scalars(args.work / "base" / f"seed{seed}")
    return {"seed": seed, "val": {n: logged[f"val/reward/{n}"][-1][1] for n in REWARDS}}


def _fit_job(name: str, seed: int, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Train one (method, seed) and read back its curves, cosines and times."""
    cfg = run_config(
        methods()[name], seed, args.steps, args.work, model_dir, args.val_every, args.preset
    )
    folder = args.work / "configs"
    wall = _marble("fit", cfg, folder / f"{name}_{seed}.yaml", folder / f"{name}_{seed}.log")
    logged = scalars(args.work / name / f"seed{seed}")
    step_s = np.median(np.sum([[v for s, v in logged[t] if s > 0] for t in TIMES], axis=0))
    print(f"digits study: {name} seed {seed} done in {wall:.0f} s", file=sys.stderr, flush=True)
    return {
        "method": name,
        "seed": seed,
        "curves": {n: logged[f"val/reward/{n}"] for n in REWARDS},
        "frac_min_negative": logged["cos/frac_min_negative"][-1][1],
        "frac_min_negative_ws": logged["cos_ws/frac_min_negative"][-1][1],
        "step_s": float(step_s),
        "wall_s": wall,
    }


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def summarize(bases: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: each reward's final change over its seed's base (mean, std), how many seeds
    raised every reward, the worst-cosine fractions and the seconds per step."""
    base = {b["seed"]: b["val"] for b in bases}
    rows: dict[str, Any] = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        delta = {n: [r["curves"][n][-1][1] - base[r["seed"]][n] for r in mine] for n in REWARDS}
        rows[name] = {
            "seeds": len(mine),
            "delta": {n: _mean_std(v) for n, v in delta.items()},
            "all_up": sum(all(delta[n][i] > 0 for n in REWARDS) for i in range(len(mine))),
            "frac_min_negative": _mean_std([r["frac_min_negative"] for r in mine]),
            "step_s": _mean_std([r["step_s"] for r in mine]),
        }
    singles = [rows[n]["step_s"]["mean"] for n in rows if n.startswith("single_")]
    for row in rows.values():
        row["step_ratio"] = row["step_s"]["mean"] / np.mean(singles) if singles else math.nan
    base_means = {n: _mean_std([b["val"][n] for b in bases]) for n in REWARDS}
    return {"base": base_means, "rows": rows}


def claims(summary: dict[str, Any]) -> list[str]:
    """The paper's claims, each stated as what the numbers here say (computed, not written)."""
    rows, out = summary["rows"], []
    every = [n for n, r in rows.items() if r["all_up"] == r["seeds"]]
    out.append(
        "Every reward up in every seed: "
        + (", ".join(every) if every else "no method")
        + f" (of {len(rows)} methods)."
    )
    if "marble" in rows and "weighted_sum" in rows:
        m, w = rows["marble"]["delta"], rows["weighted_sum"]["delta"]
        for n in SPECIALISTS:
            gap = m[n]["mean"] - w[n]["mean"]
            noise = math.hypot(m[n]["std"], w[n]["std"])
            verdict = "above" if gap > noise else "below" if gap < -noise else "within noise of"
            out.append(
                f"Specialist {n}: MARBLE {m[n]['mean']:+.4f} vs weighted sum {w[n]['mean']:+.4f}"
                f" (difference {gap:+.4f}, one combined std {noise:.4f}: MARBLE is {verdict}"
                " the weighted sum)."
            )
        fm, fw = rows["marble"]["frac_min_negative"], rows["weighted_sum"]["frac_min_negative"]
        out.append(
            f"Worst reward against the update: {fm['mean']:.0%} of MARBLE's steps, "
            f"{fw['mean']:.0%} of the weighted sum's."
        )
        out.append(
            f"Cost: MARBLE {rows['marble']['step_ratio']:.2f}x the single-reward step time, the "
            f"weighted sum {rows['weighted_sum']['step_ratio']:.2f}x."
        )
    return out


def format_results(summary: dict[str, Any], args: argparse.Namespace, about: dict[str, str]) -> str:
    """The markdown report: setup, the change table, the claims."""
    head = ["method", *(f"Δ {n}" for n in REWARDS), "all up", "worst cos < 0", "s/step", "x single"]
    lines = [
        "# The digits study",
        "",
        f"`python benchmarks/digits_study.py --steps {args.steps} --seeds "
        f"{' '.join(map(str, args.seeds))}` on {os.cpu_count()} CPU cores "
        f"({args.jobs} runs at a time, one thread each): configs/digits.yaml, {args.steps} steps, "
        "each run its own `marble fit`. Δ: the final held-out validation reward minus the base "
        "model's on the same validation noise (mean ± std over seeds). 'all up': seeds in which "
        "every reward rose. 'worst cos < 0': share of steps where the worst reward's gradient "
        "points against the applied update. 's/step': rollout + reward + update seconds (median "
        "over steps after the first; 'x single': over the single-reward runs' mean).",
        "",
        "Base model: "
        + ", ".join(f"{n} {v['mean']:.4f} ± {v['std']:.4f}" for n, v in summary["base"].items()),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, row in summary["rows"].items():
        cells = [f"`{name}`"]
        cells += [f"{row['delta'][n]['mean']:+.4f} ± {row['delta'][n]['std']:.4f}" for n in REWARDS]
        cells += [
            f"{row['all_up']}/{row['seeds']}",
            f"{row['frac_min_negative']['mean']:.0%}",
            f"{row['step_s']['mean']:.2f}",
            f"{row['step_ratio']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Methods:", ""]
    lines += [f"- `{name}`: {about[name]}" for name in summary["rows"]]
    lines += ["", "## The paper's claims, as measured here", ""]
    lines += [f"- {c}" for c in claims(summary)]
    lines += ["", "![validation rewards](digits_study_curves.png)", ""]
    return "\n".join(lines)


def plot_curves(runs: list[dict[str, Any]], bases: list[dict[str, Any]], path: Path) -> None:
    """Validation reward over steps, per reward, mean over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {b["seed"]: b["val"] for b in bases}
    fig, axes = plt.subplots(1, len(REWARDS), figsize=(4 * len(REWARDS), 3.4))
    for ax, n in zip(axes, REWARDS, strict=True):
        for name in dict.fromkeys(r["method"] for r in runs):
            mine = [r for r in runs if r["method"] == name]
            steps = [0] + [s + 1 for s, _ in mine[0]["curves"][n]]
            values = np.mean(
                [[base[r["seed"]][n]] + [v for _, v in r["curves"][n]] for r in mine], axis=0
            )
            style = "-" if not name.startswith("single_") else ":"
            ax.plot(steps, values, style, label=name, lw=2 if name == "marble" else 1)
        ax.set_title(n, fontsize=10)
        ax.set_xlabel("step")
    axes[0].set_ylabel("validation reward (mean over seeds)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/digits_study.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--methods", nargs="+", default=list(methods()), choices=list(methods()))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--val-every", type=int, default=25, help="validation interval (steps)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--work", type=Path, default=Path("runs/digits_study"))
    parser.add_argument("--model-dir", type=Path, default=None, help="default: WORK/digits-sd3")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument(
        "--preset", default="default", help="digits pretrain preset (smoke: seconds, a dry run)"
    )
    args = parser.parse_args(argv)
    if args.steps % args.val_every:
        parser.error(f"--steps {args.steps} must be a multiple of --val-every {args.val_every}")
    args.work = args.work.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Pretrain (once), validate the base per seed, train every (method, seed), report."""
    args = parse_args(argv)
    from marble_pl.digits.pretrain import ensure_digits_sd3, settings_for

    model_dir = (args.model_dir or args.work / "digits-sd3").resolve()
    ensure_digits_sd3(model_dir, settings_for(args.preset))
    with ThreadPoolExecutor(args.jobs) as pool:
        bases = list(pool.map(lambda s: _base_job(s, args, model_dir), args.seeds))
        jobs = [(m, s) for m in args.methods for s in args.seeds]
        runs = list(pool.map(lambda job: _fit_job(*job, args, model_dir), jobs))
    summary = summarize(bases, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    about = {name: m.about for name, m in methods().items()}
    (args.out / "digits_study.md").write_text(format_results(summary, args, about))
    (args.out / "digits_study.json").write_text(
        json.dumps({"summary": summary, "bases": bases, "runs": runs}, indent=1) + "\n"
    )
    plot_curves(runs, bases, args.out / "digits_study_curves.png")
    print(format_results(summary, args, about))
    return summary


if __name__ == "__main__":
    main()
