"""Fidelity fixes against the official recipe (issue 22): the evaluation EMA's warm-up step,
the gaussian LoRA initialisation, exporting the weights that were evaluated."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from marble_pl.callbacks import LoraExport
from safetensors.torch import load_file
from test_module import make_module

from marble_pl.errors import ConfigError
from marble_pl.export import LORA_WEIGHT_NAME, export_checkpoint, export_evaluated
from marble_pl.export import main as export_main
from marble_pl.models import is_lora_key, lora_parameters
from marble_pl.module import MarbleModule


def _set_adapter(module: MarbleModule, adapter: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = lora_parameters(module.transformer, adapter)
    with torch.no_grad():
        for key in sorted(params):
            params[key].copy_(torch.randn(params[key].shape, generator=g))
    return {k: p.detach().clone() for k, p in params.items()}


def test_evaluation_ema_uses_the_incremented_step_as_upstream(tiny_sd3_path, monkeypatch):
    """DiffusionNFT increments ``global_step`` after the optimizer step and then calls
    ``ema.step(params, global_step)`` with ``decay = min((1 + s) / (10 + s), 0.9)``: the first
    update decays by 2/11, the second by 3/12 (not 1/10, 2/11: one step behind)."""
    module = make_module(tiny_sd3_path, eval_ema_decay=0.9)
    module.configure_model()
    ema = _set_adapter(module, "ema", seed=1)
    for step in (1, 2):  # Lightning's global_step after the optimizer step of step `step`
        monkeypatch.setattr(MarbleModule, "global_step", property(lambda self, s=step: s))
        theta = _set_adapter(module, "default", seed=10 + step)
        module.update_adapter_averages()
        decay = min((1 + step) / (10 + step), 0.9)
        ema = {k: decay * e + (1 - decay) * theta[k] for k, e in ema.items()}
        got = lora_parameters(module.transformer, "ema")
        for key, expected in ema.items():
            torch.testing.assert_close(got[key].detach(), expected, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------- LoRA initialisation


def test_gaussian_lora_init_draws_a_from_n_0_1_over_rank_and_b_zero(tiny_sd3_path):
    """``model.lora_init: gaussian`` is peft's ``init_lora_weights="gaussian"`` (the official
    recipe's): A ~ N(0, (1 / rank)^2), B = 0; every adapter copy starts equal to it."""
    rank = 4
    module = make_module(tiny_sd3_path, lora_init="gaussian", lora_rank=rank, eval_ema_decay=0.9)
    module.configure_model()
    params = lora_parameters(module.transformer, "default")
    a = torch.cat([p.detach().flatten() for k, p in params.items() if "lora_A" in k])
    b = torch.cat([p.detach().flatten() for k, p in params.items() if "lora_B" in k])
    n, sd = a.numel(), 1.0 / rank
    assert n > 1000 and torch.count_nonzero(b) == 0
    assert abs(float(a.mean())) < 5 * sd / n**0.5  # 5 standard errors
    assert abs(float(a.std()) / sd - 1) < 5 / (2 * n) ** 0.5
    assert float(a.abs().max()) > 3 * sd  # Gaussian tails: peft's default A is bounded
    for copy in ("old", "ema"):
        for key, value in lora_parameters(module.transformer, copy).items():
            assert torch.equal(value, params[key])

    default = make_module(tiny_sd3_path, lora_rank=rank)  # peft's default: Kaiming-uniform A
    default.configure_model()
    params = lora_parameters(default.transformer, "default")
    for key, value in params.items():
        if "lora_A" in key:  # kaiming_uniform_(a=sqrt(5)): |A| <= 1 / sqrt(fan_in)
            assert float(value.detach().abs().max()) <= value.shape[1] ** -0.5
        else:
            assert torch.count_nonzero(value) == 0
    with pytest.raises(ConfigError, match="model.lora_init"):
        make_module(tiny_sd3_path, lora_init="kaiming")


# ----------------------------------------------------------------------- export


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("transformer."): v for k, v in load_file(path).items()}


def _assert_file_is(path: Path, adapter: dict[str, torch.Tensor]) -> None:
    got = _file_tensors(path)
    assert got.keys() == adapter.keys()
    for key, value in adapter.items():
        assert torch.equal(got[key], value), key


@pytest.fixture
def ema_module(tiny_sd3_path):
    """A module keeping the evaluation EMA, its trained and EMA adapters different."""
    module = make_module(tiny_sd3_path, eval_ema_decay=0.9)
    module.configure_model()
    trained = _set_adapter(module, "default", seed=3)
    ema = _set_adapter(module, "ema", seed=4)
    return module, trained, ema


def test_export_writes_the_evaluated_ema_and_the_raw_adapter_beside_it(ema_module, tmp_path):
    module, trained, ema = ema_module
    assert module.eval_adapter == "ema"
    written, raw = export_evaluated(module, tmp_path / "lora")
    assert written == tmp_path / "lora" / LORA_WEIGHT_NAME
    assert raw == tmp_path / "lora_raw" / LORA_WEIGHT_NAME
    _assert_file_is(written, ema)
    _assert_file_is(raw, trained)
    plain = make_module(module.hparams.pretrained_model_name_or_path)  # no EMA: the trained one
    plain.configure_model()
    trained_plain = _set_adapter(plain, "default", seed=5)
    written, raw = export_evaluated(plain, tmp_path / "plain")
    assert raw is None and not (tmp_path / "plain_raw").exists()
    _assert_file_is(written, trained_plain)


def test_lora_export_callback_writes_the_evaluated_adapter(ema_module, tmp_path):
    module, trained, ema = ema_module
    callback = LoraExport(dirname="lora")
    strategy = SimpleNamespace(barrier=lambda name: None)
    trainer = SimpleNamespace(is_global_zero=True, default_root_dir=tmp_path, strategy=strategy)
    callback.on_train_end(trainer, module)
    assert callback.path == tmp_path / "lora" / LORA_WEIGHT_NAME
    assert callback.raw_path == tmp_path / "lora_raw" / LORA_WEIGHT_NAME
    _assert_file_is(callback.path, ema)
    _assert_file_is(callback.raw_path, trained)


def test_marble_export_of_a_checkpoint_writes_the_evaluated_ema(ema_module, tmp_path, capsys):
    module, trained, ema = ema_module
    ckpt = tmp_path / "run.ckpt"
    state = {k: v for k, v in module.state_dict().items() if is_lora_key(k)}
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams)}, ckpt)
    out = tmp_path / "exported"
    assert export_main(["--ckpt_path", str(ckpt), "--out_dir", str(out)]) == 0
    assert "the raw trained adapter" in capsys.readouterr().out
    _assert_file_is(out / LORA_WEIGHT_NAME, ema)
    _assert_file_is(tmp_path / "exported_raw" / LORA_WEIGHT_NAME, trained)
    assert export_checkpoint(ckpt, tmp_path / "again") == tmp_path / "again" / LORA_WEIGHT_NAME
