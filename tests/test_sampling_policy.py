"""The sampling policy v_old: float32 adapters under a bf16 base, its decay schedule, no CFG."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from test_module import make_module

from marble_pl.cli import MarbleCLI
from marble_pl.data import PromptDataModule
from marble_pl.errors import ConfigError
from marble_pl.models import SAMPLING_ADAPTER, ema_update_adapter, lora_parameters, use_adapter
from marble_pl.module import MarbleModule
from marble_pl.schedules import DIFFUSIONNFT_DECAY, DecaySchedule, decay_schedule

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "configs" / "prompts" / "tiny_train.txt"


def build(path: Path, **overrides) -> MarbleModule:
    """test_module's tiny module with 2 sampler steps (the fastest that still samples)."""
    return make_module(path, **{"num_inference_steps": 2, **overrides})


def randomize_trained_adapter(module: MarbleModule, seed: int = 0) -> None:
    """Give the trained adapter values unlike v_old's (LoRA B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(module.transformer).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


# ------------------------------------------------------------------ float32 adapters


def test_both_adapters_stay_float32_on_a_bfloat16_base_and_the_ema_is_exact(tiny_sd3_path):
    module = build(tiny_sd3_path, weights_dtype="bfloat16")
    module.configure_model()
    tr = module.transformer
    assert tr.dtype == torch.bfloat16
    trained, old = lora_parameters(tr), lora_parameters(tr, SAMPLING_ADAPTER)
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert {p.dtype for p in old.values()} == {torch.float32}, "v_old must not be bf16"

    randomize_trained_adapter(module)
    before = {k: p.detach().clone() for k, p in old.items()}
    decay = 0.999
    ema_update_adapter(tr, decay=decay)
    moved = total = 0
    for k, p in old.items():
        new = trained[k].detach().float()
        expected = before[k].float() * decay + new * (1.0 - decay)  # float32 arithmetic
        assert torch.equal(p.detach(), expected), k
        differs = new != before[k]
        moved += int((p.detach() != before[k])[differs].sum())
        total += int(differs.sum())
    assert total > 0 and moved == total  # bf16 storage would leave about half of them unmoved

    # peft casts the bf16 activations to the float32 LoRA weights and back: velocity() runs.
    x_t = torch.randn(2, 16, 4, 4)
    t = torch.tensor([0.3, 0.7])
    embeds, pooled = module.encode(["a cat", "a dog"])
    v_theta = module.velocity(x_t, t, embeds, pooled)
    with torch.no_grad(), use_adapter(tr, SAMPLING_ADAPTER):
        v_old = module.velocity(x_t, t, embeds, pooled)
    assert v_theta.dtype == v_old.dtype == torch.float32
    assert v_theta.shape == x_t.shape and torch.isfinite(v_theta).all()
    assert not torch.equal(v_theta, v_old)  # the adapters differ, and both are in the forward


# ------------------------------------------------------------------ the decay schedule


def test_schedule_holds_then_ramps_then_caps():
    ramp = DecaySchedule(hold_steps=75, slope=0.0075, max_decay=0.999)  # DiffusionNFT's OCR
    assert [ramp(s) for s in (0, 1, 74, 75)] == [0.0, 0.0, 0.0, 0.0]
    assert ramp(76) == pytest.approx(0.0075)
    assert ramp(175) == pytest.approx(0.75)
    assert ramp(208) == pytest.approx(0.9975)  # 133 * 0.0075, still below the cap
    assert ramp(209) == 0.999 and ramp(10_000) == 0.999  # 134 * 0.0075 = 1.005, capped
    default = DIFFUSIONNFT_DECAY  # DiffusionNFT's SD3.5 multi-reward setting
    assert (default.hold_steps, default.slope, default.max_decay) == (0, 0.001, 0.5)
    assert default(0) == 0.0 and default(1) == pytest.approx(0.001)
    assert default(300) == pytest.approx(0.3) and default(500) == 0.5 and default(9999) == 0.5
    started = DecaySchedule(hold_steps=2, slope=0.1, max_decay=0.5, start=0.2)
    assert [started(s) for s in (0, 1, 2, 3)] == pytest.approx([0.0, 0.0, 0.2, 0.3])


def test_constant_schedule_and_plain_round_trip():
    const = decay_schedule(0.7)
    assert const == DecaySchedule.constant(0.7) and const.is_constant
    assert {const(s) for s in (0, 1, 50, 10**6)} == {0.7}
    assert const.as_plain() == 0.7
    ramp = decay_schedule({"hold_steps": 3, "slope": 0.01, "max_decay": 0.9})
    assert ramp.as_plain() == {"hold_steps": 3, "slope": 0.01, "max_decay": 0.9, "start": 0.0}
    assert decay_schedule(ramp.as_plain()) == ramp and decay_schedule(ramp) is ramp
    assert decay_schedule(0) == DecaySchedule.constant(0.0)  # DiffusionNFT's on-policy setting


@pytest.mark.parametrize(
    "spec, words",
    [
        (1.5, "[0, 1]"),
        (-0.1, "[0, 1]"),
        ({"hold_steps": -1}, "hold_steps"),
        ({"hold_steps": 2.5}, "hold_steps"),
        ({"slope": -0.1}, "slope"),
        ({"slope": float("inf")}, "slope"),
        ({"max_decay": 1.2}, "max_decay"),
        ({"start": 0.7, "max_decay": 0.5}, "start"),
        ({"flat": 75}, "unknown"),
        ("0.5", "expected a number"),
    ],
)
def test_bad_schedules_are_config_errors_naming_the_field(tiny_sd3_path, spec, words):
    with pytest.raises(ConfigError, match="model.old_policy_decay") as info:
        build(tiny_sd3_path, old_policy_decay=spec)
    assert words in str(info.value)


def test_module_defaults_are_diffusionnft_sd35(tiny_sd3_path):
    module = build(tiny_sd3_path)
    assert module.old_policy_schedule == DIFFUSIONNFT_DECAY
    assert module.hparams.guidance_scale == 1.0 and module.rollout_config.guidance_scale == 1.0
    # hparams hold plain data: checkpoints load with weights_only=True.
    assert module.hparams.old_policy_decay == DIFFUSIONNFT_DECAY.as_plain()
    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["old_policy_decay"]["slope"] == 0.001
    assert build(tiny_sd3_path, old_policy_decay=0.5).hparams.old_policy_decay == 0.5


class EMARecorder(Callback):
    """The two adapters after every step, with the step and the module's decay then."""

    def __init__(self) -> None:
        self.after: list[tuple[int, float, dict, dict]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tr = pl_module.transformer
        self.after.append(
            (
                trainer.global_step,
                pl_module.sampling_decay(),
                {k: p.detach().clone() for k, p in lora_parameters(tr).items()},
                {k: p.detach().clone() for k, p in lora_parameters(tr, SAMPLING_ADAPTER).items()},
            )
        )


def test_training_updates_v_old_with_the_scheduled_decay(tiny_sd3_path):
    schedule = DecaySchedule(hold_steps=1, slope=0.3, max_decay=0.5)
    module = build(tiny_sd3_path, old_policy_decay=schedule)
    module.configure_model()
    randomize_trained_adapter(module)
    old = {k: p.detach().clone() for k, p in lora_parameters(module.transformer, "old").items()}
    rec = EMARecorder()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, PromptDataModule(str(PROMPTS), batch_size=2, group_size=2, seed=0))
    assert [(step, decay) for step, decay, _, _ in rec.after] == [
        (1, 0.0),  # step 1: the ramp starts at 0 once the 1-step hold is over
        (2, pytest.approx(0.3)),
        (3, 0.5),  # 0.6, capped
    ]
    for step, decay, new, after in rec.after:
        for k in old:
            expected = old[k] * decay + new[k] * (1.0 - decay)
            torch.testing.assert_close(after[k], expected, rtol=0, atol=1e-7, msg=f"step {step}")
        assert not torch.equal(after[k], old[k])
        old = after


