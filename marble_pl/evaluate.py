"""``marble evaluate``: score a trained adapter on the paper's benchmarks, as the authors'
``scripts/evaluation.py`` does (a table on stdout, ``--out`` JSON).

Three benchmarks from a prompt root in DiffusionNFT's ``dataset/`` layout (``data.root``; the
``test`` split by default): **geneval** (``geneval/{split}_metadata.jsonl``, the ``geneval``
reward: its mean, GenEval accuracy and strict accuracy, per tag), **ocr** (``ocr/{split}.txt``,
the ``ocr`` reward) and **pickscore** (``pickscore/{split}.txt`` scored by ImageReward,
PickScore, aesthetic, CLIP score and HPSv2). What is evaluated::

    marble evaluate --config configs/sd35.yaml --ckpt_path runs/sd35/version_0/checkpoints/last.ckpt
    marble evaluate --config configs/sd35.yaml --lora runs/sd35/version_0/lora
    marble evaluate --config configs/sd35.yaml            # the base model, no adapter

The module is built from the ``marble fit`` config by the CLI (:class:`MarbleModule`, its own
loading and sampler): a checkpoint's evaluated adapter (the evaluation EMA when the run kept one,
as validation samples), or a diffusers LoRA folder (``marble export``) loaded with diffusers'
``load_lora_adapter``. Upstream's settings by default: 40 deterministic Euler steps, CFG 1, 512
px; each image's noise is seeded by its prompt's index in its benchmark file, as
``MarbleModule.validation_step`` seeds validation, so a score moves only when the policy does.
A reward of the config's ``model.rewards`` with a benchmark reward's name lends it its settings
(weights paths, dtype); others are built by name with their defaults. A reward scores only the
prompts it applies to (``Reward.applicable``): ``n`` counts them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from marble_pl.errors import MarbleUserError

__all__ = [
    "BENCHMARKS",
    "EvaluateError",
    "evaluate",
    "geneval_summary",
    "main",
    "markdown",
    "parse_rewards",
    "reward_specs",
    "reward_summary",
]

BENCHMARKS: dict[str, tuple[str, ...]] = {
    "geneval": ("geneval",),
    "ocr": ("ocr",),
    "pickscore": ("imagereward", "pickscore", "aesthetic", "clip_score", "hpsv2"),
}
"""Benchmark (a source of the prompt root, :data:`~marble_pl.data.DEFAULT_SOURCES`) -> the
rewards that score it, as ``evaluation.py`` (its ``unifiedreward``, a remote VLM, has no
counterpart here)."""

LORA_ADAPTER = "evaluated"
"""The name the ``--lora`` adapter is loaded under, beside the config's own adapters."""


class EvaluateError(MarbleUserError, ValueError):
    """A bad ``marble evaluate`` argument or input; the message names it and the fix."""


# --------------------------------------------------------------------------- reward specs


def _spec_name(spec: Any) -> str:
    """The name a reward spec builds under: ``alias``, else ``name``, else the class's."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return str(spec.get("alias") or spec.get("name") or spec.get("class_path", "")).rsplit(
            ".", 1
        )[-1]
    return str(getattr(spec, "name", ""))


def parse_rewards(text: str) -> list[Any]:
    """``--rewards``: comma-separated names (``pickscore,hpsv2``) or a YAML/JSON list of specs
    (``[{name: pickscore, dtype: float16}, hpsv2]``)."""
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = None
    if isinstance(value, str):
        value = [name.strip() for name in value.split(",") if name.strip()]
    if not isinstance(value, list) or not value:
        raise EvaluateError(
            f"--rewards {text!r}: give reward names separated by commas (e.g. "
            "imagereward,pickscore) or a YAML list of specs (e.g. '[{name: pickscore}]')"
        )
    return value


def reward_specs(names: Sequence[Any], configured: Sequence[Any] | None) -> list[Any]:
    """Each benchmark reward's spec: a bare name takes the config's spec of that name (its
    paths and dtype), else stays a name; a mapping is used as given."""
    by_name = {_spec_name(spec): spec for spec in configured or []}
    return [by_name.get(spec, spec) if isinstance(spec, str) else spec for spec in names]


def build_eval_rewards(specs: Sequence[Any], random_weights: bool) -> torch.nn.ModuleList:
    """The rewards of one benchmark; GenEval's accuracy pass is always on (``only_strict``
    off: training may skip it, an evaluation reports it)."""
    from marble_pl.rewards import PretrainedReward, build_rewards

    rewards = build_rewards(list(specs))
    for reward in rewards:
        if random_weights and isinstance(reward, PretrainedReward):
            reward.random_weights = True
        if hasattr(reward, "only_strict"):
            reward.only_strict = False
    return rewards


# --------------------------------------------------------------------------- summaries


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a mean over nothing is ``null``."""
    return value if math.isfinite(value) else None


