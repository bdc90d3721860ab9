"""The shipped configs parse and instantiate, so they cannot rot."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from marble_pl.callbacks import CoefficientEMA, GradientCosineMonitor, SampleGrid

from marble_pl.cli import MarbleCLI, main
from marble_pl.data import PromptDataModule
from marble_pl.module import MarbleModule

ROOT = Path(__file__).resolve().parents[1]
SD35 = ROOT / "configs" / "sd35.yaml"


def sd35_cli(tmp_path: Path, tiny_sd3_path: Path, monkeypatch, *overrides: str) -> MarbleCLI:
    """configs/sd35.yaml on the tiny model, run=False, its prompt files written in tmp_path."""
    data = tmp_path / "data"
    data.mkdir(parents=True)
    (data / "train_prompts.txt").write_text("a cat\na dog\na red car\na blue boat\n")
    (data / "val_prompts.txt").write_text("a cat\na dog\n")
    monkeypatch.chdir(tmp_path)  # the config's relative prompt paths
    return MarbleCLI(
        MarbleModule,
        PromptDataModule,
        seed_everything_default=0,
        run=False,
        args=[
            "--config",
            str(SD35),
            f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
            "--model.local_files_only=true",
            "--model.resolution=32",
            "--model.max_sequence_length=16",
            "--trainer.accelerator=cpu",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            *overrides,
        ],
    )


def test_sd35_instantiates_with_tiny_local_model(tmp_path, tiny_sd3_path, monkeypatch):
    """configs/sd35.yaml with only the hub id (and GPU-only settings) swapped for a tiny model."""
    cli = sd35_cli(tmp_path, tiny_sd3_path, monkeypatch, "--trainer.precision=32-true")
    model = cli.model
    assert model.reward_names == ["pickscore", "hpsv2", "clip_score", "aesthetic", "imagereward"]
    hp = model.hparams
    assert (hp.balancer, hp.gradient_space, hp.loss_form) == ("marble", "gramian", "reference")
    assert hp.balance_every_n_steps == 4
    assert (hp.lora_rank, hp.weights_dtype, hp.gradient_checkpointing) == (32, "bfloat16", True)
    kinds = {type(cb) for cb in cli.trainer.callbacks}
    assert {CoefficientEMA, GradientCosineMonitor, SampleGrid} <= kinds
    # DiffusionNFT's multi-reward SD3.5 recipe (docs/recipe.md): 48 prompts x 24 images on 8 GPUs,
    # 24 of the 25 sampler timesteps per image, micro-batches of 9, KL 1e-4, beta 0.1, CFG-free.
    assert (cli.datamodule.batch_size, cli.datamodule.group_size) == (6, 24)
    assert (hp.num_inference_steps, model.timesteps_count, hp.timestep_sampling) == (
        25,
        24,
        "sampler",
    )
    assert (hp.micro_batch_size, hp.kl_beta, hp.beta, hp.guidance_scale) == (9, 1e-4, 0.1, 1.0)
    assert (hp.advantage_std, hp.eval_ema_decay) == ("global", 0.9)
    assert model.eval_rollout_config.num_inference_steps == 40
    assert yaml.safe_load(SD35.read_text())["model"]["max_sequence_length"] == 128
    assert [model.sampling_decay(s) for s in (0, 100, 1000)] == [0.0, 0.1, 0.5]
    # The real loading path on the tiny model: bf16 base, float32 LoRA on every target module.
    model.configure_model()
    assert model.transformer.dtype == torch.bfloat16
    assert model.lora_params and all(p.dtype == torch.float32 for p in model.lora_params)
    adapted = {
        n.rsplit(".lora_A", 1)[0]
        for n, _ in model.transformer.named_parameters()
        if "lora_A.default" in n
    }
    for target in hp.lora_target_modules:
        assert any(name.endswith(target) for name in adapted), target
    assert model.transformer.is_gradient_checkpointing


@pytest.mark.parametrize(
    "config", ["sd35.yaml", "tiny.yaml", "tiny_mixed.yaml", "marble_sd35.yaml"]
)
def test_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "balancer: marble" in out and "pretrained_model_name_or_path" in out


def test_interpolations_follow_command_line_overrides(capsys, tmp_path):
    """``${data.val_file}`` and ``${trainer.logger.init_args.save_dir}`` resolve after the
    overrides: moving the referenced key moves the values that name it (issue 23, item 4)."""
    val = tmp_path / "val.txt"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                f"--data.val_file={val}",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    grid = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("SampleGrid")]
    assert grid[0]["init_args"]["prompt_file"] == str(val)
    assert cfg["model"]["pretrained_model_name_or_path"] == f"{tmp_path / 'runs'}/tiny-sd3"
    assert "${" not in str(cfg)


class FirstStep(Callback):
    """Keeps the first step's record (per-reward gradients) and the logged metrics of each step."""

    def __init__(self) -> None:
        self.first = None
        self.logged: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.first is None:
            self.first = copy.deepcopy(pl_module.last_step)
            self.first_metadata = list(batch.get("metadata") or [])
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def run_sd35(tmp_path: Path, tiny_sd3_path: Path, monkeypatch, steps: int, *overrides: str):
    """configs/sd35.yaml AS SHIPPED (bf16 weights, bf16-mixed, gradient checkpointing, KL,
    gramian every 4th step, every callback and the logger) on the tiny model, at 32 px, with
    cheap rewards and B = 2 x G = 3 on the CPU."""
    cli = sd35_cli(
        tmp_path,
        tiny_sd3_path,
        monkeypatch,
        "--model.rewards=[brightness, saturation, compressibility]",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=1",
        "--data.batch_size=2",
        "--data.group_size=3",
        *overrides,
    )
    spy = FirstStep()
    cli.trainer.callbacks.append(spy)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli, spy


