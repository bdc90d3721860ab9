"""Export the trained LoRA adapter in diffusers' format (``pipe.load_lora_weights(out_dir)``).

Two routes write the same file, ``<out_dir>/pytorch_lora_weights.safetensors``:

* :func:`export_lora` from a live :class:`~marble_pl.module.MarbleModule` (or its transformer):
  the ``"default"`` adapter (``v_theta``, the one the optimizer trains; the ``"old"`` sampling
  policy is left out), written with diffusers' own ``StableDiffusion3Pipeline.save_lora_weights``
  and the adapter's peft config as metadata, so ``lora_alpha`` / target modules survive.
* :func:`export_evaluated`: what ``marble export`` and the ``LoraExport`` callback write, the
  adapter that was EVALUATED. With ``model.eval_ema_decay`` set, validation and sample grids
  sample the evaluation EMA of the trained adapter (as DiffusionNFT, whose checkpoints save
  the EMA weights): it goes to ``<out_dir>`` and the raw trained adapter to ``<out_dir>_raw``
  (e.g. ``lora/`` and ``lora_raw/``). Without the EMA, ``<out_dir>`` holds the trained adapter.
* :func:`export_checkpoint` from a Lightning checkpoint of a marble run: rebuilds the module from
  the checkpoint's hyper-parameters, loads its ``lora_`` weights (every one must find its layer)
  and calls :func:`export_evaluated`. Also the ``marble export`` command::

      marble export --ckpt_path runs/marble/version_0/checkpoints/last.ckpt --out_dir lora/

Load the result with plain diffusers::

    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    pipe.load_lora_weights("lora/")

Sharded strategies (FSDP, DeepSpeed stage 3) hold only a shard of each LoRA tensor per rank: export
from the checkpoint there, not from the live module.
"""

from __future__ import annotations

import argparse
import inspect
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from marble_pl.errors import MarbleUserError
from marble_pl.models import DEFAULT_ADAPTER, is_lora_key

if TYPE_CHECKING:
    from marble_pl.module import MarbleModule

