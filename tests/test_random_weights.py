"""SD3.5 Medium's real architecture with random weights: configs, sizes, and a MARBLE step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.models.normalization import RMSNorm
from test_module import fit, make_module
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from marble_pl.architectures import SD35_MEDIUM, shipped_sd3_configs
from marble_pl.errors import ConfigError
from marble_pl.models import ModelLoadError, load_sd3
from marble_pl.random_weights import (
    build_random_sd3,
    check_sd3_architecture,
    random_module,
    sd3_configs,
)

# Published parameter counts (the checkpoints' tensors): CLIP ViT-L/14's and OpenCLIP
# ViT-bigG/14's text towers with projection, and T5 v1.1 XXL's encoder.
CLIP_L_TEXT, CLIP_G_TEXT, T5_XXL_ENCODER = 123_650_304, 694_659_840, 4_762_310_656


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_configs_come_from_the_directory_then_the_cache_then_the_shipped_facts(tiny_sd3_path):
    configs, source = sd3_configs(tiny_sd3_path)
    assert source == "local directory" and configs["transformer"]["num_layers"] == 2
    configs, source = sd3_configs(SD35_MEDIUM)  # not cached here: the published configs
    assert source == "shipped (marble_pl.architectures)"
    assert configs == shipped_sd3_configs(SD35_MEDIUM)
    with pytest.raises(ModelLoadError, match="neither cached nor shipped.*local directory"):
        sd3_configs("someone/another-model")
    with pytest.raises(ModelLoadError, match="lacks the components' config.json"):
        sd3_configs(tiny_sd3_path / "transformer")


def test_shipped_sd35_medium_has_the_published_shapes():
    """Built on the meta device (no memory): MMDiT-X with 24 blocks of width 1536, dual
    attention in the first 13, RMS-normalised q/k; the text encoders' published sizes."""
    c = shipped_sd3_configs(SD35_MEDIUM)
    with init_empty_weights():
        transformer = SD3Transformer2DModel.from_config(c["transformer"])
        vae = AutoencoderKL.from_config(c["vae"])
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(c["text_encoder"]))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(c["text_encoder_2"]))
        t5 = T5EncoderModel(T5Config.from_dict(c["text_encoder_3"]))
        t5.set_input_embeddings(t5.shared)
    blocks = transformer.transformer_blocks
    assert len(blocks) == 24 and transformer.inner_dim == 1536
    assert [b.attn2 is not None for b in blocks] == [i < 13 for i in range(24)]
    assert isinstance(blocks[0].attn.norm_q, RMSNorm) and blocks[-1].context_pre_only
    assert 2.2e9 < count(transformer) < 2.3e9  # + the 384 x 384 x 1536 positional table
    assert transformer.pos_embed.pos_embed.numel() == 384 * 384 * 1536
    assert vae.config.latent_channels == 16 and 8.3e7 < count(vae) < 8.4e7
    assert (count(clip_l), count(clip_g), count(t5)) == (CLIP_L_TEXT, CLIP_G_TEXT, T5_XXL_ENCODER)


def test_random_module_draws_every_parameter_once_in_the_dtype():
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)

    def build() -> T5EncoderModel:
        model = T5EncoderModel(config)
        model.set_input_embeddings(model.shared)
        return model

    model = random_module(build, torch.bfloat16, seed=3)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert not any(p.is_meta for p in params.values())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert model.shared.weight is model.encoder.embed_tokens.weight  # still tied
    assert torch.all(model.encoder.final_layer_norm.weight == 1)
    assert 0 < model.shared.weight.float().std() <= 0.021
    again = random_module(build, torch.bfloat16, seed=3)
    assert torch.equal(again.shared.weight, model.shared.weight)  # seeded


def test_random_weights_train_through_the_module(tiny_sd3_path):
    """The tiny pipeline's own configs, random weights (not the saved ones), one MARBLE step."""
    module = make_module(tiny_sd3_path, random_weights=True, gradient_space="gramian")
    fit(module, steps=1)
    saved = load_sd3(tiny_sd3_path, local_files_only=True).transformer
    w = module.transformer.pos_embed.proj.weight
    assert w.shape == saved.pos_embed.proj.weight.shape and not torch.equal(
        w, saved.pos_embed.proj.weight
    )
    assert torch.isfinite(module.last_step.rewards).all()
    assert module.last_step.grads is not None and torch.isfinite(module.last_step.grads).all()


def test_architecture_overrides_need_random_weights(tiny_sd3_path):
    with pytest.raises(ConfigError, match="random_weights: true"):
        make_module(tiny_sd3_path, architecture_overrides={"transformer": {"num_layers": 1}})
    with pytest.raises(ConfigError, match="unknown component 'unet'"):
        build_random_sd3(tiny_sd3_path, architecture_overrides={"unet": {"num_layers": 1}})


