"""``gradient_space: gramian``: exact per-reward gradients from two backwards with LoRA taps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from marble_pl.gramian import LinearGradientTaps, affine_reward_grads
from tests.test_module import fit, make_module


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
