"""Per-sample generators: every part of the seed changes the noise.

torch's CPU generator (mt19937) keeps only the low 32 bits of ``manual_seed``'s argument, so a
seed built as ``base * 2**31 + i`` drew the same noise at every step of one parity: each step's
rollouts repeated the last-but-one's noise, and validation noise was a training draw.
"""

from __future__ import annotations

import itertools

import torch

from marble_pl.seeding import mix_seed, step_generators, validation_generators


def _noise(generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(8, generator=g) for g in generators])


def test_each_part_of_a_step_seed_changes_the_noise():
    """(seed, step, stream, index): changing any one draws different noise; equal parts, equal."""
    ref = _noise(step_generators(0, 0, 0, 0, 4))
    assert torch.equal(ref, _noise(step_generators(0, 0, 0, 0, 4)))
    for changed in ((1, 0, 0, 0), (2, 0, 0, 0), (0, 1, 0, 0), (0, 2, 0, 0), (0, 0, 1, 0)):
        other = _noise(step_generators(*changed, 4))
        assert not torch.isclose(ref, other).any(dim=1).all(), changed
    assert torch.equal(ref[1:], _noise(step_generators(0, 0, 0, 1, 3)))  # global index only


def test_no_two_samples_of_a_run_share_noise():
    """Every (step, stream, index) of a 50-step run, 24 samples, 2 streams: distinct 32-bit
    seeds, so distinct noise; validation draws none of them."""
    seen = set()
    for step, stream, i in itertools.product(range(50), range(2), range(24)):
        seen.add(mix_seed(0, 0, step, stream, i) & 0xFFFFFFFF)
    assert len(seen) == 50 * 2 * 24
    val = {mix_seed(1, 0, i) & 0xFFFFFFFF for i in range(76)}
    assert len(val) == 76 and not val & seen


def test_validation_noise_depends_on_seed_and_index_only():
    a = _noise(validation_generators(0, [0, 1, 2]))
    assert torch.equal(a, _noise(validation_generators(0, [0, 1, 2])))
    assert torch.equal(a[2], _noise(validation_generators(0, [2]))[0])
    for seed in (1, 2):
        b = _noise(validation_generators(seed, [0, 1, 2]))
        assert not torch.isclose(a, b).any(dim=1).all(), seed
