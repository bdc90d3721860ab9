"""The progress bar counts optimizer steps of the whole run, resumes included (issue 23, item 8)."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from marble_pl.callbacks import MarbleTQDMProgressBar
from torch.utils.data import DataLoader


class Tiny(LightningModule):
    """Three batches an epoch, one optimizer step a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(torch.randn(6, 2), batch_size=2)


class Seen(Callback):
    """What the bar shows after each step: (n, total, description)."""

    def __init__(self, bar: MarbleTQDMProgressBar) -> None:
        self.bar, self.shown = bar, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tqdm = self.bar.train_progress_bar
        self.shown.append((tqdm.n, tqdm.total, tqdm.desc))


def fit(tmp_path, max_steps: int, ckpt_path=None) -> list[tuple]:
    bar = MarbleTQDMProgressBar()
    seen = Seen(bar)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        default_root_dir=tmp_path,
        enable_model_summary=False,
        callbacks=[bar, seen, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    trainer.fit(Tiny(), ckpt_path=ckpt_path)
    return seen.shown


def test_bar_counts_steps_across_epochs_and_a_resume(tmp_path):
    first = fit(tmp_path, max_steps=4)  # epochs of 3 batches: the bar does not restart at 3
    assert [(n, total) for n, total, _ in first] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    resumed = fit(tmp_path, max_steps=8, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [(n, total) for n, total, _ in resumed] == [(5, 8), (6, 8), (7, 8), (8, 8)]
    assert resumed[-1][2].startswith("step 8/8")
