"""The digits task: data, rewards, the pretrain (smoke preset) and `marble fit` on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sklearn  # noqa: F401  (in the test extra: a missing scikit-learn fails, never skips)
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from marble_pl.cli import main
from marble_pl.data import read_sources, resolve_sources
from marble_pl.digits.data import (
    digit_images,
    prompted_digit,
    prompted_style,
    stroke_styles,
)
from marble_pl.digits.pretrain import (
    MARKER,
    digits_sd3_is_complete,
    ensure_digits_sd3,
    settings_for,
)
from marble_pl.rewards import build_rewards
from marble_pl.rewards import digits as _digits  # noqa: E402, F401  (registers the names)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"
PROMPTS = ROOT / "configs" / "prompts" / "digits"
SOURCES = {
    "digits": "digits/{split}.txt",
    "styles": "styles/{split}.txt",
    "free": "free/{split}.txt",
}


def rgb(images: torch.Tensor) -> torch.Tensor:
    """Gray ``[N, 1, H, W]`` -> ``[N, 3, H, W]``."""
    return images.expand(-1, 3, -1, -1)


def test_data_and_prompts():
    """16x16 digits in [0, 1]; a third thin and a third thick per digit; the shipped prompt
    files name a digit exactly in digits/ and styles/, a style exactly in styles/ and free/'s
    last two."""
    images, labels = digit_images()
    assert images.shape == (1797, 1, 16, 16) and labels.shape == (1797,)
    assert images.min() >= 0 and images.max() <= 1
    styles = stroke_styles(images, labels)
    for name in ("thin", "thick"):
        assert abs(styles.count(name) / len(styles) - 1 / 3) < 0.02
    prompts, metadata, sizes = read_sources(
        str(PROMPTS), resolve_sources(SOURCES), "train", "prompt"
    )
    assert dict(sizes) == {"digits": 10, "styles": 14, "free": 3}
    test, _, test_sizes = read_sources(str(PROMPTS), resolve_sources(SOURCES), "test", "prompt")
    assert dict(test_sizes) == {"digits": 40, "styles": 24, "free": 12}  # each prompt 4 times
    held_out = {p for p in test if prompted_style(p) and prompted_digit(p) is not None}
    assert len(held_out) == 6 and not held_out & set(prompts)  # (digit, style) pairs never trained
    seen = {p for p, m in zip(prompts, metadata, strict=True) if m["source"] != "styles"}
    assert set(test) - held_out == seen  # digits/ and free/: the training prompts, fresh noise
    for prompt, meta in zip(prompts, metadata, strict=True):
        assert (prompted_digit(prompt) is not None) == (meta["source"] != "free"), prompt
    assert [prompted_style(p) for p in prompts[-3:]] == [None, "thin", "thick"]
    assert prompted_digit("a handwritten 7, thin strokes") == 7


def test_rewards_mean_what_they_say():
    """digit_confidence reads real digits (>= 95 % top-1 on the data) and is NaN, not
    applicable, without a digit; stroke's sign follows the style; symmetry and centredness
    are 1 at their optimum."""
    images, labels = digit_images()
    digit, stroke, symmetry, centred = build_rewards(
        ["digit_confidence", "stroke", "symmetry", "centredness"]
    )
    probs = digit.probabilities(rgb(images))
    assert (probs.argmax(1) == labels).float().mean() >= 0.95
    prompts = [
        "a handwritten 3",
        "a handwritten digit, thick strokes",
        "a handwritten 3, thin strokes",
    ]
    batch = rgb(images[:3])
    scores = digit(batch, prompts)
    assert math.isnan(scores[1]) and not math.isnan(scores[0])
    assert digit.applicable(prompts).tolist() == [True, False, True]
    assert stroke.applicable(prompts).tolist() == [False, True, True]
    s = stroke(batch, prompts)
    assert math.isnan(s[0]) and s[1] > 0 and s[2] < 0
    blob = torch.zeros(1, 3, 16, 16)
    blob[..., 6:10, 6:10] = 1.0
    corner = torch.zeros(1, 3, 16, 16)
    corner[..., :4, :4] = 1.0
    assert symmetry(blob, ["x"]).item() == 1.0
    assert centred(blob, ["x"]).item() == pytest.approx(1.0, abs=1e-6)
    assert centred(corner, ["x"]).item() < 0.5
    assert centred(torch.zeros(1, 3, 16, 16), ["x"]).item() == 0.0


def test_pretrain_is_deterministic_and_rebuilds_an_incomplete_folder(tmp_path):
    """Two smoke builds with one seed save equal transformers; a folder without its marker
    (a crash before the end) is rebuilt, not loaded."""
    from safetensors.torch import load_file

    settings = settings_for("smoke")
    a, b = ensure_digits_sd3(tmp_path / "a", settings), ensure_digits_sd3(tmp_path / "b", settings)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    wa, wb = load_file(a / weights), load_file(b / weights)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert digits_sd3_is_complete(a, settings)
    assert not digits_sd3_is_complete(a, settings_for("smoke", seed=1))
    (a / MARKER).unlink()
    assert not digits_sd3_is_complete(a, settings)
    ensure_digits_sd3(a, settings)
    assert digits_sd3_is_complete(a, settings)


def test_digits_config_fits_two_steps_on_the_smoke_model(tmp_path, monkeypatch):
    """``marble fit --config configs/digits.yaml`` (smoke pretrain, 2 steps, a validation):
    the callback builds the pipeline first; digit_confidence applies to the digits and styles
    prompts' 2 x G images, stroke to the styles prompt's G (and free/'s when it names a style),
    never elsewhere; validation rewards are logged."""
    config = yaml.safe_load(CONFIG.read_text())
    build = config["trainer"]["callbacks"][0]
    assert build["class_path"] == "marble_pl.digits.callback.BuildDigitsModel"
    build["init_args"]["preset"] = "smoke"
    config["data"]["root"] = str(PROMPTS)
    (tmp_path / "digits.yaml").write_text(yaml.safe_dump(config))
    logged: list[dict[str, float]] = []
    original = TensorBoardLogger.log_metrics

    def spy(self, metrics, step=None):
        logged.append({k: float(v) for k, v in metrics.items()})
        return original(self, metrics, step)

    monkeypatch.setattr(TensorBoardLogger, "log_metrics", spy)
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(tmp_path / "digits.yaml"),
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false",
            "--data.group_size=4",
            "--data.val_batch_size=12",
        ]
    )
    marker = json.loads((tmp_path / "runs" / "digits-sd3" / MARKER).read_text())
    assert marker["settings"]["steps"] == settings_for("smoke").steps
    steps = [m for m in logged if "rewards/stroke/applicable" in m]
    assert len(steps) == 2
    for metrics in steps:
        assert metrics["rewards/digit_confidence/applicable"] == 8
        assert metrics["rewards/stroke/applicable"] in (4, 8)  # free/'s prompt may name a style
        by_source = {k for k in metrics if k.startswith("reward_by_source/")}
        assert "reward_by_source/stroke/styles" in by_source
        assert "reward_by_source/digit_confidence/digits" in by_source
        assert not {"reward_by_source/stroke/digits", "reward_by_source/digit_confidence/free"} & (
            by_source
        )
        assert metrics["rewards/symmetry/applicable"] == 12
    samples = sorted(p.name for p in (tmp_path / "runs" / "digits").glob("*/samples/*.png"))
    assert samples == ["validation_step000000.png", "validation_step000002.png"]  # base, end
    values = {k: v for m in logged for k, v in m.items()}
    for name in ("digit_confidence", "stroke", "symmetry", "centredness"):
        assert math.isfinite(values[f"val/reward/{name}"]), name