def reward_summary(scores: Tensor, applicable: Tensor) -> dict[str, Any]:
    """``{mean, n}`` over the samples the reward applies to and scored finitely; ``nonfinite``:
    applicable samples whose score was NaN/inf (left out of the mean, as upstream's -10)."""
    scored = applicable & scores.isfinite()
    values = scores[scored].double()
    return {
        "mean": _finite_or_none(float(values.mean())) if values.numel() else None,
        "n": int(scored.sum()),
        "nonfinite": int((applicable & ~scores.isfinite()).sum()),
    }


def geneval_summary(
    accuracy: Sequence[float], strict: Sequence[float], tags: Sequence[str | None]
) -> dict[str, Any]:
    """GenEval's accuracy and strict accuracy over the scored images, and per ``tag``;
    ``overall``: the mean of the per-tag accuracies (GenEval's headline number)."""

    def block(rows: list[int]) -> dict[str, Any]:
        acc = [accuracy[i] for i in rows if math.isfinite(accuracy[i])]
        sta = [strict[i] for i in rows if math.isfinite(strict[i])]
        return {
            "n": len(rows),
            "accuracy": sum(acc) / len(acc) if acc else None,
            "strict_accuracy": sum(sta) / len(sta) if sta else None,
        }

    scored = [i for i, tag in enumerate(tags) if tag is not None]
    by_tag: dict[str, list[int]] = {}
    for i in scored:
        by_tag.setdefault(str(tags[i]), []).append(i)
    per_tag = {tag: block(rows) for tag, rows in sorted(by_tag.items())}
    tag_acc = [t["accuracy"] for t in per_tag.values() if t["accuracy"] is not None]
    return {
        **block(scored),
        "overall": sum(tag_acc) / len(tag_acc) if tag_acc else None,
        "tags": per_tag,
    }


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(result: Mapping[str, Any]) -> str:
    """The scores as markdown: one row per (benchmark, reward), then GenEval per tag."""
    s = result["settings"]
    lines = [
        f"Evaluated: {s['evaluated']}; {s['num_inference_steps']} {s['solver']} steps, CFG "
        f"{s['guidance_scale']:g}, {s['resolution']} px, split {s['split']!r}, seeds by prompt "
        "index.",
        "",
        "| benchmark | reward | mean | n scored | prompts |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for bench, out in result["benchmarks"].items():
        for name, row in out["rewards"].items():
            lines.append(
                f"| {bench} | {name} | {_fmt(row['mean'])} | {row['n']} | {out['prompts']} |"
            )
    for bench, out in result["benchmarks"].items():
        for name, gen in (out.get("geneval") or {}).items():
            lines += [
                "",
                f"GenEval ({bench}, reward {name}): accuracy {_fmt(gen['accuracy'])}, strict "
                f"accuracy {_fmt(gen['strict_accuracy'])}, overall (mean over tags) "
                f"{_fmt(gen['overall'])}, {gen['n']} images.",
                "",
                "| tag | n | accuracy | strict accuracy |",
                "| --- | ---: | ---: | ---: |",
            ]
            lines += [
                f"| {tag} | {t['n']} | {_fmt(t['accuracy'])} | {_fmt(t['strict_accuracy'])} |"
                for tag, t in gen["tags"].items()
            ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the model


def _read_lora_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The ``lora_`` tensors and hyper-parameters of a marble Lightning checkpoint."""
    from marble_pl.export import _read_checkpoint
    from marble_pl.models import is_lora_key

    try:
        checkpoint = _read_checkpoint(path)
    except FileNotFoundError as err:
        raise EvaluateError(f"--ckpt_path: {err}") from err
    lora = {k: v for k, v in checkpoint["state_dict"].items() if is_lora_key(k)}
    if not lora:
        raise EvaluateError(
            f"--ckpt_path {path} holds no LoRA weights: give a checkpoint a marble run wrote"
        )
    return lora, dict(checkpoint.get("hyper_parameters") or {})


def _ema_override(lora: Mapping[str, Tensor], hparams: Mapping[str, Any]) -> str:
    """``model.eval_ema_decay`` as the checkpoint's run had it: the EMA adapter is built (and
    evaluated) exactly when the checkpoint holds one."""
    from marble_pl.models import EVAL_ADAPTER

    if any(f".{EVAL_ADAPTER}." in k for k in lora):
        return f"--model.eval_ema_decay={hparams.get('eval_ema_decay') or 0.9}"
    return "--model.eval_ema_decay=null"


def _resolved(config: str | Path, scratch: Path) -> Path:
    """The config with its ``${...}`` interpolations resolved, written to ``scratch``: evaluate
    turns the logger off, which a path may name (``${trainer.logger.init_args.save_dir}``).
    A config that does not resolve on its own is passed as it is."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = yaml.safe_load(Path(config).read_text()) or {}
        resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except (OSError, yaml.YAMLError, OmegaConfBaseException):
        return Path(config)
    out = scratch / "config.yaml"
    out.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return out


def build_module(
    config: str | Path,
    *,
    resolution: int,
    num_inference_steps: int,
    random_weights: bool,
    accelerator: str,
    overrides: Sequence[str] = (),
) -> tuple[Any, Any, Any]:
    """``(module, trainer, data module)`` from a ``marble fit`` config by the CLI, models loaded, on the
    trainer's device. Nothing is written (no logger, no checkpoints, no saved config)."""
    from marble_pl.cli import MarbleCLI
    from marble_pl.data import PromptDataModule
    from marble_pl.module import MarbleModule

    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    scratch = Path(tempfile.mkdtemp(prefix="marble-evaluate-"))
    args = [
        "--config", str(_resolved(config, scratch)),
        *(["--model.random_weights=true"] if random_weights else []),
        f"--model.resolution={resolution}",
        f"--model.eval_num_inference_steps={num_inference_steps}",
        f"--trainer.accelerator={accelerator}",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]",
        *overrides,
    ]  # fmt: skip
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads only `args`
    try:
        cli = MarbleCLI(
            MarbleModule, PromptDataModule, run=False, save_config_callback=None, args=args
        )
    finally:
        sys.argv = argv
        shutil.rmtree(scratch, ignore_errors=True)
    module, trainer = cli.model, cli.trainer
    module.configure_model()
    module.to(trainer.strategy.root_device).eval()
    return module, trainer, cli.datamodule


