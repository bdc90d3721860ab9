"""``marble preflight --config <fit YAML>``: the config's models at their REAL architecture with
random weights (nothing downloaded), what LoRA adapts, and timed MARBLE steps.

Every SD3 component and pretrained reward model is built as ``model.random_weights`` builds it
(:mod:`marble_pl.random_weights`), reported per component (parameters, dtype, memory), then
``--steps`` real MARBLE training steps run at a reduced resolution and batch on the device at
hand, with the time and peak memory of each phase, and an extrapolation to the resolution and
batch per GPU of the config file (its YAML values; class defaults where it sets none).
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback

__all__ = ["ComponentRow", "PreflightReport", "main", "preflight"]

PROMPTS = [  # each quotes a text, so the OCR reward applies (and is timed) on every image
    'a photo of a cat beside a sign that says "hello"',
    'a red car in the rain, "STOP" painted on the road',
    'two dogs on grass under a banner reading "park"',
    'an apple on a table next to a note saying "lunch"',
]
GENEVAL_METADATA = [  # GenEval's fields for each prompt: the geneval reward applies everywhere too
    {
        "tag": "two_object",
        "include": [{"class": "cat", "count": 1}, {"class": "stop sign", "count": 1}],
    },
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
    {
        "tag": "counting",
        "include": [{"class": "dog", "count": 2}],
        "exclude": [{"class": "dog", "count": 3}],
    },
    {
        "tag": "position",
        "include": [
            {"class": "dining table", "count": 1},
            {"class": "apple", "count": 1, "position": ["above", 0]},
        ],
    },
]
"""Every reward applies to every preflight image (OCR: the quoted text; GenEval: these fields),
so each is built and timed: the reward phase is that of a batch all of whose images each
specialist scores, an upper bound for a mixed set where each applies to its own source only."""


def prompt_records() -> list[dict[str, Any]]:
    """The preflight prompts as ``.jsonl`` records: the prompt and its GenEval metadata."""
    return [
        {"prompt": prompt, "source": "preflight", **meta}
        for prompt, meta in zip(PROMPTS, GENEVAL_METADATA, strict=True)
    ]


SD3_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
MIB = 1024**2
GIB = 1024**3


@dataclass
class ComponentRow:
    """One built model: its parameters, dtype and memory (parameters + buffers)."""

    name: str
    cls: str
    params: int
    dtype: str
    bytes: int


@dataclass
class PreflightReport:
    """What preflight built and measured (see :func:`preflight`)."""

    components: list[ComponentRow]
    lora_params: int
    lora_bytes: int
    adapted: dict[str, int]
    device: str
    run: dict[str, Any]
    configured: dict[str, Any]
    phases: dict[str, float] = field(default_factory=dict)
    estimate: dict[str, float] = field(default_factory=dict)
    peak_bytes: int = 0
    peak_kind: str = ""
    phase_peaks: dict[str, int] = field(default_factory=dict)
    taps: dict[str, float] = field(default_factory=dict)

    def markdown(self) -> str:
        """The report as markdown tables."""
        lines = [
            "| component | class | parameters | dtype | memory (MiB) |",
            "| --- | --- | ---: | --- | ---: |",
        ]
        for c in self.components:
            lines.append(
                f"| {c.name} | {c.cls} | {c.params:,} | {c.dtype} | {c.bytes / MIB:,.1f} |"
            )
        lines.append(
            f"| LoRA (trained + sampling adapters) | peft | {self.lora_params:,} trained | "
            f"float32 | {self.lora_bytes / MIB:,.1f} |"
        )
        lines += ["", "| LoRA target | modules adapted |", "| --- | ---: |"]
        lines += [f"| {kind} | {n} |" for kind, n in sorted(self.adapted.items())]
        run, cfg = self.run, self.configured
        lines += [
            "",
            f"Steps on {self.device}: {run['steps']} MARBLE step(s) at {run['resolution']} px, "
            f"{run['batch_size']} prompt(s) x {run['group_size']} images, "
            f"{run['num_inference_steps']} sampler steps, {run['timesteps']} training "
            f"timestep(s) per image; configured: {cfg['resolution']} px, {cfg['batch_size']} x "
            f"{cfg['group_size']}, {cfg['num_inference_steps']} sampler steps, "
            f"{cfg['timesteps']} timesteps per image.",
            "",
            "| phase | measured (s) | estimate at the configured size (s) | peak memory (GiB) |",
            "| --- | ---: | ---: | ---: |",
        ]
        for phase in ("rollout_s", "reward_s", "update_s", "step_s"):
            peak = self.phase_peaks.get(phase, self.peak_bytes if phase == "step_s" else None)
            lines.append(
                f"| {phase.removesuffix('_s')} | {self.phases.get(phase, float('nan')):.2f} | "
                f"{self.estimate.get(phase, float('nan')):.1f} | "
                f"{'n/a' if peak is None else f'{peak / GIB:.2f}'} |"
            )
        if self.taps:
            lines += [
                "",
                "| gramian taps: bytes per micro-batch | measured (MiB) | estimate at the "
                "configured size (MiB) |",
                "| --- | ---: | ---: |",
                f"| {self.taps['run_pairs']:g} pairs (configured: {self.taps['pairs']:g}) | "
                f"{self.taps['bytes'] / MIB:,.3f} | {self.taps['estimate'] / MIB:,.1f} |",
            ]
        lines += [
            "",
            f"Peak memory ({self.peak_kind}): {self.peak_bytes / GIB:.2f} GiB.",
            "",
            "The estimate scales each measured phase linearly: rollout by images x sampler steps "
            "x tokens, update by images x training timesteps x tokens, rewards by images "
            "(tokens: latent patches + text tokens). The timed run is never larger than the "
            "config, so at the configured size the estimate is the measurement; above it, "
            "attention's quadratic term is ignored (the estimate is low) and the per-step "
            "overhead is scaled with the work (high, on small models): a rough guide, not a "
            "bound.",
        ]
        if self.taps:
            lines += [
                "",
                "gramian taps: the LoRA layers' inputs the per-sample taps hold from the forward "
                "to the backward (the very tensors the layers save for their own backward, so "
                "no extra copy); the estimate scales them by pairs per micro-batch, and the "
                "image stream's by image tokens.",
            ]
        return "\n".join(lines)


def _defaults() -> dict[str, Any]:
    from marble_pl.data import PromptDataModule
    from marble_pl.module import MarbleModule

    out = {}
    for cls in (MarbleModule, PromptDataModule):
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if p.default is not inspect.Parameter.empty:
                out[name] = p.default
    return out


def _configured(config: dict[str, Any]) -> dict[str, Any]:
    """The settings the estimate scales to, from the YAML (class defaults where absent)."""
    defaults = _defaults()
    model, data = config.get("model") or {}, config.get("data") or {}

    def get(section: dict[str, Any], key: str) -> Any:
        return section.get(key, defaults.get(key))

    return {
        "resolution": get(model, "resolution"),
        "num_inference_steps": get(model, "num_inference_steps"),
        "timesteps_per_image": get(model, "timesteps_per_image"),
        "batch_size": get(data, "batch_size"),
        "group_size": get(data, "group_size"),
        "max_sequence_length": get(model, "max_sequence_length"),
    }


def _reward_name(spec: Any) -> str:
    """A reward spec's name as the module logs it: ``alias``, else ``name``, else the class."""
    if isinstance(spec, str):
        return spec
    return str(spec.get("alias") or spec.get("name") or spec.get("class_path", "")).rsplit(".")[-1]


