"""GenEval's scoring rules as pure functions: detections + a prompt's metadata -> scores.

The rules of GenEval (Ghosh et al., 2023) as DiffusionNFT's ``flow_grpo/gen_eval.py`` applies
them for training: per-class confidence thresholds (stricter for counting prompts), a per-class
cap and optional NMS, relative positions with a size-aware dead zone, colours decided by a
callable (zero-shot CLIP over masked crops in :mod:`marble_pl.rewards.geneval`), and three
results per image: the training ``score`` (mean of the count / colour / position sub-scores),
``strict_correct`` (exact counts) and ``correct`` (GenEval's accuracy: at-least counts, excludes).
No model is needed here, so every rule is tested on hand-built detections.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "COCO_CLASSES",
    "COLORS",
    "COLOR_TEMPLATES",
    "COUNTING_THRESHOLD",
    "MAX_OBJECTS",
    "NMS_THRESHOLD",
    "POSITION_THRESHOLD",
    "TAGS",
    "THRESHOLD",
    "ColorFn",
    "Detection",
    "GenEvalResult",
    "box_iou",
    "evaluate",
    "evaluate_reward",
    "geneval_applicable",
    "relative_position",
    "score_image",
    "select_detections",
]

# GenEval's object names: the 80 COCO classes in the detector's label order, with COCO's
# "mouse", "remote" and "keyboard" named "computer mouse", "tv remote", "computer keyboard".
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse",
    "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip

COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)  # fmt: skip
"""The colours the zero-shot classifier chooses among."""

COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)
"""Prompts of the zero-shot colour classifier; each colour's text embedding is their mean."""

TAGS: tuple[str, ...] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr",
)  # fmt: skip

THRESHOLD = 0.3
"""A detection counts if its score is strictly above this ..."""
COUNTING_THRESHOLD = 0.9
"""... or above this for ``tag == "counting"`` prompts."""
MAX_OBJECTS = 16
"""At most this many detections per class (the most confident)."""
NMS_THRESHOLD = 1.0
"""Drop a detection whose IoU with a kept one of its class is >= this; 1.0 turns NMS off."""
POSITION_THRESHOLD = 0.1
"""Dead zone of relative positions, as a fraction of the two boxes' summed width (height)."""


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected instance: ``box`` ``(x1, y1, x2, y2)`` in pixels, ``score``, optional
    boolean ``mask`` ``[H, W]`` (the colour classifier crops with it). Compared by identity."""

    box: tuple[float, float, float, float]
    score: float
    mask: Tensor | None = None


ColorFn = Callable[[str, Sequence[Detection]], Sequence[str]]
"""``colors(classname, detections) -> one colour name of COLORS per detection``."""


@dataclass(frozen=True)
class GenEvalResult:
    """One image's results: the training score, exact-count and at-least-count correctness."""

    score: float
    strict_correct: bool
    correct: bool | None
    """None when not computed (``only_strict``)."""
    reason: str


def geneval_applicable(metadata: Sequence[Mapping[str, Any]] | None, n: int) -> Tensor:
    """``BoolTensor[n]``: samples whose metadata has GenEval's ``include`` clauses."""
    if metadata is None:
        return torch.zeros(n, dtype=torch.bool)
    return torch.tensor([bool(m) and "include" in m for m in metadata], dtype=torch.bool)


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of two ``(x1, y1, x2, y2)`` boxes with GenEval's inclusive-pixel (+1) areas."""

    def area(x1: float, y1: float, x2: float, y2: float) -> float:
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    inter = area(
        max(box_a[0], box_b[0]),
        max(box_a[1], box_b[1]),
        min(box_a[2], box_b[2]),
        min(box_a[3], box_b[3]),
    )
    union = area(*box_a[:4]) + area(*box_b[:4]) - inter
    return inter / union if union else 0.0


def select_detections(
    detections: Sequence[Detection],
    threshold: float,
    *,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
) -> list[Detection]:
    """One class's kept detections, most confident first: ``score > threshold``, the top
    ``max_objects``, then greedy NMS (none at ``nms_threshold == 1``)."""
    order = sorted(detections, key=lambda d: d.score, reverse=True)
    pending = [d for d in order if d.score > threshold][:max_objects]
    kept: list[Detection] = []
    while pending:
        best = pending.pop(0)
        kept.append(best)
        if nms_threshold != 1:
            pending = [d for d in pending if box_iou(best.box, d.box) < nms_threshold]
    return kept


