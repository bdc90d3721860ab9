"""GenEval reward in process: Mask2Former detections and CLIP colours, scored by GenEval's rules.

DiffusionNFT runs mmdet's Mask2Former Swin-S and open_clip's ViT-L/14; mmdet does not build on
our torch, so here the detector is transformers' ``Mask2FormerForUniversalSegmentation`` (Meta's
COCO instance-segmentation checkpoint) with its image processor's instance post-processing, and
CLIP is transformers' ``CLIPModel`` (the same OpenAI ViT-L/14 weights). The scoring rules are
:mod:`marble_pl.rewards.geneval_rules`. For the original pipeline use ``geneval_remote``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from marble_pl.errors import ConfigError
from marble_pl.models import tiny_clip_tokenizer
from marble_pl.rewards.base import Metadata
from marble_pl.rewards.clip_score import OPENAI_CLIP_L
from marble_pl.rewards.geneval_rules import (
    COCO_CLASSES,
    COLOR_TEMPLATES,
    COLORS,
    COUNTING_THRESHOLD,
    THRESHOLD,
    Detection,
    GenEvalResult,
    geneval_applicable,
    score_image,
)
from marble_pl.rewards.pretrained import (
    ImageTransform,
    PretrainedReward,
    RewardLoadError,
    clip_architecture,
    clip_crop_transform,
    clip_features,
    hub_guard_errors,
    load_json,
    module_dtype,
    require_local,
)
from marble_pl.rewards.registry import register_reward

__all__ = [
    "MASK2FORMER_SWIN_S_COCO",
    "GenEvalReward",
    "coco_label_names",
    "mask2former_architecture",
    "mask_boxes",
]

MASK2FORMER_SWIN_S_COCO = "facebook/mask2former-swin-small-coco-instance"

# Names a COCO detector's id2label may use where GenEval's list has another (compared with case,
# spaces, "_" and "-" ignored): COCO's own three, and older COCO / VOC spellings.
_GENEVAL_SPELLING = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "tvmonitor": "tv",
    "hairdryer": "hair drier",
    "doughnut": "donut",
}
_CROP_BACKGROUND = 153 / 255  # GenEval pastes each masked object on grey "#999"
_MMDET_LONGEST_EDGE = 1333


def coco_label_names(id2label: Mapping[int, str]) -> tuple[str, ...]:
    """GenEval's class name of each detector label, checked against :data:`COCO_CLASSES`.

    Generic names (``LABEL_0`` ...) are read as COCO's order; any other mismatch is an error.
    """
    names = [str(id2label[i]) for i in range(len(id2label))]
    if len(names) != len(COCO_CLASSES):
        raise ValueError(f"it has {len(names)} labels, not COCO's 80 instance classes")
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return COCO_CLASSES
    for i, (name, expected) in enumerate(zip(names, COCO_CLASSES, strict=True)):
        key = _squash(name)
        if _squash(_GENEVAL_SPELLING.get(key, key)) != _squash(expected):
            raise ValueError(f"label {i} is {name!r}, COCO's is {expected!r}")
    return COCO_CLASSES


def _squash(name: str) -> str:
    """A class name without case, spaces, ``_`` or ``-`` (``"Potted_Plant"`` -> ``pottedplant``)."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def mask_boxes(masks: Tensor) -> Tensor:
    """``[K, 4]`` boxes ``(x1, y1, x2 + 1, y2 + 1)`` of boolean masks ``[K, H, W]`` (mmdet's
    ``mask2bbox``, the boxes GenEval reads); an empty mask gives zeros."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [K, H], [K, W]
    height, width = masks.shape[-2:]
    boxes = torch.stack(
        [
            cols.float().argmax(dim=1),
            rows.float().argmax(dim=1),
            width - cols.flip(1).float().argmax(dim=1),
            height - rows.flip(1).float().argmax(dim=1),
        ],
        dim=1,
    ).float()
    return boxes * (rows.any(dim=1) & cols.any(dim=1))[:, None]


def mask2former_architecture(name: str) -> Any:
    """The ``Mask2FormerConfig`` of ``name``: its local or cached ``config.json``, else the
    published one shipped in :mod:`marble_pl.architectures`; a ``RewardLoadError`` otherwise."""
    from transformers import Mask2FormerConfig

    from marble_pl.architectures import shipped_mask2former_config

    try:
        return Mask2FormerConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        shipped = shipped_mask2former_config(name)
    if shipped is None:
        raise RewardLoadError(
            f"cannot build the Mask2Former {name!r} with random weights: its config.json is "
            f"neither local, cached nor shipped (shipped: {MASK2FORMER_SWIN_S_COCO})"
        )
    return Mask2FormerConfig(**shipped)


@register_reward("geneval")
class GenEvalReward(PretrainedReward):
    """GenEval's training reward for prompts with GenEval metadata (``tag``, ``include``, ...).

    Each image is run through a COCO Mask2Former; detections are kept per GenEval's rules and
    the prompt's ``include`` clauses are scored: the mean of count, colour and position
    sub-scores (1 when all is right; negative when far too many objects are found), as
    DiffusionNFT trains with. Samples without ``include`` metadata score NaN (not applicable).
    Colours are CLIP ViT-L/14 zero-shot over each object's masked crop on grey.

    After each call, for logging (``[N]`` float32 on the CPU, NaN where not applicable):
    ``last_strict_accuracy`` (1 if every count is exact and every colour and position right)
    and ``last_accuracy`` (GenEval's accuracy: at least the count, ``exclude`` honoured; NaN
    too with ``only_strict``, as DiffusionNFT trains to save CLIP calls); ``last_tags`` each
    prompt's ``tag`` (for per-tag accuracies) and ``last_results`` each image's
    :class:`GenEvalResult` (None where not applicable).

    Example (YAML)::

        model:
          rewards:
            - {name: geneval, dtype: float16}

    Args:
        detector_name_or_path: hub id or local ``save_pretrained`` directory of a COCO
            instance-segmentation ``Mask2FormerForUniversalSegmentation`` with its
            ``preprocessor_config.json``.
        clip_name_or_path: CLIP ``CLIPModel`` (weights, tokenizer, ``preprocessor_config.json``).
        detector_size: shortest edge the detector sees (longest at most 1333), as mmdet's test
            scale (1333, 800) upstream; None keeps the processor config's size.
        batch_size: images per detector forward.
        only_strict: skip the accuracy pass (``last_accuracy`` stays NaN).
        build_tiny_if_missing: write a tiny random Mask2Former and CLIP to the local
            ``detector_name_or_path`` and ``clip_name_or_path`` first when they are missing
            (CPU smoke runs; :mod:`marble_pl.tiny_rewards`; set ``detector_size: null``).
        local_files_only, cache_dir, revision: passed to the hub (``revision`` to the detector).
        device, dtype, offload_to_cpu: placement, see :class:`PretrainedReward`.
    """

    def __init__(
        self,
        detector_name_or_path: str = MASK2FORMER_SWIN_S_COCO,
        clip_name_or_path: str = OPENAI_CLIP_L,
        detector_size: int | None = 800,
        batch_size: int = 8,
        only_strict: bool = False,
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
        if detector_size is not None and not int(detector_size) >= 32:
            raise ConfigError(
                f"reward {self.name!r}: detector_size must be >= 32 pixels or null, "
                f"got {detector_size}"
            )
        if int(batch_size) < 1:
            raise ConfigError(f"reward {self.name!r}: batch_size must be >= 1, got {batch_size}")
        self.detector_name_or_path = str(detector_name_or_path)
        self.clip_name_or_path = str(clip_name_or_path)
        self.detector_size = None if detector_size is None else int(detector_size)
        self.batch_size = int(batch_size)
        self.only_strict = bool(only_strict)
        self.build_tiny_if_missing = bool(build_tiny_if_missing)
        self.processor: Any = None
        self.tokenizer: Any = None
        self.clip_transform: ImageTransform | None = None
        self.label_names: tuple[str, ...] = COCO_CLASSES
        self._color_text: dict[str, Tensor] = {}
        self._metadata: Metadata = ()
        self.last_strict_accuracy = torch.empty(0)
        self.last_accuracy = torch.empty(0)
        self.last_results: list[GenEvalResult | None] = []
        self.last_tags: list[str | None] = []
        self._last: list[GenEvalResult] = []

    # ---------------------------------------------------------------- applicability

    def applicable(self, prompts: Sequence[str], metadata: Metadata | None = None) -> Tensor:
        """Samples whose metadata carries GenEval's ``include`` clauses."""
        return geneval_applicable(metadata, len(prompts))

    def forward(
        self, images: Tensor, prompts: Sequence[str], metadata: Metadata | None = None
    ) -> Tensor:
        """Scores ``[N]``: GenEval's reward where applicable, NaN elsewhere."""
        n = images.shape[0]
        mask = self.applicable(prompts, metadata)
        scores = torch.full((n,), math.nan)
        strict, accuracy = torch.full((n,), math.nan), torch.full((n,), math.nan)
        results: list[GenEvalResult | None] = [None] * n
        tags: list[str | None] = [None] * n
        index = torch.nonzero(mask).flatten().tolist()
        if index:
            assert metadata is not None
            self._metadata = [metadata[i] for i in index]
            try:
                super().forward(images[index], [prompts[i] for i in index])
            finally:
                found, self._metadata = self._last, ()
            for i, result in zip(index, found, strict=True):
                results[i], tags[i] = result, str(metadata[i].get("tag"))
                scores[i] = result.score
                strict[i] = float(result.strict_correct)
                if result.correct is not None:
                    accuracy[i] = float(result.correct)
        self.last_strict_accuracy, self.last_accuracy, self.last_results = strict, accuracy, results
        self.last_tags = tags
        return scores.to(images.device)

    # ---------------------------------------------------------------- scoring

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Score the applicable images (their metadata set by :meth:`forward`)."""
        pixels = (images * 255).round().clamp(0, 255).to(torch.uint8)  # as saved PNGs are
        self._last = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            for b, detections in enumerate(self.detect(chunk)):
                image = chunk[b].float() / 255
                colors = self._color_fn(image)
                self._last.append(
                    score_image(
                        detections,
                        self._metadata[start + b],
                        colors,
                        only_strict=self.only_strict,
                    )
                )
        return torch.tensor([r.score for r in self._last], dtype=torch.float32)

    def detect(self, pixels: Tensor) -> list[dict[str, list[Detection]]]:
        """Per image of a uint8 batch ``[B, 3, H, W]``, the detections (score >= 0.3) by class."""
        assert self.scorer is not None and self.processor is not None
        detector = self.scorer["detector"]
        device, dtype = pixels.device, module_dtype(detector)
        height, width = pixels.shape[-2:]
        kwargs: dict[str, Any] = {}
        if self.detector_size is not None:
            longest = max(self.detector_size, _MMDET_LONGEST_EDGE)
            kwargs["size"] = {"shortest_edge": self.detector_size, "longest_edge": longest}
        arrays = [x.permute(1, 2, 0).cpu().numpy() for x in pixels]
        inputs = self.processor(images=arrays, return_tensors="pt", **kwargs)
        pixel_mask = inputs["pixel_mask"].to(device)
        outputs = detector(
            pixel_values=inputs["pixel_values"].to(device, dtype), pixel_mask=pixel_mask
        )
        outputs.class_queries_logits = outputs.class_queries_logits.float()
        outputs.masks_queries_logits = _unpadded(outputs.masks_queries_logits.float(), pixel_mask)
        found = self.processor.post_process_instance_segmentation(
            outputs,
            threshold=min(THRESHOLD, COUNTING_THRESHOLD),
            target_sizes=[(int(height), int(width))] * len(pixels),
            return_binary_maps=True,
        )
        return [self._by_class(item) for item in found]

    def _by_class(self, item: Mapping[str, Any]) -> dict[str, list[Detection]]:
        """One post-processed image as ``{class name: [Detection, ...]}``."""
        segments = item["segments_info"]
        if not segments:
            return {}
        masks = item["segmentation"].bool()
        boxes = mask_boxes(masks).tolist()
        out: dict[str, list[Detection]] = {}
        for k, segment in enumerate(segments):
            name = self.label_names[int(segment["label_id"])]
            box = (boxes[k][0], boxes[k][1], boxes[k][2], boxes[k][3])
            out.setdefault(name, []).append(Detection(box, float(segment["score"]), masks[k]))
        return out

    def _color_fn(self, image: Tensor) -> Any:
        """GenEval's colour callable for one image (``[3, H, W]`` in [0, 1]), memoised per
        detection so the accuracy pass reuses the reward pass's answers."""
        memo: dict[Detection, str] = {}

        def colors(classname: str, detections: Sequence[Detection]) -> list[str]:
            todo = [d for d in detections if d not in memo]
            if todo:
                found = self.classify_colors(image, classname, todo)
                memo.update(zip(todo, found, strict=True))
            return [memo[d] for d in detections]

        return colors

    def classify_colors(
        self, image: Tensor, classname: str, detections: Sequence[Detection]
    ) -> list[str]:
        """Zero-shot CLIP colour of each object: its mask over grey, cropped to its box."""
        assert self.scorer is not None and self.clip_transform is not None
        clip = self.scorer["clip"]
        crops = []
        for det in detections:
            x = image
            if det.mask is not None:
                x = torch.where(det.mask.to(image.device), image, _CROP_BACKGROUND)
            x1, y1, x2, y2 = (int(round(v)) for v in det.box)
            crops.append(self.clip_transform(x[None, :, y1:y2, x1:x2]))
        pixels = torch.cat(crops).to(module_dtype(clip))
        features, _ = clip_features(clip, pixel_values=pixels)
        assert features is not None
        logits = features @ self._color_embeddings(classname).to(features.device).T
        return [COLORS[i] for i in logits.argmax(dim=1).tolist()]

    def _color_embeddings(self, classname: str) -> Tensor:
        """``[10, D]``: per colour, the normalised mean of its normalised template embeddings."""
        if classname not in self._color_text:
            assert self.scorer is not None and self.tokenizer is not None
            clip = self.scorer["clip"]
            texts = [t.format(color=c, object=classname) for c in COLORS for t in COLOR_TEMPLATES]
            device = next(clip.parameters()).device
            tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            _, text = clip_features(
                clip,
                input_ids=tokens["input_ids"].to(device),
                attention_mask=tokens["attention_mask"].to(device),
            )
            assert text is not None
            mean = text.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)
            self._color_text[classname] = torch.nn.functional.normalize(mean, dim=-1)
        return self._color_text[classname]

    # ---------------------------------------------------------------- loading

    def _build(self) -> nn.Module:
        from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer
        from transformers import Mask2FormerForUniversalSegmentation as Mask2Former

        self._color_text.clear()
        name = self.detector_name_or_path
        if self.build_tiny_if_missing:
            from marble_pl.tiny_rewards import ensure_tiny_clip, ensure_tiny_mask2former

            ensure_tiny_mask2former(name)
            ensure_tiny_clip(self.clip_name_or_path)
        hub = {"local_files_only": self.offline, "cache_dir": self.cache_dir}
        try:
            require_local(name)
            detector = Mask2Former.from_pretrained(
                name, revision=self.revision, dtype=self.torch_dtype, **hub
            )
            self.processor = AutoImageProcessor.from_pretrained(name, revision=self.revision, **hub)
        except hub_guard_errors() as err:
            raise self._load_error(
                "the Mask2Former detector",
                name,
                err,
                download=f"hf download {name}",
                option="detector_name_or_path",
            ) from err
        self._check_labels(detector.config.id2label)
        clip_name = self.clip_name_or_path
        try:
            require_local(clip_name)
            clip = CLIPModel.from_pretrained(clip_name, dtype=self.torch_dtype, **hub)
            self.tokenizer = CLIPTokenizer.from_pretrained(clip_name, **hub)
            config = load_json(clip_name, "preprocessor_config.json", **hub)
        except hub_guard_errors() as err:
            raise self._load_error(
                "the CLIP model", clip_name, err, download=f"hf download {clip_name}",
                option="clip_name_or_path",
            ) from err  # fmt: skip
        self.clip_transform = ImageTransform.from_processor_config(config)
        return nn.ModuleDict({"detector": detector, "clip": clip})

    def _check_labels(self, id2label: Mapping[int, str]) -> None:
        """Map the detector's labels to GenEval's class names, or fail naming the mismatch."""
        try:
            self.label_names = coco_label_names(id2label)
        except ValueError as err:
            raise RewardLoadError(
                f"reward {self.name!r}: {self.detector_name_or_path!r} is not a COCO instance-"
                f"segmentation model ({err}); use {MASK2FORMER_SWIN_S_COCO!r} or another "
                "Mask2Former trained on COCO's 80 classes in COCO's order"
            ) from None

    def _build_random(self) -> nn.Module:
        """Mask2Former Swin-S (COCO, 80 classes) and CLIP ViT-L/14 at their real shapes, random
        weights; the processor's defaults and a byte-level tokenizer."""
        from transformers import CLIPModel
        from transformers import Mask2FormerForUniversalSegmentation as Mask2Former
        from transformers.models.mask2former.image_processing_pil_mask2former import (
            Mask2FormerImageProcessorPil,
        )

        from marble_pl.random_weights import random_module

        self._color_text.clear()
        detector_config = mask2former_architecture(self.detector_name_or_path)
        self._check_labels(detector_config.id2label)
        clip_config = clip_architecture(self.clip_name_or_path)
        self.processor = Mask2FormerImageProcessorPil()
        self.tokenizer = tiny_clip_tokenizer()
        self.clip_transform = clip_crop_transform(int(clip_config.vision_config.image_size))
        detector = random_module(lambda: Mask2Former(detector_config), self.torch_dtype)
        clip = random_module(lambda: CLIPModel(clip_config), self.torch_dtype)
        return nn.ModuleDict({"detector": detector, "clip": clip})


def _unpadded(mask_logits: Tensor, pixel_mask: Tensor) -> Tensor:
    """Mask logits ``[B, Q, h, w]`` cropped to the unpadded part of the processed images (all
    of one batch share a size), so the post-processing resizes the image, not its padding."""
    rows = int(pixel_mask[0].any(dim=1).sum())
    cols = int(pixel_mask[0].any(dim=0).sum())
    scale_h = mask_logits.shape[-2] / pixel_mask.shape[-2]
    scale_w = mask_logits.shape[-1] / pixel_mask.shape[-1]
    keep_h = max(1, min(mask_logits.shape[-2], math.ceil(rows * scale_h)))
    keep_w = max(1, min(mask_logits.shape[-1], math.ceil(cols * scale_w)))
    return mask_logits[..., :keep_h, :keep_w]
