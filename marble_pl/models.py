"""SD3 loading (hub id or local directory), tiny random SD3 builders, LoRA adapters via peft.

Everything goes through the libraries' own entry points: ``from_pretrained``/``save_pretrained``
for every component, ``transformer.add_adapter(LoraConfig)`` for LoRA and
``StableDiffusion3Pipeline.encode_prompt`` for the text conditioning.
"""

from __future__ import annotations

import copy
import json
import os
import string
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.utils import logging as diffusers_logging
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from marble_pl.errors import ConfigError, MarbleUserError
from marble_pl.tiny_build import ensure_built

__all__ = [
    "DEFAULT_ADAPTER",
    "DEFAULT_LORA_TARGETS",
    "EVAL_ADAPTER",
    "SAMPLING_ADAPTER",
    "ModelLoadError",
    "SD3Components",
    "TORCH_DTYPES",
    "add_lora",
    "add_sampling_adapter",
    "build_tiny_sd3",
    "byte_level_clip_vocab",
    "ema_update_adapter",
    "encode_prompts",
    "ensure_tiny_sd3",
    "env_offline",
    "is_lora_key",
    "load_sd3",
    "lora_init_weights",
    "looks_like_local_path",
    "lora_parameters",
    "read_model_index",
    "tiny_clip_config",
    "tiny_clip_tokenizer",
    "tiny_sd3_is_complete",
    "tiny_sd3_pipeline",
    "tiny_t5_config",
    "tiny_t5_tokenizer",
    "tiny_vae",
    "use_adapter",
]

DEFAULT_ADAPTER = "default"
SAMPLING_ADAPTER = "old"
EVAL_ADAPTER = "ema"  # an EMA of the trained adapter, for evaluation (``eval_ema_decay``)
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


class ModelLoadError(MarbleUserError, OSError):
    """SD3 weights or configs could not be found (offline, missing directory, gated repo)."""


@dataclass
class SD3Components:
    """The modules and tokenizers of a Stable Diffusion 3 pipeline, held separately.

    A Lightning module keeps them as attributes so that Lightning moves them to the device
    (``StableDiffusion3Pipeline`` itself is not an ``nn.Module``).
    """

    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModelWithProjection
    text_encoder_2: CLIPTextModelWithProjection
    text_encoder_3: T5EncoderModel | None
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    tokenizer_3: Any | None
    scheduler: FlowMatchEulerDiscreteScheduler

    @property
    def vae_scale_factor(self) -> int:
        """Pixel size of one latent cell, computed the way ``StableDiffusion3Pipeline`` does."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_prompts(
        self,
        prompts: Sequence[str],
        *,
        device: torch.device | str | None = None,
        max_sequence_length: int = 256,
    ) -> tuple[Tensor, Tensor]:
        """Encode prompts with this pipeline's text encoders (see :func:`encode_prompts`)."""
        return encode_prompts(
            prompts,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            text_encoder_3=self.text_encoder_3,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            tokenizer_3=self.tokenizer_3,
            transformer=self.transformer,
            device=device,
            max_sequence_length=max_sequence_length,
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""The weight dtypes a config may name (frozen SD3 weights, reward models)."""


def env_offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set now (the hub reads it at import)."""
    import huggingface_hub

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags) or bool(
        huggingface_hub.constants.HF_HUB_OFFLINE
    )