def _row(name: str, part: torch.nn.Module) -> ComponentRow:
    params = [p for n, p in part.named_parameters() if "lora_" not in n]
    tensors = params + list(part.buffers())
    return ComponentRow(
        name=name,
        cls=type(part).__name__,
        params=sum(p.numel() for p in params),
        dtype=str(params[0].dtype).removeprefix("torch."),
        bytes=sum(t.numel() * t.element_size() for t in tensors),
    )


def _component_rows(module: Any) -> list[ComponentRow]:
    """The SD3 components, then every pretrained reward's model."""
    from marble_pl.rewards import PretrainedReward

    rows = [
        _row(name, getattr(module, name))
        for name in SD3_COMPONENTS
        if getattr(module, name, None) is not None
    ]
    for reward in module.rewards:
        if isinstance(reward, PretrainedReward) and reward.scorer is not None:
            rows.append(_row(f"reward: {reward.name}", reward.scorer))
    return rows


def _adapted(transformer: torch.nn.Module) -> dict[str, int]:
    """Adapted modules per kind (block index dropped). A target that matches nothing is a
    ``ConfigError`` naming it when the LoRA is attached (:func:`~marble_pl.models.add_lora`)."""
    names = [
        n.removesuffix(".lora_A") for n, _ in transformer.named_modules() if n.endswith(".lora_A")
    ]
    return dict(Counter(_kind(n) for n in names))


