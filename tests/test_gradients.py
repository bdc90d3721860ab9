import pytest
import torch

from marble_pl.balance import gram, min_norm_coefficients
from marble_pl.gradients import (
    assign_flat_grad,
    cosines,
    flat_grad,
    output_grads,
    parameter_grads,
    update_direction,
)
from marble_pl.nft import nft_loss


class TinyVelocity(torch.nn.Module):
    """A small velocity model ``v(x)``; the frozen part plays the base model, the rest LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(8, 16)
        self.head = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(16, 8))
        self.base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


def _setup(seed: int = 0, n: int = 10, k: int = 4):
    torch.manual_seed(seed)
    model = TinyVelocity().double()
    x = torch.randn(n, 8, dtype=torch.float64)
    v_old = torch.randn(n, 8, dtype=torch.float64)
    v_target = torch.randn(n, 8, dtype=torch.float64)
    r = torch.rand(n, k, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, x, v_old, v_target, r, params


def test_affine_identity_one_backward_equals_weighted_sum():
    model, x, v_old, v_target, r, params = _setup()
    beta = 0.3
    losses = nft_loss(model(x), v_old, v_target, r, beta).mean(0)
    g = parameter_grads(losses, params)
    assert g.shape == (4, sum(p.numel() for p in params))
    lam = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    expected = update_direction(g, lam)
    model.zero_grad()
    nft_loss(model(x), v_old, v_target, r @ lam, beta).mean().backward()
    torch.testing.assert_close(flat_grad(params), expected, atol=1e-5, rtol=1e-5)
    # The frozen part got nothing.
    assert model.base.weight.grad is None


def test_parameter_grads_match_separate_backwards():
    model, x, v_old, v_target, r, params = _setup(1)
    losses = nft_loss(model(x), v_old, v_target, r, 0.5).mean(0)
    g = parameter_grads(losses, params)
    for k in range(r.shape[1]):
        model.zero_grad()
        nft_loss(model(x), v_old, v_target, r[:, k], 0.5).mean().backward()
        torch.testing.assert_close(g[k], flat_grad(params))


def test_output_space_gram_is_chain_rule_consistent():
    """Parameter gradients are J^T times output gradients, for every reward."""
    model, x, v_old, v_target, r, params = _setup(2)
    z = model(x)
    g_out = output_grads(z, v_old, v_target, r, 0.7)
    losses = nft_loss(z, v_old, v_target, r, 0.7).sum(0)
    g_par = parameter_grads(losses, params, retain_graph=True)
    for k in range(r.shape[1]):
        vjp = torch.autograd.grad(z, params, grad_outputs=g_out[k].view_as(z), retain_graph=True)
        torch.testing.assert_close(torch.cat([v.reshape(-1) for v in vjp]), g_par[k])


def test_cosines_and_non_conflict_of_min_norm_direction():
    model, x, v_old, v_target, r, params = _setup(3)
    losses = nft_loss(model(x), v_old, v_target, r, 0.5).mean(0)
    g = parameter_grads(losses, params)
    lam = torch.from_numpy(min_norm_coefficients(gram(g)).weights)
    d = update_direction(g, lam)
    cos = cosines(g, d)
    expected = (g @ d) / (g.norm(dim=1) * d.norm())
    torch.testing.assert_close(cos, expected)
    assert torch.all(cos >= -1e-6)
    assert torch.all(cosines(torch.zeros(2, 3), torch.ones(3)) == 0)


def test_assign_flat_grad_round_trip():
    model, *_, params = _setup(4)
    flat = torch.arange(sum(p.numel() for p in params), dtype=torch.float64)
    assign_flat_grad(params, flat)
    torch.testing.assert_close(flat_grad(params), flat)
    with pytest.raises(ValueError, match="entries"):
        assign_flat_grad(params, torch.zeros(flat.numel() + 1, dtype=torch.float64))


def test_errors():
    with pytest.raises(ValueError, match="no trainable parameters"):
        parameter_grads(torch.zeros(2, requires_grad=True), [])
    with pytest.raises(ValueError, match="one coefficient per gradient"):
        update_direction(torch.zeros(3, 4), torch.zeros(2))
