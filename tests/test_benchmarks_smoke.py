"""Smoke tests of the benchmark scripts: they run, write their files, and report finite numbers.

No timing or outcome assertions: the benchmarks measure, the tests only check they work.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` by path (``benchmarks`` is not an installed package)."""
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _table_rows(text: str) -> list[list[str]]:
    """Cells of every markdown table row (header and separator lines included)."""
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", cell)]


def test_qp_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qp = _load("qp")
    out = tmp_path / "qp.md"
    rows = qp.main(["--smoke", "--out", str(out)])
    assert out.exists()
    assert "| K |" in capsys.readouterr().out
    table = _table_rows(out.read_text())
    header, body = table[0], table[2:]
    assert len(header) == len(qp.COLUMNS) == 11
    assert [int(r[0]) for r in body] == [2, 5]
    for r in body:
        assert len(r) == len(header)
        values = [float(c) for c in r]
        assert all(math.isfinite(v) for v in values)
        assert all(v >= 0 for v in values[2:8])  # times
    for row in rows:
        assert row.max_rel_gap < 1e-3  # OSQP agrees with SLSQP / Frank-Wolfe
        assert row.fallbacks >= 0


def test_qp_help(capsys: pytest.CaptureFixture[str]) -> None:
    qp = _load("qp")
    with pytest.raises(SystemExit) as exc:
        qp.main(["--help"])
    assert exc.value.code == 0
    assert "--repeats" in capsys.readouterr().out


def test_toy_study_smoke(tmp_path: Path) -> None:
    toy = _load("toy_study")
    summary = toy.main(["--smoke", "--out", str(tmp_path)])
    for name in ("curves.png", "results.md", "results.json"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "curves.png").stat().st_size > 1000

    tables = (tmp_path / "results.md").read_text().split("\n\n")
    main_table = _table_rows(next(t for t in tables if t.startswith("| method")))
    header, body = main_table[0], main_table[2:]
    k = 3
    assert len(header) == 5 + k
    assert [r[0] for r in body] == list(toy.METHODS)
    for r in body:
        assert len(r) == len(header)
        numbers = [x for cell in r[1:] for x in _numbers(cell)]
        assert len(numbers) >= 2 * (3 + k) and all(math.isfinite(x) for x in numbers)

    payload = json.loads((tmp_path / "results.json").read_text())
    assert set(payload["summary"]["methods"]) == set(toy.METHODS)
    assert payload["config"]["steps"] == len(payload["runs"][0]["marble"]["reward_mean"])
    for method in toy.METHODS:
        agg = summary["methods"][method]
        assert 0.0 <= agg["frac_neg_worst_cos"]["mean"] <= 1.0
        assert len(agg["delta"]["mean"]) == k
        assert all(math.isfinite(x) for x in agg["delta"]["mean"])


def test_step_time_smoke(tmp_path):
    """The step-time benchmark runs the four variants through the real training step."""
    module = _load("step_time")
    result = module.main(["--smoke", "--out", str(tmp_path / "st.md")])
    names = [row["variant"] for row in result["rows"]]
    assert names == ["single", "weighted_sum", "marble_output", "marble_parameters"]
    for row in result["rows"]:
        assert math.isfinite(row["speed_vs_single"]) and row["speed_vs_single"] > 0
        assert math.isfinite(row["update_speed_vs_single"]) and row["median_step_ms"] > 0
    assert result["rows"][2]["qp_ms"] > 0  # marble solves a QP, single does not
    text = (tmp_path / "st.md").read_text()
    assert "| marble_output |" in text and "Machine:" in text
    assert (tmp_path / "st.json").exists()


def test_step_time_smoke_from_a_config(tmp_path, tiny_sd3_path, monkeypatch):
    """``--config`` builds the variants as ``marble fit`` does; ``single`` keeps one reward."""
    monkeypatch.chdir(ROOT)  # the config's prompt files are relative to the project root
    module = _load("step_time")
    result = module.main(
        [
            "--smoke",
            "--config",
            "configs/tiny.yaml",
            "--out",
            str(tmp_path / "st.md"),
            f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
            "--model.num_inference_steps=2",
        ]
    )
    assert [row["variant"] for row in result["rows"]][0] == "single"
    note = result["note"]
    assert "configs/tiny.yaml" in note and "K=3 rewards" in note and "2 sampler steps" in note
    assert result["rows"][3]["qp_ms"] > 0


def test_step_time_rejects_cli_overrides_without_a_config(tmp_path):
    module = _load("step_time")
    with pytest.raises(SystemExit):
        module.main(["--smoke", "--model.lora_rank=2", "--out", str(tmp_path / "st.md")])


def test_toy_study_advantage_std_option() -> None:
    toy = _load("toy_study")
    assert toy.parse_args([])[0].advantage_std == "global"  # DiffusionNFT's default, the module's
    assert toy.parse_args(["--advantage-std", "group"])[0].advantage_std == "group"
    with pytest.raises(SystemExit):
        toy.parse_args(["--advantage-std", "bogus"])


def test_toy_study_sampler_timesteps_are_grid_points_per_rollout() -> None:
    toy = _load("toy_study")
    cfg = toy.parse_args(["--timestep-sampling", "sampler", "--sampler-steps", "8"])[0]
    t = toy.training_times(cfg, 5, torch.Generator().manual_seed(0))
    assert t.shape == (cfg.timesteps * 5,)
    grid = set(torch.linspace(1.0, 0.0, 9)[:-1].tolist())
    per_rollout = t.reshape(cfg.timesteps, 5).t()  # timestep-major, as the rollouts repeat
    for row in per_rollout.tolist():
        assert len(set(row)) == cfg.timesteps and set(row) <= grid
    uniform = toy.training_times(toy.parse_args([])[0], 5, torch.Generator().manual_seed(0))
    assert not set(uniform.tolist()) <= grid