def looks_like_local_path(name: str) -> bool:
    """A string that can only be a filesystem path, never a hub id ``owner/name``."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).expanduser().exists()
    )


def _load_error(name: str, local_files_only: bool, reason: str, *, local: bool) -> ModelLoadError:
    """Build the user-facing error for weights that cannot be found, with the fix for its kind."""
    offline_env = env_offline()
    mode = f"local_files_only={bool(local_files_only)}"
    if offline_env:
        mode += ", HF_HUB_OFFLINE set"
    if local:
        fix = (
            "check the path, or pass a directory written by `save_pretrained` (it holds "
            "model_index.json and one subfolder per component), or a hub id such as "
            "stabilityai/stable-diffusion-3.5-medium"
        )
    else:
        fix = (
            f"on a machine with network run `huggingface-cli download {name}` (or `hf download "
            f"{name}`; gated repos need the licence accepted and `huggingface-cli login` first), "
            "then set HF_HOME to that cache here; or pass a local directory that holds a "
            "`save_pretrained` copy"
        )
        if local_files_only or offline_env:
            fix += "; or drop local_files_only / unset HF_HUB_OFFLINE to download now"
    return ModelLoadError(
        f"Could not load the SD3 pipeline {name!r} ({mode}): {reason}. Fix: {fix}."
    )


def _present(entry: Any) -> bool:
    """Whether a model_index.json entry names a component (``[null, null]`` means absent)."""
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def load_sd3(
    pretrained_model_name_or_path: str | os.PathLike[str],
    *,
    local_files_only: bool = False,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    load_t5: bool = True,
) -> SD3Components:
    """Load every SD3 component with its class's ``from_pretrained(path, subfolder=...)``.

    The same code path serves hub ids and local directories; missing weights raise
    ``ModelLoadError``. With ``local_files_only`` or ``HF_HUB_OFFLINE=1`` no network is touched.
    ``text_encoder_3`` is ``None`` when ``load_t5`` is False or model_index.json lists it as null.
    """
    from huggingface_hub.errors import HFValidationError

    name = os.fspath(pretrained_model_name_or_path)
    offline = bool(local_files_only) or env_offline()
    is_local = looks_like_local_path(name)
    if is_local:
        local = Path(name).expanduser()
        if not local.is_dir():
            raise _load_error(
                name, local_files_only, "the local directory does not exist", local=True
            )
        if not (local / "model_index.json").is_file():
            raise _load_error(
                name, local_files_only, "the directory has no model_index.json", local=True
            )
        name = str(local)
    common: dict[str, Any] = {"local_files_only": offline, "revision": revision}
    try:
        with warnings.catch_warnings():  # diffusers passes a deprecated hub argument
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            index = StableDiffusion3Pipeline.load_config(name, **common)
        entries = {k: v for k, v in index.items() if not k.startswith("_")}
        missing = [k for k in _REQUIRED if not _present(entries.get(k))]
        if missing:
            reason = f"model_index.json lists no {', '.join(missing)}"
            raise _load_error(name, local_files_only, reason, local=is_local)
        with_t5 = load_t5 and _present(entries.get("text_encoder_3"))
        parts: dict[str, Any] = {
            "transformer": SD3Transformer2DModel.from_pretrained(
                name, subfolder="transformer", torch_dtype=dtype, **common
            ),
            "vae": AutoencoderKL.from_pretrained(
                name, subfolder="vae", torch_dtype=dtype, **common
            ),
            "text_encoder": CLIPTextModelWithProjection.from_pretrained(
                name, subfolder="text_encoder", dtype=dtype, **common
            ),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                name, subfolder="text_encoder_2", dtype=dtype, **common
            ),
            "tokenizer": CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common),
            "tokenizer_2": CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **common),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(
                name, subfolder="scheduler", **common
            ),
            "text_encoder_3": None,
            "tokenizer_3": None,
        }
        if with_t5:
            parts["text_encoder_3"] = T5EncoderModel.from_pretrained(
                name, subfolder="text_encoder_3", dtype=dtype, **common
            )
            parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(
                name, subfolder="tokenizer_3", **common
            )
    except ModelLoadError:
        raise
    except (OSError, HFValidationError) as err:
        reason = f"{type(err).__name__}: {str(err).rstrip('.')}"
        raise _load_error(name, local_files_only, reason, local=is_local) from err
    return SD3Components(**parts)


# --------------------------------------------------------------------------------------------
# Tiny random SD3 (real classes, a few hundred k parameters)
# --------------------------------------------------------------------------------------------

TINY_CLIP_HIDDEN = 16  # two CLIP encoders: 16 + 16 = joint_attention_dim (encode_prompt concats)
TINY_CLIP_PROJECTION = 32  # pooled: 32 + 32 = pooled_projection_dim
TINY_JOINT_DIM = 2 * TINY_CLIP_HIDDEN
TINY_POOLED_DIM = 2 * TINY_CLIP_PROJECTION


def byte_level_clip_vocab() -> dict[str, int]:
    """The 514-entry byte-level CLIP vocab: 256 byte symbols, the same with ``</w>``, 2 specials."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({f"{s}</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIPTokenizer built from Python objects (no merges, no file, no package)."""
    return CLIPTokenizer(vocab=byte_level_clip_vocab(), merges=[], model_max_length=77)


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A character-level Unigram T5 tokenizer built from Python objects (no sentencepiece file)."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation:
        pieces += [(ch, -3.0), (f"▁{ch}", -3.5)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def tiny_clip_config(
    tokenizer: CLIPTokenizer,
    *,
    hidden_size: int = TINY_CLIP_HIDDEN,
    projection_dim: int = TINY_CLIP_PROJECTION,
) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder's config for ``tokenizer``, sized for a tiny transformer."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_t5_config(
    tokenizer: T5TokenizerFast, *, d_model: int = TINY_JOINT_DIM, feed_forward_proj: str = "relu"
) -> T5Config:
    """A 2-layer T5 encoder's config whose width ``d_model`` is the transformer's
    joint_attention_dim, as the T5 text stream needs."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj=feed_forward_proj,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def tiny_vae(*, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A 2x-downsampling VAE of 16 latent channels (32 px -> 16 x 16), as SD3's and FLUX's."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_sd3_pipeline(*, seed: int = 0, with_t5: bool = False) -> StableDiffusion3Pipeline:
    """A randomly initialised tiny SD3 pipeline of the real classes, in memory (~167k params).

    Deterministic given ``seed``; the global RNG is left untouched. Text dims follow
    ``encode_prompt``: the two CLIP hidden sizes concatenate to ``joint_attention_dim`` (32), the
    two CLIP projections to ``pooled_projection_dim`` (64), T5's ``d_model`` is 32.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=TINY_JOINT_DIM,
            caption_projection_dim=32,
            pooled_projection_dim=TINY_POOLED_DIM,
            pos_embed_max_size=32,
            dual_attention_layers=(0,),  # SD3.5's MMDiT-X self-attention branch in block 0
            qk_norm="rms_norm",  # as SD3.5
        )
        vae = tiny_vae(scaling_factor=1.5305, shift_factor=0.0609)
        tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
        text_encoder = CLIPTextModelWithProjection(tiny_clip_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer_2))
        tokenizer_3 = tiny_t5_tokenizer() if with_t5 else None
        text_encoder_3 = T5EncoderModel(tiny_t5_config(tokenizer_3)) if tokenizer_3 else None
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def build_tiny_sd3(path: str | os.PathLike[str], *, seed: int = 0, with_t5: bool = False) -> Path:
    """Build :func:`tiny_sd3_pipeline` and ``save_pretrained`` it (safetensors) to ``path``.

    For offline tests and the CPU smoke run. Returns the directory, loadable with :func:`load_sd3`.
    """
    out = Path(path)
    pipe = tiny_sd3_pipeline(seed=seed, with_t5=with_t5)
    diffusers_logger = diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils")
    level = diffusers_logger.level
    diffusers_logger.setLevel(diffusers_logging.ERROR)  # "text_encoder_3=None cannot be saved"
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        diffusers_logger.setLevel(level)
    return out


_SCHEDULER_CONFIG = "scheduler_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _weights_readable(path: Path) -> bool:
    """A weights file that is whole: a safetensors header fully present, or a non-empty ``.bin``."""
    size = path.stat().st_size
    if path.suffix != ".safetensors":
        return size > 0
    with path.open("rb") as fh:
        head = fh.read(8)
    return len(head) == 8 and 8 + int.from_bytes(head, "little") <= size


def _component_complete(folder: Path, class_name: str) -> bool:
    """Whether one component subfolder holds its config and, for a model, whole weights."""
    if not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir() if p.is_file()}
    if "Tokenizer" in class_name:
        return "tokenizer_config.json" in names
    if "Scheduler" in class_name:
        return _SCHEDULER_CONFIG in names
    weights = [folder / n for n in names if n.endswith(_WEIGHT_SUFFIXES)]
    return "config.json" in names and bool(weights) and all(map(_weights_readable, weights))


def tiny_sd3_is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a whole saved pipeline: model_index.json and every component it lists.

    A folder cut short (a crashed build, a rank that saved nothing) must be rebuilt, not loaded.
    """
    root = Path(path)
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    entries = {k: v for k, v in index.items() if not k.startswith("_") and _present(v)}
    if any(k not in entries for k in _REQUIRED):
        return False
    return all(_component_complete(root / k, str(v[1])) for k, v in entries.items())


