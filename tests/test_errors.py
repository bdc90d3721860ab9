"""User mistakes end with one line, ``marble: error: <setting or file, and the fix>``, exit code 2.

Each mistake runs the real CLI in-process (``marble_pl.cli.main``) on ``configs/tiny.yaml`` with
one override. Those that can be caught before the models load are asserted to be: loading is
replaced by a function that fails the test. One slow test runs the ``marble`` console script to
show no traceback reaches the terminal. The checks the CLI calls (run folder,
checkpoint file) are tested directly too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import marble_pl.policies.sd3
from marble_pl.checks import check_run_folder, load_checkpoint_file, resolution_multiple
from marble_pl.cli import main
from marble_pl.data import PromptDataModule
from marble_pl.errors import CheckpointError, ConfigError, MarbleUserError, RunFolderError
from marble_pl.module import MarbleModule

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TRAIN = ROOT / "configs" / "prompts" / "tiny_train.txt"
VAL = ROOT / "configs" / "prompts" / "tiny_val.txt"


def tiny_fit_args(tiny_sd3_path: Path, tmp_path: Path, *overrides: str) -> list[str]:
    """``fit`` on the shipped tiny config with the session's tiny SD3 and a run folder in tmp."""
    return [
        "fit",
        "--config",
        str(TINY),
        f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
        f"--data.train_file={TRAIN}",
        f"--data.val_file={VAL}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        *overrides,
    ]


def _no_load(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the model was loaded: this mistake must be reported before loading")


@pytest.fixture
def marble_error(tmp_path, monkeypatch, capsys, tiny_sd3_path):
    """Run ``marble fit`` on the tiny config plus overrides; return its last stderr line.

    Asserts exit code 2, no traceback, and that the last line is marble's one-line error. Runs
    in ``tmp_path`` (nothing is written to the repository) with loading the model forbidden.
    """
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the config's relative paths
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MARBLE_DEBUG", raising=False)
    monkeypatch.setattr(marble_pl.policies.sd3, "load_sd3", _no_load)
    monkeypatch.setattr(sys, "argv", ["marble"])  # not pytest's arguments

    def run(*overrides: str) -> str:
        args = tiny_fit_args(
            tiny_sd3_path, tmp_path, "--trainer.enable_progress_bar=false", *overrides
        )
        with pytest.raises(SystemExit) as info:
            main(args)
        err = capsys.readouterr().err
        assert info.value.code == 2, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("marble: error: "), err[-3000:]
        return last

    return run


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# --- settings: reported when the CLI builds the classes ------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--model.rewards=[brightnes]", ["model.rewards", "Did you mean 'brightness'"]),
        ("--data.group_size=1", ["data.group_size", "at least two"]),
        ("--model.optimizer.init_args.lr=-0.001", ["model.optimizer", "-0.001"]),
        ("--model.lora_rank=0", ["model.lora_rank must be >= 1", "got 0"]),
        ("--model.lora_alpha=0", ["model.lora_alpha must be > 0"]),
        ("--model.resolution=0", ["model.resolution must be a positive"]),
        ("--model.beta=2", ["model.beta must be in (0, 1]"]),
        ("--model.num_inference_steps=0", ["model.num_inference_steps"]),
        ("--data.seed=3", ["model.seed (0) and data.seed (3) differ", "--model.seed=3"]),
        ("--model.rewards=[{name: pickscore, dtype: bf16}]", ["reward 'pickscore': dtype must"]),
    ],
)
def test_bad_setting_is_one_line_before_loading(marble_error, override, expected):
    last = marble_error(override)
    for text in expected:
        assert text in last, last


def test_resolution_not_a_multiple_is_reported_from_the_configs(marble_error):
    last = marble_error("--model.resolution=30")
    assert "model.resolution=30 must be a multiple of" in last
    assert "use e.g." in last


def test_batch_size_above_the_prompt_count(marble_error):
    n = sum(1 for line in TRAIN.read_text().splitlines() if line.strip())
    last = marble_error("--data.batch_size=999")
    assert "data.batch_size=999" in last and str(TRAIN) in last
    assert "at most" in last and str(n) in last


