"""FLUX.1 as a model family: its shipped architecture at real shape (meta device), random
weights, the tiny FLUX of the CPU tests, and the per-GPU memory table of ``marble preflight``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from marble_pl.errors import ConfigError
from marble_pl.flux.architecture import FLUX_DEV, shipped_flux_configs
from marble_pl.flux.components import build_random_flux, is_flux, load_flux
from marble_pl.flux.memory import flux_memory, meta_modules
from marble_pl.flux.tiny import ensure_tiny_flux, tiny_flux_configs, tiny_flux_is_complete

FLOW_GRPO_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory):
    return ensure_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "tiny-flux")


def test_flux_dev_at_real_shape_on_the_meta_device():
    """The shipped configs build FLUX.1-dev's published sizes: 11.9 B transformer parameters."""
    modules = meta_modules(shipped_flux_configs(FLUX_DEV), torch.bfloat16)
    counts = {
        k: sum(p.numel() for p in modules[k].parameters())
        for k in ("transformer", "vae", "text_encoder", "text_encoder_2")
    }
    assert counts == {
        "transformer": 11_901_408_320,
        "vae": 83_819_683,
        "text_encoder": 123_060_480,
        "text_encoder_2": 4_762_310_656,
    }
    t = modules["transformer"]
    assert (len(t.transformer_blocks), len(t.single_transformer_blocks)) == (19, 38)
    assert t.config.guidance_embeds and t.time_text_embed.guidance_embedder is not None
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in t.parameters())
    scheduler = modules["scheduler"].config
    assert scheduler.use_dynamic_shifting and (scheduler.base_shift, scheduler.max_shift) == (
        0.5,
        1.15,
    )


def test_random_flux_draws_real_classes_in_the_dtype():
    """``model.random_weights`` for FLUX: shipped configs (overridden smaller here), weights drawn
    in the dtype, byte-level tokenizers when none are cached; components that do not fit fail."""
    small = {
        "transformer": {
            "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 1,
            "joint_attention_dim": 32, "pooled_projection_dim": 16,
        },
        "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "projection_dim": 16},
        "text_encoder_2": {"d_model": 32, "d_ff": 32, "num_layers": 1, "num_heads": 2},
        "vae": {"block_out_channels": [32, 32], "norm_num_groups": 8, "layers_per_block": 1,
                "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2},
    }  # fmt: skip
    built = build_random_flux(FLUX_DEV, dtype=torch.bfloat16, architecture_overrides=small)
    parts = built.components
    assert built.config_source.startswith("shipped") and built.tokenizer_source == "byte-level"
    assert type(parts.transformer).__name__ == "FluxTransformer2DModel"
    assert type(parts.text_encoder_2).__name__ == "T5EncoderModel"
    assert all(p.dtype == torch.bfloat16 for p in parts.transformer.parameters())
    assert parts.transformer.config.attention_head_dim == 128  # the shipped head width kept
    with pytest.raises(ConfigError, match="joint_attention_dim is 4096 but text_encoder_2.d_model"):
        build_random_flux(FLUX_DEV, architecture_overrides={"text_encoder_2": {"d_model": 64}})


def test_tiny_flux_is_built_once_loads_with_from_pretrained_and_is_rebuilt_if_cut(tiny_flux):
    parts = load_flux(tiny_flux, local_files_only=True)
    sizes = {
        k: sum(p.numel() for p in getattr(parts, k).parameters())
        for k in ("transformer", "vae", "text_encoder", "text_encoder_2")
    }
    assert 100_000 < sum(sizes.values()) < 500_000, sizes
    assert is_flux(tiny_flux) and not is_flux("stabilityai/stable-diffusion-3.5-medium")
    assert parts.transformer.config.guidance_embeds and parts.vae_scale_factor == 2
    # the tiny configs preflight reads before the first build build the model saved
    shapes = meta_modules(tiny_flux_configs(), torch.float32)
    for name, module in shapes.items():
        if name != "scheduler":
            assert [p.shape for p in module.parameters()] == [
                p.shape for p in getattr(parts, name).parameters()
            ], name
    embeds, pooled, text_ids = parts.encode_prompts(["a cat"], max_sequence_length=16)
    assert embeds.shape == (1, 16, 32) and pooled.shape == (1, 16) and text_ids.shape == (16, 3)
    before = {k: v.clone() for k, v in parts.transformer.state_dict().items()}
    weights = next((tiny_flux / "transformer").glob("*.safetensors"))
    cut = weights.read_bytes()[:100]
    weights.unlink()  # a new file: the loaded tensors may map the old one
    weights.write_bytes(cut)  # a build cut short
    assert not tiny_flux_is_complete(tiny_flux)
    ensure_tiny_flux(tiny_flux)
    assert tiny_flux_is_complete(tiny_flux)
    rebuilt = load_flux(tiny_flux, local_files_only=True)
    for (name, a), b in zip(
        before.items(),
        rebuilt.transformer.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name  # the same seed: the same model


def test_memory_table_of_flux_dev_decides_ddp_or_sharding():
    """The 12 B model's per-GPU memory in bf16 with LoRA: weights counted on the meta device,
    activations from the real shapes; the verdict flips with the GPU's size."""
    kwargs = dict(
        resolution=512, max_sequence_length=128, lora_rank=64, lora_targets=FLOW_GRPO_TARGETS,
        pairs_per_micro_batch=4, images_per_rollout=24, prompts_per_step=2, gramian_taps=True,
    )  # fmt: skip
    report = flux_memory(shipped_flux_configs(FLUX_DEV), **kwargs)
    bf16 = 2
    weights = (11_901_408_320 + 83_819_683 + 123_060_480 + 4_762_310_656) * bf16
    assert report.resident["frozen weights"] >= weights  # + buffers
    # Flow-GRPO's targets at rank 64: r (in + out) on 12 Linears x 19 double blocks and the
    # 3 attention projections x 38 single blocks (attn.to_q matches those too).
    double = 8 * (3072 + 3072) + 2 * (3072 + 12288) + 2 * (12288 + 3072)
    assert report.lora_params == 64 * (19 * double + 38 * 3 * (3072 + 3072))
    settings = report.settings
    assert (settings["image_tokens"], settings["text_tokens"]) == (1024, 128)
    per_pair = settings["per_pair"]
    width = 3072
    assert per_pair["boundary"] == 57 * (1024 + 128) * width * bf16  # checkpointed block inputs
    assert 0 < per_pair["double"] < per_pair["all"] and per_pair["lora_inputs"] > 0
    _, peak = report.peak
    assert peak == max(report.phase_total(p) for p in ("encode", "rollout", "update"))
    text = report.markdown()
    assert "| transformer | FluxTransformer2DModel | 11,901,408,320 |" in text
    assert report.fits_ddp() and "DDP fits" in text
    resident = sum(report.resident.values())
    lowered = dataclasses.replace(report, gpu_bytes=resident + (peak - resident) // 2)
    assert not lowered.fits_ddp() and "no sharding needed" in lowered.markdown()
    small = dataclasses.replace(report, gpu_bytes=30 * 1024**3)  # under the weights alone
    assert not small.fits_ddp() and "a sharded strategy (FSDP" in small.markdown()