def load_evaluated(module: Any, lora: Mapping[str, Tensor] | None, lora_dir: Path | None) -> Any:
    """Put the evaluated adapter on the module; return its name (None: the base model).

    A checkpoint's tensors go into the module's adapters (a layout that does not fit the
    config is a one-line ``CheckpointError``) and its :attr:`eval_adapter` is evaluated; a
    LoRA folder is loaded by diffusers, with the ``LoraConfig`` stored in its metadata."""
    if lora is not None:
        state = {"state_dict": dict(lora)}
        from marble_pl.checkpointing import check_lora_keys

        check_lora_keys(module, state)
        module.load_state_dict(state["state_dict"], strict=False)
        return module.eval_adapter
    if lora_dir is None:
        return None
    from marble_pl.export import LORA_WEIGHT_NAME

    folder, weight = (lora_dir.parent, lora_dir.name) if lora_dir.is_file() else (lora_dir, None)
    if not (folder / (weight or LORA_WEIGHT_NAME)).is_file():
        raise EvaluateError(
            f"--lora {lora_dir}: no {weight or LORA_WEIGHT_NAME} there: give the folder "
            "`marble export` or LoraExport wrote (or the .safetensors file itself)"
        )
    try:
        with warnings.catch_warnings():  # peft: "multiple adapters", as intended
            warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
            module.transformer.load_lora_adapter(
                str(folder),
                prefix="transformer",
                adapter_name=LORA_ADAPTER,
                weight_name=weight or LORA_WEIGHT_NAME,
                local_files_only=True,
            )
    except (ValueError, RuntimeError, KeyError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise EvaluateError(
            f"--lora {lora_dir} does not fit the base model of the config ({type(err).__name__}: "
            f"{first}): use the config it was trained with"
        ) from err
    module.transformer.to(module.device)
    return LORA_ADAPTER


# --------------------------------------------------------------------------- the loop


def _prompts(root: Path, benchmark: str, split: str, limit: int | None):
    """One benchmark's prompts and metadata (``source`` set), in file order."""
    from marble_pl.data import DEFAULT_SOURCES, check_layout, read_sources

    pattern = DEFAULT_SOURCES[benchmark]
    check_layout(root, {benchmark: pattern}, [split])
    prompts, metadata, _ = read_sources(root, {benchmark: pattern}, split)
    if limit is not None:
        prompts, metadata = prompts[:limit], metadata[:limit]
    return prompts, metadata


def evaluate_benchmark(
    module: Any,
    rewards: torch.nn.ModuleList,
    prompts: Sequence[str],
    metadata: Sequence[Mapping[str, Any]],
    *,
    adapter: str | None,
    config: Any,
    batch_size: int,
    context: Callable[[], AbstractContextManager[Any]],
    save_images: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Sample every prompt once (seeded by its index) and score it with every reward."""
    from marble_pl.grid import save_png

    scores: dict[str, list[Tensor]] = {rw.name: [] for rw in rewards}
    applies: dict[str, list[Tensor]] = {rw.name: [] for rw in rewards}
    geneval: dict[str, tuple[list[float], list[float], list[str | None]]] = {}
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        meta = list(metadata[start : start + batch_size])
        indices = torch.arange(start, start + len(batch))
        with context():
            out = module.sample(
                batch, module.validation_generators(indices), adapter=adapter, config=config
            )
        images = out.images.float().clamp(0, 1)
        for rw in rewards:
            scores[rw.name].append(rw(images, batch, metadata=meta).float().cpu())
            applies[rw.name].append(torch.as_tensor(rw.applicable(batch, meta)).bool().cpu())
            if hasattr(rw, "last_strict_accuracy") and hasattr(rw, "last_tags"):
                acc, strict, tags = geneval.setdefault(rw.name, ([], [], []))
                acc += [float(v) for v in getattr(rw, "last_accuracy", rw.last_strict_accuracy)]
                strict += [float(v) for v in rw.last_strict_accuracy]
                tags += list(rw.last_tags)
        if save_images is not None:
            for i, image in zip(indices.tolist(), images, strict=True):
                save_png(image.cpu(), save_images / f"{i:05d}.png")
        if progress is not None:
            progress(f"{start + len(batch)}/{len(prompts)}")
    result: dict[str, Any] = {
        "prompts": len(prompts),
        "rewards": {
            name: reward_summary(torch.cat(scores[name]), torch.cat(applies[name]))
            for name in scores
        },
    }
    if geneval:
        result["geneval"] = {name: geneval_summary(*cols) for name, cols in geneval.items()}
    return result


def evaluate(
    config: str | Path,
    *,
    ckpt_path: str | Path | None = None,
    lora: str | Path | None = None,
    root: str | Path | None = None,
    split: str = "test",
    benchmarks: Sequence[str] = tuple(BENCHMARKS),
    rewards: Sequence[Any] | None = None,
    num_inference_steps: int = 40,
    resolution: int = 512,
    solver: str = "euler",
    batch_size: int = 8,
    limit: int | None = None,
    random_weights: bool = False,
    accelerator: str = "auto",
    save_images: str | Path | None = None,
    overrides: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate the config's model with the given adapter on ``benchmarks``; the result dict
    (``settings``, ``benchmarks``: per benchmark ``prompts``, ``rewards`` ``{mean, n,
    nonfinite}`` and for GenEval ``geneval`` accuracies per tag), as :func:`markdown` prints."""
    if ckpt_path is not None and lora is not None:
        raise EvaluateError("give --ckpt_path or --lora, not both (neither: the base model)")
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown or not benchmarks:
        raise EvaluateError(
            f"--benchmarks {','.join(benchmarks)}: unknown {unknown or 'none given'}; choose "
            f"from {','.join(BENCHMARKS)}"
        )
    for name, value in (("num-inference-steps", num_inference_steps), ("batch-size", batch_size)):
        if value < 1:
            raise EvaluateError(f"--{name} must be >= 1, got {value}")
    if limit is not None and limit < 1:
        raise EvaluateError(f"--limit (prompts per benchmark) must be >= 1, got {limit}")
    if solver not in ("euler", "dpm2"):
        raise EvaluateError(f"--solver must be euler or dpm2, got {solver!r}")
    lora_state, extra = None, list(overrides)
    if ckpt_path is not None:
        lora_state, hparams = _read_lora_checkpoint(Path(ckpt_path))
        extra.insert(0, _ema_override(lora_state, hparams))
    lora_dir = None if lora is None else Path(lora)
    if lora_dir is not None and not lora_dir.exists():
        raise EvaluateError(f"--lora {lora_dir} does not exist: give an exported LoRA folder")
    module, trainer, data = build_module(
        config,
        resolution=resolution,
        num_inference_steps=num_inference_steps,
        random_weights=random_weights,
        accelerator=accelerator,
        overrides=extra,
    )
    root = root if root is not None else getattr(data, "root", None)
    if root is None:
        raise EvaluateError(
            "no prompt root: pass --root (a folder in DiffusionNFT's dataset/ layout: "
            "geneval/, ocr/, pickscore/) or set data.root in the config"
        )
    adapter = load_evaluated(module, lora_state, lora_dir)
    sampler = replace(module.eval_rollout_config, solver=solver, guidance_scale=1.0)
    configured = (module.hparams.get("rewards") or []) if hasattr(module, "hparams") else []
    device = trainer.strategy.root_device
    out: dict[str, Any] = {
        "settings": {
            "config": str(config),
            "evaluated": (
                f"checkpoint {ckpt_path} (adapter {adapter!r})"
                if ckpt_path is not None
                else f"LoRA {lora}"
                if lora is not None
                else "the base model"
            ),
            "adapter": adapter,
            "root": str(root),
            "split": split,
            "num_inference_steps": sampler.num_inference_steps,
            "solver": sampler.solver,
            "guidance_scale": sampler.guidance_scale,
            "resolution": sampler.height,
            "seed": int(module.hparams.seed),
            "limit": limit,
            "random_weights": bool(random_weights),
            "device": str(device),
        },
        "benchmarks": {},
    }
    for bench in dict.fromkeys(benchmarks):
        prompts, metadata = _prompts(Path(root), bench, split, limit)
        names = list(rewards) if (bench == "pickscore" and rewards) else BENCHMARKS[bench]
        scorers = build_eval_rewards(
            reward_specs(names, configured), random_weights=random_weights
        ).to(device)
        out["benchmarks"][bench] = evaluate_benchmark(
            module,
            scorers,
            prompts,
            metadata,
            adapter=adapter,
            config=sampler,
            batch_size=batch_size,
            context=trainer.precision_plugin.forward_context,
            save_images=None if save_images is None else Path(save_images) / bench,
            progress=None if progress is None else (lambda s, b=bench: progress(f"{b} {s}")),
        )
        del scorers
    return out


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marble evaluate",
        description=__doc__.split("\n\n")[0].replace("``", "`"),
        epilog="Other --model.* / --trainer.* / --data.* arguments override the config.",
    )
    parser.add_argument("--config", required=True, help="the `marble fit` YAML of the run")
    parser.add_argument("--ckpt_path", default=None, help="a Lightning .ckpt of a marble run")
    parser.add_argument("--lora", default=None, help="an exported diffusers LoRA folder")
    parser.add_argument(
        "--root", default=None, help="prompt root (default: the config's data.root)"
    )
    parser.add_argument("--split", default="test", help="prompt split (default test)")
    parser.add_argument(
        "--benchmarks", default=",".join(BENCHMARKS), help="comma-separated (default: all three)"
    )
    parser.add_argument(
        "--rewards", default=None, help="rewards of the pickscore set: names or a YAML list"
    )
    parser.add_argument("--num-inference-steps", type=int, default=40, help="default 40")
    parser.add_argument("--resolution", type=int, default=512, help="image side (default 512)")
    parser.add_argument(
        "--solver", default="euler", help="euler (default, the diffusers pipeline's) or dpm2"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampler call")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts per benchmark")
    parser.add_argument(
        "--random-weights", action="store_true", help="real architectures, random weights"
    )
    parser.add_argument("--accelerator", default="auto", help="auto (cuda if any), cpu or gpu")
    parser.add_argument("--save-images", default=None, help="also write PNGs into this folder")
    parser.add_argument("--out", type=Path, default=None, help="write the scores as JSON here")
    return parser


def _unknown(overrides: Sequence[str]) -> list[str]:
    """The arguments that are neither ``--model.*`` / ``--trainer.*`` / ``--data.*`` overrides
    (``--data.root=x`` or ``--data.root x``) nor their values."""
    bad, value_next = [], False
    for arg in overrides:
        if arg.startswith(("--model.", "--trainer.", "--data.")):
            value_next = "=" not in arg
        elif value_next and not arg.startswith("--"):
            value_next = False
        else:
            bad.append(arg)
    return bad


def main(argv: Sequence[str] | None = None) -> int:
    """``marble evaluate``: print the table, write ``--out``; errors are one line (``marble``)."""
    args, overrides = build_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    bad = _unknown(overrides)
    if bad:
        raise EvaluateError(
            f"unknown argument(s) {bad} for marble evaluate: it takes its own options and "
            "--model.* / --trainer.* / --data.* overrides (`marble evaluate --help`)"
        )
    result = evaluate(
        args.config,
        ckpt_path=args.ckpt_path,
        lora=args.lora,
        root=args.root,
        split=args.split,
        benchmarks=[b.strip() for b in args.benchmarks.split(",") if b.strip()],
        rewards=None if args.rewards is None else parse_rewards(args.rewards),
        num_inference_steps=args.num_inference_steps,
        resolution=args.resolution,
        solver=args.solver,
        batch_size=args.batch_size,
        limit=args.limit,
        random_weights=args.random_weights,
        accelerator=args.accelerator,
        save_images=args.save_images,
        overrides=overrides,
        progress=lambda s: print(f"marble evaluate: {s}", file=sys.stderr, flush=True),
    )
    print(markdown(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
