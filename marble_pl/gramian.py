"""Exact per-reward parameter gradients from two backward passes (``gradient_space: gramian``).

Per training pair ``p`` the DiffusionNFT loss is affine in the optimality probability,
``l_p(r) = r a_p + b_p`` with ``a_p = s (e+_p - e-_p)`` and ``b_p = s e-_p``, and pair ``p``
touches only its own activations. So reward ``k``'s gradient of the mean loss is

    ``g_k = (1 / T) (sum_p r_pk grad a_p + grad sum_p b_p)``

and every ``g_k`` comes from ONE backward of ``sum_p a_p`` in which each trained linear layer
weighs its per-sample weight gradient by ``r_pk`` (:class:`LinearGradientTaps`), plus ONE plain
backward of ``sum_p b_p``: two backwards whatever K is, against K in ``parameters`` space, and the
same vectors, so their Gram ``M = G G^T`` is the exact parameter-space Gram. For a LoRA layer the
per-sample weight gradients are ``rank x width``: small next to the backward itself. When each
reward has its own per-pair weights ``w_pk`` (its loss averaged over the pairs it applies to),
``g_k = sum_p w_pk (r_pk grad a_p + grad b_p)``: the second backward is tapped too, weighted by
``w``; still two backwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from marble_pl.gradients import flatten_grads

__all__ = ["LinearGradientTaps", "affine_split", "affine_reward_grads"]


class LinearGradientTaps:
    """Per-sample-weighted weight gradients of bias-free ``nn.Linear`` layers (LoRA's A and B).

    While installed (``with taps:``), each tapped layer's forward WITH grad records its input and
    hooks its output; in a backward run inside :meth:`weighted`, the hook forms, for every
    column ``j`` of ``weights [n, J]``, ``sum_i weights[i, j] * dy_i^T x_i``: the weight gradient
    of ``sum_i weights[i, j] * o_i`` when the backward is that of ``sum_i o_i`` and sample ``i``'s
    objective ``o_i`` depends on sample ``i``'s activations only (dim 0 is the sample).

    With gradient checkpointing the tapped inputs stay alive until the backward (their memory is
    not saved by checkpointing); recomputed forwards hook tensors no backward visits (non-reentrant
    mode) or are the ones visited (reentrant mode), so each layer counts once either way.
    """

    def __init__(self, root: nn.Module, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        owners: dict[int, nn.Linear] = {}
        for module in root.modules():
            if isinstance(module, nn.Linear) and module.bias is None:
                owners[id(module.weight)] = module
        missing = [i for i, p in enumerate(self.params) if id(p) not in owners]
        if missing:
            shapes = [tuple(self.params[i].shape) for i in missing[:3]]
            raise ValueError(
                f"gradient_space 'gramian' needs every trained parameter to be the weight of a "
                f"bias-free nn.Linear (LoRA's A and B); {len(missing)} are not (shapes {shapes}): "
                "use gradient_space 'parameters' for other adapters"
            )
        self.modules = [owners[id(p)] for p in self.params]
        self._handles: list[Any] = []
        self._weights: Tensor | None = None
        self._acc: list[Tensor | None] = [None] * len(self.params)

    def __enter__(self) -> LinearGradientTaps:
        for index, module in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._forward_hook(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, index: int) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = inputs[0].detach()
            output.register_hook(lambda grad: self._accumulate(index, x, grad))

        return hook

    def _accumulate(self, index: int, x: Tensor, grad: Tensor) -> None:
        """Add ``sum_i w_ij dy_i^T x_i`` for every column ``j`` into parameter ``index``."""
        w = self._weights
        if w is None:  # a backward outside weighted(): nothing to record
            return
        if x.shape[0] != w.shape[0] or grad.shape[0] != w.shape[0]:
            raise ValueError(
                f"a tapped layer saw {x.shape[0]} samples on dim 0 for {w.shape[0]} weights: "
                "the model must keep one training pair per row of dim 0"
            )
        dy = grad.reshape(grad.shape[0], -1, grad.shape[-1]).float()
        xs = x.reshape(x.shape[0], -1, x.shape[-1]).float()
        per_sample = torch.einsum("nso,nsi->noi", dy, xs)  # [n, out, in]: LoRA-sized
        part = torch.einsum("nj,noi->joi", w.to(per_sample.dtype), per_sample)
        acc = self._acc[index]
        self._acc[index] = part if acc is None else acc + part

    def weighted(self, objective: Tensor, weights: Tensor, retain_graph: bool = False) -> Tensor:
        """``[J, P]``: weight gradients of ``sum_i weights[i, j] * objective[i]``, flattened.

        One backward of ``objective.sum()`` through the graph built while the taps were
        installed; parameters whose layer the objective does not reach get zeros.
        """
        if objective.ndim != 1 or weights.ndim != 2 or weights.shape[0] != objective.shape[0]:
            raise ValueError(
                f"need objective [n] and weights [n, J], got {tuple(objective.shape)} and "
                f"{tuple(weights.shape)}"
            )
        self._weights = weights.detach()
        self._acc = [None] * len(self.params)
        try:
            torch.autograd.grad(
                objective.sum(), self.params, retain_graph=retain_graph, allow_unused=True
            )
        finally:
            self._weights = None
        cols = weights.shape[1]
        flat = [
            (acc if acc is not None else torch.zeros(cols, *p.shape, device=p.device)).reshape(
                cols, -1
            )
            for acc, p in zip(self._acc, self.params, strict=True)
        ]
        self._acc = [None] * len(self.params)
        return torch.cat(flat, dim=1)


def affine_split(e_pos: Tensor, e_neg: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(a, b)`` with ``l(r) = r a + b``: ``a = s (e+ - e-)``, ``b = s e-`` (per pair)."""
    return scale * (e_pos - e_neg), scale * e_neg


def affine_reward_grads(
    taps: LinearGradientTaps,
    a: Tensor,
    b: Tensor,
    r: Tensor,
    extra: Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``[K, P]`` gradients of ``sum_p w_pk (r_pk a_p + b_p)`` for every column ``k`` of ``r [n, K]``.

    Two backwards: the tapped one of ``sum a`` (weighted by ``w r``) and one of ``sum b``:
    plain when ``weights`` is None (``w = 1``), tapped (weighted by ``w``) when each reward has
    its own per-pair weights (:func:`~marble_pl.gradients.masked_mean_weights`: a reward
    averaged over the pairs it applies to). With ``extra`` (a scalar such as the KL term, not
    part of any reward) a third gives its gradient ``[P]`` separately. The graph is freed after
    the last one.
    """
    params = taps.params
    if weights is None:
        weighted = taps.weighted(a, r, retain_graph=True)
        grad_b = torch.autograd.grad(
            b.sum(), params, retain_graph=extra is not None, allow_unused=True
        )
        grads = weighted + flatten_grads(grad_b, params).unsqueeze(0)
    else:
        if weights.shape != r.shape:
            raise ValueError(
                f"weights must be shaped like r {tuple(r.shape)}, got {tuple(weights.shape)}"
            )
        w = weights.to(r.dtype)
        grads = taps.weighted(a, w * r, retain_graph=True)
        grads = grads + taps.weighted(b, w, retain_graph=extra is not None)
    extra_grad = None
    if extra is not None:
        extra_grad = flatten_grads(torch.autograd.grad(extra, params, allow_unused=True), params)
    return grads, extra_grad