def ensure_tiny_sd3(path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Build the tiny SD3 pipeline at ``path`` unless a complete one is already there.

    Lets the CPU smoke config point at a directory that is created on first use. A half-written
    folder (see :func:`tiny_sd3_is_complete`) is rebuilt, never loaded. Builds into a sibling
    temp directory and renames it into place, so a reader never sees a partial folder. Under
    ``torch.distributed`` call it on global rank 0 only (transformers saves text encoders on
    rank 0 only) and have the other ranks wait at a barrier: ``MarbleModule`` does so.
    """
    return ensure_built(
        path,
        lambda tmp: build_tiny_sd3(tmp, **kwargs),
        tiny_sd3_is_complete,
        what="tiny SD3 pipeline",
        error=ModelLoadError,
    )


def read_model_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a local pipeline directory's model_index.json (for tests and diagnostics)."""
    return json.loads((Path(path) / "model_index.json").read_text())


# --------------------------------------------------------------------------------------------
# LoRA via peft
# --------------------------------------------------------------------------------------------


def _module_matches(module_name: str, target: str) -> bool:
    """peft's suffix rule: a target matches a module named exactly so or ending in ``.target``."""
    return module_name == target or module_name.endswith(f".{target}")


LORA_INITS: dict[str, bool | str] = {"default": True, "gaussian": "gaussian"}
"""``model.lora_init`` -> peft's ``init_lora_weights``; B = 0 either way, so ``v_theta`` starts
at the base model. ``default``: A Kaiming-uniform; ``gaussian``: A ~ N(0, (1 / rank)^2), as the
official MARBLE and DiffusionNFT recipes (``init_lora_weights="gaussian"``)."""


def lora_init_weights(name: str) -> bool | str:
    """peft's ``init_lora_weights`` for a ``model.lora_init`` name; a ConfigError otherwise."""
    if name not in LORA_INITS:
        raise ConfigError(f"model.lora_init must be one of {sorted(LORA_INITS)}, got {name!r}")
    return LORA_INITS[name]


def add_lora(
    transformer: nn.Module,
    *,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    adapter_name: str = DEFAULT_ADAPTER,
    init_lora_weights: bool | str = True,
) -> list[nn.Parameter]:
    """Freeze every base weight and attach a LoRA adapter with ``transformer.add_adapter``.

    Returns the trainable LoRA parameters (the optimiser's parameter list), in float32 whatever
    the base weights' dtype (see :func:`_keep_float32`). ``alpha`` defaults to ``rank`` (scale 1).
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
    if not hasattr(transformer, "add_adapter"):
        raise TypeError(
            f"{type(transformer).__name__} has no add_adapter(); pass a diffusers model such as "
            "SD3Transformer2DModel (PeftAdapterMixin)."
        )
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    names = [n for n, _ in transformer.named_modules() if n]
    unmatched = [t for t in targets if not any(_module_matches(n, t) for n in names)]
    if not targets or unmatched:
        raise ConfigError(
            f"model.lora_target_modules: {unmatched or list(targets)} match no module of "
            f"{type(transformer).__name__}. Use module-name suffixes of its Linear layers, such as "
            f"{_linear_suffixes(transformer)[:30]}."
        )
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        target_modules=list(targets),
        init_lora_weights=init_lora_weights,
    )
    transformer.add_adapter(config, adapter_name=adapter_name)
    params = list(lora_parameters(transformer, adapter_name).values())
    _keep_float32(params)
    for p in params:
        p.requires_grad_(True)
    return params


def _keep_float32(params: Sequence[nn.Parameter]) -> None:
    """Store LoRA parameters in float32 in place (peft creates them in the base layer's dtype).

    Every adapter, trained or sampling, is float32 whatever the frozen weights' dtype: AdamW
    updates and the EMA ``v_old <- decay * v_old + (1 - decay) * v_theta`` would otherwise be
    rounded to bfloat16's 8 mantissa bits (at decay 0.999 about half the entries would never
    move). peft's LoRA forward casts the input to the LoRA weights' dtype and the sum back to the
    base layer's output dtype, so a bfloat16 base keeps bfloat16 activations.
    """
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()


def _linear_suffixes(model: nn.Module) -> list[str]:
    """Distinct LoRA-targetable suffixes (``to_q``, ``to_out.0``) of a model's Linear layers."""
    out: set[str] = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        linear = isinstance(module, nn.Linear) or isinstance(
            getattr(module, "base_layer", None), nn.Linear
        )
        if not linear or any(p.startswith("lora_") or p == "base_layer" for p in parts):
            continue
        out.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(out)


def _strip_adapter(name: str, adapter_name: str) -> str | None:
    """``a.to_q.lora_A.<adapter>.weight`` -> ``a.to_q.lora_A.weight``; None for other params."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i] == adapter_name and parts[i - 1].startswith("lora_"):
            return ".".join(parts[:i] + parts[i + 1 :])
    return None


def is_lora_key(name: str) -> bool:
    """Whether a state-dict key is a peft LoRA tensor (of any adapter): what checkpoints keep."""
    return "lora_" in name


def lora_parameters(
    transformer: nn.Module, adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, nn.Parameter]:
    """The LoRA parameters of one adapter, keyed without the adapter name so adapters zip."""
    out: dict[str, nn.Parameter] = {}
    for name, param in transformer.named_parameters():
        key = _strip_adapter(name, adapter_name)
        if key is not None:
            out[key] = param
    if not out:
        available = sorted(getattr(transformer, "peft_config", {}) or {})
        raise ValueError(
            f"Adapter {adapter_name!r} has no LoRA parameters on {type(transformer).__name__}; "
            f"adapters present: {available}. Call add_lora() first."
        )
    return out


def _zip_adapters(
    transformer: nn.Module, src: str, dst: str
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Matching (src, dst) LoRA tensors of two adapters, checked to have the same layout."""
    a, b = lora_parameters(transformer, src), lora_parameters(transformer, dst)
    if a.keys() != b.keys():
        raise ValueError(
            f"Adapters {src!r} and {dst!r} target different modules; create {dst!r} with "
            "add_sampling_adapter() so it mirrors the source."
        )
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(
                f"LoRA tensor {k} differs in shape: {src}={tuple(a[k].shape)}, "
                f"{dst}={tuple(b[k].shape)}."
            )
    keys = list(a)
    return [a[k] for k in keys], [b[k] for k in keys]


def add_sampling_adapter(
    transformer: nn.Module, src: str = DEFAULT_ADAPTER, dst: str = SAMPLING_ADAPTER
) -> None:
    """Add adapter ``dst`` as a frozen copy of ``src``: DiffusionNFT's sampling policy ``v_old``.

    ``src`` stays the active (trained) adapter; ``dst`` is only used inside ``use_adapter(dst)``.
    ``dst`` is stored in float32 whatever the base weights' dtype, as :func:`add_lora`'s adapter.
    """
    peft_config = getattr(transformer, "peft_config", None) or {}
    if src not in peft_config:
        raise ValueError(
            f"Source adapter {src!r} not found (adapters: {sorted(peft_config)}); "
            "call add_lora() first."
        )
    if dst in peft_config:
        raise ValueError(f"Adapter {dst!r} already exists on the transformer; pick another name.")
    flags = {p: p.requires_grad for p in transformer.parameters()}
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: intended
        warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
        transformer.add_adapter(copy.deepcopy(peft_config[src]), adapter_name=dst)  # activates dst
    transformer.set_adapter(src)
    for p, flag in flags.items():
        p.requires_grad_(flag)
    src_params, dst_params = _zip_adapters(transformer, src, dst)
    _keep_float32(dst_params)
    with torch.no_grad():
        for s, d in zip(src_params, dst_params, strict=True):
            d.copy_(s)
            d.requires_grad_(False)


@torch.no_grad()
def ema_update_adapter(
    transformer: nn.Module, *, src: str = DEFAULT_ADAPTER, dst: str = SAMPLING_ADAPTER, decay: float
) -> None:
    """In place ``dst = decay * dst + (1 - decay) * src`` for every LoRA tensor (v_old <- EMA)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
    src_params, dst_params = _zip_adapters(transformer, src, dst)
    # two rounded products then a sum: bit-equal to `decay * dst + (1 - decay) * src`
    torch._foreach_mul_(dst_params, decay)
    torch._foreach_add_(dst_params, torch._foreach_mul(src_params, 1.0 - decay))


def _tuner_layers(transformer: nn.Module) -> list[Any]:
    """All peft tuner layers (LoRA-wrapped modules) of the model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def _activate(layers: Sequence[Any], name: str | list[str] | None) -> None:
    """Make ``name`` the active adapter on every tuner layer (None: disable all adapters)."""
    for layer in layers:
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.set_adapter(name)
            if layer.disable_adapters:
                layer.enable_adapters(True)


@contextmanager
def use_adapter(transformer: nn.Module, name: str | None) -> Iterator[None]:
    """Run forwards inside the block with adapter ``name`` (None: the base model, adapters off).

    peft's ``set_adapter``/``disable_adapters`` flip ``requires_grad`` of adapter weights (the
    activated one becomes trainable); here every flag is kept as it was, inside the block and after.
    On exit the previously active adapter (normally "default") is active again. Works on the peft
    tuner layers directly: diffusers' ``set_adapter`` re-reads package metadata on every call.
    """
    layers = _tuner_layers(transformer)
    if not layers:
        raise ValueError(
            "use_adapter() needs a transformer with LoRA adapters; call add_lora() first."
        )
    available = getattr(transformer, "peft_config", None) or {}
    if name is not None and name not in available:
        raise ValueError(f"Adapter {name!r} not found; adapters present: {sorted(available)}.")
    previous = list(layers[0].active_adapters)
    was_disabled = bool(layers[0].disable_adapters)
    flags = [(p, p.requires_grad) for p in transformer.parameters()]

    def restore_flags() -> None:
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)

    try:
        _activate(layers, name)
        restore_flags()
        yield
    finally:
        _activate(layers, previous)
        if was_disabled:
            _activate(layers, None)
        restore_flags()


