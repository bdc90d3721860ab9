"""The shipped configs parse and instantiate, so they cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from marble_pl.callbacks import CoefficientEMA, GradientCosineMonitor, SampleGrid

from marble_pl.cli import MarbleCLI, main
from marble_pl.data import PromptDataModule
from marble_pl.module import MarbleModule

ROOT = Path(__file__).resolve().parents[1]
SD35 = ROOT / "configs" / "sd35.yaml"


def test_sd35_instantiates_with_tiny_local_model(tmp_path, tiny_sd3_path, monkeypatch):
    """configs/sd35.yaml with only the hub id (and GPU-only settings) swapped for a tiny model."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train_prompts.txt").write_text("a cat\na dog\na red car\na blue boat\n")
    (data / "val_prompts.txt").write_text("a cat\na dog\n")
    monkeypatch.chdir(tmp_path)  # the config's relative prompt paths
    cli = MarbleCLI(
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
            "--trainer.precision=32-true",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ],
    )
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


@pytest.mark.parametrize("config", ["sd35.yaml", "tiny.yaml"])
def test_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "balancer: marble" in out and "pretrained_model_name_or_path" in out
