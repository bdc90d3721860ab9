"""LoRA export: diffusers' ``load_lora_weights`` reproduces the trained adapter exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from marble_pl.callbacks import LoraExport
from safetensors import safe_open
from safetensors.torch import load_file
from test_module import PROMPTS, make_module

from marble_pl.data import PromptDataModule
from marble_pl.export import (
    LORA_WEIGHT_NAME,
    LoraExportError,
    export_checkpoint,
    export_lora,
    main,
)
from marble_pl.models import use_adapter
from marble_pl.module import MarbleModule


@dataclass
class Run:
    module: MarbleModule
    root: Path
    ckpt: Path
    callback: LoraExport


@pytest.fixture(scope="module")
def run(tiny_sd3_path, tmp_path_factory) -> Run:
    """One training step (LoRA B randomised first) with ModelCheckpoint and LoraExport."""
    root = tmp_path_factory.mktemp("export_run")
    module = make_module(tiny_sd3_path, lora_rank=4, lora_alpha=8.0)  # scale 2: alpha must survive
    torch.manual_seed(0)  # peft draws LoRA A from the global RNG: any test order
    module.configure_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "lora_B.default" in name:
                p.normal_(0, 0.05, generator=gen)
    callback = LoraExport()
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, checkpoint],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, PromptDataModule(str(PROMPTS), batch_size=2, group_size=3, seed=0))
    (ckpt,) = (root / "checkpoints").glob("*.ckpt")
    return Run(module=module, root=root, ckpt=ckpt, callback=callback)


def transformer_inputs(config, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = config.sample_size
    return {
        "hidden_states": torch.randn(2, config.in_channels, size, size, generator=g),
        "encoder_hidden_states": torch.randn(2, 7, config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([250.0, 750.0]),
    }


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), metadata


def assert_same_file(a: Path, b: Path) -> None:
    (ta, ma), (tb, mb) = read(a), read(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert ma == mb


def test_diffusers_load_lora_weights_reproduces_trained_adapter(run, tiny_sd3_path, tmp_path):
    written = export_lora(run.module, tmp_path / "lora")
    assert written == tmp_path / "lora" / LORA_WEIGHT_NAME
    tensors, metadata = read(written)
    n_default = sum(".default." in k for k, _ in run.module.named_parameters() if "lora_" in k)
    assert len(tensors) == n_default  # the trained adapter only, not the "old" sampling policy
    assert all(k.startswith("transformer.") and ".default." not in k for k in tensors)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in tensors.items())
    assert '"transformer.lora_alpha": 8.0' in metadata["lora_adapter_metadata"]

    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(tiny_sd3_path), text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    pipe.load_lora_weights(written.parent)
    inputs = transformer_inputs(pipe.transformer.config)
    transformer = run.module.transformer
    with torch.no_grad():
        loaded = pipe.transformer(**inputs).sample
        with use_adapter(transformer, "default"):
            trained = transformer(**inputs).sample
        with use_adapter(transformer, "old"):
            sampling = transformer(**inputs).sample
        with use_adapter(transformer, None):
            base = transformer(**inputs).sample
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)
    assert (loaded - base).abs().max() > 1e-3  # the adapter does something
    assert (loaded - sampling).abs().max() > 1e-6  # and it is v_theta, not v_old


def test_export_from_checkpoint_writes_the_same_file(run, tmp_path):
    direct = export_lora(run.module, tmp_path / "direct")
    from_ckpt = export_checkpoint(run.ckpt, tmp_path / "ckpt", local_files_only=True)
    assert from_ckpt == tmp_path / "ckpt" / LORA_WEIGHT_NAME
    assert_same_file(direct, from_ckpt)


def test_callback_writes_the_adapter_under_log_dir(run, tmp_path):
    expected = run.root / "lora" / LORA_WEIGHT_NAME  # logger=False: log_dir is default_root_dir
    assert run.callback.path == expected and expected.is_file()
    assert_same_file(expected, export_lora(run.module, tmp_path / "direct"))
    with pytest.raises(ValueError, match="relative"):
        LoraExport(dirname="/abs/lora")


def marble_export(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "marble_pl.cli", "export", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_marble_export_cli(run, tmp_path):
    out = tmp_path / "cli_lora"
    proc = marble_export("--ckpt_path", str(run.ckpt), "--out_dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert str(out / LORA_WEIGHT_NAME) in proc.stdout
    assert_same_file(out / LORA_WEIGHT_NAME, export_lora(run.module, tmp_path / "direct"))

    missing = tmp_path / "nope.ckpt"
    proc = marble_export("--ckpt_path", str(missing), "--out_dir", str(out), cwd=tmp_path)
    assert proc.returncode == 1
    assert f"marble export: error: checkpoint not found: {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--ckpt_path",
        "--out_dir",
        "--pretrained_model_name_or_path",
        "--local_files_only",
    ):
        assert flag in text
    with pytest.raises(SystemExit) as info:
        main(["--out_dir", "x"])  # --ckpt_path is required
    assert info.value.code == 2
    assert "--ckpt_path" in capsys.readouterr().err


def test_marble_main_dispatches_export(tmp_path, capsys):
    from marble_pl.cli import main as marble_main

    with pytest.raises(SystemExit) as info:
        marble_main(["export", "--ckpt_path", str(tmp_path / "x.ckpt"), "--out_dir", "y"])
    assert info.value.code == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_checkpoint_without_lora_weights_is_a_clear_error(run, tmp_path, capsys):
    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {"transformer.proj_out.weight": torch.zeros(2, 2)}
    bad = tmp_path / "no_lora.ckpt"
    torch.save(checkpoint, bad)
    with pytest.raises(LoraExportError, match="has no LoRA weights"):
        export_checkpoint(bad, tmp_path / "out")
    assert main(["--ckpt_path", str(bad), "--out_dir", str(tmp_path / "out")]) == 1
    assert "has no LoRA weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_checkpoint_that_does_not_fit_the_model_is_an_error(run, tmp_path):
    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    dropped = next(k for k in checkpoint["state_dict"] if "lora_A.default" in k)
    del checkpoint["state_dict"][dropped]
    partial = tmp_path / "partial.ckpt"
    torch.save(checkpoint, partial)
    with pytest.raises(LoraExportError, match="1 LoRA tensors missing"):
        export_checkpoint(partial, tmp_path / "out")

    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["lora_rank"] = 2  # the tensors are rank 4
    wrong_rank = tmp_path / "rank.ckpt"
    torch.save(checkpoint, wrong_rank)
    with pytest.raises(LoraExportError, match="do not fit"):
        export_checkpoint(wrong_rank, tmp_path / "out")


def test_export_lora_needs_the_adapter(tiny_sd3_path, tmp_path):
    module = make_module(tiny_sd3_path)
    with pytest.raises(LoraExportError, match="configure_model"):
        export_lora(module, tmp_path)
    module.configure_model()
    with pytest.raises(LoraExportError, match="adapters present"):
        export_lora(module, tmp_path, adapter_name="nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraExportError, match="not a directory"):
        export_lora(module, tmp_path / "file")


def _readme_lora_snippets() -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("**The LoRA.**", 1)[1]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:3]]


def test_readme_lora_snippet_runs_on_the_tiny_pipeline(run, tiny_sd3_path, tmp_path):
    """The README's first LoRA snippet, as written, on the tiny run's files (issue 23, item 8):
    no error, and no deprecation warning from diffusers."""
    import warnings

    tiny, sd35 = _readme_lora_snippets()
    lora = tmp_path / "lora"
    export_lora(run.module, lora)
    assert '"runs/tiny-sd3"' in tiny and '"runs/tiny/version_0/lora"' in tiny
    code = tiny.replace('"runs/tiny-sd3"', repr(str(tiny_sd3_path))).replace(
        '"runs/tiny/version_0/lora"', repr(str(lora))
    )
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.filterwarnings("error", message=".*deprecated.*")
        exec(compile(code, "README.md", "exec"), scope)
    assert scope["image"].size == (32, 32)
    code_lines = [line for line in sd35.splitlines() if not line.strip().startswith("#")]
    assert "dtype=torch.bfloat16" in sd35 and not any("torch_dtype" in ln for ln in code_lines)