# ------------------------------------------------------------------ no CFG in training


def test_guidance_above_one_is_a_config_error(tiny_sd3_path):
    with pytest.raises(ConfigError, match="guidance_scale=4.5") as info:
        build(tiny_sd3_path, guidance_scale=4.5)
    message = str(info.value)
    assert "rollout policy would differ from the policy in the loss" in message
    assert "1.0" in message and "CFG-free" in message
    build(tiny_sd3_path, guidance_scale=1.0)
    build(tiny_sd3_path, guidance_scale=0.0)  # <= 1 disables CFG, as in the SD3 pipeline


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0.5", DecaySchedule.constant(0.5)),
        ("{hold_steps: 75, slope: 0.0075, max_decay: 0.999}", DecaySchedule(75, 0.0075, 0.999)),
        ("{slope: 0.001}", DIFFUSIONNFT_DECAY),  # the other fields keep their defaults
    ],
)
def test_the_schedule_is_set_from_yaml(tmp_path, tiny_sd3_path, value, expected):
    args = [
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--model.old_policy_decay",
        value,
    ]
    cli = MarbleCLI(MarbleModule, PromptDataModule, seed_everything_default=0, run=False, args=args)
    assert cli.model.old_policy_schedule == expected
    assert decay_schedule(cli.model.hparams.old_policy_decay) == expected