@pytest.fixture
def one_thread():
    """One intra-op thread: the bf16 figures below do not depend on the machine's thread count
    (CPU bf16 kernels with a busy second core ran 14x slower here with two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_sd35_settings_train_in_bf16_with_checkpointing_and_the_monitor(
    tmp_path, tiny_sd3_path, monkeypatch, one_thread
):
    """The SD3.5 recipe's numerics (never run elsewhere): two steps (balanced, then lambda_bar)
    in bf16-mixed with bf16 frozen weights and gradient checkpointing, the monitor's extra
    backward included; the first step's per-reward gradients agree with a float32 run's."""
    cli, spy = run_sd35(tmp_path / "bf16", tiny_sd3_path, monkeypatch, 2)
    model = cli.model
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 2
    assert model.transformer.dtype == torch.bfloat16 and model.transformer.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in model.lora_params)
    assert model.counters["skipped_nonfinite"] == 0 and model.counters["skipped_zero_grad"] == 0
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientCosineMonitor)]
    assert monitor.steps == 1  # balanced (and logged) on step 0 only: every 4th step
    assert monitor.last["cos/min"] >= -1e-6 and all(math.isfinite(v) for v in monitor.last.values())
    assert all(math.isfinite(v) for v in spy.logged[-1].values())
    grads_bf16 = spy.first.grads
    assert grads_bf16.dtype == torch.float32 and torch.isfinite(grads_bf16).all()

    # The same first step in float32 throughout: the bf16 step's per-reward gradients point the
    # same way: cosine > 0.99 for the smooth rewards (measured 0.9994, 0.9993; bf16 keeps 8
    # significant bits), > 0.9 for the JPEG size, which jumps with bf16's other pixels (0.970).
    ref, ref_spy = run_sd35(
        tmp_path / "fp32",
        tiny_sd3_path,
        monkeypatch,
        1,
        "--trainer.precision=32-true",
        "--model.weights_dtype=float32",
    )
    assert ref.model.transformer.dtype == torch.float32
    grads_fp32 = ref_spy.first.grads
    cos = torch.nn.functional.cosine_similarity(grads_bf16.double(), grads_fp32.double(), dim=1)
    assert cos[0] > 0.99 and cos[1] > 0.99 and cos[2] > 0.9, cos
    assert not torch.equal(grads_bf16, grads_fp32)  # bf16 really ran


MARBLE_SD35 = ROOT / "configs" / "marble_sd35.yaml"
MIXED = ROOT / "configs" / "prompts" / "mixed"


def marble_sd35_cli(config: Path, tmp_path: Path, tiny_sd3_path: Path, monkeypatch) -> MarbleCLI:
    """A marble_sd35 config on the tiny model, run=False: one step on the CPU with the shipped
    mixed set (GPU-only sizes swapped for tiny ones, the CLIP-based rewards for built-ins, ocr
    and geneval for tiny random models)."""
    monkeypatch.chdir(tmp_path)
    tiny = "build_tiny_if_missing: true, local_files_only: true"
    specialists = (  # pickscore, hpsv2, clip_score -> built-ins; ocr, geneval -> tiny models
        f"[brightness, saturation, compressibility, {{name: ocr, engine: trocr, {tiny}, "
        f"pretrained_model_name_or_path: {tmp_path / 'trocr'}, max_new_tokens: 8}}, "
        f"{{name: geneval, {tiny}, detector_size: null, "
        f"detector_name_or_path: {tmp_path / 'm2f'}, clip_name_or_path: {tmp_path / 'clip'}}}]"
    )
    return MarbleCLI(
        MarbleModule,
        PromptDataModule,
        seed_everything_default=0,
        run=False,
        args=[
            "--config", str(config),
            f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
            "--model.local_files_only=true", "--model.resolution=32",
            "--model.max_sequence_length=16", "--model.weights_dtype=float32",
            "--model.num_inference_steps=3", "--model.eval_num_inference_steps=2",
            "--model.micro_batch_size=null",
            f"--model.rewards={specialists}",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1",
            "--trainer.strategy=auto", "--trainer.precision=32-true", "--trainer.max_steps=1",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--data.root={MIXED}", "--data.group_size=2",
        ],
    )  # fmt: skip


def test_marble_sd35_is_the_official_recipe_and_trains_a_step_on_the_tiny_model(
    tmp_path, tiny_sd3_path, monkeypatch
):
    """configs/marble_sd35.yaml: the release config's rewards, data and recipe; one step on the
    tiny model on the CPU with the shipped mixed set (GPU-only sizes swapped for tiny ones, the
    CLIP-based rewards for built-ins, ocr and geneval for tiny random models)."""
    raw = yaml.safe_load(MARBLE_SD35.read_text())
    names = [spec["name"] for spec in raw["model"]["rewards"]]
    assert names == ["pickscore", "hpsv2", "clip_score", "ocr", "geneval"]
    assert raw["model"]["rewards"][3]["engine"] == "paddle"  # the official OCR
    assert raw["data"]["stratified"] is True and raw["data"]["root"]
    assert (raw["trainer"]["num_nodes"], raw["trainer"]["devices"]) == (2, 8)
    assert raw["data"]["batch_size"] * 16 == 48 and raw["data"]["group_size"] == 24
    cli = marble_sd35_cli(MARBLE_SD35, tmp_path, tiny_sd3_path, monkeypatch)
    hp = cli.model.hparams
    assert (hp.beta, hp.kl_beta, hp.a_max, hp.guidance_scale) == (0.1, 1e-4, 5.0, 1.0)
    assert (hp.lora_rank, hp.lora_alpha, hp.lora_init, hp.solver) == (32, 64.0, "gaussian", "dpm2")
    assert (hp.gradient_space, hp.balance_every_n_steps, hp.gradient_clip_norm) == (
        "gramian",
        10,
        1.0,
    )
    # The official balance (issue 22): unit-norm QP, first micro-batch of every 10th step, EMA 0.7.
    assert cli.model.balancer.normalization == "unit"
    assert (hp.balance_on, hp.balance_warmup_steps) == ("first_micro_batch", 1)
    assert hp.clip_combined_advantage
    (ema,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, CoefficientEMA)]
    assert (ema.ema.decay, ema.ema.bias_correction, ema.ema.start) == (0.7, False, "first")
    assert (ema.guard, ema.apply) == ("off", "fresh_on_solve")
    assert [cli.model.sampling_decay(s) for s in (0, 100, 2000)] == [0.0, 0.1, 0.95]
    assert (hp.eval_ema_decay, raw["model"]["eval_num_inference_steps"]) == (0.9, 40)
    assert raw["model"]["num_inference_steps"] == 25 and raw["model"]["resolution"] == 512
    assert cli.datamodule.stratified and cli.datamodule.batch_size == 3
    spy = FirstStep()
    cli.trainer.callbacks.append(spy)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1 and spy.first is not None
    sources = sorted(m["source"] for m in spy.first_metadata)
    assert sources == ["geneval"] * 2 + ["ocr"] * 2 + ["pickscore"] * 2  # one prompt per source
    # Each specialist applies to its source's prompt only: 2 images of the 6.
    assert spy.first.applicable.sum(dim=0).tolist() == [6, 6, 6, 2, 2]
    assert torch.isfinite(spy.first.grads).all()
    grids = list((tmp_path / "runs").rglob("samples/validation_step000001.png"))
    assert len(grids) == 1  # the grid took the mixed validation prompts (no prompt_file)


def test_marble_sd35_equal_alpha_trains_a_step_with_one_over_k(
    tmp_path, tiny_sd3_path, monkeypatch
):
    """configs/marble_sd35_equal_alpha.yaml: marble_sd35 with alpha = 1/5 on the per-reward
    advantages (EqualAlpha), never solved; one step on the tiny model."""
    from marble_pl.balancers import EqualAlpha

    config = ROOT / "configs" / "marble_sd35_equal_alpha.yaml"
    official, raw = yaml.safe_load(MARBLE_SD35.read_text()), yaml.safe_load(config.read_text())
    for section in ("data", "trainer"):  # the same run but for the balance and its callbacks
        assert set(raw[section]) == set(official[section]), section
        same = {k: v for k, v in raw[section].items() if k not in ("logger", "callbacks")}
        assert same == {k: official[section][k] for k in same}, section
    differs = {k for k in official["model"] if official["model"].get(k) != raw["model"].get(k)}
    assert differs == {"balancer", "gradient_space", "normalization", "balance_every_n_steps",
                       "balance_on", "balance_warmup_steps", "clip_combined_advantage"}  # fmt: skip
    cli = marble_sd35_cli(config, tmp_path, tiny_sd3_path, monkeypatch)
    assert isinstance(cli.model.balancer, EqualAlpha)
    assert not any(isinstance(cb, CoefficientEMA) for cb in cli.trainer.callbacks)
    spy = FirstStep()
    cli.trainer.callbacks.append(spy)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1 and spy.first is not None
    assert spy.first.r_train.shape == spy.first.r.shape == (6, 5)  # one estimator per reward
    assert spy.first.weights.tolist() == [0.2] * 5 and spy.first.balance is None
    assert spy.logged[0]["lambda/ocr"] == pytest.approx(0.2)
