import pytest
import torch

from marble_pl.advantages import group_advantages, optimality


def _batch(seed: int = 0, groups: int = 4, g: int = 6, k: int = 3):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(groups * g, k, generator=gen, dtype=torch.float64) * 3 + 1
    ids = torch.arange(groups).repeat_interleave(g)
    return rewards, ids


def test_group_zero_mean_unit_std_per_reward():
    rewards, ids = _batch()
    adv = group_advantages(rewards, ids, eps=1e-12)
    assert adv.shape == rewards.shape
    for gid in ids.unique():
        a = adv[ids == gid]
        torch.testing.assert_close(a.mean(0), torch.zeros(3, dtype=a.dtype), atol=1e-9, rtol=0)
        torch.testing.assert_close(a.std(0, unbiased=False), torch.ones(3, dtype=a.dtype))


def test_rewards_are_normalised_independently():
    rewards, ids = _batch()
    adv = group_advantages(rewards, ids)
    scaled = rewards.clone()
    scaled[:, 1] *= 1000.0
    adv2 = group_advantages(scaled, ids)
    torch.testing.assert_close(adv[:, 0], adv2[:, 0])
    torch.testing.assert_close(adv[:, 1], adv2[:, 1], atol=1e-4, rtol=1e-4)


def test_invariant_to_constant_shift_of_a_group():
    rewards, ids = _batch(1)
    shifted = rewards.clone()
    shifted[ids == 2] += torch.tensor([5.0, -7.0, 100.0], dtype=rewards.dtype)
    torch.testing.assert_close(group_advantages(rewards, ids), group_advantages(shifted, ids))


def test_interleaved_group_ids_match_contiguous():
    rewards, ids = _batch(2)
    perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))
    adv = group_advantages(rewards, ids)
    torch.testing.assert_close(group_advantages(rewards[perm], ids[perm]), adv[perm])


def test_singleton_and_constant_groups_give_zero_and_half():
    rewards = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0], [9.0, 9.0]])
    ids = torch.tensor([0, 0, 0, 1])
    adv = group_advantages(rewards, ids)
    assert torch.all(adv[:, 1][:3] == 0)  # constant reward within group 0
    assert torch.all(adv[3] == 0)  # group of size 1
    assert adv[0, 0] < 0 < adv[2, 0]
    r = optimality(adv, a_max=2.0)
    assert torch.all(r[3] == 0.5) and torch.all(r[:3, 1] == 0.5)


def test_global_std_variant():
    rewards, ids = _batch(3)
    adv = group_advantages(rewards, ids, std="global", eps=1e-12)
    sigma = rewards.std(0, unbiased=False)
    for gid in ids.unique():
        m = ids == gid
        torch.testing.assert_close(adv[m], (rewards[m] - rewards[m].mean(0)) / sigma)


def test_one_dimensional_rewards():
    rewards, ids = _batch(k=1)
    adv = group_advantages(rewards[:, 0], ids)
    assert adv.shape == (rewards.shape[0],)
    torch.testing.assert_close(adv, group_advantages(rewards, ids)[:, 0])


def test_optimality_range_and_clip():
    adv = torch.tensor([[-10.0, -2.5, 0.0, 2.5, 10.0]]).t()
    r = optimality(adv, a_max=5.0)
    torch.testing.assert_close(r[:, 0], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"std": "bogus"}, "std must be"),
        ({"eps": 0.0}, "eps must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    rewards, ids = _batch()
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, ids, **kwargs)


def test_bad_shapes_and_a_max():
    rewards, ids = _batch()
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(rewards, ids[:-1])
    with pytest.raises(ValueError, match="a_max"):
        optimality(rewards, a_max=0.0)
