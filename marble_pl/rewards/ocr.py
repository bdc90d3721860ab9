"""OCR reward: how exactly an image renders the text its prompt quotes (DiffusionNFT / MARBLE)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from marble_pl.architectures import TROCR_BASE_PRINTED
from marble_pl.errors import ConfigError
from marble_pl.rewards.base import Metadata
from marble_pl.rewards.ocr_engines import (
    PaddleOCREngine,
    TrOCREngine,
    byte_level_roberta_tokenizer,
    check_paddle,
    trocr_architecture,
    vit_transform,
)
from marble_pl.rewards.ocr_rule import has_target, ocr_scores
from marble_pl.rewards.pretrained import (
    PretrainedReward,
    RewardLoadError,
    hub_guard_errors,
    load_json,
    require_local,
)
from marble_pl.rewards.registry import register_reward

__all__ = ["ENGINES", "OCRReward"]

ENGINES = ("paddle", "trocr")


@register_reward("ocr")
class OCRReward(PretrainedReward):
    """Text rendering accuracy, in ``[0, 1]``: the OCR score of DiffusionNFT and MARBLE.

    The target is the text between the prompt's first pair of double quotes; spaces are removed
    and case ignored; the score is 1 when the recognised text contains the target, else
    ``1 - min(levenshtein, len(target)) / len(target)`` (:mod:`~marble_pl.rewards.ocr_rule`).
    Prompts without a quoted target are not applicable (:meth:`applicable`): NaN, and their
    images are not read at all.

    Engines (``engine``):

    - ``paddle`` (default): PaddleOCR 2.x, English, no angle classifier, on the CPU unless
      ``use_gpu``: the official scorer, so scores compare with the paper's. Needs
      ``pip install "marble-pl[ocr]"`` (PaddlePaddle, a second framework); PaddleOCR downloads
      its models into ``~/.paddleocr`` on first use. No random-weights form.
    - ``trocr``: a transformers TrOCR (``VisionEncoderDecoderModel``, default
      ``microsoft/trocr-base-printed``, 334 M parameters), greedy decoding in batches: PyTorch
      only, follows the module's device. TrOCR reads one text line without a detector, so its
      scores are a proxy for PaddleOCR's, not the official number.

    YAML::

        model:
          rewards:
            - ocr                                     # PaddleOCR, the official score
            - {name: ocr, engine: trocr, alias: ocr_trocr, dtype: bfloat16}

    Args:
        engine: ``paddle`` or ``trocr``.
        pretrained_model_name_or_path: TrOCR hub id or ``save_pretrained`` directory.
        processor_name_or_path: tokenizer and ``preprocessor_config.json`` (default: the model's).
        max_new_tokens: TrOCR's longest decoded text, in tokens.
        batch_size: images per TrOCR ``generate`` call.
        use_gpu: run PaddleOCR on the GPU (the official scorer does not).
        build_tiny_if_missing: (``trocr``) write a tiny random TrOCR to the local
            ``pretrained_model_name_or_path`` first when it is missing (CPU smoke runs;
            :func:`marble_pl.tiny_rewards.ensure_tiny_trocr`).
        local_files_only, cache_dir, revision: passed to the hub (TrOCR).
        device, dtype, offload_to_cpu: placement of the TrOCR model, see :class:`PretrainedReward`.
    """

    def __init__(
        self,
        engine: str = "paddle",
        pretrained_model_name_or_path: str = TROCR_BASE_PRINTED,
        processor_name_or_path: str | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        use_gpu: bool = False,
        build_tiny_if_missing: bool = False,
        local_files_only: bool = False,
        cache_dir: str | None = None,
        revision: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        offload_to_cpu: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            revision=revision,
            device=device,
            dtype=dtype,
            offload_to_cpu=offload_to_cpu,
            name=name,
        )
        if engine not in ENGINES:
            close = difflib.get_close_matches(str(engine), ENGINES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"reward {self.name!r}: unknown engine {engine!r}{hint}: use one of {list(ENGINES)}"
            )
        for key, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"reward {self.name!r}: {key} must be an int >= 1, got {value!r}")
        self.engine = engine
        self.pretrained_model_name_or_path = str(pretrained_model_name_or_path)
        self.processor_name_or_path = str(processor_name_or_path or pretrained_model_name_or_path)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.use_gpu = bool(use_gpu)
        self.build_tiny_if_missing = bool(build_tiny_if_missing)
        if self.build_tiny_if_missing and engine != "trocr":
            raise ConfigError(
                f"reward {self.name!r}: build_tiny_if_missing builds a tiny TrOCR: set "
                "engine: trocr, or build_tiny_if_missing: false"
            )
        if engine == "paddle":
            check_paddle(self.name)  # at config time, not after the policy has loaded

    def applicable(self, prompts: Sequence[str], metadata: Metadata | None = None) -> Tensor:
        """Prompts that quote a target with a non-space character."""
        return torch.tensor([has_target(p) for p in prompts], dtype=torch.bool)

    def forward(
        self, images: Tensor, prompts: Sequence[str], metadata: Metadata | None = None
    ) -> Tensor:
        """Scores ``[N]``: OCR of the applicable images only, NaN elsewhere."""
        scores = torch.full((len(prompts),), math.nan, dtype=torch.float32, device=images.device)
        rows = self.applicable(prompts, metadata).nonzero().flatten().tolist()
        if rows:
            index = torch.tensor(rows, device=images.device)
            picked = super().forward(images[index], [prompts[i] for i in rows])
            scores[index] = picked.to(scores.device, torch.float32)
        return scores

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Recognise, then score each text against its prompt's target."""
        texts = self.scorer.recognize(images)  # type: ignore[union-attr, operator]
        return ocr_scores(texts, prompts).to(images.device)

    # ---------------------------------------------------------------- building the engine

    def _build(self) -> nn.Module:
        if self.engine == "paddle":
            check_paddle(self.name)
            try:
                return PaddleOCREngine(use_gpu=self.use_gpu)
            except RewardLoadError as err:
                raise RewardLoadError(f"reward {self.name!r}: {err}") from err
        return self._build_trocr()

    def _build_trocr(self) -> nn.Module:
        """``VisionEncoderDecoderModel.from_pretrained`` + tokenizer + image-processor config."""
        from transformers import AutoTokenizer, VisionEncoderDecoderModel

        name, processor = self.pretrained_model_name_or_path, self.processor_name_or_path
        if self.build_tiny_if_missing:
            from marble_pl.tiny_rewards import ensure_tiny_trocr

            ensure_tiny_trocr(name)
        try:
            require_local(name)
            model = VisionEncoderDecoderModel.from_pretrained(
                name,
                local_files_only=self.offline,
                cache_dir=self.cache_dir,
                revision=self.revision,
                dtype=self.torch_dtype,
            )
        except hub_guard_errors() as err:
            raise self._load_error(
                "the TrOCR model",
                name,
                err,
                download=f"hf download {name}",
                option="pretrained_model_name_or_path",
            ) from err
        revision = self.revision if processor == name else None
        common = {"local_files_only": self.offline, "cache_dir": self.cache_dir}
        try:
            require_local(processor)
            tokenizer = AutoTokenizer.from_pretrained(processor, revision=revision, **common)
            config = load_json(processor, "preprocessor_config.json", revision=revision, **common)
            transform = vit_transform(config)
        except (*hub_guard_errors(), ValueError) as err:
            raise self._load_error(
                "the TrOCR tokenizer / preprocessor_config.json",
                processor,
                err,
                download=f"hf download {processor}",
                option="processor_name_or_path",
            ) from err
        return self._engine(model, tokenizer, transform)

    def _build_random(self) -> nn.Module:
        """TrOCR at its real architecture with random weights and a byte-level tokenizer."""
        if self.engine == "paddle":
            raise RewardLoadError(
                f"reward {self.name!r}: engine 'paddle' has no random-weights form (PaddleOCR is "
                "not a PyTorch model): set engine: trocr for this run, or leave the reward out "
                "(marble preflight --skip ocr)"
            )
        from transformers import VisionEncoderDecoderModel

        from marble_pl.random_weights import random_module

        config = trocr_architecture(self.pretrained_model_name_or_path)
        model = random_module(lambda: VisionEncoderDecoderModel(config), self.torch_dtype)
        model.tie_weights()  # accelerate's meta init undoes the tie; redo it as loading does
        side = int(config.encoder.image_size)
        transform = vit_transform({"size": {"height": side, "width": side}})
        return self._engine(model, byte_level_roberta_tokenizer(), transform)

    def _engine(self, model: nn.Module, tokenizer: object, transform: object) -> TrOCREngine:
        return TrOCREngine(
            model,
            tokenizer,
            transform,  # type: ignore[arg-type]
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )

    def extra_repr(self) -> str:
        return f"engine={self.engine!r}, " + super().extra_repr()
