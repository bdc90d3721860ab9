"""Step time of MARBLE against the single-reward baseline, side by side in one process.

Six variants of the real ``MarbleModule.training_step`` on the same model and prompts:
``single`` (one reward scored and trained: the speed reference), ``weighted_sum`` (K rewards),
``marble`` in ``output`` space (amortized), in ``parameters`` space (exact, K backwards), in
``gramian`` space (exact, two backwards with per-sample taps) and in ``gramian`` space balanced
every 4th step (``balance_every_n_steps``; one backward in between). Steps
are interleaved round-robin (A B C D A B C D ...) after a warm-up, so machine noise hits every
variant alike, and reported as paired ratios: per round, ``speed = single_time /
variant_time`` (0.98 = 2 % slower), given as the median [min-max] over the rounds, so the
spread shows how noisy one figure is. The update phase alone (per-reward gradients, balance,
backward, optimizer step) is reported the same way: there the balancing overhead is not hidden
behind the rollout. Per-reward details are assembled every step by default, as both shipped
configs log (``--log-every-n-steps``); no logger writes and no callbacks run.

    python benchmarks/step_time.py                 # tiny random SD3, CPU
    python benchmarks/step_time.py --device cuda --model /path/to/sd3 --resolution 512
    python benchmarks/step_time.py --device cuda --config configs/sd35.yaml --model.x=y ...

With ``--config`` each variant is built as ``marble fit --config`` builds it (so six copies
of the model live in the process: on one GPU that needs room for six pipelines).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from marble_pl.data import PromptDataModule
from marble_pl.models import build_tiny_sd3
from marble_pl.module import MarbleModule

ROOT = Path(__file__).resolve().parents[1]
REWARDS_K5: list[Any] = [
    "brightness",
    "saturation",
    "contrast",
    "compressibility",
    {"name": "compressibility", "alias": "compressibility_q50", "quality": 50},
]
# The baselines train in `output` space: ONE backward, as they need no per-reward gradients (a
# config's `gradient_space: gramian` would make them pay MARBLE's exact per-reward backwards too).
VARIANTS = {
    "single": {"balancer": "single", "rewards": REWARDS_K5[:1], "gradient_space": "output"},
    "weighted_sum": {"balancer": "weighted_sum", "gradient_space": "output"},
    "marble_output": {"balancer": "marble", "gradient_space": "output"},
    "marble_parameters": {"balancer": "marble", "gradient_space": "parameters"},
    "marble_gramian": {"balancer": "marble", "gradient_space": "gramian"},
    "marble_gramian_every4": {
        "balancer": "marble",
        "gradient_space": "gramian",
        "balance_every_n_steps": 4,
    },
}


class StepTimer(Callback):
    """Wall time of each training step (batch start to batch end) and the module's split."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        cuda = torch.cuda.is_available() and pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        rec = pl_module.last_step
        qp = rec.balance.solve_seconds if rec is not None and rec.balance is not None else 0.0
        self.steps.append(
            {
                "step_s": time.perf_counter() - self._start,
                **pl_module.last_timing,
                "qp_s": qp,
                "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"),
            }
        )


def build(args: argparse.Namespace, model: str, overrides: dict[str, Any]) -> tuple[Any, ...]:
    """One variant: its module, Trainer, data and timer (nothing run yet)."""
    seed_everything(0)
    kwargs: dict[str, Any] = {
        "pretrained_model_name_or_path": model,
        "local_files_only": True,
        "rewards": REWARDS_K5,
        "lora_rank": args.lora_rank,
        "lora_alpha": float(2 * args.lora_rank),
        "num_inference_steps": args.steps,
        "guidance_scale": 1.0,
        "resolution": args.resolution,
        "max_sequence_length": 16,
        "weights_dtype": args.dtype,
        "optimizer": lambda p: torch.optim.AdamW(p, lr=1e-4),
    }
    kwargs.update(overrides)
    module = MarbleModule(**kwargs)
    timer = StepTimer()
    trainer = _timing_trainer(args, timer)
    data = PromptDataModule(
        str(ROOT / "configs/prompts/tiny_train.txt"),
        batch_size=args.batch_size,
        group_size=args.group_size,
        seed=0,
    )
    return module, trainer, data, timer


