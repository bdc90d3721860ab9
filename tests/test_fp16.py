"""``trainer.precision: 16-mixed`` (fp16 autocast on float32 weights with a GradScaler, the
official recipe's precision) under the module's manual optimisation: the update is unscaled,
clipped on the true gradient, skipped steps leave weights, optimizer state and scale alone."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from test_module import PROMPTS, make_module

from marble_pl.data import PromptDataModule
from marble_pl.errors import ConfigError
from marble_pl.loss_scaling import (
    check_loss_scaling,
    is_overflow,
    scaled_clip,
    skipped_update,
)
from marble_pl.models import lora_parameters

F16 = torch.finfo(torch.float16).eps


def _scaler(init_scale: float = 256.0) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=init_scale)


def _scaled_backward(layer: torch.nn.Linear, scaler: torch.amp.GradScaler, scale_by=1.0):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    scaler.scale(layer(x).sum() * scale_by).backward()


@pytest.mark.parametrize("skip", ["zero", "no_reward"])
def test_a_skipped_update_moves_nothing_and_keeps_the_scale(skip):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    scaler = _scaler()
    before = [p.detach().clone() for p in layer.parameters()]
    _scaled_backward(layer, scaler)
    with skipped_update(opt, scaler, skip):
        scaler.unscale_(opt)  # what Lightning's MixedPrecision.optimizer_step does
        scaler.step(opt)
        scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before, strict=True))
    assert not opt.state  # no momentum buffer: the optimizer never stepped
    assert scaler.get_scale() == 256.0
    # without a scaler the gradients are dropped
    with skipped_update(opt, None, skip):
        opt.step()
    assert all(p.grad is None for p in layer.parameters()) and not opt.state


def test_overflow_is_left_to_the_scaler_and_a_kept_step_is_unscaled():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = _scaler()
    before = [p.detach().clone() for p in layer.parameters()]
    _scaled_backward(layer, scaler, scale_by=math.inf)
    norm = float(torch.stack([p.grad.norm() for p in layer.parameters()]).norm())
    assert is_overflow(norm, scaler) and not is_overflow(norm, None)
    with skipped_update(opt, scaler, "overflow"):
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before, strict=True))
    assert scaler.get_scale() == 128.0  # backed off
    opt.zero_grad()
    _scaled_backward(layer, scaler)
    grads = [p.grad / 128.0 for p in layer.parameters()]
    with skipped_update(opt, scaler, None):
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    for p, b, g in zip(layer.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)
    assert scaled_clip(1.0, scaler) == 128.0 and scaled_clip(1.0, None) == 1.0


def test_settings_loss_scaling_cannot_serve_are_refused():
    scaler = _scaler()
    check_loss_scaling(None, "parameters", "bfloat16")  # no scaler: anything goes
    check_loss_scaling(scaler, "output", "float32")
    for space in ("parameters", "gramian"):
        with pytest.raises(ConfigError, match="gradient_space"):
            check_loss_scaling(scaler, space, "float32")
    with pytest.raises(ConfigError, match="weights_dtype"):
        check_loss_scaling(scaler, "output", "bfloat16")


# ----------------------------------------------------------------------- in a fit


def _lora_update(tiny_sd3_path, plugins=None, **overrides) -> torch.Tensor:
    """The flat LoRA change of one training step (SGD, lr 0.5) from a seeded start."""
    module = make_module(tiny_sd3_path, rewards=["brightness", "saturation"], **overrides)
    module.configure_model()
    g = torch.Generator().manual_seed(0)  # A and B seeded here: every call starts alike
    params = lora_parameters(module.transformer, "default")
    old = lora_parameters(module.transformer, "old")
    with torch.no_grad():
        for key, p in sorted(params.items()):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
            old[key].copy_(p)
    before = torch.cat([p.detach().flatten().clone() for _, p in sorted(params.items())])
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=plugins,
    )
    trainer.fit(module, PromptDataModule(str(PROMPTS), batch_size=2, group_size=3, seed=0))
    after = torch.cat([p.detach().flatten() for _, p in sorted(params.items())])
    return after - before


def test_fp16_step_is_the_fp32_step_to_fp16_accuracy(tiny_sd3_path):
    fp32 = _lora_update(tiny_sd3_path)
    fp16 = _lora_update(tiny_sd3_path, [MixedPrecision("16-mixed", "cpu", scaler=_scaler())])
    assert float(fp32.norm()) > 0
    cosine = float(fp16 @ fp32 / (fp16.norm() * fp32.norm()))
    assert cosine > 0.99, cosine
    assert abs(float(fp16.norm() / fp32.norm()) - 1) < 0.05  # a 256x scale error would not pass
    # clipping acts on the true (unscaled) gradient: the SGD step is lr * clip long
    clip = 1e-4
    clipped = _lora_update(
        tiny_sd3_path,
        [MixedPrecision("16-mixed", "cpu", scaler=_scaler())],
        gradient_clip_norm=clip,
    )
    torch.testing.assert_close(clipped.norm(), torch.tensor(0.5 * clip), rtol=1e-3, atol=0)


def test_fp16_with_parameter_space_gradients_is_refused_at_setup(tiny_sd3_path):
    with pytest.raises(ConfigError, match="gradient_space"):
        _lora_update(
            tiny_sd3_path,
            [MixedPrecision("16-mixed", "cpu", scaler=_scaler())],
            gradient_space="parameters",
        )


def test_fp16_skipped_updates_leave_weights_optimizer_and_scale(tiny_sd3_path):
    """Constant rewards with v_theta == v_old: an all-zero gradient, the update skipped. Under
    the GradScaler too (whose ``step`` needs gradients): no AdamW state, the scale kept."""
    import test_reliability  # noqa: F401  (registers the `test_constant` reward)

    module = make_module(
        tiny_sd3_path,
        rewards=["test_constant", {"name": "test_constant", "alias": "constant2"}],
        optimizer=lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
    )
    module.configure_model()
    old = lora_parameters(module.transformer, "old")
    with torch.no_grad():
        for key, p in lora_parameters(module.transformer, "default").items():
            old[key].copy_(p)
    before = {k: p.detach().clone() for k, p in module.named_parameters() if "lora_" in k}
    scaler = _scaler()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    trainer.fit(module, PromptDataModule(str(PROMPTS), batch_size=2, group_size=3, seed=0))
    assert module.counters["skipped_zero_grad"] == 2 and trainer.global_step == 2
    assert all(torch.equal(p, before[k]) for k, p in module.named_parameters() if "lora_" in k)
    assert not trainer.optimizers[0].state and scaler.get_scale() == 256.0
