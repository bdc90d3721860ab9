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


@pytest.fixture(scope="module")
def toy_smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, Path, dict]:
    """One smoke run of the toy study's whole grid (K = 3 and 5), shared by the tests below."""
    toy = _load("toy_study")
    out = tmp_path_factory.mktemp("toy_study")
    result = toy.main(["--smoke", "--jobs", "1", "--out", str(out)])
    return toy, out, result


def test_toy_study_smoke(toy_smoke: tuple[ModuleType, Path, dict]) -> None:
    toy, out, result = toy_smoke
    cfg = toy.parse_args(["--smoke"])[0]
    assert cfg.ks == [3, 5] and len(cfg.seeds) == 1
    names = ["results.md", "results.json", "runs.json"]
    for k in cfg.ks:
        names += [f"results_k{k}.md", f"gains_k{k}.png"]
    for name in names:
        assert (out / name).exists(), name
    payload = json.loads((out / "results.json").read_text())
    curves = json.loads((out / "runs.json").read_text())
    for k in cfg.ks:
        assert (out / f"gains_k{k}.png").stat().st_size > 1000
        rows = toy.variants(cfg.for_k(k))
        keys = [v.key for v in rows]
        # every balancer (torchjd's six are installed with the balancers extra), every space
        assert {v.balancer for v in rows} == set(toy.BALANCERS)
        assert {v.space for v in rows} == {None, *toy.SPACES}
        assert {v.ema for v in rows} == {None, "none", "reset", "project"}
        summary = result["by_k"][k]
        assert list(summary["rows"]) == keys
        assert list(payload["summary"][str(k)]["rows"]) == keys
        steps = payload["configs"][str(k)]["steps"]
        assert len(curves[str(k)][0]["marble/parameters/reset"]["reward_mean"]) == steps

        table = _table_rows((out / f"results_k{k}.md").read_text())
        header, body = table[0], table[2:]
        assert len(header) == 9 + k
        assert [r[0] if r[1] == "—" else f"{r[0]}/{r[1]}/{r[2]}" for r in body] == keys
        for r in body:
            assert len(r) == len(header)
            numbers = [x for cell in r[3:] for x in _numbers(cell)]
            assert len(numbers) >= 2 * (3 + k) and all(math.isfinite(x) for x in numbers)
        for key, agg in summary["rows"].items():
            for name in ("frac_neg_worst_cos", "frac_guarded"):
                assert 0.0 <= agg[name]["mean"] <= 1.0, (key, name)
            assert len(agg["delta"]["mean"]) == k
            assert all(math.isfinite(x) for x in agg["delta"]["mean"])
            if agg["ema"] in (None, "none"):
                assert agg["frac_guarded"]["mean"] == 0.0  # no EMA, no guard


def test_toy_study_gramian_gram_equals_parameters_and_min_norm_never_conflicts(
    toy_smoke: tuple[ModuleType, Path, dict],
) -> None:
    """The taps' Gram is the K-backward one on every step; raw min-norm weights (no EMA) never
    conflict on their own exact Gram (``<g_k, d> >= |d|^2``), so no negative worst cosine."""
    toy, _, result = toy_smoke
    for k, summary in result["by_k"].items():
        check = summary["gramian_check"]
        assert check is not None and check["rows"], k
        assert check["max_gram_gap"] < 1e-5, (k, check)
        for key in check["rows"]:
            for seed in summary["rows"][key]["per_seed"]:
                assert seed["max_gram_gap"] is not None and seed["max_gram_gap"] < 1e-5
        for space in ("parameters", "gramian"):
            agg = summary["rows"][f"marble/{space}/none"]
            assert agg["frac_neg_worst_cos"]["mean"] == 0.0, (k, space)
            assert agg["min_worst_cos"] >= -toy.NEG_COS_TOL, (k, space)


def test_toy_study_results_do_not_depend_on_jobs(tmp_path: Path) -> None:
    toy = _load("toy_study")
    args = ["--smoke", "--k", "3", "--balancers", "marble", "PCGrad", "--spaces", "parameters"]
    args += ["--ema", "project"]
    one = toy.main([*args, "--jobs", "1", "--out", str(tmp_path / "one")])["by_k"][3]
    two = toy.main([*args, "--jobs", "2", "--out", str(tmp_path / "two")])["by_k"][3]
    assert list(one["rows"]) == ["marble/parameters/project", "PCGrad/parameters/project"]
    for key in one["rows"]:
        assert one["rows"][key]["per_seed"] == two["rows"][key]["per_seed"], key


def test_toy_study_lora_layers_are_tappable() -> None:
    """The LoRA's A and B are bias-free nn.Linear weights, as the gramian space's taps need."""
    from marble_pl.gramian import LinearGradientTaps

    toy = _load("toy_study")
    model = toy.VelocityField(prompts=2, hidden=8, rank=2)
    x, t, prompt = torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, 0, 1, 0])
    before = model(x, t, prompt)
    params = model.attach_lora(torch.Generator().manual_seed(0))
    assert len(params) == 8
    LinearGradientTaps(model, params)  # raises unless every parameter is such a weight
    assert torch.equal(model(x, t, prompt), before)  # B = 0: the adapter starts as the base
    assert torch.allclose(model.frozen_forward(x, t, prompt), before, atol=1e-6)


def test_step_time_smoke(tmp_path):
    """The step-time benchmark runs the six variants through the real training step."""
    module = _load("step_time")
    result = module.main(["--smoke", "--out", str(tmp_path / "st.md")])
    names = [row["variant"] for row in result["rows"]]
    assert names == [
        "single",
        "weighted_sum",
        "marble_output",
        "marble_parameters",
        "marble_gramian",
        "marble_gramian_every4",
    ]
    for row in result["rows"]:
        assert math.isfinite(row["speed_vs_single"]) and row["speed_vs_single"] > 0
        assert math.isfinite(row["update_speed_vs_single"]) and row["median_step_ms"] > 0
    assert result["rows"][2]["qp_ms"] > 0  # marble solves a QP, single does not
    assert result["rows"][4]["qp_ms"] > 0  # gramian: a QP every step
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