# --------------------------------------------------------------------------------------------
# Text conditioning
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(
    prompts: Sequence[str],
    *,
    text_encoder: CLIPTextModelWithProjection,
    text_encoder_2: CLIPTextModelWithProjection,
    tokenizer: CLIPTokenizer,
    tokenizer_2: CLIPTokenizer,
    text_encoder_3: T5EncoderModel | None = None,
    tokenizer_3: Any | None = None,
    transformer: SD3Transformer2DModel | None = None,
    device: torch.device | str | None = None,
    max_sequence_length: int = 256,
) -> tuple[Tensor, Tensor]:
    """SD3 text conditioning ``(prompt_embeds [N, 77 + L, D], pooled [N, P])`` via diffusers.

    Calls ``StableDiffusion3Pipeline.encode_prompt`` without CFG. ``transformer`` is needed when
    ``text_encoder_3`` is None (the T5 stream is then zeros of width ``joint_attention_dim``).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_prompts() got an empty prompt list.")
    if (text_encoder_3 is None) != (tokenizer_3 is None):
        raise ValueError("Pass text_encoder_3 and tokenizer_3 together (or neither).")
    if text_encoder_3 is None and transformer is None:
        raise ValueError(
            "Without text_encoder_3, encode_prompts() needs transformer= (its joint_attention_dim "
            "sizes the zero T5 stream)."
        )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=None,
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    device = torch.device(device) if device is not None else text_encoder.device
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=device,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return prompt_embeds, pooled
