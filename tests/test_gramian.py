"""``gradient_space: gramian``: exact per-reward gradients from two backwards with LoRA taps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_module import fit, make_module
from torch import nn

from marble_pl.gramian import LinearGradientTaps, affine_reward_grads


class _Net(nn.Module):
    """A frozen layer with a LoRA-style pair of bias-free linears, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(5, 7)
        self.lora_a = nn.Linear(5, 2, bias=False)
        self.lora_b = nn.Linear(2, 7, bias=False)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.base(x) + self.lora_b(self.lora_a(x))))


def _reference(objective_fn, params, cols: int) -> torch.Tensor:
    rows = []
    for j in range(cols):
        grads = torch.autograd.grad(objective_fn(j), params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_taps_give_each_columns_weighted_gradient():
    torch.manual_seed(0)
    net = _Net()
    params = [net.lora_a.weight, net.lora_b.weight]
    x, r = torch.randn(4, 6, 5), torch.rand(4, 3)
    with LinearGradientTaps(net, params) as taps:
        y = net(x)
    a, b = y.square().mean((1, 2)), y.mean((1, 2))
    ref = _reference(lambda j: (r[:, j] * a + b).sum(), params, 3)
    grads, extra = affine_reward_grads(taps, a, b, r, extra=None)
    assert extra is None
    torch.testing.assert_close(grads, ref, rtol=1e-5, atol=1e-7)


def test_taps_refuse_parameters_that_are_not_linear_weights():
    net = _Net()
    with pytest.raises(ValueError, match="bias-free nn.Linear"):
        LinearGradientTaps(net, [net.base.weight])


def _step_record(path, space: str, **overrides):
    module = make_module(
        path, gradient_space=space, old_policy_decay=1.0, advantage_std="group", **overrides
    )
    torch.manual_seed(0)  # peft draws LoRA A from the global RNG
    module.configure_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init: give it values so every layer carries gradient
        for name, p in sorted(module.named_parameters()):
            if "lora_B.default" in name:
                p.normal_(0, 0.05, generator=gen)
    fit(module, steps=1)
    return module.last_step


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"gradient_checkpointing": True},
        {"kl_beta": 0.1, "micro_batch_size": 4},
    ],
    ids=["plain", "checkpointing", "kl-microbatches"],
)
def test_gramian_space_gram_equals_parameter_space_gram(tiny_sd3_path, overrides):
    exact = _step_record(tiny_sd3_path, "parameters", **overrides)
    fast = _step_record(tiny_sd3_path, "gramian", **overrides)
    torch.testing.assert_close(fast.r, exact.r)
    m_exact, m_fast = exact.gram.double(), fast.gram.double()
    rel = float((m_fast - m_exact).abs().max() / m_exact.abs().max())
    assert rel < 1e-5, rel
    np.testing.assert_allclose(fast.weights_raw, exact.weights_raw, atol=1e-4)
    rel_d = float((fast.direction - exact.direction).norm() / exact.direction.norm())
    assert rel_d < 1e-5, rel_d


def test_balance_every_n_steps_reuses_the_ema_coefficients_in_between(tiny_sd3_path):
    from marble_pl.callbacks import CoefficientEMA
    from test_module import Recorder

    module = make_module(
        tiny_sd3_path, gradient_space="gramian", balance_every_n_steps=2, advantage_std="group"
    )
    ema, rec = CoefficientEMA(decay=0.5, guard=False), Recorder()
    fit(module, steps=4, callbacks=[ema, rec])
    balanced = [r.balance is not None for r in rec.records]
    assert balanced == [True, False, True, False]
    for i in (1, 3):  # in between: no per-reward gradients, the last lambda_bar applied
        between = rec.records[i]
        assert between.grads is None and between.gram is None
        np.testing.assert_array_equal(between.weights, rec.records[i - 1].weights)
    # The EMA folded in only the balanced steps' lambda* (bias-corrected, decay 0.5).
    first, third = rec.records[0].weights_raw, rec.records[2].weights_raw
    expected = (0.5 * 0.5 * first + 0.5 * third) / (1 - 0.25)
    np.testing.assert_allclose(ema.value, expected, atol=1e-12)


def test_balance_every_n_steps_must_be_positive(tiny_sd3_path):
    from marble_pl.errors import ConfigError

    with pytest.raises(ConfigError, match="balance_every_n_steps"):
        make_module(tiny_sd3_path, balance_every_n_steps=0)


def test_a_torchjd_weighting_chosen_by_class_path_drives_the_update(tiny_sd3_path):
    pytest.importorskip("torchjd")
    spec = {"class_path": "GramianWeighting", "init_args": {"weighting": "UPGrad"}}
    module = make_module(tiny_sd3_path, balancer=spec, gradient_space="gramian")
    fit(module, steps=1)
    rec = module.last_step
    assert module.hparams.balancer["class_path"] == "marble_pl.balancers.GramianWeighting"
    assert rec.balance.status == "torchjd:UPGrad" and not rec.balance.fallback
    assert rec.weights.sum() == pytest.approx(1.0)
    expected = torch.as_tensor(rec.weights, dtype=rec.grads.dtype) @ rec.grads
    torch.testing.assert_close(rec.direction, expected)


def test_torchjd_autogram_engine_gives_the_same_gram_as_the_taps():
    """benchmarks/gramian_engines.py: torchjd's Engine and our taps agree (timings printed only)."""
    pytest.importorskip("torchjd")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gramian_engines.py"
    spec = importlib.util.spec_from_file_location("gramian_engines", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--resolution", "32", "--pairs", "4", "--rewards", "3", "--repeats", "1"])
    assert result["gram_rel_diff"] < 1e-5
    assert result["taps_ms"] > 0 and result["torchjd_ms"] > 0
