import numpy as np
import pytest
import torch

from marble_pl.advantages import batch_moments, group_advantages, optimality, pooled_std


def _batch(seed: int = 0, groups: int = 4, g: int = 6, k: int = 3):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(groups * g, k, generator=gen, dtype=torch.float64) * 3 + 1
    ids = torch.arange(groups).repeat_interleave(g)
    return rewards, ids


def test_group_zero_mean_unit_std_per_reward():
    rewards, ids = _batch()
    adv = group_advantages(rewards, ids, eps=1e-12, std="group")
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
    torch.testing.assert_close(
        group_advantages(rewards, ids, std="group"), group_advantages(shifted, ids, std="group")
    )
    # the global std sees the shift of one group, not a shift of the whole batch
    assert not torch.allclose(group_advantages(rewards, ids), group_advantages(shifted, ids))
    torch.testing.assert_close(group_advantages(rewards, ids), group_advantages(rewards + 3.0, ids))


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


def test_global_std_matches_diffusionnft_definition():
    # DiffusionNFT (global_std=True): per-prompt mean, np.std of ALL rewards (population) + 1e-4.
    rewards, ids = _batch(4)
    adv = group_advantages(rewards, ids, std="global", eps=1e-4)
    r, g = rewards.numpy(), ids.numpy()
    expected = np.empty_like(r)
    for gid in np.unique(g):
        expected[g == gid] = (r[g == gid] - r[g == gid].mean(0)) / (np.std(r, axis=0) + 1e-4)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", [(12, 12), (6, 18), (3, 9, 12), (24,)])
def test_pooled_std_of_rank_moments_is_std_of_concatenation(sizes):
    rewards, _ = _batch(5)  # 24 rows, 3 rewards
    parts = rewards.float().split(list(sizes))
    pooled = pooled_std(torch.stack([batch_moments(p) for p in parts]))
    assert pooled.dtype == torch.float64 and pooled.shape == (3,)
    torch.testing.assert_close(pooled, rewards.std(0, unbiased=False), rtol=1e-6, atol=0)


def test_pooled_std_is_stable_under_a_large_offset():
    rewards, _ = _batch(6)
    shifted = rewards + 1e6  # sums of squares minus squared sums would lose every digit here
    parts = shifted.split([10, 14])
    pooled = pooled_std(torch.stack([batch_moments(p) for p in parts]))
    torch.testing.assert_close(pooled, rewards.std(0, unbiased=False), rtol=1e-8, atol=0)


def test_global_std_over_ranks_equals_one_process_on_concatenated_batch():
    # Two "ranks", each with whole groups (groups never span ranks): with the pooled std, each
    # rank's advantages are the rows of the single process's advantages on the whole batch.
    rewards, ids = _batch(7, groups=6, g=4)
    whole = group_advantages(rewards, ids, std="global")
    halves = [(rewards[:8], ids[:8]), (rewards[8:], ids[8:] - 2)]
    sigma = pooled_std(torch.stack([batch_moments(r) for r, _ in halves]))
    per_rank = [group_advantages(r, i, std="global", global_std=sigma) for r, i in halves]
    torch.testing.assert_close(torch.cat(per_rank), whole)
    # ... while each rank's own std (the old behaviour) differs
    local = torch.cat([group_advantages(r, i, std="global") for r, i in halves])
    assert not torch.allclose(local, whole)


def test_global_std_argument_is_used_per_reward():
    rewards, ids = _batch(8)
    sigma = torch.tensor([1.0, 2.0, 4.0])
    adv = group_advantages(rewards, ids, std="global", global_std=sigma, eps=1e-12)
    plain = group_advantages(rewards, ids, std="global", global_std=torch.ones(3), eps=1e-12)
    torch.testing.assert_close(adv, plain / sigma.to(adv.dtype))
    one = group_advantages(
        rewards[:, 0], ids, std="global", global_std=torch.tensor(2.0), eps=1e-12
    )
    torch.testing.assert_close(one, plain[:, 0] / 2.0, atol=1e-9, rtol=1e-6)


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
        ({"std": "group", "global_std": torch.ones(3)}, "only used with std='global'"),
        ({"std": "global", "global_std": torch.ones(2)}, "one value per reward"),
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
    with pytest.raises(ValueError, match="moments"):
        pooled_std(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no rewards"):
        pooled_std(batch_moments(torch.zeros(0, 3)))
