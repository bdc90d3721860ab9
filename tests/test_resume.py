"""Explicit resume: a plain re-run starts a new run; --ckpt_path resumes in the run's folder,
refuses changed shapes and applies (and lists) other changes; interrupt checkpoints are safe."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from marble_pl.callbacks import InterruptCheckpoint, PreemptionSignal
from marble_pl.callbacks.progress import _short_metrics, _step_description

from marble_pl.cli import main
from marble_pl.errors import CheckpointError, ConfigError
from marble_pl.resume import (
    check_changes,
    diff_settings,
    find_last_checkpoint,
    flatten,
    plan_resume,
    reshaped_settings,
    version_of,
)

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, tiny_sd3_path: Path, **overrides: object) -> Path:
    """The shipped tiny config with every path in ``tmp_path`` (and the session's tiny SD3)."""
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"].update(max_steps=2, val_check_interval=2, limit_val_batches=1)
    config["model"]["pretrained_model_name_or_path"] = str(tiny_sd3_path)
    config["data"]["train_file"] = str(ROOT / "configs/prompts/tiny_train.txt")
    config["data"]["val_file"] = str(ROOT / "configs/prompts/tiny_val.txt")
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = 1
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``marble <args>`` in-process: (exit code, stderr)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as stop:
        code = int(stop.code or 0)
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------- pure pieces


def test_flatten_and_diff_list_changes_and_skip_start_keys():
    old = flatten({"model": {"beta": 1.0, "rewards": ["a", "b"]}, "ckpt_path": "x"})
    new = flatten({"model": {"beta": 0.5, "rewards": ("a", "b")}, "ckpt_path": "y"})
    assert diff_settings(old, new) == [("model.beta", 1.0, 0.5)]
    cbs = flatten({"trainer": {"callbacks": [{"class_path": "A", "init_args": {"d": 1}}]}})
    assert cbs == {"trainer.callbacks.0.class_path": "A", "trainer.callbacks.0.init_args.d": 1}


def test_a_balancer_changed_from_a_name_to_a_class_is_a_fixed_change():
    old = flatten({"model": {"balancer": "marble", "beta": 1.0}})
    spec = {"class_path": "marble_pl.balancers.WeightedSum", "init_args": {"weights": None}}
    new = flatten({"model": {"balancer": spec, "beta": 1.0}})
    assert diff_settings(old, new) == []  # no key in both
    changes = reshaped_settings(old, new)
    assert [c[0] for c in changes] == ["model.balancer"]
    assert changes[0][1] == "marble" and changes[0][2]["class_path"].endswith("WeightedSum")
    with pytest.raises(ConfigError, match="model.balancer"):
        check_changes(changes, Path("x.ckpt"))
    assert reshaped_settings(new, new) == []


def test_last_is_the_newest_checkpoint_of_the_run_and_version_is_its_folder(tmp_path):
    root = tmp_path / "runs" / "tiny"
    assert find_last_checkpoint(root) is None
    older = root / "version_0" / "checkpoints" / "last.ckpt"
    newer = root / "version_1" / "checkpoints" / "interrupted-step=000007.ckpt"
    for i, path in enumerate((older, newer)):
        path.parent.mkdir(parents=True)
        torch.save({"state_dict": {}, "global_step": 5 + 2 * i}, path)
        os.utime(path, ns=(10**18 + i, 10**18 + i))
    assert find_last_checkpoint(root) == newer
    assert version_of(newer, root) == 1
    assert version_of(tmp_path / "elsewhere.ckpt", root) is None
    logger = {
        "class_path": "TensorBoardLogger",
        "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"},
    }
    config = {"trainer": {"logger": logger, "max_steps": 20}}
    plan = plan_resume("last", config)
    assert (plan.ckpt_path, plan.step, plan.version) == (newer, 7, 1)
    with pytest.raises(CheckpointError, match="nothing left to train.*max_steps N with N > 7"):
        plan_resume("last", {"trainer": {**config["trainer"], "max_steps": 7}})
    empty = {
        "trainer": {"logger": {**logger, "init_args": {"save_dir": str(tmp_path), "name": "x"}}}
    }
    plan = plan_resume("last", empty)
    assert plan.ckpt_path is None and "starting a new run" in plan.message


# ----------------------------------------------------------------------- the CLI, end to end


