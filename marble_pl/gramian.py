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

In low precision the split is centred, ``l = (r - 1/2) a + (b + a/2)``: ``grad a`` and
``grad b`` nearly cancel where ``r`` is near 1/2 (``e+`` and ``e-`` move in opposite
directions), so the uncentred sum loses the bits of bf16 that the centred one keeps
(``b + a/2 = s (e+ + e-) / 2`` is formed before its backward). Under autocast the taps cast
each tapped input to the compute dtype themselves, once for the layers that share it, so what
they hold is the very tensor the layer saves for its own backward (no copy of their own), and
they form the per-sample products and their sums in float32.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from marble_pl.gradients import flatten_grads

__all__ = [
    "CENTRE",
    "LinearGradientTaps",
    "affine_reward_grads",
    "affine_split",
    "bytes_by_tokens",
    "storage_bytes",
]

#: ``l = (r - CENTRE) a + (b + CENTRE a)``: the optimality probability's neutral value.
CENTRE = 0.5


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear layer computes ``x`` in: autocast's where it casts ``x``, else ``x``'s."""
    kind = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def bytes_by_tokens(tensors: Sequence[Tensor]) -> dict[int, int]:
    """Bytes of the distinct storages behind ``tensors`` (views of one count once), keyed by the
    token count (dim -2 of a ``[n, tokens, features]`` input; 1 for ``[n, features]``)."""
    seen: dict[tuple[str, int], tuple[int, int]] = {}
    for t in tensors:
        storage = t.untyped_storage()
        tokens = t.shape[-2] if t.ndim > 2 else 1
        seen[(str(t.device), storage.data_ptr())] = (tokens, storage.nbytes())
    out: dict[int, int] = {}
    for tokens, nbytes in seen.values():
        out[tokens] = out.get(tokens, 0) + nbytes
    return out


def storage_bytes(tensors: Sequence[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    return sum(bytes_by_tokens(tensors).values())


class LinearGradientTaps:
    """Per-sample-weighted weight gradients of bias-free ``nn.Linear`` layers (LoRA's A and B).

    While installed (``with taps:``), each tapped layer's forward WITH grad records its input and
    hooks its output; in a backward run inside :meth:`weighted`, the hook forms, for every
    column ``j`` of ``weights [n, J]``, ``sum_i weights[i, j] * dy_i^T x_i``: the weight gradient
    of ``sum_i weights[i, j] * o_i`` when the backward is that of ``sum_i o_i`` and sample ``i``'s
    objective ``o_i`` depends on sample ``i``'s activations only (dim 0 is the sample).

    Each input is made what the layer's backward saves (under autocast, the cast to the compute
    dtype autocast would make; contiguous) before the layer, once for the layers fed the same
    tensor (LoRA A of q, k and v), so the taps hold no copy of their own.
    :attr:`held_bytes` is what the last forward's tapped inputs hold (:attr:`peak_bytes`: the most).
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
        self._casts: dict[int, tuple[weakref.ref, Tensor]] = {}  # one cast per shared input
        self._held: list[weakref.ref] = []
        self.peak_bytes = 0
        self.peak_by_tokens: dict[int, int] = {}  # that peak, by the inputs' token counts

    def __enter__(self) -> LinearGradientTaps:
        self._held = []
        for index, module in enumerate(self.modules):
            self._handles.append(module.register_forward_pre_hook(self._cast_hook))
            self._handles.append(module.register_forward_hook(self._forward_hook(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._casts.clear()
        held = bytes_by_tokens(self._held_tensors())
        if sum(held.values()) > self.peak_bytes:
            self.peak_bytes, self.peak_by_tokens = sum(held.values()), held

    def _held_tensors(self) -> list[Tensor]:
        return [t for ref in self._held if (t := ref()) is not None]

    @property
    def held_bytes(self) -> int:
        """Bytes of the inputs tapped in the last forward that are alive now (distinct storages)."""
        return storage_bytes(self._held_tensors())

    def _cast_hook(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> Any:
        """The input as the layer's backward saves it: autocast's cast, contiguous (a slice of a
        larger tensor would keep all of it alive), made once for the layers fed the same tensor."""
        x = inputs[0]
        if not torch.is_grad_enabled():
            return None
        hit = self._casts.get(id(x))
        if hit is None or hit[0]() is not x:
            hit = (weakref.ref(x), x.to(_compute_dtype(x)).contiguous())
            self._casts[id(x)] = hit
        return None if hit[1] is x else (hit[1], *inputs[1:])

    def _forward_hook(self, index: int) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = inputs[0].detach()
            self._held.append(weakref.ref(x))
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
        dtype = torch.promote_types(torch.promote_types(x.dtype, grad.dtype), torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # float32 (or wider) products, sums
            dy = grad.reshape(grad.shape[0], -1, grad.shape[-1]).to(dtype)
            xs = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)
            per_sample = torch.einsum("nso,nsi->noi", dy, xs)  # [n, out, in]: LoRA-sized
            part = torch.einsum("nj,noi->joi", w.to(dtype), per_sample)
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
            (acc if acc is not None else p.new_zeros(cols, *p.shape)).reshape(cols, -1)
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
    centre: float = CENTRE,
) -> tuple[Tensor, Tensor | None]:
    """``[K, P]`` gradients of ``sum_p w_pk (r_pk a_p + b_p)`` for every column ``k`` of ``r [n, K]``.

    Two backwards, on the centred split ``(r - c) a + (b + c a)`` (``c = centre``; 0 is the
    plain split, which cancels in bf16 where ``r`` is near 1/2): the tapped one of ``sum a``
    (weighted by ``w (r - c)``) and one of ``sum (b + c a)``: plain when ``weights`` is None
    (``w = 1``), tapped (weighted by ``w``) when each reward has its own per-pair weights
    (:func:`~marble_pl.gradients.masked_mean_weights`: a reward averaged over the pairs it
    applies to). With ``extra`` (a scalar such as the KL term, not part of any reward) a third
    gives its gradient ``[P]`` separately. The graph is freed after the last one.
    """
    params = taps.params
    rc = r - centre
    bc = b + centre * a if centre else b
    if weights is None:
        weighted = taps.weighted(a, rc, retain_graph=True)
        grad_b = torch.autograd.grad(
            bc.sum(), params, retain_graph=extra is not None, allow_unused=True
        )
        grads = weighted + flatten_grads(grad_b, params).unsqueeze(0)
    else:
        if weights.shape != r.shape:
            raise ValueError(
                f"weights must be shaped like r {tuple(r.shape)}, got {tuple(weights.shape)}"
            )
        w = weights.to(r.dtype)
        grads = taps.weighted(a, w * rc, retain_graph=True)
        grads = grads + taps.weighted(bc, w, retain_graph=extra is not None)
    extra_grad = None
    if extra is not None:
        extra_grad = flatten_grads(torch.autograd.grad(extra, params, allow_unused=True), params)
    return grads, extra_grad