@pytest.mark.slow
def test_sd35_medium_width_two_blocks_through_a_marble_step():
    """SD3.5 Medium's transformer at its real width with 2 blocks (one dual-attention, one
    plain, the last context-pre-only), its real VAE, one-layer CLIP encoders at real width: one
    MARBLE step in `gramian` space on the CPU, LoRA on the shipped default targets."""
    module = make_module(
        SD35_MEDIUM,
        random_weights=True,
        load_t5=False,
        architecture_overrides={
            "transformer": {"num_layers": 2, "dual_attention_layers": [0]},
            "text_encoder": {"num_hidden_layers": 1},
            "text_encoder_2": {"num_hidden_layers": 1},
        },
        rewards=["brightness", "saturation"],
        gradient_space="gramian",
        resolution=64,
        num_inference_steps=2,
        max_sequence_length=16,
    )
    before = None
    torch.manual_seed(0)
    module.configure_model()
    before = [p.detach().clone() for p in module.lora_params]
    fit(module, steps=1)
    transformer = module.transformer
    assert transformer.inner_dim == 1536 and transformer.transformer_blocks[0].attn2 is not None
    # 4 targets x 2 blocks; the dual attention's attn2 projections are named attn2.to_*: adapted.
    adapted = [n for n, _ in transformer.named_modules() if n.endswith(".lora_A")]
    assert len(adapted) == 4 * 2 + 4
    rank = module.hparams.lora_rank
    expected = sum(rank * (1536 + 1536) for _ in adapted)
    assert sum(p.numel() for p in module.lora_params) == expected
    rec = module.last_step
    assert rec.grads.shape == (2, expected) and torch.isfinite(rec.grads).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, module.lora_params, strict=True))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"vae": {"latent_channels": 4}},
            "vae.latent_channels is 4 but transformer.in_channels is 16",
        ),
        ({"text_encoder": {"projection_dim": 512}}, "projection_dim add up to 1792 but"),
        ({"text_encoder_3": {"d_model": 2048}}, "text_encoder_3.d_model is 2048 but"),
        ({"transformer": {"joint_attention_dim": 1024}}, "hidden_size add up to 2048, more than"),
    ],
)
def test_components_that_do_not_fit_are_one_line_before_building(overrides, message):
    """Checked on the configs, before a single parameter is drawn."""
    with pytest.raises(ConfigError, match=message):
        build_random_sd3(SD35_MEDIUM, architecture_overrides=overrides)


def test_the_tiny_and_the_shipped_architectures_fit(tiny_sd3_path):
    for name in (tiny_sd3_path, SD35_MEDIUM):
        check_sd3_architecture(sd3_configs(name)[0])


def test_the_five_reward_models_have_their_published_shapes(monkeypatch):
    """Each pretrained reward's ``_build_random`` on the meta device: CLIP ViT-H-14 (PickScore,
    HPSv2), ViT-L/14 (CLIP score: 427,616,513 parameters as published), its vision tower + MLP
    (aesthetic), BLIP ViT-L/16 + BERT-base (ImageReward)."""
    import marble_pl.random_weights as rw
    from marble_pl.rewards import build_reward

    def on_meta(build, dtype, seed=0):
        with init_empty_weights(include_buffers=False):
            return build()

    monkeypatch.setattr(rw, "random_module", on_meta)
    counts = {}
    for name in ("pickscore", "hpsv2", "clip_score", "aesthetic", "imagereward"):
        reward = build_reward({"name": name, "local_files_only": True})
        reward.random_weights = True
        counts[name] = count(reward._build_random())
        assert reward.transform is not None
    assert counts["clip_score"] == 427_616_513
    assert counts["pickscore"] == counts["hpsv2"] and 9.8e8 < counts["pickscore"] < 9.9e8
    assert 3.0e8 < counts["aesthetic"] < 3.1e8 and 4.4e8 < counts["imagereward"] < 4.5e8


def test_a_custom_pretrained_reward_without_random_weights_is_one_line():
    from marble_pl.rewards.pretrained import PretrainedReward, RewardLoadError

    class Custom(PretrainedReward):
        pass

    reward = Custom(name="mine")
    reward.random_weights = True
    with pytest.raises(RewardLoadError, match="'mine' .* cannot be built with random weights"):
        reward.load()


def test_marble_fit_random_weights_flag(tmp_path, tiny_sd3_path, monkeypatch, capsys):
    """``marble fit --random-weights`` is ``--model.random_weights=true``: the saved config says so."""
    from test_errors import tiny_fit_args

    from marble_pl.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(Path(__file__).resolve().parents[1] / "configs")
    monkeypatch.setattr(sys, "argv", ["marble"])
    args = tiny_fit_args(tiny_sd3_path, tmp_path, "--trainer.max_steps=1", "--random-weights")
    main(args)
    (saved,) = (tmp_path / "runs").rglob("config.yaml")
    assert yaml.safe_load(saved.read_text())["model"]["random_weights"] is True