__all__ = [
    "LORA_WEIGHT_NAME",
    "LoraExportError",
    "export_checkpoint",
    "export_evaluated",
    "export_lora",
    "raw_dir",
    "load_lora_checkpoint",
    "main",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default: load_lora_weights(dir)
RAW_SUFFIX = "_raw"  # the trained adapter beside an exported evaluation EMA: lora/ and lora_raw/


class LoraExportError(MarbleUserError, ValueError):
    """The adapter or checkpoint cannot be exported; the message says why and what to do."""


def _transformer_of(module_or_transformer: nn.Module) -> nn.Module:
    """The peft-adapted transformer of a MarbleModule (``.transformer``) or the model itself."""
    model = module_or_transformer
    if not hasattr(model, "peft_config") and isinstance(
        getattr(model, "transformer", None), nn.Module
    ):
        model = model.transformer
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def _metadata(config: Any) -> dict[str, Any]:
    """The adapter's ``LoraConfig`` as a dict, sets sorted: the same bytes in every process."""
    return {
        k: sorted(v) if isinstance(v, set | frozenset) else v for k, v in config.to_dict().items()
    }


def export_lora(
    module_or_transformer: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    weight_name: str = LORA_WEIGHT_NAME,
) -> Path:
    """Write adapter ``adapter_name`` as diffusers LoRA weights into ``out_dir``; return the file.

    ``module_or_transformer`` is a :class:`~marble_pl.module.MarbleModule` after
    ``configure_model()`` or an SD3 transformer carrying peft adapters. The file is
    ``<out_dir>/<weight_name>`` (safetensors, float32 as trained), keyed ``transformer.<layer>.
    lora_A.weight`` / ``lora_B.weight`` with the adapter's ``LoraConfig`` as metadata, exactly what
    ``StableDiffusion3Pipeline.save_lora_weights`` writes and ``load_lora_weights(out_dir)`` reads.
    An existing file of that name is overwritten.
    """
    from diffusers import StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    transformer = _transformer_of(module_or_transformer)
    configs = getattr(transformer, "peft_config", None) or {}
    if adapter_name not in configs:
        hint = (
            "call configure_model() first"
            if not configs
            else f"adapters present: {sorted(configs)}"
        )
        raise LoraExportError(
            f"{type(module_or_transformer).__name__} has no LoRA adapter {adapter_name!r} to "
            f"export ({hint})."
        )
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    if not state:
        raise LoraExportError(f"LoRA adapter {adapter_name!r} has no weights to export.")
    layers = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LoraExportError(f"out_dir {out} exists and is not a directory.")
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(
        save_directory=out,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=_metadata(configs[adapter_name]),
        weight_name=weight_name,
        safe_serialization=True,
    )
    return out / weight_name


def raw_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Where the raw trained adapter goes beside an exported evaluation EMA: ``<out_dir>_raw``."""
    out = Path(out_dir)
    return out.with_name(out.name + RAW_SUFFIX)


def export_evaluated(
    module_or_transformer: nn.Module, out_dir: str | os.PathLike[str]
) -> tuple[Path, Path | None]:
    """Write the adapter that validation samples with to ``out_dir``; ``(file, raw file)``.

    That is the module's :attr:`~marble_pl.module.MarbleModule.eval_adapter`: the evaluation
    EMA when ``eval_ema_decay`` is set, and then the trained adapter also goes to
    :func:`raw_dir` (the second path; None without the EMA). A bare transformer exports its
    trained adapter.
    """
    adapter = getattr(module_or_transformer, "eval_adapter", DEFAULT_ADAPTER)
    written = export_lora(module_or_transformer, out_dir, adapter_name=adapter)
    if adapter == DEFAULT_ADAPTER:
        return written, None
    return written, export_lora(module_or_transformer, raw_dir(out_dir))


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (give the .ckpt file a marble run wrote, e.g. "
            "runs/<name>/version_<n>/checkpoints/last.ckpt)"
        )
    if path.is_dir():
        raise LoraExportError(
            f"{path} is a directory: give the .ckpt file itself (sharded/DeepSpeed checkpoint "
            "directories are not supported; consolidate them into one file first)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except pickle.UnpicklingError as err:
        raise LoraExportError(
            f"{path} holds objects that torch.load(weights_only=True) refuses to unpickle ({err}); "
            "marble checkpoints hold only tensors and plain values."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise LoraExportError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise LoraExportError(f"{path} is not a Lightning checkpoint (no 'state_dict').")
    return checkpoint


def _module_kwargs(hparams: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's hyper-parameters that ``MarbleModule.__init__`` takes (drops CLI extras)."""
    from marble_pl.module import MarbleModule

    accepted = set(inspect.signature(MarbleModule.__init__).parameters) - {"self"}
    return {k: v for k, v in hparams.items() if k in accepted}


def load_lora_checkpoint(
    ckpt_path: str | os.PathLike[str],
    *,
    pretrained_model_name_or_path: str | None = None,
    local_files_only: bool = False,
) -> MarbleModule:
    """Rebuild a :class:`~marble_pl.module.MarbleModule` with the LoRA weights of a checkpoint.

    The module is built from the checkpoint's ``hyper_parameters`` (``pretrained_model_name_or_path``
    overrides the base model, e.g. a local copy on an offline machine; ``local_files_only=True``
    forbids downloads, as does a checkpoint that was trained with it), ``configure_model()`` loads
    the base model and attaches the adapters (the T5 encoder is skipped: the LoRA lives on the
    transformer), then every ``lora_`` tensor of the checkpoint is loaded. A LoRA tensor with no
    matching layer, a layer with no tensor, or a shape mismatch (another base model, rank or
    target modules) is an error.
    """
    from marble_pl.module import MarbleModule

    path = Path(ckpt_path)
    checkpoint = _read_checkpoint(path)
    state = checkpoint["state_dict"]
    lora = {k: v for k, v in state.items() if is_lora_key(k)}
    if not lora:
        raise LoraExportError(
            f"{path} has no LoRA weights (none of its {len(state)} state_dict entries is a "
            "'lora_' tensor): export a checkpoint written by a marble run (MarbleModule)."
        )
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not hparams:
        raise LoraExportError(
            f"{path} has no hyper_parameters to rebuild the MarbleModule from (was it written "
            "by Trainer.save_checkpoint of a MarbleModule run?)."
        )
    kwargs = _module_kwargs(dict(hparams))
    if pretrained_model_name_or_path is not None:
        kwargs["pretrained_model_name_or_path"] = str(pretrained_model_name_or_path)
    kwargs["local_files_only"] = bool(kwargs.get("local_files_only", False) or local_files_only)
    kwargs["load_t5"] = False  # not needed for the LoRA layers; saves ~10 GB at SD3.5 scale
    kwargs["gradient_checkpointing"] = False
    module = MarbleModule(**kwargs)
    module.configure_model()
    expected = {k for k in module.state_dict() if is_lora_key(k)}
    missing, unexpected = sorted(expected - lora.keys()), sorted(lora.keys() - expected)
    if missing or unexpected:
        raise LoraExportError(
            f"the LoRA weights of {path} do not fit the model rebuilt from its hyper-parameters "
            f"(base {kwargs.get('pretrained_model_name_or_path')!r}, lora_rank "
            f"{kwargs.get('lora_rank')}, targets {list(kwargs.get('lora_target_modules', []))}): "
            f"{len(missing)} LoRA tensors missing from the checkpoint {missing[:3]}, "
            f"{len(unexpected)} with no matching layer {unexpected[:3]}."
        )
    try:
        module.load_state_dict(lora, strict=False)
    except RuntimeError as err:  # size mismatch
        raise LoraExportError(
            f"the LoRA weights of {path} do not fit the rebuilt model (another base model or "
            f"LoRA rank?): {err}"
        ) from err
    return module


def export_checkpoint(
    ckpt_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    pretrained_model_name_or_path: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """Export the evaluated adapter of a marble checkpoint; return the written weights file.

    See :func:`load_lora_checkpoint` for how the module is rebuilt and :func:`export_evaluated`
    for what is written (the evaluation EMA, and the trained adapter in ``<out_dir>_raw``, when
    the run kept one). The base model is loaded (on CPU) to check that every LoRA tensor finds
    its layer.
    """
    return _export_checkpoint(
        ckpt_path,
        out_dir,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        local_files_only=local_files_only,
    )[0]


def _export_checkpoint(
    ckpt_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    **kwargs: Any,
) -> tuple[Path, Path | None]:
    """:func:`export_checkpoint`, returning :func:`export_evaluated`'s two paths."""
    return export_evaluated(load_lora_checkpoint(ckpt_path, **kwargs), out_dir)


# ------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marble export",
        description=(
            "Export the evaluated LoRA adapter of a marble checkpoint as diffusers LoRA weights "
            f"(<out_dir>/{LORA_WEIGHT_NAME}), loadable with "
            "StableDiffusion3Pipeline.load_lora_weights(out_dir): the evaluation EMA when the "
            "run kept one (model.eval_ema_decay), the raw trained adapter then in "
            f"<out_dir>{RAW_SUFFIX}; else the trained adapter."
        ),
    )
    parser.add_argument("--ckpt_path", required=True, help="the Lightning .ckpt file of a run")
    parser.add_argument("--out_dir", required=True, help="directory to write the LoRA into")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="base SD3 model (hub id or local dir) instead of the one in the checkpoint",
    )
    parser.add_argument(
        "--local_files_only",
        action="store_true",
        help="never download the base model (also set by HF_HUB_OFFLINE=1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``marble export ...``: returns the exit status (0 ok, 1 export error, 2 usage error)."""
    from marble_pl.models import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        written, raw = _export_checkpoint(
            args.ckpt_path,
            args.out_dir,
            pretrained_model_name_or_path=args.pretrained_model_name_or_path,
            local_files_only=args.local_files_only,
        )
    except (FileNotFoundError, LoraExportError, ModelLoadError) as err:
        print(f"marble export: error: {err}", file=sys.stderr)
        return 1
    print(f"LoRA weights written to {written}")
    if raw is not None:
        print(f"(the evaluation EMA, as validated; the raw trained adapter: {raw})")
    print(f"load them with: StableDiffusion3Pipeline.load_lora_weights({str(written.parent)!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
