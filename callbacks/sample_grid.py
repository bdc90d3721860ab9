"""Fixed prompts and seeds sampled from the current policy, logged as image grids."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from marble_pl.data import read_prompt_records
from marble_pl.errors import ConfigError
from marble_pl.grid import image_grid, save_png
from marble_pl.models import DEFAULT_ADAPTER

__all__ = ["SampleGrid", "score_text", "validation_prompts"]


def score_text(value: float) -> str:
    """A score for the grid's caption: 4 significant digits, ``n/a`` where it is not a number
    (a reward that does not apply to the prompt scores NaN)."""
    return f"{value:.4g}" if math.isfinite(value) else "n/a"


def validation_prompts(trainer: Trainer) -> tuple[list[str], list[dict[str, Any]]]:
    """The data module's distinct validation prompts (first occurrence, in order) and their
    metadata, or a one-line error when it has none. A validation file may repeat a prompt to
    average over more noise; the grid's rows already show several seeds of each."""
    dataset = getattr(getattr(trainer, "datamodule", None), "val_dataset", None)
    if dataset is None or not len(dataset):
        raise ConfigError(
            "SampleGrid has no prompts: give it `prompts` or `prompt_file`, or give the data "
            "module validation prompts (data.val_file, or data.root with data.val_split)"
        )
    seen: set[str] = set()
    prompts, metadata = [], []
    for prompt, meta in zip(dataset.prompts, dataset.metadata, strict=True):
        key = json.dumps([prompt, meta], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
            metadata.append(dict(meta))
    return prompts, metadata


class SampleGrid(Callback):
    r"""Every ``every_n_steps`` steps and at the end of training, sample a fixed grid and log it.

    Rows are the prompts, columns ``images_per_prompt`` fixed seeds, sampled from the trained
    policy (``v_theta``, or its evaluation EMA when the module keeps one: ``eval_ema_decay``)
    with the module's evaluation sampler (``eval_num_inference_steps``, deterministic). The grid goes to TensorBoard
    (``samples/<name>``) with a text summary of every image's K reward scores
    (``samples/<name>/scores``), and to ``<log_dir>/samples/<name>_step<step>.png``. The same
    step of the same run gives byte-identical PNGs. Under DDP only global rank 0 samples and
    writes (one PNG per step); the other ranks skip the work.

    Without ``prompts`` and ``prompt_file`` the grid takes the data module's validation prompts
    (``data.val_file``, or ``data.root``'s validation split, sources interleaved) with their
    metadata, so a specialist reward (``ocr``, ``geneval``) scores the prompts it applies to;
    a score that is not applicable (NaN) shows as ``n/a`` in the text summary.

    Args:
        prompts: the prompts, or ``prompt_file`` (``.txt`` / ``.jsonl``, whose fields are the
            metadata); neither: the validation prompts. At most ``max_prompts``.
        every_n_steps: period in training steps (0: only at the end of training).
        images_per_prompt: seeds per prompt (columns).
        seed: the base seed of the fixed noise.
        name: the prompt set's name in tags and file names.
        at_start: also sample the grid before the first update (step 0: the base model, as
            the LoRA starts at zero), the "before" to compare every later grid with. A resumed
            run does not repeat it.
        min_cell_size: enlarge images smaller than this many pixels by a whole factor,
            nearest neighbour, before tiling (0: as sampled). For low-resolution tasks such as
            the 16x16 digits, whose grid is otherwise too small to read in TensorBoard.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: marble_pl.callbacks.SampleGrid
              init_args: {prompt_file: configs/prompts/tiny_val.txt, every_n_steps: 10}
    """

    def __init__(
        self,
        prompts: Sequence[str] | None = None,
        prompt_file: str | None = None,
        every_n_steps: int = 100,
        images_per_prompt: int = 2,
        seed: int = 1234,
        name: str = "validation",
        max_prompts: int = 8,
        at_start: bool = False,
        min_cell_size: int = 0,
    ) -> None:
        if prompts is not None and prompt_file is not None:
            raise ConfigError(
                "give exactly one of `prompts` or `prompt_file` to SampleGrid (or neither: the "
                "data module's validation prompts)"
            )
        if prompts is not None and not list(prompts):
            raise ConfigError("SampleGrid got an empty prompt list")
        if every_n_steps < 0 or images_per_prompt < 1 or max_prompts < 1 or min_cell_size < 0:
            raise ConfigError(
                "SampleGrid needs every_n_steps >= 0, images_per_prompt >= 1, max_prompts >= 1, "
                f"min_cell_size >= 0; got {every_n_steps}, {images_per_prompt}, {max_prompts}, "
                f"{min_cell_size}"
            )
        self.max_prompts = max_prompts
        self.prompts: list[str] = []
        self.metadata: list[dict[str, Any]] = []
        if prompts is not None:
            self._use(list(prompts), [{} for _ in prompts])
        elif prompt_file is not None:
            self._use(*read_prompt_records(prompt_file))
        self.every_n_steps = every_n_steps
        self.images_per_prompt = images_per_prompt
        self.seed = seed
        self.name = name
        self.at_start = at_start
        self.min_cell_size = min_cell_size
        self.last_path: Path | None = None
        self.log_dir: Path | None = None
        self._last_step = -1

    def _use(self, prompts: list[str], metadata: list[dict[str, Any]]) -> None:
        """Keep the first ``max_prompts`` prompts and their metadata."""
        self.prompts = prompts[: self.max_prompts]
        self.metadata = [dict(m) for m in metadata[: self.max_prompts]]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the log dir here, on every rank: ``trainer.log_dir`` is a collective. Without
        prompts of its own, take the validation prompts (the data module is set up first)."""
        self.log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not self.prompts:
            self._use(*validation_prompts(trainer))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self.render(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.render(trainer, pl_module)

    @torch.no_grad()
    def render(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        """Sample, score and log the grid for the current step on global rank 0 only.

        The other ranks return at once; nothing here is a collective (``pl_module.sample`` runs
        the bare transformer, not the DDP wrapper; the log dir was resolved in :meth:`setup`).
        """
        step = trainer.global_step
        self._last_step = step
        if not trainer.is_global_zero:
            return None
        prompts = [p for p in self.prompts for _ in range(self.images_per_prompt)]
        metadata = [dict(m) for m in self.metadata for _ in range(self.images_per_prompt)]
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        adapter = getattr(pl_module, "eval_adapter", DEFAULT_ADAPTER)  # the evaluation EMA if kept
        config = getattr(pl_module, "eval_rollout_config", None)  # evaluation sampler steps
        out = pl_module.sample(prompts, generator, adapter=adapter, config=config)
        scores = pl_module.score(out.images, prompts, metadata)
        grid = image_grid(out.images, ncol=self.images_per_prompt, min_cell_size=self.min_cell_size)
        log_dir = self.log_dir or Path(trainer.default_root_dir)
        self.last_path = save_png(grid, log_dir / "samples" / f"{self.name}_step{step:06d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"samples/{self.name}", grid, step)
                logger.experiment.add_text(
                    f"samples/{self.name}/scores", self._caption(prompts, scores, pl_module), step
                )
        return self.last_path

    def _caption(self, prompts: list[str], scores: torch.Tensor, pl_module: LightningModule) -> str:
        names = pl_module.reward_names
        rows = ["| prompt | seed | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for i, prompt in enumerate(prompts):
            vals = " | ".join(score_text(v) for v in scores[i].tolist())
            rows.append(f"| {prompt} | {i % self.images_per_prompt} | {vals} |")
        return "\n".join(rows)
