"""Data parallel on CPU (gloo): 2 DDP processes == 1 process on the concatenated batch."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from masked_rewards import spec as masked_spec
from test_reward_models import build_reward_weights, specs

from marble_pl.models import tiny_sd3_is_complete

SCRIPT = Path(__file__).resolve().parent / "ddp_run.py"
REPO = Path(__file__).resolve().parent.parent
PROMPTS = [f"prompt {i}: a {c} object" for i, c in enumerate(["red", "green", "blue", "white"])]


def run(tmp_path: Path, name: str, **kw) -> Path:
    out = tmp_path / name
    out.mkdir()
    args = [sys.executable, str(SCRIPT), "--out", str(out)]
    for key, value in kw.items():
        args += [f"--{key}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def ddp_and_single(tmp_path: Path, **common) -> tuple[dict, dict, dict, list[str]]:
    """Rank 0's and rank 1's records of a 2-process run, the 1-process run's, and its prompts.

    The single process reads each step's prompts in the order rank 0's then rank 1's (as the
    DDP run was dealt them), so global sample i is the same image in both runs.
    """
    ddp_file = tmp_path / "ddp.txt"
    ddp_file.write_text("\n".join(PROMPTS) + "\n")
    ddp = run(tmp_path, "ddp", prompts=ddp_file, devices=2, batch_size=2, **common)
    dealt = [torch.load(ddp / f"rank{i}.pt")["prompts"] for i in (0, 1)]
    steps = len(dealt[0])
    order = [p for step in range(steps) for rank in (0, 1) for p in dealt[rank][step][::3]]
    single_file = tmp_path / "single.txt"
    single_file.write_text("\n".join(order) + "\n")
    single = run(tmp_path, "single", prompts=single_file, devices=1, batch_size=4, **common)
    r0, r1 = (torch.load(ddp / f"rank{i}.pt") for i in (0, 1))
    return r0, r1, torch.load(single / "rank0.pt"), order


EPS32 = torch.finfo(torch.float32).eps
REDUCTION_ULPS = 100
LATER_STEP_BOUND = 2e-3  # see assert_global_grams_match
"""A Gram entry summed over the batch in another order (two ranks, then the all-reduce) differs
by a few float32 ulps of its natural scale ``sqrt(G_ii G_jj)``: measured 2.6 ulps."""


def assert_global_grams_match(grams: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
    """The global Gram of each step equals the 1-process run's, to float32 round-off.

    Entries are compared at their natural scale, ``sqrt(G_ii G_jj)`` (an off-diagonal entry can
    cancel to ~0, where a relative test is meaningless). Step 1 sees the same weights in both runs:
    only the reduction order differs, so <= REDUCTION_ULPS ulps (measured 3.1e-7 = 2.6 ulps). A
    later step's weights already differ by step 1's round-off, moved by an update of lr 0.5, and
    how much that moves the Gram depends on the batch: measured 4.7e-5 (output), 7.5e-5
    (parameters), 2.2e-4 (gramian) at step 2 over two rollout noises, against LATER_STEP_BOUND =
    2e-3. A missing all-reduce, or a rank's half batch counted alone, is off by O(1).
    """
    assert len(grams) == len(refs) > 0
    for step, (g, ref) in enumerate(zip(grams, refs, strict=True)):
        g, ref = g.double(), ref.double()
        scale = ref.diag().clamp_min(0).sqrt()
        err = float(((g - ref).abs() / torch.outer(scale, scale)).max())
        bound = REDUCTION_ULPS * EPS32 if step == 0 else LATER_STEP_BOUND
        assert err <= bound, (
            f"step {step + 1}: Gram differs by {err:.2e} of its scale > {bound:.2e}"
        )


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    ("space", "recipe"),
    [
        ("output", {}),
        ("parameters", {}),
        # 2 timesteps per image in micro-batches of 4 pairs: the balance and the one update
        # accumulate over micro-batches AND ranks (DDP syncs the gradient once, at the last).
        ("output", {"timesteps_per_image": 2, "micro_batch_size": 4}),
        # The tapped per-sample gradients: exact per-reward gradients all-reduced as in
        # `parameters` space, so the global Gram equals the single process's.
        ("gramian", {"timesteps_per_image": 2, "micro_batch_size": 4}),
        # SDE rollouts: every sample's step noise has its own generator (global index).
        ("gramian", {"noise_level": 0.7}),
    ],
    ids=["output", "parameters", "output-micro-batches", "gramian-micro-batches", "gramian-sde"],
)
def test_ddp_matches_single_process_on_concatenated_batch(tmp_path, tiny_sd3_path, space, recipe):
    common = {"model": tiny_sd3_path, "space": space, "steps": 2, "advantage_std": "group"}
    common.update(recipe)
    r0, r1, ref, order = ddp_and_single(tmp_path, **common)
    # Every rank applied the very same coefficients ...
    assert r0["applied"] == r1["applied"]
    # ... equal to the single process's, step by step.
    torch.testing.assert_close(
        torch.tensor(r0["raw"]), torch.tensor(ref["raw"]), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        torch.tensor(r0["applied"]), torch.tensor(ref["applied"]), atol=1e-4, rtol=1e-4
    )
    assert len(ref["applied"]) == 2
    assert [p[::3] for p in ref["prompts"]] == [order[:4], order[4:]]
    assert_global_grams_match(r0["grams"], ref["grams"])
    for key, value in ref["lora"].items():
        torch.testing.assert_close(r0["lora"][key], value, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r1["lora"][key], r0["lora"][key], atol=0, rtol=0)
    moved = [k for k, v in ref["lora"].items() if ".default." in k]
    assert moved


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("balancer", ["weighted_sum"])  # marble: the every-reward test below
def test_global_advantage_std_spans_the_ranks(tmp_path, tiny_sd3_path, balancer):
    # advantage_std: global divides by the std of the GLOBAL batch (DiffusionNFT's default): each
    # rank's optimality probabilities are the rows of the 1-process run on the concatenated batch.
    common = {"model": tiny_sd3_path, "steps": 2, "advantage_std": "global", "balancer": balancer}
    r0, r1, ref, _ = ddp_and_single(tmp_path, **common)
    for step in range(2):
        rows = torch.cat([r0["r"][step], r1["r"][step]])  # [N, K] per reward, whatever balancer
        assert rows.shape == ref["r"][step].shape == (12, 3)
        torch.testing.assert_close(rows, ref["r"][step], atol=1e-5, rtol=1e-5)
        assert not torch.all(rows == 0.5)  # a real signal, not all neutral
        trained = torch.cat([r0["r_train"][step], r1["r_train"][step]])  # weighted_sum: R @ w
        torch.testing.assert_close(trained, ref["r_train"][step], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.tensor(r0["applied"]), torch.tensor(ref["applied"]), atol=1e-4, rtol=1e-4
    )
    for key, value in ref["lora"].items():
        torch.testing.assert_close(r0["lora"][key], value, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r1["lora"][key], r0["lora"][key], atol=0, rtol=0)


# Each applies to some of PROMPTS only (NaN elsewhere); "white" sits on one rank in each step
# (per step, rank 0 and rank 1 get two prompts each), so the other rank has no sample of "c".
MASKED_REWARDS = [
    masked_spec("a", ["red", "blue"], "brightness"),
    masked_spec("b", ["green", "white", "red"], "red"),
    masked_spec("c", ["white"], "contrast"),
]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "space", ["output", "gramian"], ids=["output-micro-batches", "gramian-micro-batches"]
)
def test_ddp_with_rewards_that_apply_to_some_samples_equals_one_process(
    tmp_path, tiny_sd3_path, space
):
    """Masked advantages (group means and the GLOBAL std over each reward's applicable
    samples), per-reward losses averaged over their valid pairs with the GLOBAL count (a rank
    may hold none of a reward's samples), balance and update: 2 processes equal 1.

    Tolerances as the unmasked DDP test: float32 sums over other orders (per rank, then the
    all-reduce) move the last bits of r (~1e-7) and of the Gram (~1e-6 relative)."""
    rewards_json = tmp_path / "rewards.json"
    rewards_json.write_text(json.dumps(MASKED_REWARDS))
    common = {"model": tiny_sd3_path, "space": space, "steps": 2, "advantage_std": "global"}
    common.update(rewards_json=rewards_json, timesteps_per_image=2, micro_batch_size=4)
    r0, r1, ref, _ = ddp_and_single(tmp_path, **common)
    for step in range(2):
        rows = torch.cat([r0["r"][step], r1["r"][step]])
        torch.testing.assert_close(rows, ref["r"][step], atol=1e-5, rtol=1e-5)
        scored = torch.cat([r0["rewards"][step], r1["rewards"][step]]).isfinite()
        assert not scored.all(0).any() and scored.any(0).all()  # every reward: some, not all
        assert torch.all(rows[~scored] == 0.5)
        c_rows = [r["rewards"][step][:, 2].isfinite().any() for r in (r0, r1)]
        assert sorted(map(bool, c_rows)) == [False, True]  # "c" on one rank only
    assert r0["applied"] == r1["applied"]
    torch.testing.assert_close(
        torch.tensor(r0["applied"]), torch.tensor(ref["applied"]), atol=1e-4, rtol=1e-4
    )
    for g_ddp, g_ref in zip(r0["grams"], ref["grams"], strict=True):  # the GLOBAL Gram
        torch.testing.assert_close(g_ddp, g_ref, rtol=1e-4, atol=1e-12)
    for key, value in ref["lora"].items():
        torch.testing.assert_close(r0["lora"][key], value, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r1["lora"][key], r0["lora"][key], atol=0, rtol=0)


def shipped_rewards() -> list[str]:
    """The rewards the package registers that score every prompt (specialists such as GenEval
    and OCR need their data sets' metadata), read in a fresh process: this process's registry
    also holds the tests' own."""
    code = (
        "from marble_pl.rewards import Reward, available_rewards\n"
        "from marble_pl.rewards.registry import _REGISTRY\n"
        "print(*(n for n in available_rewards() if _REGISTRY[n].applicable is Reward.applicable))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return sorted(out.stdout.split())


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_equals_one_process_with_every_shipped_reward_and_validation(tmp_path, tiny_sd3_path):
    """All nine registered rewards (the five pretrained ones on tiny weights), trained and
    validated under 2-process DDP, give the 1-process run's rewards, ``val/reward/*``, balance
    and LoRA. Rollouts in chunks of one rank's batch and validation images one at a time make
    every image bitwise the same in both runs, so the JPEG-size reward (a step function of the
    pixels) must agree exactly too.
    """
    pretrained = specs(build_reward_weights(tmp_path / "reward_weights"))
    rewards = ["brightness", "saturation", "contrast", "compressibility", *pretrained.values()]
    rewards_json = tmp_path / "rewards.json"
    rewards_json.write_text(json.dumps(rewards))
    val_file = tmp_path / "val.txt"  # 5 prompts on 2 ranks: 3 + 2, none repeated
    val_file.write_text(
        "".join(f"a {c} vase on a table\n" for c in ("red", "blue", "green", "gray", "pink"))
    )
    common = {"model": tiny_sd3_path, "space": "gramian", "steps": 1, "advantage_std": "global"}
    common.update(rewards_json=rewards_json, rollout_chunk_size=6, val_prompts=val_file)
    common.update(val_batch_size=1)
    r0, r1, ref, _ = ddp_and_single(tmp_path, **common)
    names = ref["reward_names"]
    assert sorted(names) == shipped_rewards(), "every shipped reward, and only those"
    rows = torch.cat([r0["rewards"][0], r1["rewards"][0]])  # [12, 9], global sample order
    assert rows.shape == ref["rewards"][0].shape == (12, 9) and torch.isfinite(rows).all()
    r_rows = torch.cat([r0["r"][0], r1["r"][0]])  # advantage_std global: the GLOBAL batch's std
    torch.testing.assert_close(r_rows, ref["r"][0], atol=1e-5, rtol=1e-5)
    assert not torch.all(r_rows == 0.5)
    jpeg = names.index("compressibility")
    assert torch.equal(rows[:, jpeg], ref["rewards"][0][:, jpeg])
    torch.testing.assert_close(rows, ref["rewards"][0], atol=1e-5, rtol=1e-5)
    # val/reward/<name>: the 5 prompts' mean, the same on both ranks and equal to one process's.
    assert sorted(ref["val"]) == sorted([*(f"val/reward/{n}" for n in names), "val/reward_mean"])
    assert r0["val"] == r1["val"]
    for key, value in ref["val"].items():
        assert r0["val"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    torch.testing.assert_close(
        torch.tensor(r0["applied"]), torch.tensor(ref["applied"]), atol=1e-4, rtol=1e-4
    )
    for key, value in ref["lora"].items():
        torch.testing.assert_close(r0["lora"][key], value, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r1["lora"][key], r0["lora"][key], atol=0, rtol=0)


# Callback periods shortened for a 4-step run: every callback still fires, some more than once.
PERIODS = ("every_n_steps", "every_n_train_steps", "audit_every_n_steps")
FIT_STEPS, PERIOD = 4, 2


def shortened_tiny_config(src: Path, dst: Path) -> None:
    """configs/tiny.yaml with every callback and the logger kept, only their periods shortened."""
    config = yaml.safe_load(src.read_text())
    for callback in config["trainer"]["callbacks"]:
        args = callback.get("init_args") or {}
        for key in PERIODS:
            if args.get(key):
                args[key] = min(args[key], PERIOD)
    config["trainer"].update(val_check_interval=PERIOD, limit_val_batches=1)
    dst.write_text(yaml.safe_dump(config, sort_keys=False))


def marble_command() -> list[str]:
    """The installed ``marble`` console script next to this Python, else ``python -m``."""
    script = Path(sys.executable).with_name("marble")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "marble_pl.cli"]


def run_to_completion(args: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run a command in its own process group; on timeout kill the whole group and fail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the DDP launcher's children are in the group
        output, _ = proc.communicate()
        pytest.fail(f"`{' '.join(args)}` hung for {timeout}s; output tail:\n{output[-5000:]}")
    return proc.returncode, output


def render_steps(config: dict[str, Any], steps: int) -> list[int]:
    """The steps at which SampleGrid renders: its period, and the end of training."""
    (grid,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("SampleGrid")]
    every = (grid.get("init_args") or {}).get("every_n_steps", 0)
    periodic = {s for s in range(1, steps + 1) if every and s % every == 0}
    return sorted(periodic | {steps})


def saved_run_dir(root: Path) -> Path:
    """The one run folder under ``root``: where the CLI saved the resolved config.yaml."""
    saved = [p for p in root.rglob("config.yaml") if p.relative_to(root).parts[0] != "configs"]
    assert len(saved) == 1, saved
    return saved[0].parent


@pytest.mark.distributed
@pytest.mark.slow
def test_marble_fit_tiny_config_with_two_ddp_processes(tmp_path: Path) -> None:
    # A fresh folder: both ranks reach the tiny-model build, and every shipped callback (sample
    # grid, LoRA export, checkpoints, ...) and the TensorBoard logger run under gloo DDP.
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shortened_tiny_config(
        tmp_path / "configs" / "tiny.yaml", tmp_path / "configs" / "tiny_ddp.yaml"
    )
    args = ["fit", "--config", "configs/tiny_ddp.yaml", "--trainer.devices", "2"]
    args += ["--trainer.strategy", "ddp", "--trainer.max_steps", str(FIT_STEPS)]
    code, output = run_to_completion(marble_command() + args, tmp_path, timeout=420)

    assert code == 0, output[-5000:]
    assert "Traceback" not in output, output[-5000:]
    assert "deprecated" not in output, output[-5000:]  # no library noise on a DDP run either
    log_dir = saved_run_dir(tmp_path)  # one run, written once (by rank 0)
    resolved = yaml.safe_load((log_dir / "config.yaml").read_text())  # interpolations resolved
    assert [p.name for p in log_dir.parent.iterdir()] == [log_dir.name]
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    model = tmp_path / resolved["model"]["pretrained_model_name_or_path"]
    assert tiny_sd3_is_complete(model)
    assert [p.name for p in model.parent.glob(f".{model.name}.*")] == []  # no temp build left
    assert (log_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pngs = sorted(log_dir.rglob("*.png"))
    steps = [int(re.search(r"_step(\d+)\.png$", p.name).group(1)) for p in pngs]
    assert steps == render_steps(resolved, FIT_STEPS)  # one PNG per render step
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert [p.name for p in checkpoints].count("last.ckpt") == 1, checkpoints
