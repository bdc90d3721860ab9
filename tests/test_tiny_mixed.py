"""configs/tiny_mixed.yaml end to end: the three-source set, OCR and GenEval on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger

from marble_pl.cli import main
from marble_pl.data import read_sources, resolve_sources
from marble_pl.rewards.ocr_rule import has_target

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_mixed.yaml"
MIXED = ROOT / "configs" / "prompts" / "mixed"


def test_the_shipped_sources_are_what_the_counts_below_assume():
    """OCR prompts (and only they) quote a text; GenEval prompts (and only they) have include."""
    prompts, metadata, sizes = read_sources(str(MIXED), resolve_sources(None), "train", "prompt")
    assert list(sizes) == ["pickscore", "ocr", "geneval"]
    for prompt, meta in zip(prompts, metadata, strict=True):
        assert has_target(prompt) == (meta["source"] == "ocr"), prompt
        assert ("include" in meta) == (meta["source"] == "geneval"), prompt


def test_tiny_mixed_trains_two_steps_with_the_specialists_applicable_where_they_should_be(
    tmp_path, monkeypatch
):
    """``marble fit --config configs/tiny_mixed.yaml`` for 2 steps (every callback, the logger,
    a validation): stratified B = 3 (one prompt per source) x G = 4 gives 12 images a step, of
    which ``ocr`` applies to exactly the 4 of the OCR prompt and ``geneval`` to the 4 of the
    GenEval prompt; nothing logged is NaN."""
    logged: list[tuple[int | None, dict[str, float]]] = []
    original = TensorBoardLogger.log_metrics

    def spy(self, metrics, step=None):
        logged.append((step, {k: float(v) for k, v in metrics.items()}))
        return original(self, metrics, step)

    monkeypatch.setattr(TensorBoardLogger, "log_metrics", spy)
    monkeypatch.chdir(tmp_path)  # runs/ (the tiny models, the run) lands here
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--data.root={MIXED}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false",
        ]
    )
    runs = tmp_path / "runs"
    for model in ("tiny-sd3", "tiny-trocr", "tiny-mask2former", "tiny-clip"):
        assert (runs / model).is_dir(), model
    steps = [m for _, m in logged if "rewards/ocr/applicable" in m]
    assert len(steps) == 2
    for metrics in steps:
        for name in ("brightness", "saturation", "compressibility"):
            assert metrics[f"rewards/{name}/applicable"] == 12
        assert metrics["rewards/ocr/applicable"] == 4
        assert metrics["rewards/geneval/applicable"] == 4
        by_source = {k for k in metrics if k.startswith("reward_by_source/")}
        assert {"reward_by_source/ocr/ocr", "reward_by_source/geneval/geneval"} <= by_source
        assert not {"reward_by_source/ocr/pickscore", "reward_by_source/geneval/ocr"} & by_source
    values = {k: v for _, m in logged for k, v in m.items()}
    assert "val/reward/ocr" in values and "val/reward/geneval" in values
    assert all(math.isfinite(v) for _, m in logged for v in m.values()), values
    run = runs / "tiny_mixed" / "version_0"
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["validation_step000002.png"]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((runs / "tiny-trocr" / "preprocessor_config.json").read_text())["size"]