def _kind(module_name: str) -> str:
    """``transformer_blocks.3.attn2.to_q`` -> ``attn2.to_q``."""
    parts = module_name.split(".")
    if len(parts) > 2 and parts[0] == "transformer_blocks" and parts[1].isdigit():
        parts = parts[2:]
    return ".".join(parts)


class _StepTimes(Callback):
    """Each step's phase times (``MarbleModule.last_timing``) and wall time."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        timing = dict(pl_module.last_timing)
        timing["step_s"] = time.perf_counter() - self._t0
        self.steps.append(timing)


class PhasePeaks(Callback):
    """Peak memory of each phase of a step: CUDA's ``max_memory_allocated``, or on Linux CPUs the
    process's peak RSS (``VmHWM``), reset at each phase through ``/proc/self/clear_refs``.

    ``rollout_batch`` and ``score`` are wrapped on the module instance; the update phase is the
    rest of the step (training pairs, gradients, balance, optimizer step), as the step's timing.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS, CPU"
        self.peaks: dict[str, int] = {}
        self.per_phase = device.type == "cuda" or self._reset_rss()

    def _reset_rss(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.per_phase:
            self._reset_rss()

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.per_phase:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux

    def _record(self, phase: str) -> None:
        self.peaks[phase] = max(self.peaks.get(phase, 0), self.read())
        self.reset()

    def wrap(self, module: Any, method: str, phase: str) -> None:
        """Record ``phase``'s peak around ``module.<method>`` (an instance attribute)."""
        original = getattr(module, method)

        def measured(*args: Any, **kwargs: Any) -> Any:
            self.reset()
            try:
                return original(*args, **kwargs)
            finally:
                self._record(phase)

        setattr(module, method, measured)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record("update_s")

    @property
    def overall(self) -> int:
        return max([*self.peaks.values(), self.read()])


def _estimate(
    phases: dict[str, float], run: dict[str, Any], cfg: dict[str, Any], text_tokens: int, cell: int
) -> dict[str, float]:
    def tokens(res: int) -> float:
        return (res // cell) ** 2 + text_tokens

    tok = tokens(cfg["resolution"]) / tokens(run["resolution"])
    images = (cfg["batch_size"] * cfg["group_size"]) / (run["batch_size"] * run["group_size"])
    rollout = (
        phases["rollout_s"] * images * tok * cfg["num_inference_steps"] / run["num_inference_steps"]
    )
    update = phases["update_s"] * images * tok * cfg["timesteps"] / run["timesteps"]
    reward = phases["reward_s"] * images
    return {
        "rollout_s": rollout,
        "reward_s": reward,
        "update_s": update,
        "step_s": rollout + reward + update,
    }


def _taps_row(
    module: Any, raw: dict[str, Any], run: dict[str, Any], cfg: dict[str, Any], tok: float
) -> dict[str, float]:
    """The ``gramian`` taps' bytes for one timed micro-batch and scaled to the configured one:
    by pairs per micro-batch, and the image stream's inputs by image tokens (``tok``: the
    configured over the timed image tokens; text tokens are the same); empty in other spaces."""
    held = getattr(module.balancing.space, "tap_bytes", None)
    if not held:
        return {}
    run_total = run["batch_size"] * run["group_size"] * run["timesteps"]
    run_pairs = min(module.hparams.micro_batch_size or run_total, run_total)
    total = cfg["batch_size"] * cfg["group_size"] * cfg["timesteps"]
    micro = (raw.get("model") or {}).get("micro_batch_size", _defaults().get("micro_batch_size"))
    pairs = min(micro or total, total)
    return {
        "bytes": sum(held.values()),
        "run_pairs": run_pairs,
        "pairs": pairs,
        "estimate": sum(
            b * pairs / run_pairs * (tok if n == run["image_tokens"] else 1.0)
            for n, b in held.items()
        ),
    }


def preflight(
    config: str | Path,
    *,
    steps: int = 2,
    resolution: int = 128,
    batch_size: int = 1,
    group_size: int = 2,
    num_inference_steps: int = 2,
    skip: Sequence[str] = (),
    accelerator: str = "auto",
    overrides: Sequence[str] = (),
) -> PreflightReport:
    """Build the config's models at real shape with random weights and time ``steps`` steps."""
    from marble_pl.cli import MarbleCLI
    from marble_pl.data import PromptDataModule
    from marble_pl.module import MarbleModule
    from marble_pl.rewards import PretrainedReward

    raw = yaml.safe_load(Path(config).read_text()) or {}
    configured = _configured(raw)
    resolution, batch_size, group_size, num_inference_steps = _timed_size(
        configured, resolution, batch_size, group_size, num_inference_steps
    )
    skip = set(skip)
    specs = (raw.get("model") or {}).get("rewards") or list(_defaults()["rewards"])
    rewards = [r for r in specs if _reward_name(r) not in skip]
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    scratch = Path(tempfile.mkdtemp(prefix="marble-preflight-"))
    prompts = scratch / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_records()))
    model_path = _model_path(raw, scratch)
    args = [
        "--config", str(config),
        *([f"--model.pretrained_model_name_or_path={model_path}"] if model_path else []),
        "--model.random_weights=true",
        "--model.local_files_only=true",
        f"--model.resolution={resolution}",
        f"--model.num_inference_steps={num_inference_steps}",
        f"--model.rewards={yaml.safe_dump(rewards, default_flow_style=True).strip()}",
        "--data.root=null",
        f"--data.train_file={prompts}",
        "--data.val_file=null",
        f"--data.batch_size={batch_size}",
        f"--data.group_size={group_size}",
        f"--trainer.accelerator={accelerator}",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        f"--trainer.max_steps={steps}",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
    ]  # fmt: skip
    if "text_encoder_3" in skip:
        args.append("--model.load_t5=false")
    per_image = configured["timesteps_per_image"]
    if isinstance(per_image, int) and per_image > num_inference_steps:  # a count the run's
        args.append(f"--model.timesteps_per_image={num_inference_steps}")  # sampler lacks
        per_image = num_inference_steps
    pairs = batch_size * group_size * _timesteps(per_image, num_inference_steps)
    micro = (raw.get("model") or {}).get("micro_batch_size")
    if isinstance(micro, int) and micro > pairs:  # the timed step is smaller than the config's
        args.append(f"--model.micro_batch_size={pairs}")
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads only `args`
    try:
        cli = MarbleCLI(
            MarbleModule,
            PromptDataModule,
            run=False,
            save_config_callback=None,  # preflight writes nothing into the working folder
            args=[*args, *overrides],
        )
    finally:
        sys.argv = argv
    module, trainer = cli.model, cli.trainer
    module.configure_model()
    for reward in module.rewards:  # built now, so the timed steps do not include building
        if isinstance(reward, PretrainedReward):
            reward.load()
    adapted = _adapted(module.transformer)
    lora = [p for n, p in module.transformer.named_parameters() if "lora_" in n]
    times = _StepTimes()
    device = trainer.strategy.root_device
    memory = PhasePeaks(device)
    if memory.per_phase:
        memory.wrap(module, "rollout_batch", "rollout_s")
        memory.wrap(module, "score", "reward_s")
    trainer.callbacks += [times, memory]
    memory.reset()
    trainer.fit(module, cli.datamodule)
    measured = times.steps[1:] or times.steps  # the first step includes warm-up
    phases = {k: statistics.median(s[k] for s in measured) for k in measured[0]}
    run = {
        "steps": steps,
        "resolution": resolution,
        "batch_size": batch_size,
        "group_size": group_size,
        "num_inference_steps": num_inference_steps,
        "timesteps": module.timesteps_count,
    }
    configured["timesteps"] = _timesteps(
        configured["timesteps_per_image"], configured["num_inference_steps"]
    )
    cell = module.policy.vae_scale_factor * module.policy.patch_size
    text_tokens = 77 + (configured["max_sequence_length"] or 0)
    run["image_tokens"] = (resolution // cell) ** 2
    tok = (configured["resolution"] // cell) ** 2 / run["image_tokens"]
    return PreflightReport(
        components=_component_rows(module),
        lora_params=sum(p.numel() for p in module.lora_params),
        lora_bytes=sum(p.numel() * p.element_size() for p in lora),
        adapted=adapted,
        device=str(device)
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        run=run,
        configured=configured,
        phases=phases,
        estimate=_estimate(phases, run, configured, text_tokens, cell),
        peak_bytes=memory.overall,
        peak_kind=memory.kind,
        phase_peaks=dict(memory.peaks) if memory.per_phase else {},
        taps=_taps_row(module, raw, run, configured, tok),
    )


def _timed_size(
    configured: dict[str, Any], resolution: int, batch: int, group: int, sampler_steps: int
) -> tuple[int, int, int, int]:
    """The size of the timed steps: the config's own when it is no more work than the one asked
    for (then the estimate IS the measurement), else the one asked for, capped at the config's
    in each dimension so that no factor of the estimate scales down."""
    size = [
        int(configured[k])
        for k in ("resolution", "batch_size", "group_size", "num_inference_steps")
    ]
    if size[0] ** 2 * size[1] * size[2] * size[3] <= resolution**2 * batch * group * sampler_steps:
        return size[0], size[1], size[2], size[3]
    asked = (resolution, batch, group, sampler_steps)
    return tuple(min(a, c) for a, c in zip(asked, size, strict=True))  # type: ignore[return-value]


def _model_path(raw: dict[str, Any], scratch: Path) -> str | None:
    """The config's model path with its interpolations resolved (preflight turns the logger a
    path may name off); a tiny model still to build is built in ``scratch``, not the working
    folder, as preflight writes nothing but its report."""
    from omegaconf import OmegaConf

    from marble_pl.models import tiny_sd3_is_complete

    model = raw.get("model") or {}
    value = model.get("pretrained_model_name_or_path")
    if value is None:
        return None
    path = str(OmegaConf.select(OmegaConf.create(raw), "model.pretrained_model_name_or_path"))
    if model.get("build_tiny_if_missing") and not tiny_sd3_is_complete(Path(path)):
        return str(scratch / "tiny-sd3")
    return path


def _timesteps(per_image: int | float, sampler_steps: int) -> int:
    """Training timesteps per image: a count, or a fraction of the sampler's steps."""
    from marble_pl.timesteps import timesteps_per_image_count

    return timesteps_per_image_count(per_image, sampler_steps)


def main(argv: Sequence[str] | None = None) -> int:
    """``marble preflight``: print (and with ``--out`` write) the report."""
    parser = argparse.ArgumentParser(
        prog="marble preflight",
        description=__doc__.split("\n\n")[0],
        epilog="Other --model.* / --trainer.* / --data.* arguments override the config.",
    )
    parser.add_argument("--config", required=True, help="a `marble fit` YAML config")
    parser.add_argument("--steps", type=int, default=2, help="MARBLE steps to time (default 2)")
    parser.add_argument("--resolution", type=int, default=128, help="image side of the timed steps")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per timed step")
    parser.add_argument("--group-size", type=int, default=2, help="images per prompt")
    parser.add_argument("--num-inference-steps", type=int, default=2, help="sampler steps")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        help="leave out a component that does not fit the machine (text_encoder_3) or a reward",
    )
    parser.add_argument("--accelerator", default="auto", help="auto (cuda if any), cpu or gpu")
    parser.add_argument(
        "--random-weights", action="store_true", help="accepted: preflight always builds them"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    from marble_pl.flux.preflight import flux_preflight  # a 12 B model: counted, not run

    report = flux_preflight(args.config, overrides) or preflight(
        args.config,
        steps=args.steps,
        resolution=args.resolution,
        batch_size=args.batch_size,
        group_size=args.group_size,
        num_inference_steps=args.num_inference_steps,
        skip=args.skip,
        accelerator=args.accelerator,
        overrides=overrides,
    )
    text = report.markdown()
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0