# --- prompt files: reported by the data module's setup, before configure_model -------------


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("empty.txt", b"", "contains no prompts"),
        ("blank.txt", b"\n   \n\t\n", "contains no prompts"),
        ("latin1.txt", "a caf\u00e9\n".encode("latin-1"), "not valid UTF-8"),
        ("nokey.jsonl", b'{"text": "a red apple"}\n', "missing key 'prompt'"),
        ("bad.jsonl", b'{"prompt": "a"\n', "invalid JSON"),
    ],
)
def test_bad_prompt_file_is_one_line_before_loading(marble_error, tmp_path, name, data, expected):
    path = _write(tmp_path / name, data)
    last = marble_error(f"--data.train_file={path}")
    assert "data.train_file" in last and path in last and expected in last, last


def test_missing_prompt_file(marble_error, tmp_path):
    last = marble_error(f"--data.train_file={tmp_path / 'nope.txt'}")
    assert "data.train_file" in last and "nope.txt" in last and "not found" in last


def test_unwritable_run_folder(marble_error, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    last = marble_error(f"--trainer.logger.init_args.save_dir={blocker / 'runs'}")
    assert "run folder" in last and str(blocker) in last


# --- the checks themselves -------------------------------------------------------------------


def test_settings_errors_are_still_value_errors(tiny_sd3_path):
    with pytest.raises(ValueError, match="model.lora_rank") as info:
        MarbleModule(str(tiny_sd3_path), lora_rank=0)
    assert isinstance(info.value, ConfigError)
    with pytest.raises(ConfigError, match="data.group_size"):
        PromptDataModule("unused.txt", group_size=1)


def test_optimizer_is_probed_with_its_own_arguments():
    MarbleModule(optimizer=lambda p: torch.optim.SGD(p, lr=0.1))  # fine: nothing raised
    with pytest.raises(ConfigError, match=r"model\.optimizer: Invalid beta"):
        MarbleModule(optimizer=lambda p: torch.optim.Adam(p, betas=(1.5, 0.9)))
    with pytest.raises(ConfigError, match=r"model\.lr_scheduler"):
        MarbleModule(
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            lr_scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1),
        )


def test_resolution_multiple_reads_configs_only(tiny_sd3_path, tmp_path):
    multiple, vae_scale, patch = resolution_multiple(tiny_sd3_path, local_files_only=True)
    assert multiple == vae_scale * patch and multiple > 1
    assert resolution_multiple(tmp_path / "missing", local_files_only=True) is None


def test_tiny_model_still_to_build_skips_the_early_check(tmp_path):
    module = MarbleModule(
        str(tmp_path / "tiny-sd3"), local_files_only=True, build_tiny_if_missing=True, resolution=30
    )
    module.setup("fit")  # nothing to read yet: configure_model checks after building
    assert not (tmp_path / "tiny-sd3").exists()


def test_check_run_folder(tmp_path):
    check_run_folder(tmp_path / "new" / "runs")  # a folder still to create is fine
    assert not (tmp_path / "new").exists()  # and nothing is created
    check_run_folder(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunFolderError, match=r"is a file, not a folder.*save_dir"):
        check_run_folder(blocker / "runs")
    with pytest.raises(RunFolderError, match="trainer.default_root_dir"):
        check_run_folder(blocker, setting="trainer.default_root_dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_check_run_folder_read_only(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(RunFolderError, match="creating a file in"):
        check_run_folder(locked / "runs")


# --- checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint written by ``Trainer.save_checkpoint``, with numbers, lists and tensors."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    folder = tmp_path_factory.mktemp("ckpt")
    trainer = Trainer(
        default_root_dir=folder,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(BoringModel())
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_lightning_checkpoint_loads(lightning_checkpoint):
    checkpoint = load_checkpoint_file(lightning_checkpoint)
    assert checkpoint["global_step"] == 1 and checkpoint["state_dict"]


def test_checkpoint_with_objects_the_safe_loader_refuses(lightning_checkpoint, tmp_path):
    checkpoint = torch.load(lightning_checkpoint, weights_only=True)
    checkpoint["callbacks"]["Custom"] = {"ema": np.ones(3)}  # refused by weights_only=True
    path = tmp_path / "numpy.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="numpy.ckpt.*safe loader refuses"):
        load_checkpoint_file(path)


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.0])
def test_truncated_checkpoint_names_the_file(lightning_checkpoint, tmp_path, keep):
    data = lightning_checkpoint.read_bytes()
    path = Path(_write(tmp_path / "cut.ckpt", data[: int(len(data) * keep)]))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = _write(tmp_path / "noise.ckpt", np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="noise.ckpt.*truncated or corrupt"):
        load_checkpoint_file(path)