def build_from_config(
    args: argparse.Namespace, name: str, cli_args: list[str], first_reward: Any = None
) -> tuple[Any, ...]:
    """One variant built exactly as ``marble fit --config`` builds it, plus the variant's switch.

    The config's rewards are kept (``single`` keeps its first one) and ``balance_every_n_steps``
    is the variant's (1 unless it sets one); the config's trainer, logger and callbacks are not
    used: every variant gets the same bare timing Trainer.
    """
    from marble_pl.cli import MarbleCLI

    overrides = VARIANTS[name]
    switch = [f"--model.balancer={overrides['balancer']}"]
    if first_reward is not None:  # `single`, the speed reference: one reward scored and trained
        switch.append(f"--model.rewards={json.dumps([first_reward])}")
    # Every variant sets its balance period: 1 unless it says otherwise, so a config's own value
    # (configs/sd35.yaml: 4) does not turn every MARBLE variant into the amortized one.
    switch.append(f"--model.balance_every_n_steps={overrides.get('balance_every_n_steps', 1)}")
    if "gradient_space" in overrides:
        switch.append(f"--model.gradient_space={overrides['gradient_space']}")
    seed_everything(0)
    cli = MarbleCLI(
        MarbleModule,
        PromptDataModule,
        run=False,
        seed_everything_default=0,
        args=["--config", args.config, *cli_args, *switch, "--trainer.logger=false"],
    )
    timer = StepTimer()
    return cli.model, _timing_trainer(args, timer), cli.datamodule, timer


def _timing_trainer(args: argparse.Namespace, timer: StepTimer) -> Trainer:
    """A Trainer with nothing but the timer: no logger, checkpoints, progress bar or validation."""
    return Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=args.log_every_n_steps,
        callbacks=[timer],
    )


def run_round(variant: tuple[Any, ...], steps: int) -> None:
    """Advance one variant by ``steps`` training steps (fit resumes where it stopped)."""
    module, trainer, data, _ = variant
    trainer.fit_loop.epoch_loop.max_steps = trainer.global_step + steps
    trainer.fit(module, data)


def paired_ratios(
    ref_steps: list[dict[str, float]], steps: list[dict[str, float]], key: str
) -> list[float]:
    """Per-round ratios ``ref / variant`` of one timing: round i of every variant ran back to back
    (A B C D A B C D ...), so each ratio compares two steps taken under the same machine load."""
    return [a[key] / b[key] for a, b in zip(ref_steps, steps, strict=True)]


