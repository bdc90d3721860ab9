"""The tiny specialist-reward models built on first use (marble_pl.tiny_rewards)."""

from __future__ import annotations

import pytest
import torch

from marble_pl.errors import ConfigError
from marble_pl.rewards.registry import build_reward
from marble_pl.tiny_rewards import ensure_tiny_clip, ensure_tiny_mask2former, ensure_tiny_trocr


@pytest.mark.parametrize("ensure", [ensure_tiny_trocr, ensure_tiny_mask2former, ensure_tiny_clip])
def test_built_twice_byte_identical_and_not_rebuilt(tmp_path, ensure):
    """Seeded (the global RNG untouched), renamed into place whole, then left alone."""
    state = torch.random.get_rng_state()
    a, b = ensure(tmp_path / "a"), ensure(tmp_path / "b")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert ensure(a) == a and (a / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_a_folder_with_other_files_is_never_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="holds files but not a whole model") as info:
        ensure_tiny_trocr(tmp_path / "mine")
    assert "\n" not in str(info.value)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_rewards_build_their_tiny_models_on_first_use_and_score_where_applicable(tmp_path):
    ocr = build_reward(
        {"name": "ocr", "engine": "trocr", "build_tiny_if_missing": True,
         "pretrained_model_name_or_path": str(tmp_path / "trocr"), "local_files_only": True,
         "max_new_tokens": 8}
    )  # fmt: skip
    geneval = build_reward(
        {"name": "geneval", "build_tiny_if_missing": True, "detector_size": None,
         "detector_name_or_path": str(tmp_path / "m2f"), "local_files_only": True,
         "clip_name_or_path": str(tmp_path / "clip")}
    )  # fmt: skip
    prompts = ['a sign that reads "Open"', "a photo of a cup", "a cat"]
    meta = [
        {"source": "ocr"},
        {"source": "geneval", "tag": "single_object", "include": [{"class": "cup", "count": 1}]},
        {"source": "pickscore"},
    ]
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for reward, row in ((ocr, 0), (geneval, 1)):
        scores = reward(images, prompts, metadata=meta)
        assert torch.isfinite(scores).tolist() == [i == row for i in range(3)], reward.name
    assert {p.name for p in tmp_path.iterdir()} == {"trocr", "m2f", "clip"}


def test_build_tiny_needs_the_trocr_engine():
    with pytest.raises(ConfigError, match="engine: trocr"):
        build_reward({"name": "ocr", "engine": "paddle", "build_tiny_if_missing": True})
