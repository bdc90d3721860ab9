"""Typos are one line with a did-you-mean, found before torch is imported (issue 23, items 2, 3, 10).

Each case runs the real ``marble`` entry point in a fresh interpreter and asserts the exit code,
that stderr is exactly one ``marble: error:`` line, and that neither torch nor Lightning was
imported: the answer cannot wait for the heavy stack (10 s or more on a 2-core machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from marble_pl.precheck import UsageError, did_you_mean, precheck, signature_schema

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")

PROBE = """
import sys
from marble_pl.cli import main
try:
    main(sys.argv[1:])
finally:
    heavy = sorted(m for m in ("torch", "lightning", "diffusers") if m in sys.modules)
    sys.stdout.write("HEAVY=" + ",".join(heavy) + "\\n")
"""


def marble_light(*args: str, cwd: Path, env: dict[str, str] | None = None):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    lines = proc.stderr.strip().splitlines()
    return proc, lines


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.lora_rnk", "8"], "unknown option --model.lora_rnk (did you mean --model.lora_rank?)"),
        (["--model.gradient_space", "Gramian"], "not one of parameters, gramian, output (did you mean 'gramian'?)"),
        (["--model.balancer", "upgrad"], "init_args: {weighting: UPGrad}}'"),
        (["--model.balancer", "marbel"], "(did you mean 'marble'?)"),
        (["--trainer.max_step=3"], "(did you mean --trainer.max_steps?)"),
        (["--data.batch_sze", "2"], "(did you mean --data.batch_size?)"),
        (["--model.lora_rank", "eight"], "--model.lora_rank is 'eight', not an int"),
        (["--model.beta=abc"], "--model.beta is 'abc', not a float"),
        (["--model.beta=2"], "model.beta must be in (0, 1]"),
        (["--model.lora_rank=0"], "model.lora_rank must be >= 1"),
        (["--model.guidance_scale", "4.5"], "model.guidance_scale=4.5 samples the rollouts with"),
    ],
    ids=["key", "choice", "torchjd-name", "shortcut", "trainer", "data", "int", "float",
         "beta-range", "rank-range", "cfg"],
)  # fmt: skip
def test_command_line_typos(tmp_path, args, expected):
    proc, lines = marble_light("fit", "--config", TINY, *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("marble: error: "), proc.stderr
    assert expected in lines[0]
    assert "HEAVY=\n" in proc.stdout  # answered without importing torch / Lightning
    assert not any(tmp_path.iterdir())  # and nothing written


def test_yaml_key_typo_names_file_and_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  lora_rank: 4\n  lora_rnk: 8\n")
    proc, lines = marble_light("fit", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert lines == [
        f"marble: error: {cfg}:3: model has no setting 'lora_rnk' (did you mean 'lora_rank'?); "
        "`marble fit --help` lists them"
    ]


def test_yaml_top_level_typo(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("trainer:\n  max_steps: 1\nmodle:\n  beta: 1.0\n")
    with pytest.raises(
        UsageError, match=r"bad.yaml:3: unknown top-level key 'modle' \(did you mean 'model'\?\)"
    ):
        precheck(["fit", "--config", str(cfg)])


def test_yaml_syntax_error_names_the_file_not_unicode_string(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("model:\n  rewards: [brightness, saturation\n  beta: 1.0\n")
    proc, lines = marble_light("fit", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2 and len(lines) == 1
    assert lines[0].startswith(f"marble: error: {cfg}:3:")
    assert "invalid YAML" in lines[0] and "unicode string" not in lines[0]


def test_missing_config_file_suggests_the_near_one(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("model: {}\n")
    proc, lines = marble_light("fit", "--config", "configs/tinny.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and len(lines) == 1
    assert "config file configs/tinny.yaml does not exist" in lines[0]
    assert "(did you mean 'configs/tiny.yaml'?)" in lines[0]


def test_gramian_weighting_without_torchjd_is_one_line(tmp_path):
    # torchjd hidden from this interpreter: a site folder whose torchjd package cannot be found
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torchjd' or name.startswith('torchjd.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    spec = "{class_path: marble_pl.balancers.GramianWeighting, init_args: {weighting: UPGrad}}"
    env = {"PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc, lines = marble_light(
        "fit", "--config", TINY, "--model.balancer", spec, cwd=tmp_path, env=env
    )
    assert proc.returncode == 2, proc.stderr
    assert lines == [
        "marble: error: --model.balancer: GramianWeighting needs torchjd, which is not "
        'installed: run pip install "marble-pl[balancers]"'
    ]


def test_valid_commands_pass_the_precheck():
    precheck(["fit", "--config", TINY, "--model.lora_rank", "8", "--trainer.max_steps=3"])
    precheck(["fit", "--config", TINY, "--model.balancer", "weighted_sum", "--model.beta=0.1"])
    precheck(["fit", "--config", str(ROOT / "configs" / "sd35.yaml"), "--print_config"])
    precheck(["fit", "--config", TINY, "--model.eval_ema_decay", "null", "--help"])
    precheck(["export", "--whatever"])  # not a LightningCLI subcommand: not checked here


def test_schema_follows_the_real_signatures():
    import inspect

    from lightning.pytorch import Trainer

    from marble_pl.data import PromptDataModule
    from marble_pl.module import MarbleModule

    for section, cls in (("model", MarbleModule), ("data", PromptDataModule), ("trainer", Trainer)):
        params = list(inspect.signature(cls.__init__).parameters)[1:]
        assert sorted(signature_schema(section).options) == sorted(params)
    choices = signature_schema("model").options["gradient_space"].choices
    assert set(choices) == {"parameters", "gramian", "output"}


def test_did_you_mean():
    assert did_you_mean("Gramian", ["gramian", "output"]) == " (did you mean 'gramian'?)"
    assert did_you_mean("zzz", ["gramian", "output"]) == ""


def test_every_missing_prompt_file_is_named_at_once(tmp_path):
    proc, lines = marble_light(
        "fit", "--config", TINY, "--data.train_file", "a.txt", "--data.val_file=b.txt", cwd=tmp_path
    )
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "prompt files not found: data.train_file 'a.txt' and data.val_file 'b.txt'" in lines[0]
    assert "HEAVY=\n" in proc.stdout
    # validate reads only the validation prompts; --print_config reads none
    with pytest.raises(UsageError, match=r"prompt file not found: data.val_file 'b.txt'"):
        precheck(["validate", "--config", TINY, "--data.train_file=a.txt", "--data.val_file=b.txt"])
    precheck(["fit", "--config", TINY, "--data.train_file=a.txt", "--print_config"])