def summarise(
    name: str,
    steps: list[dict[str, float]],
    ref_steps: list[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Medians of a variant's timed steps and its paired speed ratios to the reference (single).

    ``speed`` (whole step) and ``update_speed`` (update phase) are the median, min and max over
    rounds of ``single's time / the variant's time in the same round`` (``ref_steps``: single's
    steps; without them the variant is its own reference and every ratio is 1).
    """

    def med(key: str) -> float:
        return statistics.median(s[key] for s in steps)

    times = sorted(s["step_s"] for s in steps)
    out: dict[str, Any] = {
        "variant": name,
        "median_step_ms": 1e3 * med("step_s"),
        "p90_step_ms": 1e3 * times[min(len(times) - 1, int(0.9 * len(times)))],
        "rollout_ms": 1e3 * med("rollout_s"),
        "reward_ms": 1e3 * med("reward_s"),
        "update_ms": 1e3 * med("update_s"),
        "qp_ms": 1e3 * med("qp_s"),
        "peak_mb": med("peak_mb"),
        "step_s": [s["step_s"] for s in steps],  # every timed round, in order
        "update_s": [s["update_s"] for s in steps],
    }
    ref = ref_steps if ref_steps is not None else steps
    for prefix, key in (("speed", "step_s"), ("update_speed", "update_s")):
        ratios = paired_ratios(ref, steps, key)
        out[f"{prefix}_ratios"] = ratios
        out[f"{prefix}_median"] = statistics.median(ratios)
        out[f"{prefix}_min"] = min(ratios)
        out[f"{prefix}_max"] = max(ratios)
    return out


def spread(row: dict[str, Any], prefix: str) -> str:
    """``median [min-max]`` of a row's paired ratios."""
    lo, mid, hi = (row[f"{prefix}_{stat}"] for stat in ("min", "median", "max"))
    return f"{mid:.2f} [{lo:.2f}-{hi:.2f}]"


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the summaries."""
    cols: list[tuple[str, Any]] = [
        ("variant", "{}"),
        ("median_step_ms", "{:.1f}"),
        ("p90_step_ms", "{:.1f}"),
        ("speed median [min-max]", lambda r: spread(r, "speed")),
        ("rollout_ms", "{:.1f}"),
        ("reward_ms", "{:.1f}"),
        ("update_ms", "{:.1f}"),
        ("update speed median [min-max]", lambda r: spread(r, "update_speed")),
        ("qp_ms", "{:.3f}"),
        ("peak_mb", "{:.0f}"),
    ]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [fmt(row) if callable(fmt) else fmt.format(row[c]) for c, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RANDOM_WEIGHTS_ARGS = ["--model.random_weights=true", "--model.local_files_only=true"]
"""CLI overrides building the config's models at real shape with random weights."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        default=None,
        help="a `marble fit` YAML: its model, rewards and data (extra `--model.x=y` args pass on)",
    )
    parser.add_argument("--model", default=None, help="SD3 pipeline dir (default: a tiny one)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per step (B)")
    parser.add_argument("--group-size", type=int, default=4, help="images per prompt (G)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="sampler steps per rollout")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant")
    parser.add_argument(
        "--log-every-n-steps",
        type=int,
        default=1,
        help="Trainer.log_every_n_steps: per-reward details assembled on those steps (1, as both "
        "shipped configs)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="with --config: the config's SD3 and reward models at their real architecture "
        "with random weights (model.random_weights; nothing downloaded)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS)[1:],
        default=list(VARIANTS)[1:],
        help="the variants to time against `single` (default: all); each holds its own models, "
        "so fewer fit a GPU at real shape",
    )
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the test suite")
    parser.add_argument("--out", default="runs/step_time/step_time.md")
    args, cli_args = parser.parse_known_args(argv)
    if cli_args and args.config is None:
        parser.error(f"unrecognized arguments: {' '.join(cli_args)} (CLI overrides need --config)")
    if args.random_weights:
        if args.config is None:
            parser.error("--random-weights needs --config (the architecture of the config's model)")
        cli_args = RANDOM_WEIGHTS_ARGS + cli_args
    if args.smoke:
        args.warmup, args.repeats = 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric"):  # one fit per step: keep it quiet
        logging.getLogger(name).setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        chosen = list(dict.fromkeys(args.variants))
        if args.config is not None:
            multi = {n: build_from_config(args, n, cli_args) for n in chosen}
            first = next(iter(multi.values()))[0].hparams.rewards[0]
            variants = {"single": build_from_config(args, "single", cli_args, first), **multi}
        else:
            model = args.model or str(build_tiny_sd3(Path(tmp) / "tiny_sd3", seed=0))
            variants = {n: build(args, model, VARIANTS[n]) for n in ["single", *chosen]}
        for variant in variants.values():  # warm-up, untimed
            run_round(variant, args.warmup)
            variant[3].steps.clear()
        for _ in range(args.repeats):  # interleaved: A B C D A B C D ...
            for variant in variants.values():
                run_round(variant, 1)

    single = variants["single"][3].steps
    rows = [summarise(n, v[3].steps, single) for n, v in variants.items()]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"device {args.device}, threads {torch.get_num_threads()}"
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    module, _, data, _ = variants[chosen[0]]
    hp = module.hparams
    source = args.config or args.model
    model_text = f"{source} ({hp.pretrained_model_name_or_path})" if source else "tiny random SD3"
    note = (
        f"Machine: {machine}. Model: {model_text}, "
        f"{hp.weights_dtype} weights, B={data.batch_size}, G={data.group_size}, "
        f"{hp.resolution}px, {hp.num_inference_steps} sampler steps, K={len(hp.rewards)} rewards "
        f"(single: 1). {args.repeats} interleaved steps per variant after {args.warmup} warm-up. "
        "speed = single's step time / the variant's in the same round (paired), median "
        f"[min-max] over the {args.repeats} rounds; update speed: the same for the update phase "
        "(per-reward gradients, balance, backward, optimizer step). Per-reward detail metrics are "
        f"assembled every {args.log_every_n_steps} step(s) (Trainer.log_every_n_steps; both "
        "shipped configs: 1), reward means every step; no logger writes and no callbacks run (no "
        "CoefficientEMA, no cosine monitor). Peak memory per variant is CUDA max-allocated; on "
        "the CPU the variants share one process, so only the process's max RSS is known: "
        f"{rss:.0f} MB."
    )
    text = f"{table(rows)}\n\n{note}\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    result = {"rows": rows, "note": note, "args": vars(args)}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
