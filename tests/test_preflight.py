"""``marble preflight``: the config's models at real shape with random weights, timed steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from marble_pl.cli import main
from marble_pl.models import load_sd3
from marble_pl.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def configs(tmp_path, monkeypatch) -> Path:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "configs"


def test_preflight_of_the_tiny_config(configs, tiny_sd3_path):
    report = preflight(
        configs / "tiny.yaml",
        steps=2,
        resolution=32,
        overrides=[f"--model.pretrained_model_name_or_path={tiny_sd3_path}"],
    )
    saved = load_sd3(tiny_sd3_path, local_files_only=True)
    rows = {r.name: r for r in report.components}
    assert list(rows) == ["transformer", "vae", "text_encoder", "text_encoder_2"]
    for name, row in rows.items():  # the saved model's architecture, parameter for parameter
        part = getattr(saved, name)
        assert row.params == sum(p.numel() for p in part.parameters()), name
        assert row.dtype == "float32" and row.bytes >= 4 * row.params
    # tiny.yaml's LoRA: rank 4 on to_q/k/v/out.0 of 2 blocks, the first with dual attention.
    assert report.adapted == {
        "attn.to_q": 2, "attn.to_k": 2, "attn.to_v": 2, "attn.to_out.0": 2,
        "attn2.to_q": 1, "attn2.to_k": 1, "attn2.to_v": 1, "attn2.to_out.0": 1,
    }  # fmt: skip
    assert report.lora_params > 0 and report.lora_bytes == 2 * 4 * report.lora_params
    assert report.configured["timesteps"] == 3 and report.run["timesteps"] == 1
    assert set(report.phases) == {"rollout_s", "reward_s", "update_s", "step_s"}
    assert all(v > 0 for v in report.phases.values()) and report.peak_bytes > 0
    # Per-phase peaks (Linux: peak RSS reset at each phase; CUDA: max_memory_allocated).
    assert set(report.phase_peaks) == {"rollout_s", "reward_s", "update_s"}
    assert all(0 < v <= report.peak_bytes for v in report.phase_peaks.values())
    # The estimate: images 8 / 2, rollout steps 6 / 2, training timesteps 3 / 1, same tokens.
    assert report.estimate["rollout_s"] == pytest.approx(report.phases["rollout_s"] * 4 * 3)
    assert report.estimate["update_s"] == pytest.approx(report.phases["update_s"] * 4 * 3)
    assert report.estimate["reward_s"] == pytest.approx(report.phases["reward_s"] * 4)
    # gramian taps: one timed micro-batch of 2 pairs; configured 12 pairs, same tokens.
    taps = report.taps
    assert taps["bytes"] > 0 and (taps["run_pairs"], taps["pairs"]) == (2, 12)
    assert taps["estimate"] == pytest.approx(taps["bytes"] * 6)
    text = report.markdown()
    assert "| gramian taps: bytes per micro-batch |" in text
    assert "| transformer | SD3Transformer2DModel |" in text and "| attn2.to_q | 1 |" in text
    assert (
        "| phase | measured (s) | estimate at the configured size (s) | peak memory (GiB) |" in text
    )


def test_marble_preflight_command_writes_its_report(configs, tiny_sd3_path, capsys):
    out = configs.parent / "report.md"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "preflight", "--config", str(configs / "tiny.yaml"), "--steps", "1",
                "--resolution", "32", "--out", str(out),
                f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert out.read_text().strip() and out.read_text().strip() in printed
    assert "| attn2.to_q | 1 |" in out.read_text()
    # Nothing written but the report (and the tiny model's folder, built on a fresh machine).
    assert sorted(p.name for p in configs.parent.iterdir()) == ["configs", "report.md"]


def test_preflight_of_a_small_config_writes_nothing_and_times_its_own_size(configs, capsys):
    """tiny.yaml names its model ``${trainer.logger.init_args.save_dir}/tiny-sd3`` and builds it
    on first use: preflight builds it in a scratch folder, not in the working folder (issue 23,
    item 6), and times the config's own size, so the estimate is the measurement."""
    with pytest.raises(SystemExit) as exit_info:
        main(["preflight", "--config", str(configs / "tiny.yaml"), "--steps", "1"])
    assert exit_info.value.code == 0
    assert sorted(p.name for p in configs.parent.iterdir()) == ["configs"]
    printed = capsys.readouterr().out
    assert "at 32 px, 2 prompt(s) x 4 images, 6 sampler steps, 3 training timestep(s)" in printed
    report = preflight(configs / "tiny.yaml", steps=1)
    assert report.run["resolution"] == report.configured["resolution"] == 32
    for phase in ("rollout_s", "reward_s", "update_s"):  # the whole step adds bookkeeping
        assert report.estimate[phase] == pytest.approx(report.phases[phase])
    assert sorted(p.name for p in configs.parent.iterdir()) == ["configs"]


