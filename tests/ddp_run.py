"""Run a few tiny MARBLE steps (used by test_distributed.py, once with DDP and once without).

Saves, from every rank, the applied coefficients of each step and the final LoRA weights (and,
with ``--val_prompts``, the validation metrics of the starting policy, measured before training).
Lightning's DDP launcher re-executes this script for the other ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from marble_pl.data import PromptDataModule  # noqa: E402
from marble_pl.module import MarbleModule  # noqa: E402


class Record(Callback):
    def __init__(self) -> None:
        self.raw: list[list[float]] = []
        self.applied: list[list[float]] = []
        self.prompts: list[list[str]] = []
        self.grams: list[torch.Tensor | None] = []
        self.r: list[torch.Tensor] = []
        self.r_train: list[torch.Tensor] = []
        self.rewards: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw.append(pl_module.last_step.weights_raw.tolist())
        self.applied.append(pl_module.last_step.weights.tolist())
        self.prompts.append(list(batch["prompts"]))
        gram = pl_module.last_step.gram  # None for the weighted-sum baseline
        self.grams.append(None if gram is None else gram.clone())
        self.r.append(pl_module.last_step.r.clone())
        self.r_train.append(pl_module.last_step.r_train.clone())
        self.rewards.append(pl_module.last_step.rewards.clone())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--space", default="output")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--advantage_std", default="group", choices=("group", "global"))
    parser.add_argument("--balancer", default="marble")
    parser.add_argument("--timesteps_per_image", type=int, default=1)
    parser.add_argument("--micro_batch_size", type=int, default=None)
    parser.add_argument("--noise_level", type=float, default=0.0)
    parser.add_argument("--rollout_chunk_size", type=int, default=None)
    parser.add_argument("--rewards_json", default=None, help="a JSON list of reward specs")
    parser.add_argument("--val_prompts", default=None)
    parser.add_argument("--val_batch_size", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    seed_everything(0)
    # Smooth rewards by default: JPEG size (compressibility) jumps on 1-ulp image changes.
    rewards = ["brightness", "saturation", "contrast"]
    if args.rewards_json:
        rewards = json.loads(Path(args.rewards_json).read_text())
    module = MarbleModule(
        pretrained_model_name_or_path=args.model,
        local_files_only=True,
        rewards=rewards,
        gradient_space=args.space,
        advantage_std=args.advantage_std,
        balancer=args.balancer,
        timesteps_per_image=args.timesteps_per_image,
        micro_batch_size=args.micro_batch_size,
        noise_level=args.noise_level,
        rollout_chunk_size=args.rollout_chunk_size,
        lora_rank=4,
        lora_alpha=8.0,
        num_inference_steps=3,
        guidance_scale=1.0,
        resolution=32,
        max_sequence_length=16,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        gradient_clip_norm=None,
    )
    module.configure_model()
    with torch.no_grad():  # a non-trivial adapter, identical on every rank (seeded)
        gen = torch.Generator().manual_seed(1)
        for name, p in module.named_parameters():
            if "lora_B.default" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    record = Record()
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        num_sanity_val_steps=0,
    )
    data = PromptDataModule(
        args.prompts,
        args.val_prompts,
        batch_size=args.batch_size,
        group_size=3,
        shuffle=False,
        val_batch_size=args.val_batch_size,
    )
    val: dict[str, float] = {}
    if args.val_prompts:  # the starting policy's validation metrics (synced over the ranks)
        trainer.validate(module, datamodule=data, verbose=False)
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        data.val_file = None  # training then runs without validation (val_dataloader: [])
    trainer.fit(module, data)
    lora = {k: v.detach().clone() for k, v in module.named_parameters() if "lora_" in k}
    torch.save(
        {
            "raw": record.raw,
            "applied": record.applied,
            "prompts": record.prompts,
            "grams": record.grams,
            "r": record.r,
            "r_train": record.r_train,
            "rewards": record.rewards,
            "reward_names": module.reward_names,
            "val": val,
            "lora": lora,
        },
        Path(args.out) / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