@pytest.mark.slow
def test_rerun_starts_a_new_run_and_resume_applies_or_refuses_changes(
    tmp_path, tiny_sd3_path, capsys
):
    cfg = write_config(tmp_path, tiny_sd3_path)
    code, err = run_cli(capsys, "fit", "--config", str(cfg))
    assert code == 0, err[-3000:]
    run0 = tmp_path / "runs" / "tiny" / "version_0"
    last = run0 / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2

    # A plain re-run in the same folder is a NEW run: it restores nothing.
    code, err = run_cli(capsys, "fit", "--config", str(cfg))
    assert code == 0, err[-3000:]
    assert "Restoring states" not in err and "resuming" not in err
    run1 = tmp_path / "runs" / "tiny" / "version_1"
    assert torch.load(run1 / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2

    # Changed shapes or meaning: refused, naming old and new values; nothing is written.
    code, err = run_cli(
        capsys, "fit", "--config", str(cfg), f"--ckpt_path={last}", "--trainer.max_steps=3",
        "--model.lora_rank=8", "--model.rewards=[brightness]",
    )  # fmt: skip
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("marble: error: cannot load")
    assert "model.lora_rank: 4 (checkpoint) -> 8 (now)" in line and "model.rewards" in line
    assert "Traceback" not in err

    # The README's resume without a larger max_steps: an error, not a silent no-op.
    code, err = run_cli(capsys, "fit", "--config", str(cfg), f"--ckpt_path={last}")
    assert code == 2 and "nothing left to train" in err

    # A checkpoint from before model.family / model.distilled_guidance existed still resumes.
    state = torch.load(last, weights_only=False)
    for key in ("family", "distilled_guidance"):
        del state["hyper_parameters"][key]
    torch.save(state, last)

    # Other changes apply, are listed on one line, and the run continues in its own folder.
    config = yaml.safe_load(cfg.read_text())
    ema_cb = next(
        cb for cb in config["trainer"]["callbacks"] if "CoefficientEMA" in cb["class_path"]
    )
    ema_cb["init_args"]["decay"] = 0.5
    cfg.write_text(yaml.safe_dump(config))
    code, err = run_cli(
        capsys, "fit", "--config", str(cfg), f"--ckpt_path={last}", "--trainer.max_steps=3",
        "--model.beta=0.5", "--model.optimizer.init_args.lr=0.0005",
    )  # fmt: skip
    assert code == 0, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if ln.startswith("marble: resuming")]
    assert f"{last} (step 2) in {run0}" in line
    assert (
        "model.beta 1.0 -> 0.5" in line and "model.optimizer.init_args.lr 0.001 -> 0.0005" in line
    )
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 3
    assert state["hyper_parameters"]["beta"] == 0.5
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0005
    ema = next(v for k, v in state["callbacks"].items() if "CoefficientEMA" in k)
    assert ema["decay"] == 0.5 and ema["step"] == 3
    saved = yaml.safe_load((run0 / "config.yaml").read_text())
    assert saved["model"]["beta"] == 0.5  # the saved config records the values in force
    assert sorted(p.name for p in run0.parent.iterdir()) == ["version_0", "version_1"]


class _CrashAt(Callback):
    """Raise in ``on_train_batch_end`` at a given step (a crashing reward, say)."""

    def __init__(self, step: int | None = None, in_setup: bool = False, first: bool = False):
        self.step, self.in_setup, self.first = step, in_setup, first

    def setup(self, trainer: Trainer, pl_module: object, stage: str) -> None:
        if self.in_setup:
            raise RuntimeError("boom in setup")

    def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
        if self.first:
            raise RuntimeError("boom before the first step")

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"boom at step {self.step}")


def _fit_boring(
    tmp_path: Path, crash: _CrashAt, ckpt_path: str | None = None
) -> InterruptCheckpoint:
    cb = InterruptCheckpoint(dirpath=str(tmp_path / "ckpt"))
    trainer = Trainer(
        default_root_dir=tmp_path, max_steps=10, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, crash],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    return cb


def test_interrupt_checkpoint_never_at_setup_never_overwritten_never_deleted(tmp_path):
    _fit_boring(tmp_path, _CrashAt(in_setup=True))
    assert not (tmp_path / "ckpt").exists()  # a set-up failure writes no checkpoint

    cb = _fit_boring(tmp_path, _CrashAt(step=3))
    first = tmp_path / "ckpt" / "interrupted-step=000003.ckpt"
    assert cb.last_path == first and torch.load(first, weights_only=False)["global_step"] == 3
    stamp = first.stat().st_mtime_ns

    # Resumed and crashed again before any new step: the checkpoint stays as it was.
    _fit_boring(tmp_path, _CrashAt(first=True), ckpt_path=str(first))
    assert first.stat().st_mtime_ns == stamp

    # A later interrupt writes a new file, and only then drops the superseded one.
    _fit_boring(tmp_path, _CrashAt(step=5), ckpt_path=str(first))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["interrupted-step=000005.ckpt"]