def test_missing_checkpoint_and_folder(lightning_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="missing.ckpt.*does not exist"):
        load_checkpoint_file(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"is a folder.*last\.ckpt"):
        load_checkpoint_file(lightning_checkpoint.parent)


def test_not_a_lightning_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"lora.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="weights.pt.*not a Lightning checkpoint"):
        load_checkpoint_file(path)
    assert issubclass(CheckpointError, MarbleUserError)


# --- the real console script -----------------------------------------------------------------


@pytest.mark.slow
def test_console_script_prints_one_line(tmp_path, tiny_sd3_path):
    marble = shutil.which("marble") or str(Path(sys.executable).with_name("marble"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MARBLE_DEBUG", None)
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the config's relative paths
    proc = subprocess.run(
        [marble, *tiny_fit_args(tiny_sd3_path, tmp_path, "--model.lora_rank=0")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("marble: error: model.lora_rank must be >= 1"), last


def test_gpu_config_on_a_machine_without_gpu_is_one_line(marble_error, monkeypatch):
    """configs/sd35.yaml asks for ``accelerator: gpu``: without one, what is needed, in one line
    (was Lightning's 34-line ``MisconfigurationException``; issue 23, item 5)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    last = marble_error("--trainer.accelerator=gpu")
    assert "trainer.accelerator is 'gpu' but this machine has no CUDA GPU" in last
    assert "--trainer.accelerator cpu" in last


def test_more_gpus_than_the_machine_has(marble_error, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    last = marble_error("--trainer.accelerator=gpu", "--trainer.devices=8")
    assert "trainer.devices is 8 but this machine has 2 CUDA GPU(s)" in last


def test_interpolation_that_cannot_resolve_is_one_line(marble_error):
    last = marble_error("--model.pretrained_model_name_or_path=${trainer.no_such_key}/tiny-sd3")
    assert "${" in last and "model.pretrained_model_name_or_path" in last


# --- runs that fail before their first step leave nothing behind (issue 23, item 7) ---------


def _versions(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "runs").rglob("version_*"))


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("--data.train_file=blank", "contains no prompts"),
        ("--model.lora_target_modules=[no_such_layer]", "no_such_layer"),
    ],
    ids=["whitespace-prompts", "bad-lora-target"],
)
def test_a_run_that_fails_before_its_first_step_leaves_no_version_folder(
    marble_error, tmp_path, monkeypatch, tiny_sd3_path, setting, expected
):
    import marble_pl.policies.sd3 as sd3_policy
    from marble_pl.models import load_sd3

    monkeypatch.setattr(sd3_policy, "load_sd3", load_sd3)  # this failure needs the model loaded
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t\n")
    setting = setting.replace("=blank", f"={blank}")
    assert expected in marble_error(setting)
    assert _versions(tmp_path) == []  # the next run is version_0 again


def test_max_steps_zero_is_an_error_not_a_silent_exit(marble_error, tmp_path):
    last = marble_error("--trainer.max_steps=0")
    assert "trainer.max_steps is 0" in last and "train nothing" in last
    assert _versions(tmp_path) == []


def test_micro_batch_larger_than_the_step_is_said(tiny_sd3_path):
    """Not silently accepted: the step runs as one micro-batch, and a warning says so."""
    from types import SimpleNamespace

    from marble_pl.settings import check_micro_batch_size

    data = SimpleNamespace(batch_size=2, group_size=4)
    module = MarbleModule(
        pretrained_model_name_or_path=str(tiny_sd3_path),
        micro_batch_size=100,
        num_inference_steps=6,
        timesteps_per_image=0.5,
    )
    with pytest.warns(UserWarning, match=r"micro_batch_size is 100 but a step has only 24"):
        check_micro_batch_size(module.hparams.micro_batch_size, data, module.timesteps_count)
    module.hparams.micro_batch_size = 24
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_micro_batch_size(module.hparams.micro_batch_size, data, module.timesteps_count)
