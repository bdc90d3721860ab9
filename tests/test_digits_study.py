"""benchmarks/digits_study.py: its configs are the shipped one plus each method's edits, its
summary and claims follow the numbers, and a dry run (smoke pretrain, 2 steps) writes the report."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from marble_pl.callbacks import CoefficientEMA, GradientCosineMonitor

from marble_pl.balancers import (
    EqualAlpha,
    GramianWeighting,
    MinNormBalancer,
    SingleReward,
    WeightedSum,
)
from marble_pl.cli import MarbleCLI
from marble_pl.data import PromptDataModule
from marble_pl.digits.callback import BuildDigitsModel
from marble_pl.module import MarbleModule

ROOT = Path(__file__).resolve().parents[1]


def _load_study():
    spec = importlib.util.spec_from_file_location(
        "digits_study", ROOT / "benchmarks" / "digits_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["digits_study"] = module
    spec.loader.exec_module(module)
    return module


study = _load_study()
BALANCERS = {
    "marble": MinNormBalancer,
    "official": MinNormBalancer,
    "equal_alpha": EqualAlpha,
    "weighted_sum": WeightedSum,
    "upgrad": GramianWeighting,
}


@pytest.mark.parametrize("name", list(study.methods()))
def test_each_method_is_the_shipped_config_with_its_edits(name, tmp_path):
    """Every method's config parses and instantiates through MarbleCLI: its balancer, the
    CoefficientEMA only where the method keeps one, the monitor always, the seed everywhere."""
    pytest.importorskip("torchjd") if name == "upgrad" else None
    method = study.methods()[name]
    cfg = study.run_config(method, 2, 10, tmp_path, tmp_path / "model", 5, "smoke")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = MarbleCLI(MarbleModule, PromptDataModule, run=False, args=["--config", str(path)])
    module, trainer = cli.model, cli.trainer
    expected = SingleReward if name.startswith("single_") else BALANCERS[name]
    assert type(module.balancer) is expected
    if name.startswith("single_"):
        assert module.reward_names[module.balancer.index] == name.removeprefix("single_")
    assert module.hparams.seed == 2 and cli.datamodule.seed == 2 and trainer.max_steps == 10
    kinds = {type(cb) for cb in trainer.callbacks}
    assert {BuildDigitsModel, GradientCosineMonitor} <= kinds
    assert (CoefficientEMA in kinds) == (method.ema is not None)
    if name == "official":
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, CoefficientEMA))
        assert ema.ema.decay == 0.7 and module.hparams.balance_every_n_steps == 10
        assert module.hparams.normalization == "unit"
    shipped = yaml.safe_load(study.CONFIG.read_text())["model"]
    for key in ("beta", "lora_rank", "num_inference_steps", "timesteps_per_image", "optimizer"):
        assert cfg["model"][key] == shipped[key], key


def _run(method: str, seed: int, finals: dict[str, float]) -> dict:
    curves = {n: [(49, 0.0), (99, v)] for n, v in finals.items()}
    return {
        "method": method,
        "seed": seed,
        "curves": curves,
        "frac_min_negative": 0.1 if method == "marble" else 0.6,
        "frac_min_negative_ws": 0.6,
        "step_s": 2.0 if method == "marble" else 1.0,
        "wall_s": 1.0,
    }


def test_summary_and_claims_follow_the_numbers():
    """Deltas are against each seed's own base; 'all up' counts seeds where every reward rose;
    the specialist claim says 'above' only beyond one combined std, and the cost is a ratio."""
    bases = [{"seed": s, "val": dict.fromkeys(study.REWARDS, 0.5 + s)} for s in (0, 1)]
    up = {"digit_confidence": 0.2, "stroke": 0.1, "symmetry": 0.01, "centredness": 0.01}
    ws = {"digit_confidence": 0.0, "stroke": -0.1, "symmetry": 0.05, "centredness": 0.05}
    runs = []
    for s in (0, 1):
        runs.append(_run("marble", s, {n: 0.5 + s + v for n, v in up.items()}))
        runs.append(_run("weighted_sum", s, {n: 0.5 + s + v + 0.01 * s for n, v in ws.items()}))
        runs.append(_run("single_stroke", s, {n: 0.5 + s for n in study.REWARDS}))
    summary = study.summarize(bases, runs)
    marble, weighted = summary["rows"]["marble"], summary["rows"]["weighted_sum"]
    assert marble["delta"]["digit_confidence"]["mean"] == pytest.approx(0.2)
    assert marble["delta"]["digit_confidence"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert weighted["delta"]["stroke"]["mean"] == pytest.approx(-0.095)
    assert marble["all_up"] == 2 and weighted["all_up"] == 0
    assert summary["rows"]["single_stroke"]["all_up"] == 0  # no change is not a rise
    assert marble["step_ratio"] == pytest.approx(2.0) and weighted["step_ratio"] == 1.0
    text = study.claims(summary)
    assert text[0] == "Every reward up in every seed: marble (of 3 methods)."
    assert "MARBLE is above the weighted sum" in text[1] and "MARBLE is above" in text[2]
    assert "10% of MARBLE's steps, 60% of the weighted sum's" in text[3]
    assert "MARBLE 2.00x the single-reward step time" in text[4]
    report = study.format_results(
        summary, study.parse_args(["--steps", "100"]), {n: n for n in summary["rows"]}
    )
    assert "| `marble` | +0.2000 ± 0.0000 | +0.1000 ± 0.0000 |" in report


def test_dry_run_writes_the_report(tmp_path, monkeypatch):
    """Smoke pretrain, the base validated, one method trained 2 steps: every file written,
    every figure finite (marble fit / validate in process instead of as subprocesses)."""
    from marble_pl.cli import main

    def in_process(subcommand, cfg, path, log):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        monkeypatch.chdir(path.parent)
        main([subcommand, "--config", str(path), "--data.group_size=4", "--data.val_batch_size=38"])
        return 1.0

    monkeypatch.setattr(study, "_marble", in_process)
    out = tmp_path / "out"
    args = ["--preset", "smoke", "--steps", "2", "--val-every", "2", "--seeds", "0"]
    summary = study.main([*args, "--methods", "marble", "--work", str(tmp_path), "--out", str(out)])
    assert set(summary["rows"]) == {"marble"}
    row = summary["rows"]["marble"]
    assert all(math.isfinite(row["delta"][n]["mean"]) for n in study.REWARDS)
    assert 0.0 <= row["frac_min_negative"]["mean"] <= 1.0 and row["step_s"]["mean"] > 0
    assert math.isnan(row["step_ratio"])  # no single-reward run to compare with
    saved = json.loads((out / "digits_study.json").read_text())
    assert saved["runs"][0]["curves"]["stroke"][-1][0] == 1  # the last step's validation
    assert (out / "digits_study_curves.png").stat().st_size > 0
    assert "| `marble` |" in (out / "digits_study.md").read_text()
