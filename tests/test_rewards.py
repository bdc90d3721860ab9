"""Tests of the Reward protocol, the built-in rewards and the reward registry."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import Tensor

from marble_pl.rewards import (
    Reward,
    available_rewards,
    build_reward,
    build_rewards,
    register_reward,
)
from marble_pl.rewards.registry import _REGISTRY

BUILTINS = ["brightness", "compressibility", "contrast", "saturation"]


def _solid(rgb: Sequence[float], n: int = 2, size: int = 16) -> Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def _score(name: str, images: Tensor, **kwargs: object) -> Tensor:
    reward = build_reward({"name": name, **kwargs})
    return reward(images, ["p"] * images.shape[0])


@pytest.fixture
def clean_registry() -> Iterator[None]:
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


# --- built-in values ----------------------------------------------------------------------


def test_builtins_registered() -> None:
    assert set(BUILTINS) <= set(available_rewards())
    assert available_rewards() == sorted(available_rewards())


def test_white_image() -> None:
    white = _solid([1.0, 1.0, 1.0])
    torch.testing.assert_close(_score("brightness", white), torch.ones(2))
    torch.testing.assert_close(_score("saturation", white), torch.zeros(2))
    torch.testing.assert_close(_score("contrast", white), torch.zeros(2))


def test_pure_red_image() -> None:
    red = _solid([1.0, 0.0, 0.0])
    torch.testing.assert_close(_score("brightness", red), torch.full((2,), 0.299))
    assert torch.equal(_score("saturation", red), torch.ones(2))  # exactly 1, not 1 - eps


def test_black_and_grey_have_zero_saturation() -> None:
    images = torch.cat([_solid([0.0, 0.0, 0.0], 1), _solid([0.5, 0.5, 0.5], 1)])
    torch.testing.assert_close(_score("saturation", images), torch.zeros(2))
    torch.testing.assert_close(_score("brightness", images), torch.tensor([0.0, 0.5]))


def test_contrast_of_half_black_half_white() -> None:
    image = torch.zeros(1, 3, 8, 8)
    image[..., :4] = 1.0
    torch.testing.assert_close(_score("contrast", image), torch.tensor([0.5]))


def test_noisy_image_is_less_compressible() -> None:
    generator = torch.Generator().manual_seed(0)
    flat = _solid([0.3, 0.6, 0.2], 1, 64)
    noisy = torch.rand(1, 3, 64, 64, generator=generator)
    scores = _score("compressibility", torch.cat([flat, noisy]))
    assert (scores < 0).all()
    assert scores[0] > scores[1] + 1.0  # noise costs kilobytes


def test_compressibility_quality_matters_and_is_validated() -> None:
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert _score("compressibility", noisy, quality=20) > _score("compressibility", noisy)
    with pytest.raises(ValueError, match="quality"):
        build_reward({"name": "compressibility", "quality": 0})


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_output_shape_dtype_and_no_grad(name: str) -> None:
    images = torch.rand(3, 3, 12, 10, dtype=torch.float64, requires_grad=True)
    scores = build_reward(name)(images, ["a", "b", "c"])
    assert scores.shape == (3,)
    assert scores.dtype == torch.float32
    assert not scores.requires_grad
    assert torch.isfinite(scores).all()


# --- input and output validation ----------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "prompts", "error", "match"),
    [
        (torch.rand(3, 8, 8), ["a"] * 3, ValueError, r"\[N, 3, H, W\]"),
        (torch.rand(2, 8, 8, 3), ["a"] * 2, ValueError, "permute"),
        (torch.rand(2, 1, 8, 8), ["a"] * 2, ValueError, "got \\(2, 1, 8, 8\\)"),
        (torch.rand(2, 3, 8, 8), ["a"] * 3, ValueError, "2 images but 3 prompts"),
        (torch.rand(2, 3, 8, 8), "ab", TypeError, "sequence of strings"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a"] * 2, TypeError, "/ 255"),
        (torch.rand(2, 3, 8, 8) * 2 - 1, ["a"] * 2, ValueError, r"\(x \+ 1\) / 2"),
        ([[0.0]], ["a"], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_error_clearly(images: object, prompts: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as info:
        build_reward("brightness")(images, prompts)  # type: ignore[arg-type]
    assert "'brightness'" in str(info.value)


class _WrongShape(Reward):
    name = "wrong_shape"

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return images.mean(dim=(2, 3))  # [N, 3]


class _NotATensor(Reward):
    name = "not_a_tensor"

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return [0.0] * len(prompts)  # type: ignore[return-value]


class _HalfNaN(Reward):
    name = "half_nan"

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return torch.tensor([float("nan"), 1.0], dtype=torch.float16)


def test_bad_outputs_error_clearly() -> None:
    images = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"'wrong_shape' returned shape \(2, 3\).*\[2\]"):
        _WrongShape()(images, ["a", "b"])
    with pytest.raises(TypeError, match="'not_a_tensor' returned list"):
        _NotATensor()(images, ["a", "b"])


def test_non_finite_scores_pass_through_as_float32() -> None:
    scores = _HalfNaN()(torch.rand(2, 3, 4, 4), ["a", "b"])
    assert scores.dtype == torch.float32
    assert torch.isnan(scores[0]) and scores[1] == 1.0


def test_base_forward_not_implemented() -> None:
    with pytest.raises(NotImplementedError, match="must implement forward"):
        Reward(name="bare")(torch.rand(1, 3, 2, 2), ["a"])


# --- registry -----------------------------------------------------------------------------


def test_unknown_name_lists_available_and_close_match() -> None:
    with pytest.raises(ValueError, match="unknown reward 'brightnes'") as info:
        build_reward("brightnes")
    message = str(info.value)
    assert "Did you mean 'brightness'?" in message
    for name in BUILTINS:
        assert name in message


def test_mapping_spec_with_kwargs_and_bad_kwarg() -> None:
    reward = build_reward({"name": "compressibility", "quality": 50})
    assert reward.name == "compressibility" and reward.quality == 50  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="bad arguments.*'compressibility'.*quality"):
        build_reward({"name": "compressibility", "qualty": 50})


def test_mapping_without_name_or_class_path() -> None:
    with pytest.raises(ValueError, match="neither 'name' nor 'class_path'"):
        build_reward({"quality": 50})


def test_build_rewards_module_list_and_device_move() -> None:
    rewards = build_rewards(["brightness", {"name": "saturation"}])
    assert isinstance(rewards, torch.nn.ModuleList)
    assert [r.name for r in rewards] == ["brightness", "saturation"]
    assert rewards.to("cpu") is rewards


def test_duplicates_rejected_and_alias_resolves() -> None:
    with pytest.raises(ValueError, match=r"duplicate reward names \['brightness'\]"):
        build_rewards(["brightness", "saturation", {"name": "brightness"}])
    rewards = build_rewards(
        ["compressibility", {"name": "compressibility", "quality": 30, "alias": "jpeg_q30"}]
    )
    assert [r.name for r in rewards] == ["compressibility", "jpeg_q30"]


def test_empty_and_non_list_specs_rejected() -> None:
    with pytest.raises(ValueError, match="model.rewards is empty"):
        build_rewards([])
    with pytest.raises(TypeError, match="list of specs"):
        build_rewards("brightness")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["has space", "a/b", "", "-lead"])
def test_unsafe_names_rejected(bad: str, clean_registry: None) -> None:
    with pytest.raises(ValueError, match="invalid reward name"):
        register_reward(bad)
    with pytest.raises(ValueError, match="invalid reward name"):
        build_reward({"name": "brightness", "alias": bad})


class UserReward(Reward):
    """A user reward loaded through class_path: the mean of one channel times a scale."""

    name = "user_channel"

    def __init__(self, channel: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        self.channel = channel
        self.scale = scale

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return images[:, self.channel].mean(dim=(1, 2)) * self.scale


class NotAReward(torch.nn.Module):
    """A module that is not a Reward."""


def test_class_path_spec() -> None:
    spec = {"class_path": f"{__name__}.UserReward", "init_args": {"channel": 1, "scale": 2.0}}
    reward = build_reward(spec)
    assert isinstance(reward, UserReward) and reward.name == "user_channel"
    torch.testing.assert_close(reward(_solid([0.0, 0.25, 0.0], 1), ["g"]), torch.tensor([0.5]))


def test_class_path_errors() -> None:
    with pytest.raises(TypeError, match="not a subclass of marble_pl.rewards.Reward"):
        build_reward({"class_path": f"{__name__}.NotAReward"})
    with pytest.raises(ImportError, match="no_such_pkg"):
        build_reward({"class_path": "no_such_pkg.Reward"})
    with pytest.raises(ImportError, match="has no attribute 'Missing'"):
        build_reward({"class_path": f"{__name__}.Missing"})
    with pytest.raises(ValueError, match="dotted path"):
        build_reward({"class_path": "UserReward"})
    with pytest.raises(ValueError, match="under init_args"):
        build_reward({"class_path": f"{__name__}.UserReward", "channel": 1})


def test_class_path_reward_without_name_needs_alias() -> None:
    module = types.ModuleType("marble_test_user_rewards")

    class Nameless(Reward):
        def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
            return images.mean(dim=(1, 2, 3))

    module.Nameless = Nameless  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        with pytest.raises(ValueError, match="has no name"):
            build_reward({"class_path": "marble_test_user_rewards.Nameless"})
        spec = {"class_path": "marble_test_user_rewards.Nameless", "alias": "mine"}
        assert build_reward(spec).name == "mine"
    finally:
        del sys.modules[module.__name__]


def test_register_reward(clean_registry: None) -> None:
    @register_reward("greenness")
    class Greenness(Reward):
        def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
            return images[:, 1].mean(dim=(1, 2))

    assert Greenness.name == "greenness"
    assert "greenness" in available_rewards()
    assert isinstance(build_reward("greenness"), Greenness)

    with pytest.raises(ValueError, match="already registered"):

        @register_reward("greenness")
        class Other(Reward):
            pass

    with pytest.raises(TypeError, match="decorates Reward subclasses"):
        register_reward("plain")(NotAReward)  # type: ignore[type-var]


def test_reward_instance_spec_passes_through() -> None:
    reward = UserReward()
    assert build_reward(reward) is reward
