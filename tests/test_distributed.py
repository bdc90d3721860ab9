"""Data parallel on CPU (gloo): 2 DDP processes == 1 process on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "ddp_run.py"
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


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("space", ["output", "parameters"])
def test_ddp_matches_single_process_on_concatenated_batch(tmp_path, tiny_sd3_path, space):
    # The single process reads each step's prompts in the order rank 0's then rank 1's (as the
    # DDP run was dealt them), so global sample i is the same image in both runs.
    ddp_file = tmp_path / "ddp.txt"
    ddp_file.write_text("\n".join(PROMPTS) + "\n")
    common = {"model": tiny_sd3_path, "space": space, "steps": 2}
    ddp = run(tmp_path, "ddp", prompts=ddp_file, devices=2, batch_size=2, **common)
    dealt = [torch.load(ddp / f"rank{i}.pt")["prompts"] for i in (0, 1)]
    order = [p for step in range(2) for rank in (0, 1) for p in dealt[rank][step][::3]]
    single_file = tmp_path / "single.txt"
    single_file.write_text("\n".join(order) + "\n")
    single = run(tmp_path, "single", prompts=single_file, devices=1, batch_size=4, **common)

    r0, r1 = (torch.load(ddp / f"rank{i}.pt") for i in (0, 1))
    ref = torch.load(single / "rank0.pt")
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
    for g_ddp, g_ref in zip(r0["grams"], ref["grams"], strict=True):  # the GLOBAL Gram
        torch.testing.assert_close(g_ddp, g_ref, rtol=1e-4, atol=1e-9)
    for key, value in ref["lora"].items():
        torch.testing.assert_close(r0["lora"][key], value, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r1["lora"][key], r0["lora"][key], atol=0, rtol=0)
    moved = [k for k, v in ref["lora"].items() if ".default." in k]
    assert moved
