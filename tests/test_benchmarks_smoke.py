"""Smoke tests of the benchmark scripts: they run, write their files, and report what they
measured. Each printed figure is checked against the measurements it is computed from (the
per-round timings of the step-time benchmark, the per-step records of the toy study), every
variant, row and column is checked present, and each fraction is recounted with its one
denominator. No timing outcome is asserted: the benchmarks measure, the tests check the
arithmetic and the reporting.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import statistics
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
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
    text = out.read_text()
    assert capsys.readouterr().out == text  # what it printed is what it wrote
    table = _table_rows(text)
    header, body = table[0], table[2:]
    assert header == list(qp.COLUMNS)
    assert [r.k for r in rows] == [int(r[0]) for r in body] == [2, 5]
    for row, cells in zip(rows, body, strict=True):
        # every printed cell is the row's own figure
        assert cells == [
            str(row.k),
            str(row.n),
            f"{row.cold_median_ms:.3f}",
            f"{row.cold_p90_ms:.3f}",
            f"{row.warm_median_ms:.3f}",
            f"{row.warm_p90_ms:.3f}",
            f"{row.slsqp_median_ms:.3f}",
            f"{row.fw_median_ms:.3f}",
            f"{row.max_rel_gap:.2e}",
            f"{row.max_diag_gap:.2e}",
            str(row.fallbacks),
        ]
        assert row.n == 2 * 5  # two Gram families x 5 Grams (--smoke)
        assert 0 < row.cold_median_ms <= row.cold_p90_ms
        assert 0 < row.warm_median_ms <= row.warm_p90_ms
        assert row.max_rel_gap < 1e-3  # OSQP agrees with SLSQP / Frank-Wolfe
        assert row.fallbacks == 0  # the README's "no fallbacks" on ordinary Grams


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


def _pm(mean: float, std: float, fmt: str, std_fmt: str) -> str:
    return f"{mean:{fmt}} ± {std:{std_fmt}}"


def test_toy_study_smoke(toy_smoke: tuple[ModuleType, Path, dict]) -> None:
    """Every row and column is there, and each fraction in the table is recounted from the
    run's per-step records (runs.json) with its own denominator: ``worst cos < 0`` over ALL
    batches, ``worst cos < 0, signal batches`` over the batches where every reward has signal
    (their number in brackets), ``guard fired`` over all steps."""
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
    denominators_differ = False
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
        seeds = payload["configs"][str(k)]["seeds"]
        assert [run["seed"] for run in curves[str(k)]] == seeds

        # The fractions, recounted per seed from the per-step records.
        for key, agg in summary["rows"].items():
            assert len(agg["per_seed"]) == len(seeds)
            for seed_sum, run in zip(agg["per_seed"], curves[str(k)], strict=True):
                rec = run[key]
                worst = np.asarray(rec["worst_cos"])
                signal = np.asarray(rec["all_signal"], dtype=bool)
                assert len(worst) == len(signal) == len(rec["guarded"]) == steps, key
                negative = worst < -toy.NEG_COS_TOL
                assert seed_sum["frac_neg_worst_cos"] == pytest.approx(negative.sum() / steps), key
                assert seed_sum["signal_batches"] == signal.sum(), key
                expected = negative[signal].sum() / signal.sum() if signal.any() else 0.0
                assert seed_sum["frac_neg_worst_cos_signal"] == pytest.approx(expected), key
                assert seed_sum["frac_guarded"] == pytest.approx(sum(rec["guarded"]) / steps), key
                assert seed_sum["min_worst_cos"] == worst.min(), key
                denominators_differ |= 0 < signal.sum() < steps
                if agg["ema"] in (None, "none"):
                    assert not any(rec["guarded"]), key  # no EMA, no guard
            for name in toy.SCALARS:  # the across-seed mean and std of the per-seed figures
                vals = [s[name] for s in agg["per_seed"]]
                assert agg[name]["mean"] == pytest.approx(np.mean(vals), abs=1e-12), (key, name)
                assert agg[name]["std"] == pytest.approx(np.std(vals), abs=1e-12), (key, name)
            assert len(agg["delta"]["mean"]) == k
            assert all(math.isfinite(x) for x in agg["delta"]["mean"])

        # The printed table: one row per key, every cell the summary's own figure.
        table = _table_rows((out / f"results_k{k}.md").read_text())
        header, body = table[0], table[2:]
        assert header[3:8] == [
            "worst cos < 0",
            "worst cos < 0, signal batches",
            "median worst cos",
            "guard fired",
            "λ change per step (L1)",
        ]
        assert len(header) == 9 + k
        assert [r[0] if r[1] == "—" else f"{r[0]}/{r[1]}/{r[2]}" for r in body] == keys
        for cells, (key, agg) in zip(body, summary["rows"].items(), strict=True):
            assert len(cells) == len(header)
            neg, sig = agg["frac_neg_worst_cos"], agg["frac_neg_worst_cos_signal"]
            assert cells[3] == _pm(neg["mean"], neg["std"], ".3f", ".3f"), key
            count = agg["signal_batches"]["mean"]
            assert cells[4] == _pm(sig["mean"], sig["std"], ".3f", ".3f") + f" [{count:.0f}]", key
            guard = agg["frac_guarded"]
            no_guard = agg["space"] is None or agg["ema"] in ("none", "off")
            assert cells[6] == ("—" if no_guard else _pm(guard["mean"], guard["std"], ".3f", ".3f"))
            deltas = [_pm(m, s, "+.4f", ".4f") for m, s in zip(*agg["delta"].values(), strict=True)]
            assert cells[8 : 8 + k] == deltas, key
            assert cells[-1] == str(agg["seeds_all_rewards_up"]), key
    # The smoke run has batches where some reward has no signal, so a fraction taken over the
    # wrong denominator would not go unnoticed above.
    assert denominators_differ


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


def _check_step_time_result(module: ModuleType, result: dict, text: str) -> None:
    """Every variant is reported, its speed figures are the median / min / max of single's step
    time over its own in the same round, and every printed cell is the row's own figure."""
    rows = result["rows"]
    assert (
        [row["variant"] for row in rows]
        == list(module.VARIANTS)
        == [
            "single",
            "weighted_sum",
            "marble_output",
            "marble_parameters",
            "marble_gramian",
            "marble_gramian_every4",
        ]
    )
    repeats = result["args"]["repeats"]
    single = rows[0]
    for row in rows:
        assert len(row["step_s"]) == len(row["update_s"]) == repeats, row["variant"]
        assert row["median_step_ms"] == pytest.approx(1e3 * statistics.median(row["step_s"]))
        assert row["update_ms"] == pytest.approx(1e3 * statistics.median(row["update_s"]))
        for prefix, key in (("speed", "step_s"), ("update_speed", "update_s")):
            ratios = [a / b for a, b in zip(single[key], row[key], strict=True)]
            assert row[f"{prefix}_ratios"] == pytest.approx(ratios, rel=1e-12), row["variant"]
            assert row[f"{prefix}_median"] == pytest.approx(statistics.median(ratios))
            assert row[f"{prefix}_min"] == pytest.approx(min(ratios))
            assert row[f"{prefix}_max"] == pytest.approx(max(ratios))
    assert single["speed_ratios"] == single["update_speed_ratios"] == [1.0] * repeats
    by_name = {row["variant"]: row for row in rows}
    assert by_name["single"]["qp_ms"] == by_name["weighted_sum"]["qp_ms"] == 0.0  # no QP
    for name in ("marble_output", "marble_parameters", "marble_gramian"):  # a QP every step
        assert by_name[name]["qp_ms"] > 0, name

    table = _table_rows(text)
    header, body = table[0], table[2:]
    assert header[3] == "speed median [min-max]" and header[7] == "update speed median [min-max]"
    assert [cells[0] for cells in body] == [row["variant"] for row in rows]
    for cells, row in zip(body, rows, strict=True):
        assert len(cells) == len(header)
        assert cells[1] == f"{row['median_step_ms']:.1f}"
        for col, prefix in ((3, "speed"), (7, "update_speed")):
            lo, mid, hi = (row[f"{prefix}_{s}"] for s in ("min", "median", "max"))
            assert cells[col] == f"{mid:.2f} [{lo:.2f}-{hi:.2f}]", (row["variant"], prefix)
        assert cells[6] == f"{row['update_ms']:.1f}"
    note = result["note"]
    assert f"{repeats} interleaved steps" in note and f"over the {repeats} rounds" in note
    every = result["args"]["log_every_n_steps"]
    assert f"assembled every {every} step(s)" in note


