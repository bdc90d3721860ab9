"""The exact per-reward Gram on the tiny SD3: our LoRA taps against ``torchjd.autogram.Engine``.

Both give the Gram of the K per-reward LoRA gradients of the DiffusionNFT loss
``l_p(r) = r a_p + b_p`` (:mod:`marble_pl.gramian`):

* ``taps``: :func:`~marble_pl.gramian.affine_reward_grads`, two backwards (``sum a`` weighted by
  ``r`` per sample in the LoRA layers' hooks, then ``sum b``) give the K gradients themselves,
  so the update direction ``sum_k lambda_k g_k`` costs nothing more;
* ``torchjd``: ``Engine(*lora_layers, batch_dim=0).compute_gramian`` of the ``[n, 2]`` losses
  ``(a_p, b_p)`` gives their Gramian ``G``; the reward Gram is ``C G C^T`` with ``C = [r | 1]``,
  then ONE more backward with the coefficients forms the update direction.

Prints the median time of each (forward included), their ratio and the Gram's relative
difference. ``python benchmarks/gramian_engines.py [--resolution 64] [--pairs 8]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from marble_pl.gramian import LinearGradientTaps, affine_reward_grads
from marble_pl.models import add_lora, build_tiny_sd3, load_sd3


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=8, help="training pairs in the batch (n)")
    parser.add_argument("--rewards", type=int, default=5, help="K")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torchjd.autogram import Engine  # the optional extra marble-pl[balancers]

    with tempfile.TemporaryDirectory() as tmp:
        parts = load_sd3(
            str(build_tiny_sd3(Path(tmp) / "tiny", seed=0)),
            local_files_only=True,
            load_t5=False,
            dtype=torch.float32,
        )
    transformer = parts.transformer
    params = add_lora(transformer, rank=4, alpha=8.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init: give every layer gradient
        for p in params:
            p.normal_(0, 0.05, generator=gen)
    n, k = args.pairs, args.rewards
    side = args.resolution // 8
    x = torch.randn(n, transformer.config.in_channels, side, side, generator=gen)
    t = torch.rand(n, generator=gen) * 1000
    emb = torch.randn(n, 16, transformer.config.joint_attention_dim, generator=gen)
    pooled = torch.randn(n, transformer.config.pooled_projection_dim, generator=gen)
    target = torch.randn(x.shape, generator=gen)
    r = torch.rand(n, k, generator=gen)
    lam = torch.full((k,), 1.0 / k)
    taps = LinearGradientTaps(transformer, params)
    layers = taps.modules

    def losses(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e_pos = (0.9 * v - target).square().flatten(1).mean(1)
        e_neg = (1.1 * v - target).square().flatten(1).mean(1)
        return e_pos - e_neg, e_neg

    def forward(model: torch.nn.Module) -> torch.Tensor:
        return model(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=emb,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    def with_taps() -> torch.Tensor:
        with taps:
            a, b = losses(forward(transformer))
        grads, _ = affine_reward_grads(taps, a, b, r)
        _direction = lam @ grads  # the update: no further backward
        return grads.double() @ grads.double().T

    # The Engine hooks its modules for good: give it its own copy of the transformer.
    twin = copy.deepcopy(transformer)
    names = {id(m): name for name, m in transformer.named_modules()}
    twin_modules = dict(twin.named_modules())
    twin_params = [twin_modules[names[id(m)]].weight for m in layers]
    engine = Engine(*(twin_modules[names[id(m)]] for m in layers), batch_dim=0)

    def with_torchjd() -> torch.Tensor:
        a, b = losses(forward(twin))
        both = torch.stack([a, b], dim=1)  # [n, 2]
        g = engine.compute_gramian(both).double()  # [n, 2, 2, n] or [n, 2, n, 2]
        g = g.reshape(2 * n, 2 * n)
        c = torch.zeros(k, 2 * n, dtype=torch.float64)
        c[:, 0::2] = r.double().T
        c[:, 1::2] = 1.0
        gram = c @ g @ c.T
        weights = torch.stack([r @ lam, torch.ones(n)], dim=1)
        torch.autograd.grad(both, twin_params, grad_outputs=weights)  # the update direction
        return gram

    results = {}
    grams = {}
    for name, fn in (("taps", with_taps), ("torchjd", with_torchjd)):
        grams[name] = fn()  # warm-up
    times: dict[str, list[float]] = {"taps": [], "torchjd": []}
    for _ in range(args.repeats):  # interleaved
        for name, fn in (("taps", with_taps), ("torchjd", with_torchjd)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rel = float((grams["taps"] - grams["torchjd"]).abs().max() / grams["taps"].abs().max())
    results = {f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}
    results["torchjd_over_taps"] = results["torchjd_ms"] / results["taps_ms"]
    results["gram_rel_diff"] = rel
    print(
        f"n={n} pairs, K={k}, {args.resolution}px, {args.threads} thread(s): taps "
        f"{results['taps_ms']:.1f} ms, torchjd Engine {results['torchjd_ms']:.1f} ms "
        f"(x{results['torchjd_over_taps']:.2f}); Gram relative difference {rel:.2e}"
    )
    return results


if __name__ == "__main__":
    main()