def test_a_lora_target_that_matches_nothing_is_one_line(configs, tiny_sd3_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "preflight", "--config", str(configs / "tiny.yaml"),
                "--model.lora_target_modules=[to_q, nope]",
                f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("marble: error: model.lora_target_modules: ['nope'] match no module")


def test_an_unknown_model_is_one_line(configs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "preflight", "--config", str(configs / "tiny.yaml"),
                "--model.pretrained_model_name_or_path=someone/another-model",
                "--model.build_tiny_if_missing=false",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("marble: error: ") and "neither cached nor shipped" in err


def test_pretrained_rewards_are_built_with_random_weights_and_reported(
    configs, tiny_sd3_path, tmp_path
):
    """A pretrained reward gets its architecture from its own config (here a tiny CLIP's
    local config.json), random weights, and a row in the report."""
    from test_reward_models import build_reward_weights

    from marble_pl.rewards.pretrained import clip_architecture

    clip_dir = build_reward_weights(tmp_path / "rw")["clip_dir"]
    spec = f"{{name: clip_score, pretrained_model_name_or_path: {clip_dir}}}"
    report = preflight(
        configs / "tiny.yaml",
        steps=1,
        resolution=32,
        skip=["compressibility"],
        overrides=[
            f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
            f"--model.rewards=[brightness, saturation, {spec}]",
        ],
    )
    (row,) = [r for r in report.components if r.name == "reward: clip_score"]
    config = clip_architecture(str(clip_dir))
    from transformers import CLIPModel

    assert row.cls == "CLIPModel" and row.params == sum(
        p.numel() for p in CLIPModel(config).parameters()
    )


def test_preflight_prompts_make_every_reward_applicable_so_geneval_and_ocr_are_timed(
    configs, tiny_sd3_path, monkeypatch
):
    """The preflight prompts quote a text AND carry GenEval's fields: the ocr and geneval rewards
    (random weights from tiny local configs) score every image of the timed steps."""
    from marble_pl.rewards.geneval import GenEvalReward
    from marble_pl.rewards.ocr import OCRReward
    from marble_pl.tiny_rewards import ensure_tiny_clip, ensure_tiny_mask2former, ensure_tiny_trocr

    models = configs.parent / "models"
    trocr = ensure_tiny_trocr(models / "trocr")
    detector, clip = ensure_tiny_mask2former(models / "m2f"), ensure_tiny_clip(models / "clip")
    seen: dict[str, list[int]] = {"ocr": [], "geneval": []}
    for cls, name in ((OCRReward, "ocr"), (GenEvalReward, "geneval")):
        original = cls.score

        def spy(self, images, prompts, _original=original, _name=name):
            seen[_name].append(len(images))
            return _original(self, images, prompts)

        monkeypatch.setattr(cls, "score", spy)
    specs = (
        f"[brightness, {{name: ocr, engine: trocr, pretrained_model_name_or_path: {trocr}}}, "
        f"{{name: geneval, detector_name_or_path: {detector}, clip_name_or_path: {clip}, "
        "detector_size: 64}]"
    )
    report = preflight(
        configs / "tiny.yaml",
        steps=2,
        resolution=32,
        overrides=[
            f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
            f"--model.rewards={specs}",
        ],
    )
    assert seen == {"ocr": [2, 2], "geneval": [2, 2]}  # 2 steps of 1 prompt x 2 images, all scored
    rows = {r.name: r for r in report.components}
    assert rows["reward: geneval"].params > 0 and rows["reward: ocr"].cls == "TrOCREngine"
    assert report.phases["reward_s"] > 0


def test_readme_gpu_command_is_a_valid_preflight(monkeypatch, capsys):
    """The README's "Before renting a GPU" command parses as written, with no stray override."""
    import shlex

    import marble_pl.preflight as preflight_mod

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Before renting a GPU", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == ["marble", "preflight"]
    seen = {}

    class Report:
        def markdown(self) -> str:
            return "report"

    def fake(config, **kwargs):
        seen.update(kwargs, config=config)
        return Report()

    monkeypatch.setattr(preflight_mod, "preflight", fake)
    monkeypatch.setattr(preflight_mod.Path, "write_text", lambda self, text: None)
    assert preflight_mod.main(argv[2:]) == 0
    assert seen["config"] == "configs/sd35.yaml" and seen["overrides"] == []
    assert (seen["resolution"], seen["group_size"], seen["num_inference_steps"]) == (512, 9, 25)
