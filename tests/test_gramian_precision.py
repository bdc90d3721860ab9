"""``gradient_space: gramian`` under bf16-mixed and the taps' memory (issue 22).

The per-pair loss split ``l = r a + b`` cancels where ``r`` is near 1/2; the taps use the centred
split ``(r - 1/2) a + (b + a/2)``, sum in float32 whatever the autocast, and hold the tapped
layers' own saved inputs rather than copies of them.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_module import make_module
from torch import nn

import marble_pl.spaces as spaces_mod
from marble_pl.gradients import update_direction
from marble_pl.gramian import LinearGradientTaps, affine_reward_grads, storage_bytes

BF16_U = torch.finfo(torch.bfloat16).eps / 2  # unit roundoff, 2^-8
F32_EPS = torch.finfo(torch.float32).eps


def _module(path, weights_dtype: str = "float32"):
    """The tiny SD3 with LoRA (rank 4), 3 timesteps per image; lora_B of the trained and the
    sampling adapters drawn independently, so ``v_theta`` and ``v_old`` differ a little."""
    torch.manual_seed(0)
    module = make_module(path, weights_dtype=weights_dtype, timesteps_per_image=3)
    module.configure_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(module.transformer.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
    return module


def _batch(module, images: int = 3, masked: bool = False):
    """Training pairs, conditioning, ``r [N, 3]`` near 1/2 (advantages ~ N(0, 1) clipped at 5,
    as ``optimality``) and per-image loss weights (one reward's first image masked out)."""
    gen = torch.Generator().manual_seed(1)
    cfg = module.transformer.config
    side = module.hparams.resolution // module.policy.vae_scale_factor
    x0 = torch.randn(images, cfg.in_channels, side, side, generator=gen)
    pairs = module.training_pairs(x0)
    embeds = torch.randn(images, 8, cfg.joint_attention_dim, generator=gen)
    pooled = torch.randn(images, cfg.pooled_projection_dim, generator=gen)
    adv = torch.randn(images, 3, generator=gen)
    r = 0.5 + 0.5 * (adv / 5).clamp(-1, 1)
    mask = torch.ones(images, 3, dtype=torch.bool)
    if masked:
        mask[0, 1] = False
    w = module.scorer.loss_mask(mask, pairs.count).weights
    return pairs, (embeds, pooled), r, w


def _grads(module, space: str, batch, autocast: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        grads = spaces_mod.build_space(space, module).grads(*batch)[0]
    assert grads.dtype == module.lora_params[0].dtype  # float32 LoRA: not autocast's bf16
    return grads.double()


def _rel(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-reward relative error ``|g_k - ref_k| / |ref_k|``."""
    return (g - ref).norm(dim=1) / ref.norm(dim=1)


@pytest.mark.parametrize("masked", [False, True], ids=["uniform", "masked"])
def test_centred_split_keeps_bf16_per_reward_gradients_as_accurate_as_autograd(
    tiny_sd3_path, monkeypatch, masked
):
    """bf16-mixed (bf16 frozen weights, float32 LoRA, autocast) against a float64 reference of
    the same weights: the centred taps are within plain bf16 autograd's error (K backwards,
    ``parameters`` space) plus half bf16's unit roundoff (they backpropagate the same
    quantities); the uncentred split, which cancels, is not."""
    module = _module(tiny_sd3_path, weights_dtype="bfloat16")
    batch = _batch(module, masked=masked)
    assert len(batch[0]) == 9
    plain = _grads(module, "parameters", batch, autocast=True)
    centred = _grads(module, "gramian", batch, autocast=True)
    uncentred_fn = functools.partial(affine_reward_grads, centre=0.0)
    with monkeypatch.context() as m:
        m.setattr(spaces_mod, "affine_reward_grads", uncentred_fn)
        uncentred = _grads(module, "gramian", batch, autocast=True)
    module.transformer.double()  # bf16 weights upcast exactly: the error is the arithmetic's
    ref = _grads(module, "parameters", batch, autocast=False)
    assert float(_rel(_grads(module, "gramian", batch, autocast=False), ref).max()) < 1e-5
    err = {
        k: _rel(v, ref) for k, v in [("plain", plain), ("centred", centred), ("r a + b", uncentred)]
    }
    print({k: [round(100 * float(e), 2) for e in v] for k, v in err.items()}, "% per reward")
    bound = err["plain"] + BF16_U / 2
    assert bool((err["centred"] <= bound).all()), err
    assert bool((err["r a + b"] > bound).any()), err  # the split the taps used before


def test_taps_sum_in_float32_under_autocast():
    """Under bf16 autocast the per-sample products and their weighted sums are float32: equal
    to float64 sums of the same bf16 operands within float32 rounding (bf16 sums: ~2^-9)."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8, bias=False)
    x, w = torch.randn(4, 32, 16), torch.rand(4, 3)
    dy = torch.randn(4, 32, 8).bfloat16().float()  # exact in bf16: the gradient reaching y
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with LinearGradientTaps(layer, [layer.weight]) as taps:
            y = layer(x)
        assert y.dtype == torch.bfloat16
        got = taps.weighted((y.float() * dy).sum((1, 2)), w)
    ref = torch.einsum("nj,nso,nsi->joi", w.double(), dy.double(), x.bfloat16().double())
    rel = float((got.double() - ref.reshape(3, -1)).abs().max() / ref.abs().max())
    assert got.dtype == torch.float32 and rel < 32 * F32_EPS, rel


def test_update_direction_is_float32_under_autocast():
    g, lam = torch.randn(3, 1000), torch.rand(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = update_direction(g, lam)
    assert d.dtype == torch.float32 and torch.equal(d, update_direction(g, lam))


def _tapped_forward(module, autocast: bool):
    """One tapped forward of 9 pairs: ``(taps, the tapped layers' inputs as they arrived (what
    the taps held before), the storages autograd saved for the backward)``."""
    gen = torch.Generator().manual_seed(0)
    cfg = module.transformer.config
    side = module.hparams.resolution // module.policy.vae_scale_factor
    x = torch.randn(9, cfg.in_channels, side, side, generator=gen)
    embeds = torch.randn(9, 8, cfg.joint_attention_dim, generator=gen)
    pooled = torch.randn(9, cfg.pooled_projection_dim, generator=gen)
    taps = LinearGradientTaps(module.transformer, module.lora_params)
    arrived: list[torch.Tensor] = []

    def record(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        arrived.append(inputs[0].detach())

    handles = [m.register_forward_pre_hook(record) for m in taps.modules]  # before the taps'
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    try:
        cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
        with cast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), taps:
            v = module.velocity(x, torch.rand(9, generator=gen), embeds, pooled)
    finally:
        for h in handles:
            h.remove()
    return taps, arrived, {t.untyped_storage().data_ptr() for t in saved}, v


@pytest.mark.parametrize(
    ("weights_dtype", "autocast"),
    [("float32", False), ("float32", True), ("bfloat16", True)],
    ids=["float32", "float32-autocast", "bf16-mixed"],
)
def test_taps_hold_the_layers_saved_inputs_and_fewer_bytes(tiny_sd3_path, weights_dtype, autocast):
    """Every input the taps hold is one autograd saves anyway (no copy of their own); the inputs
    as they arrived (float32 copies under autocast, the joint attention output behind to_out's
    slice) were partly not, and took more bytes."""
    module = _module(tiny_sd3_path, weights_dtype=weights_dtype)
    taps, arrived, saved, v = _tapped_forward(module, autocast)
    held = taps._held_tensors()
    assert len(held) == len(arrived) == len(taps.modules)
    own = [t for t in held if t.untyped_storage().data_ptr() not in saved]
    before = [t for t in arrived if t.untyped_storage().data_ptr() not in saved]
    assert storage_bytes(own) == 0 and storage_bytes(before) > 0
    assert 0 < taps.held_bytes == taps.peak_bytes < storage_bytes(arrived)
    assert sum(taps.peak_by_tokens.values()) == taps.peak_bytes
    print(
        f"{weights_dtype} autocast={autocast}: taps hold {taps.held_bytes} B (all saved by "
        f"autograd); before {storage_bytes(arrived)} B, {storage_bytes(before)} B not saved"
    )
    del v


@pytest.mark.parametrize("masked", [False, True], ids=["uniform", "masked"])
def test_float32_gramian_gradients_equal_autograds(tiny_sd3_path, masked):
    """In float32 the centred taps give plain autograd's per-reward gradients (K backwards)
    within float32 rounding."""
    module = _module(tiny_sd3_path)
    batch = _batch(module, masked=masked)
    exact = _grads(module, "parameters", batch, autocast=False)
    fast = _grads(module, "gramian", batch, autocast=False)
    assert float(_rel(fast, exact).max()) < 1e3 * F32_EPS
