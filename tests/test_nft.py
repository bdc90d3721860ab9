import pytest
import torch

from marble_pl.gradients import output_grads
from marble_pl.nft import (
    nft_errors,
    nft_loss,
    nft_output_grad,
    nft_output_stats,
    output_gram,
)

FORMS = [
    {},
    {"t": "t"},
    {"t": "t", "adaptive_weight": True, "scale": 5.0 / 0.3},
]


def _data(n: int = 6, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 4, 3, 3)
    v_theta = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    v_old = torch.randn(shape, generator=g, dtype=torch.float64)
    v_target = torch.randn(shape, generator=g, dtype=torch.float64)
    r = torch.rand(n, k, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return v_theta, v_old, v_target, r, t


def _kw(form: dict, t: torch.Tensor) -> dict:
    return {key: (t if val == "t" else val) for key, val in form.items()}


def test_plain_loss_matches_definition():
    v_theta, v_old, v_target, r, _ = _data()
    beta = 0.3
    v_pos = (1 - beta) * v_old + beta * v_theta
    v_neg = (1 + beta) * v_old - beta * v_theta
    e_pos = ((v_pos - v_target) ** 2).mean(dim=(1, 2, 3))
    e_neg = ((v_neg - v_target) ** 2).mean(dim=(1, 2, 3))
    expected = r[:, 0] * e_pos + (1 - r[:, 0]) * e_neg
    torch.testing.assert_close(nft_loss(v_theta, v_old, v_target, r[:, 0], beta), expected)


def test_reference_form_matches_x0_space_definition():
    v_theta, v_old, v_target, r, t = _data()
    beta, a_max = 0.3, 5.0
    x0 = torch.randn_like(v_old)
    eps = v_target + x0
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    out = []
    for v in ((1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta):
        x0_hat = x_t - tt * v
        w = (x0_hat - x0).abs().mean(dim=(1, 2, 3)).clamp_min(1e-5).detach()
        out.append(((x0_hat - x0) ** 2).mean(dim=(1, 2, 3)) / w)
    expected = a_max / beta * (r[:, 1] * out[0] + (1 - r[:, 1]) * out[1])
    got = nft_loss(
        v_theta, v_old, v_target, r[:, 1], beta, t=t, adaptive_weight=True, scale=a_max / beta
    )
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("form", FORMS)
def test_multi_column_r_shares_forward(form):
    v_theta, v_old, v_target, r, t = _data()
    kw = _kw(form, t)
    losses = nft_loss(v_theta, v_old, v_target, r, 0.5, **kw)
    assert losses.shape == r.shape
    for k in range(r.shape[1]):
        torch.testing.assert_close(
            losses[:, k], nft_loss(v_theta, v_old, v_target, r[:, k], 0.5, **kw)
        )


@pytest.mark.parametrize("form", FORMS)
def test_output_grad_equals_autograd(form):
    v_theta, v_old, v_target, r, t = _data()
    kw = _kw(form, t)
    for beta in (0.1, 1.0):
        (auto,) = torch.autograd.grad(
            nft_loss(v_theta, v_old, v_target, r[:, 0], beta, **kw).sum(), v_theta
        )
        closed = nft_output_grad(v_theta, v_old, v_target, r[:, 0], beta, **kw)
        torch.testing.assert_close(closed, auto, rtol=1e-10, atol=1e-12)
        multi = nft_output_grad(v_theta, v_old, v_target, r, beta, **kw)
        assert multi.shape == (r.shape[1], *v_theta.shape)
        for k in range(r.shape[1]):
            (auto_k,) = torch.autograd.grad(
                nft_loss(v_theta, v_old, v_target, r[:, k], beta, **kw).sum(), v_theta
            )
            torch.testing.assert_close(multi[k], auto_k, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_output_gram_from_stats_equals_explicit_gram(form):
    v_theta, v_old, v_target, r, t = _data(n=8, k=4)
    kw = _kw(form, t)
    grads = output_grads(v_theta, v_old, v_target, r, 0.4, **kw)
    stats = nft_output_stats(v_theta, v_old, v_target, 0.4, **kw)
    torch.testing.assert_close(output_gram(stats, r), grads @ grads.t())
    r_bar = r @ torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=r.dtype)
    d = nft_output_grad(v_theta, v_old, v_target, r_bar, 0.4, **kw).reshape(-1)
    torch.testing.assert_close(output_gram(stats, r, r_bar)[:, 0], grads @ d)


def test_errors_do_not_depend_on_r_and_loss_is_affine():
    v_theta, v_old, v_target, r, _ = _data()
    e_pos, e_neg = nft_errors(v_theta, v_old, v_target, 0.2)
    lam = torch.tensor([0.2, 0.5, 0.3], dtype=r.dtype)
    combined = nft_loss(v_theta, v_old, v_target, r @ lam, 0.2)
    torch.testing.assert_close(combined, nft_loss(v_theta, v_old, v_target, r, 0.2) @ lam)
    torch.testing.assert_close(nft_loss(v_theta, v_old, v_target, torch.ones(6), 0.2), e_pos)


def test_bad_inputs():
    v_theta, v_old, v_target, r, _ = _data()
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v_theta, v_old, v_target, r, 0.0)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v_theta, v_old, v_target, r, 1.5)
    with pytest.raises(ValueError, match="share one shape"):
        nft_loss(v_theta, v_old[:, :2], v_target, r, 0.5)
    with pytest.raises(ValueError, match="r must be"):
        nft_loss(v_theta, v_old, v_target, r[:3], 0.5)
    with pytest.raises(ValueError, match="needs the timesteps"):
        nft_loss(v_theta, v_old, v_target, r, 0.5, adaptive_weight=True)
