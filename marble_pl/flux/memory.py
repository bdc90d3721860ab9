"""``marble preflight`` for FLUX: the memory of a training step per GPU at REAL shape, computed
where the 12 B model cannot run (a CPU box, a GPU too small for it).

Every count comes from the real modules built on the meta device (no memory, no compute):
parameters exactly; the LoRA as peft attaches it; activations as the bytes autograd saves in
one forward of one (image, timestep) pair at the configured resolution and text length
(``saved_tensors_hooks``), attention as a fused kernel keeps it (its output and log-sum-exp,
not the S x S probabilities the meta device's math path saves); the rollout's no-grad working
set from the largest activation. Phases add to the resident weights and optimizer state what
they hold at their peak. DDP keeps everything on every GPU; the verdict says whether that fits,
whether smaller micro-batches would, or that a sharded strategy (FSDP) is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from marble_pl.models import add_lora

__all__ = ["FluxMemoryReport", "flux_memory"]

GIB = 1024**3
FLOAT32 = 4
WORKING_SET = 3
"""A no-grad forward holds about three of its largest activations at once: a layer's input, its
output and a residual (an estimate; the rollout phase's only one)."""
DOUBLE_BLOCKS, SINGLE_BLOCKS = "transformer_blocks", "single_transformer_blocks"


@dataclass
class FluxMemoryReport:
    """Per-GPU memory of a FLUX training step (see :func:`flux_memory`), in bytes."""

    components: dict[str, tuple[str, int, int]]
    """``name -> (class, parameters, bytes)``, counted on the meta device."""
    lora_params: int
    adapters: int
    resident: dict[str, int]
    phases: dict[str, dict[str, int]]
    settings: dict[str, Any]
    gpu_bytes: int
    how: dict[str, str] = field(default_factory=dict)

    def phase_total(self, phase: str) -> int:
        return sum(self.resident.values()) + sum(self.phases[phase].values())

    @property
    def peak(self) -> tuple[str, int]:
        phase = max(self.phases, key=self.phase_total)
        return phase, self.phase_total(phase)

    def fits_ddp(self) -> bool:
        """Whether every GPU can hold the whole step at the configured sizes."""
        return self.peak[1] <= self.gpu_bytes

    @property
    def smallest_peak(self) -> int:
        """The peak with one image per rollout call and one pair per backward: above the GPU,
        only sharding the weights (or a smaller model, resolution) fits."""
        units = {"rollout": self.settings["images_per_rollout"],
                 "update": self.settings["pairs_per_micro_batch"]}  # fmt: skip
        resident = sum(self.resident.values())
        return resident + max(
            sum(items.values()) // units.get(phase, 1) for phase, items in self.phases.items()
        )

    def markdown(self) -> str:
        s = self.settings
        lines = [
            f"FLUX preflight (computed on the meta device: nothing was run or allocated): "
            f"{s['resolution']} px ({s['image_tokens']} image + {s['text_tokens']} text tokens), "
            f"weights {s['dtype']}, LoRA rank {s['lora_rank']} float32, "
            f"{s['pairs_per_micro_batch']} (image, timestep) pairs per backward, "
            f"{s['images_per_rollout']} images per rollout call, gradient checkpointing "
            f"{'on' if s['gradient_checkpointing'] else 'off'}.",
            "",
            "| component | class | parameters | memory (GiB) |",
            "| --- | --- | ---: | ---: |",
        ]
        for name, (cls, params, size) in self.components.items():
            lines.append(f"| {name} | {cls} | {params:,} | {size / GIB:,.2f} |")
        kinds = "trained, sampling, EMA" if self.adapters > 2 else "trained, sampling"
        lora_gib = self.adapters * self.lora_params * FLOAT32 / GIB
        lines.append(
            f"| LoRA ({self.adapters} adapters: {kinds}) | peft | {self.lora_params:,} trained "
            f"| {lora_gib:.2f} |"
        )
        lines += ["", "| per GPU | GiB | how |", "| --- | ---: | --- |"]
        for item, size in self.resident.items():
            lines.append(f"| resident: {item} | {size / GIB:,.2f} | {self.how.get(item, '')} |")
        for phase, items in self.phases.items():
            for item, size in items.items():
                lines.append(f"| {phase}: {item} | {size / GIB:,.2f} | {self.how.get(item, '')} |")
            lines.append(f"| **{phase} peak** | **{self.phase_total(phase) / GIB:,.2f}** | |")
        phase, peak = self.peak
        gpu = self.gpu_bytes / GIB
        if self.fits_ddp():
            verdict = (
                f"DDP fits: the peak ({phase}, {peak / GIB:.1f} GiB) is under {gpu:.1f} GiB per "
                "GPU; every GPU holds the whole model."
            )
        elif self.smallest_peak <= self.gpu_bytes:
            verdict = (
                f"DDP does not fit as configured: the peak ({phase}, {peak / GIB:.1f} GiB) exceeds "
                f"{gpu:.1f} GiB per GPU; with 1 image per rollout call and 1 pair per backward it "
                f"is {self.smallest_peak / GIB:.1f} GiB: lower model.rollout_chunk_size / "
                "model.micro_batch_size, no sharding needed."
            )
        else:
            verdict = (
                f"DDP does not fit: even with 1 image per rollout call and 1 pair per backward the "
                f"peak is {self.smallest_peak / GIB:.1f} GiB, over {gpu:.1f} GiB per GPU; a "
                "sharded strategy (FSDP: the frozen weights split across GPUs) is needed."
            )
        lines += [
            "",
            verdict,
            "",
            "Not counted: the CUDA context and allocator fragmentation (a few GiB), and the "
            "reward models' activations (scored images are few next to the rollout's).",
        ]
        if self.settings.get("rewards_not_counted"):
            missing = ", ".join(self.settings["rewards_not_counted"])
            lines += ["", f"Reward models not counted (no shipped architecture): {missing}."]
        return "\n".join(lines)


def meta_modules(configs: Mapping[str, Mapping[str, Any]], dtype: torch.dtype) -> dict[str, Any]:
    """The FLUX modules of ``configs`` on the meta device, in ``dtype``."""
    from accelerate import init_empty_weights

    from marble_pl.flux.components import build_flux_modules

    def meta(_: str, make: Callable[[], nn.Module]) -> nn.Module:
        with init_empty_weights(include_buffers=False):
            module = make()
        return nn.Module.to(module, dtype)  # diffusers' own .to warns of a cast it does not do

    return build_flux_modules(configs, meta)


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class _SavedBytes:
    """Bytes autograd saves during a forward, per phase label; each tensor once, parameters
    never; with ``attention_len`` S, attention probabilities ``[N, H, S, S]`` counted as a fused
    kernel's ``[N, H, S]`` float32 log-sum-exp instead."""

    def __init__(self, attention_len: int | None = None) -> None:
        self.attention_len = attention_len
        self.label = "other"
        self.by_label: dict[str, int] = {}
        self._seen: dict[int, torch.Tensor] = {}  # held, so an id is never reused

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if isinstance(base, nn.Parameter) or id(base) in self._seen:
            return t
        self._seen[id(base)] = base
        shape = tuple(base.shape)
        if len(shape) == 4 and shape[-1] == shape[-2] == self.attention_len:
            size = math.prod(shape[:-1]) * FLOAT32
        else:
            size = base.numel() * base.element_size()
        self.by_label[self.label] = self.by_label.get(self.label, 0) + size
        return t

    def mark(self, label: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.label = label

        return hook


def transformer_saved_bytes(
    transformer: nn.Module, image_tokens: int, text_tokens: int, dtype: torch.dtype
) -> dict[str, int]:
    """What one pair's forward saves for the backward: ``double`` and ``single`` (one block of
    each kind, the largest of its kind), ``all``, and ``boundary`` (all the blocks' inputs: what
    gradient checkpointing keeps); and ``largest_output``, the largest activation."""
    counter = _SavedBytes(attention_len=image_tokens + text_tokens)
    handles = [transformer.register_forward_pre_hook(counter.mark("embed"))]
    for kind in (DOUBLE_BLOCKS, SINGLE_BLOCKS):
        for i, block in enumerate(getattr(transformer, kind)):
            handles.append(block.register_forward_pre_hook(counter.mark(f"{kind}.{i}")))
    handles.append(transformer.norm_out.register_forward_pre_hook(counter.mark("out")))
    largest = _LargestOutput(transformer)
    taps = _LoraInputs(transformer, dtype)
    config = transformer.config
    meta = {"device": "meta", "dtype": dtype}
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            transformer(
                hidden_states=torch.empty(1, image_tokens, config.in_channels, **meta),
                encoder_hidden_states=torch.empty(
                    1, text_tokens, config.joint_attention_dim, **meta
                ),
                pooled_projections=torch.empty(1, config.pooled_projection_dim, **meta),
                timestep=torch.empty(1, **meta),
                guidance=torch.empty(1, **meta) if config.guidance_embeds else None,
                img_ids=torch.zeros(image_tokens, 3),
                txt_ids=torch.zeros(text_tokens, 3),
                return_dict=False,
            )
    finally:
        for handle in handles:
            handle.remove()
        largest.remove()
        taps.remove()
    width = config.num_attention_heads * config.attention_head_dim
    tokens = image_tokens + text_tokens
    blocks = config.num_layers + config.num_single_layers
    per = counter.by_label
    return {
        "double": max(v for k, v in per.items() if k.startswith(DOUBLE_BLOCKS)),
        "single": max(v for k, v in per.items() if k.startswith(SINGLE_BLOCKS)),
        "all": sum(per.values()),
        "boundary": blocks * tokens * width * torch.finfo(dtype).bits // 8,
        "largest_output": largest.bytes,
        "lora_inputs": taps.bytes,
    }


class _LargestOutput:
    """The largest tensor any submodule outputs in a forward (bytes)."""

    def __init__(self, module: nn.Module) -> None:
        self.bytes = 0
        self._handles = [m.register_forward_hook(self._hook) for m in module.modules()]

    def _hook(self, _: nn.Module, __: Any, output: Any) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        for t in outputs:
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _LoraInputs:
    """The bytes of every LoRA layer's input in a forward, each tensor once, in the compute
    dtype: what ``gradient_space: gramian``'s taps hold until the backward
    (:class:`~marble_pl.gramian.LinearGradientTaps`), gradient checkpointing or not."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        self.bytes, self._size = 0, torch.finfo(dtype).bits // 8
        self._seen: dict[int, torch.Tensor] = {}
        self._handles = [
            m.register_forward_pre_hook(self._hook)
            for n, m in module.named_modules()
            if hasattr(m, "lora_A") or (isinstance(m, nn.Linear) and ".lora_B." in n)
        ]  # a LoRA layer's input (shared by q, k, v: once), and its B's rank-wide input

    def _hook(self, _: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if id(x) not in self._seen:
            self._seen[id(x)] = x
            self.bytes += x.numel() * self._size

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def vae_decode_largest_output(vae: nn.Module, resolution: int, dtype: torch.dtype) -> int:
    """The largest activation of one image's VAE decode (bytes)."""
    cell = 2 ** (len(vae.config.block_out_channels) - 1)
    side = resolution // cell
    latents = torch.empty(1, vae.config.latent_channels, side, side, device="meta", dtype=dtype)
    largest = _LargestOutput(vae)
    try:
        with torch.no_grad():
            vae.decode(latents, return_dict=False)
    finally:
        largest.remove()
    return largest.bytes


def flux_memory(
    configs: Mapping[str, Mapping[str, Any]],
    *,
    resolution: int,
    max_sequence_length: int,
    lora_rank: int,
    lora_targets: Sequence[str],
    pairs_per_micro_batch: int,
    images_per_rollout: int,
    prompts_per_step: int,
    dtype: torch.dtype = torch.bfloat16,
    gradient_checkpointing: bool = True,
    gramian_taps: bool = False,
    eval_ema: bool = True,
    extra_resident: Mapping[str, tuple[str, int, int]] | None = None,
    gpu_bytes: int = 80 * 10**9,
) -> FluxMemoryReport:
    """Per-GPU memory of a MARBLE step on FLUX under DDP (see the module docstring). The
    activations are counted with the LoRA attached, outside autocast: peft saves its layers'
    inputs cast to float32, which bf16 autocast would save in bfloat16 (an upper bound).

    ``extra_resident``: more frozen models held on the GPU (reward models), as
    ``name -> (class, parameters, bytes)``.
    """
    modules = meta_modules(configs, dtype)
    transformer, vae = modules["transformer"], modules["vae"]
    components = {
        name: (type(modules[name]).__name__, sum(p.numel() for p in modules[name].parameters()),
               _bytes(modules[name]))
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
    }  # fmt: skip
    components.update(extra_resident or {})
    lora = sum(
        p.numel() for p in add_lora(transformer, rank=lora_rank, target_modules=lora_targets)
    )
    adapters = 3 if eval_ema else 2
    cell = 2 * 2 ** (len(vae.config.block_out_channels) - 1)  # VAE cells, packed 2 x 2
    image_tokens = (resolution // cell) ** 2
    saved = transformer_saved_bytes(transformer, image_tokens, max_sequence_length, dtype)
    block = max(saved["double"], saved["single"])
    train_pair = saved["boundary"] + 2 * block if gradient_checkpointing else saved["all"]
    t5_tokens = prompts_per_step * max_sequence_length
    t5 = configs["text_encoder_2"]
    resident = {
        "frozen weights": sum(size for _, _, size in components.values()),
        "LoRA adapters (float32)": adapters * lora * FLOAT32,
        "AdamW moments (float32)": 2 * lora * FLOAT32,
        "LoRA gradients + DDP buckets (float32)": 2 * lora * FLOAT32,
    }
    phases = {
        "encode": {"T5 activations": t5_tokens * (4 * t5["d_model"] + t5["d_ff"]) * 2},
        "rollout": {
            "transformer working set": images_per_rollout * WORKING_SET * saved["largest_output"],
            "VAE decode": images_per_rollout
            * WORKING_SET
            * vae_decode_largest_output(vae, resolution, dtype),
        },
        "update": {
            "training activations": pairs_per_micro_batch * train_pair,
            **(
                {"gramian taps": pairs_per_micro_batch * saved["lora_inputs"]}
                if gramian_taps
                else {}
            ),
        },
    }
    how = {
        "frozen weights": "counted: meta-device parameters + buffers",
        "LoRA adapters (float32)": "counted: peft's adapter on the meta-device transformer",
        "AdamW moments (float32)": "computed: 2 x trained LoRA",
        "LoRA gradients + DDP buckets (float32)": "computed: 2 x trained LoRA",
        "gramian taps": "counted: pairs per backward x every LoRA layer's input",
        "T5 activations": "computed: prompts x tokens x (4 d_model + d_ff), bf16",
        "transformer working set": "computed: images per call x 3 x its largest activation",
        "VAE decode": "computed: images per call x 3 x its largest activation",
        "training activations": (
            "counted: pairs per backward x (every block's input + 2 x the largest block's saved "
            "tensors: its recompute and backward)"
            if gradient_checkpointing
            else "counted: pairs per backward x every tensor the forward saves"
        ),
    }
    settings = {
        "resolution": resolution,
        "image_tokens": image_tokens,
        "text_tokens": max_sequence_length,
        "dtype": str(dtype).removeprefix("torch."),
        "lora_rank": lora_rank,
        "pairs_per_micro_batch": pairs_per_micro_batch,
        "images_per_rollout": images_per_rollout,
        "gradient_checkpointing": gradient_checkpointing,
        "per_pair": saved,
    }
    return FluxMemoryReport(components, lora, adapters, resident, phases, settings, gpu_bytes, how)