def test_lightning_on_exception_checkpoint_is_refused_without_ckpt_path(tmp_path, capsys):
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["trainer"]["callbacks"].append(
        {
            "class_path": "lightning.pytorch.callbacks.OnExceptionCheckpoint",
            "init_args": {"dirpath": "x"},
        }
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    code, err = run_cli(capsys, "fit", "--config", str(path))
    assert code == 2 and "InterruptCheckpoint" in err.strip().splitlines()[-1]


# ----------------------------------------------------------------------- signals


SLURM_ENV = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_JOB_NAME": "train",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "node1",
}


class _SeeSignals(Callback):
    def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
        self.sigusr1 = signal.getsignal(signal.SIGUSR1)
        trainer.should_stop = True


@pytest.mark.parametrize("slurm", [False, True])
def test_sigusr1_routing_leaves_slurm_requeue_to_lightning(monkeypatch, tmp_path, slurm):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    if slurm:
        for key, value in SLURM_ENV.items():
            monkeypatch.setenv(key, value)
    before = signal.getsignal(signal.SIGUSR1)
    pre, see = PreemptionSignal(), _SeeSignals()
    trainer = Trainer(
        default_root_dir=tmp_path, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[pre, see],
        accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(BoringModel())
    if slurm:  # Lightning's requeue handler (checkpoint + scontrol requeue), not ours
        assert pre.routed(trainer) == []
        assert see.sigusr1 != PreemptionSignal._forward
        assert type(see.sigusr1).__name__ == "_HandlersCompose"
    else:
        assert pre.routed(trainer) == [signal.SIGUSR1]
        assert see.sigusr1 == PreemptionSignal._forward
    assert signal.getsignal(signal.SIGUSR1) == before  # restored at teardown


def test_preemption_signal_records_the_signal_for_the_exit_code(monkeypatch):
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    PreemptionSignal._forward(signal.SIGUSR1, None)
    assert PreemptionSignal.received == signal.SIGUSR1
    assert sent == [(os.getpid(), signal.SIGTERM)]
    from marble_pl.cli import _interrupted_exit_code

    assert _interrupted_exit_code() == 138
    PreemptionSignal.received = None
    assert _interrupted_exit_code() == 143


# ----------------------------------------------------------------------- progress bar


def test_progress_bar_counts_steps_and_shortens_reward_names():
    class T:
        max_steps, global_step, max_epochs = 20, 7, -1

    assert _step_description(T(), 0) == "step 7/20"
    T.max_steps = -1
    T.max_epochs = 3
    assert _step_description(T(), 1) == "epoch 2/3"
    metrics = {"v_num": 0, "reward/brightness/mean": 0.5, "reward/a.b/mean": 1.0, "loss": 2.0}
    assert _short_metrics(metrics) == {"brightness": 0.5, "a.b": 1.0, "loss": 2.0}


def test_bad_ckpt_path_value_is_a_config_error():
    with pytest.raises(ConfigError, match="not supported"):
        plan_resume("best", {"trainer": {}})


def test_checkpoint_lora_keys_must_fit_the_module(tiny_sd3_path):
    from test_module import make_module

    from marble_pl.models import is_lora_key

    source = make_module(tiny_sd3_path)
    source.configure_model()
    state = {k: v.clone() for k, v in source.state_dict().items() if is_lora_key(k)}
    dropped = sorted(state)[:2]

    target = make_module(tiny_sd3_path)
    target.configure_model()
    target.on_load_checkpoint({"state_dict": dict(state)})  # the same LoRA: accepted
    broken = {k: v for k, v in state.items() if k not in dropped}
    broken["transformer.extra.lora_A.default.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"2 missing: .*; 1 unexpected: transformer\.extra"):
        target.on_load_checkpoint({"state_dict": broken})
    reshaped = dict(state)
    reshaped[dropped[0]] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="1 of another shape"):
        target.on_load_checkpoint({"state_dict": reshaped})

    # eval_ema_decay turned on at resume: the EMA adapter starts from the trained one.
    with_ema = make_module(tiny_sd3_path, eval_ema_decay=0.9)
    with_ema.configure_model()
    checkpoint = {"state_dict": dict(state)}
    with_ema.on_load_checkpoint(checkpoint)
    ema_keys = [k for k in checkpoint["state_dict"] if ".ema." in k]
    assert ema_keys
    for key in ema_keys:
        assert torch.equal(checkpoint["state_dict"][key], state[key.replace(".ema.", ".default.")])


@pytest.mark.slow
def test_validate_refuses_a_checkpoint_of_another_lora(tmp_path, tiny_sd3_path, capsys):
    cfg = write_config(tmp_path, tiny_sd3_path, trainer__max_steps=1)
    code, err = run_cli(capsys, "fit", "--config", str(cfg))
    assert code == 0, err[-3000:]
    last = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    code, err = run_cli(
        capsys, "validate", "--config", str(cfg), f"--ckpt_path={last}", "--model.lora_rank=8"
    )
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("marble: error: cannot load") and "model.lora_rank: 4" in line
