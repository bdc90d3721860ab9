"""Export the evaluated LoRA adapter in diffusers' format when training ends."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from marble_pl.errors import ConfigError
from marble_pl.export import LORA_WEIGHT_NAME, export_evaluated, raw_dir
from marble_pl.models import DEFAULT_ADAPTER

__all__ = ["LoraExport"]


class LoraExport(Callback):
    r"""At the end of training, write the evaluated adapter to ``<trainer.log_dir>/<dirname>``.

    The file is ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format (see
    :func:`marble_pl.export.export_evaluated`): the adapter validation samples with, i.e. the
    evaluation EMA when ``model.eval_ema_decay`` is set (as DiffusionNFT saves its EMA weights),
    with the raw trained adapter ``v_theta`` in ``<dirname>_raw`` (``lora/`` and ``lora_raw/``);
    else ``v_theta`` itself. Never the sampling policy ``v_old``. Load it with
    ``StableDiffusion3Pipeline.load_lora_weights(<dir>)``. Written
    by global rank 0 only, after ``fit`` ends normally (a crashed or interrupted run writes
    nothing: export its checkpoint with ``marble export --ckpt_path ... --out_dir ...``). Not for
    sharded strategies (FSDP, DeepSpeed stage 3), where each rank holds only part of the LoRA.

    Args:
        dirname: directory name under the trainer's ``log_dir`` (e.g. ``runs/tiny/version_0``;
            ``default_root_dir`` without a logger).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: marble_pl.callbacks.LoraExport
              init_args: {dirname: lora}
    """

    def __init__(self, dirname: str = "lora") -> None:
        if not dirname or Path(dirname).is_absolute():
            raise ConfigError(
                f"LoraExport(dirname=...) must be a relative directory name, got {dirname!r}"
            )
        self.dirname = dirname
        self.path: Path | None = None  # the file written, once training has ended
        self.raw_path: Path | None = None  # the trained adapter's, beside an evaluation EMA
        self.log_dir: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the log dir here, on every rank: ``trainer.log_dir`` is a collective."""
        self.log_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = (self.log_dir or Path(trainer.default_root_dir)) / self.dirname
        if trainer.is_global_zero:
            self.path, self.raw_path = export_evaluated(pl_module, out)
            rank_zero_info(f"LoraExport: LoRA weights written to {self.path}")
            if self.raw_path is not None:
                rank_zero_info(f"LoraExport: (the evaluation EMA; raw adapter: {self.raw_path})")
        else:
            self.path = out / LORA_WEIGHT_NAME
            if getattr(pl_module, "eval_adapter", DEFAULT_ADAPTER) != DEFAULT_ADAPTER:
                self.raw_path = raw_dir(out) / LORA_WEIGHT_NAME
        trainer.strategy.barrier("lora_export")