def detected_objects(
    detections: Mapping[str, Sequence[Detection]],
    tag: str,
    *,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
) -> dict[str, list[Detection]]:
    """Per class, the detections GenEval keeps for a prompt of ``tag`` (classes with none
    left are absent)."""
    cut = counting_threshold if tag == "counting" else threshold
    objects = {
        name: select_detections(dets, cut, max_objects=max_objects, nms_threshold=nms_threshold)
        for name, dets in detections.items()
    }
    return {name: dets for name, dets in objects.items() if dets}


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Where box A is relative to box B: a subset of ``{"left of", "right of", "above",
    "below"}``.

    The centre offset, shrunk on each axis by ``threshold`` times the two boxes' summed size on
    that axis (clamped at 0, sign kept), is divided by the full offset's length; a component
    beyond 0.5 names a relation. An offset inside the dead zone (all shrunk components below
    1e-3) relates nothing.
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a[:4])
    bx1, by1, bx2, by2 = (float(v) for v in box_b[:4])
    offset = ((ax1 + ax2) / 2 - (bx1 + bx2) / 2, (ay1 + ay2) / 2 - (by1 + by2) / 2)
    dims = (abs(ax2 - ax1) + abs(bx2 - bx1), abs(ay2 - ay1) + abs(by2 - by1))
    revised = [
        math.copysign(max(abs(o) - threshold * d, 0.0), o) if o else 0.0
        for o, d in zip(offset, dims, strict=True)
    ]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    length = math.hypot(*offset)
    dx, dy = revised[0] / length, revised[1] / length
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _position_holds(
    found: Sequence[Detection],
    targets: Sequence[Detection],
    expected: str,
    threshold: float,
) -> tuple[bool, str]:
    """Whether every found object stands ``expected`` of every target (first failure named)."""
    for obj in found:
        for target in targets:
            relations = relative_position(obj.box, target.box, threshold)
            if expected not in relations:
                return False, f"found {' and '.join(sorted(relations))} target"
    return True, ""


def evaluate_reward(
    objects: Mapping[str, Sequence[Detection]],
    metadata: Mapping[str, Any],
    colors: ColorFn,
    *,
    position_threshold: float = POSITION_THRESHOLD,
) -> tuple[bool, float, str]:
    """GenEval's training reward: ``(strict_correct, score, reason)``.

    For each ``include`` clause: a count sub-score ``1 - |count - found| / count`` (negative
    when far more are found); a wrong count adds one 0 for a colour or position requirement.
    With the count exact, a colour sub-score ``1 - |count - matching| / count``; then, if the
    colour matched, a position check against the clause's target group: 0 when the target was
    not matched, otherwise a 0 at the first failing pair and, as upstream does, a 1 after the
    check whether it failed or not. ``score`` is the mean (0 without clauses). ``strict_correct``
    needs every count exact and every colour and position right; ``exclude`` is not read.
    """
    correct = True
    reasons: list[str] = []
    rewards: list[float] = []
    matched_groups: list[Sequence[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        found = list(objects.get(name, []))
        matched = True
        rewards.append(1 - abs(count - len(found)) / count)
        if len(found) != count:
            correct = matched = False
            reasons.append(f"expected {name}=={count}, found {len(found)}")
            if "color" in req or "position" in req:
                rewards.append(0.0)
        else:
            if "color" in req:
                hits = list(colors(name, found)).count(req["color"])
                rewards.append(1 - abs(count - hits) / count)
                if hits != count:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {name}=={count}, found {hits}")
            if "position" in req and matched:
                expected, group = req["position"]
                targets = matched_groups[group]
                if targets is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {expected}")
                    rewards.append(0.0)
                else:
                    holds, why = _position_holds(found, targets, expected, position_threshold)
                    if not holds:
                        correct = matched = False
                        reasons.append(f"expected {name} {expected} target, {why}")
                        rewards.append(0.0)
                    rewards.append(1.0)
        matched_groups.append(found if matched else None)
    score = sum(rewards) / len(rewards) if rewards else 0.0
    return correct, float(score), "\n".join(reasons)


def evaluate(
    objects: Mapping[str, Sequence[Detection]],
    metadata: Mapping[str, Any],
    colors: ColorFn,
    *,
    position_threshold: float = POSITION_THRESHOLD,
) -> tuple[bool, str]:
    """GenEval's accuracy: ``(correct, reason)``.

    ``include`` clauses need at least ``count`` objects, judged on the ``count`` most confident
    (their colour, their position against the target group); any ``exclude`` clause with
    ``count`` or more detections fails the image.
    """
    correct = True
    reasons: list[str] = []
    matched_groups: list[Sequence[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        found = list(objects.get(name, []))[:count]
        matched = True
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                hits = list(colors(name, found)).count(req["color"])
                if hits < count:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {name}>={count}, found {hits}")
            if "position" in req and matched:
                expected, group = req["position"]
                targets = matched_groups[group]
                if targets is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {expected}")
                else:
                    holds, why = _position_holds(found, targets, expected, position_threshold)
                    if not holds:
                        correct = matched = False
                        reasons.append(f"expected {name} {expected} target, {why}")
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], int(req["count"])
        if len(objects.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
    return correct, "\n".join(reasons)


def score_image(
    detections: Mapping[str, Sequence[Detection]],
    metadata: Mapping[str, Any],
    colors: ColorFn,
    *,
    only_strict: bool = False,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
    position_threshold: float = POSITION_THRESHOLD,
) -> GenEvalResult:
    """All of GenEval for one image: keep the detections, then score and judge them.

    ``detections`` maps class names (of :data:`COCO_CLASSES`) to raw detections in any order;
    ``colors`` is asked about kept detections only, and only where a clause has a colour.
    """
    objects = detected_objects(
        detections,
        str(metadata.get("tag", "")),
        threshold=threshold,
        counting_threshold=counting_threshold,
        max_objects=max_objects,
        nms_threshold=nms_threshold,
    )
    strict, score, reason = evaluate_reward(
        objects, metadata, colors, position_threshold=position_threshold
    )
    correct = None
    if not only_strict:
        correct, _ = evaluate(objects, metadata, colors, position_threshold=position_threshold)
    return GenEvalResult(score=score, strict_correct=strict, correct=correct, reason=reason)