def test_step_time_smoke(tmp_path, capsys):
    """The step-time benchmark runs the six variants through the real training step."""
    module = _load("step_time")
    result = module.main(["--smoke", "--out", str(tmp_path / "st.md")])
    text = (tmp_path / "st.md").read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    assert result["args"]["log_every_n_steps"] == 1  # the shipped configs' logging
    _check_step_time_result(module, result, text)
    assert "Machine:" in text and "threads" in text
    saved = json.loads((tmp_path / "st.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))


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
    _check_step_time_result(module, result, (tmp_path / "st.md").read_text())
    note = result["note"]
    assert "configs/tiny.yaml" in note and "K=3 rewards" in note and "2 sampler steps" in note


def test_step_time_with_random_weights(tmp_path, tiny_sd3_path, monkeypatch):
    """``--random-weights``: the config's architecture (here the tiny pipeline's configs) with
    random weights, the same table."""
    monkeypatch.chdir(ROOT)
    module = _load("step_time")
    args = ["--smoke", "--config", "configs/tiny.yaml", "--random-weights"]
    args += ["--out", str(tmp_path / "st.md"), "--model.num_inference_steps=2"]
    result = module.main([*args, f"--model.pretrained_model_name_or_path={tiny_sd3_path}"])
    _check_step_time_result(module, result, (tmp_path / "st.md").read_text())
    assert "--model.random_weights=true" in module.RANDOM_WEIGHTS_ARGS
    with pytest.raises(SystemExit):
        module.main(["--smoke", "--random-weights", "--out", str(tmp_path / "x.md")])


def test_step_time_times_a_subset_of_variants(tmp_path):
    """``--variants``: only those (and the single-reward reference) are built and timed."""
    module = _load("step_time")
    out = tmp_path / "st.md"
    result = module.main(["--smoke", "--variants", "marble_gramian", "--out", str(out)])
    assert [r["variant"] for r in result["rows"]] == ["single", "marble_gramian"]
    assert "| marble_gramian |" in out.read_text() and "| weighted_sum |" not in out.read_text()
    with pytest.raises(SystemExit):
        module.main(["--smoke", "--variants", "single", "--out", str(out)])


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
