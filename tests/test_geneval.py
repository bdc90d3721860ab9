"""GenEval: the scoring rules on hand-built detections, the in-process reward on tiny random
Mask2Former and CLIP models, the remote reward against a local HTTP server, and real shapes."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from marble_pl.rewards import build_reward
from marble_pl.rewards.geneval import (
    MASK2FORMER_SWIN_S_COCO,
    GenEvalReward,
    coco_label_names,
    mask2former_architecture,
    mask_boxes,
)
from marble_pl.rewards.geneval_remote import GenEvalRemote, GenEvalServerError
from marble_pl.rewards.geneval_rules import (
    COCO_CLASSES,
    COLOR_TEMPLATES,
    COLORS,
    TAGS,
    Detection,
    box_iou,
    detected_objects,
    evaluate,
    evaluate_reward,
    geneval_applicable,
    relative_position,
    score_image,
    select_detections,
)
from marble_pl.rewards.geneval_server import make_server
from marble_pl.rewards.pretrained import RewardLoadError
from marble_pl.tiny_rewards import build_tiny_clip, tiny_mask2former_config

# ------------------------------------------------------------------ the rules


def det(x1: float, y1: float, x2: float, y2: float, score: float = 0.95) -> Detection:
    return Detection((x1, y1, x2, y2), score)


def fixed_colors(color: str):
    """A colour callable answering ``color`` for every detection, counting its calls."""
    calls: list[tuple[str, int]] = []

    def colors(classname: str, dets: Sequence[Detection]) -> list[str]:
        calls.append((classname, len(dets)))
        return [color] * len(dets)

    colors.calls = calls  # type: ignore[attr-defined]
    return colors


NO_COLOR = fixed_colors("none")


def test_constants_are_geneval_s():
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush"
    assert COCO_CLASSES[64:67] == ("computer mouse", "tv remote", "computer keyboard")
    assert len(COLORS) == 10 and COLORS[0] == "red" and COLORS[-1] == "white"
    assert [t.format(color="red", object="cup") for t in COLOR_TEMPLATES] == [
        "a photo of a red cup",
        "a photo of a red-colored cup",
        "a photo of a red object",
    ]
    assert set(TAGS) == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }


def test_threshold_is_strict_and_counting_prompts_use_the_counting_one():
    dets = {"cup": [det(0, 0, 9, 9, 0.3), det(20, 0, 29, 9, 0.3001), det(40, 0, 49, 9, 0.85)]}
    kept = detected_objects(dets, "two_object")["cup"]
    assert [d.score for d in kept] == [0.85, 0.3001]  # 0.3 itself is out; most confident first
    assert detected_objects(dets, "counting") == {}  # 0.9 for counting prompts
    dets["cup"].append(det(60, 0, 69, 9, 0.91))
    assert [d.score for d in detected_objects(dets, "counting")["cup"]] == [0.91]


def test_at_most_sixteen_per_class_the_most_confident():
    dets = [det(10 * i, 0, 10 * i + 9, 9, 0.4 + 0.01 * i) for i in range(20)]
    kept = select_detections(dets, 0.3)
    assert len(kept) == 16
    assert [d.score for d in kept] == sorted((d.score for d in dets), reverse=True)[:16]


def test_iou_uses_inclusive_pixels_and_nms_is_off_at_one():
    a, b, far = det(0, 0, 9, 9, 0.9), det(5, 0, 14, 9, 0.8), det(50, 50, 59, 59, 0.7)
    assert box_iou(a.box, b.box) == pytest.approx(50 / 150)  # 5x10 overlap, 10x10 boxes
    assert box_iou(a.box, far.box) == 0.0
    assert select_detections([b, a, far], 0.3) == [a, b, far]  # NMS_THRESHOLD = 1: none
    assert select_detections([b, a, far], 0.3, nms_threshold=0.3) == [a, far]
    assert select_detections([b, a, far], 0.3, nms_threshold=0.34) == [a, b, far]


def test_relative_position_dead_zone_and_the_half_rule():
    box = (0.0, 0.0, 10.0, 10.0)  # width 10: dead zone 0.1 * (10 + 10) = 2 px per axis

    def moved(dx: float, dy: float = 0.0) -> tuple[float, float, float, float]:
        return (dx, dy, 10 + dx, 10 + dy)

    assert relative_position(moved(2), box) == set()  # inside the dead zone
    assert relative_position(moved(4), box) == set()  # (4 - 2) / 4 = 0.5 is not > 0.5
    assert relative_position(moved(5), box) == {"right of"}  # 3 / 5 = 0.6
    assert relative_position(moved(-5), box) == {"left of"}
    assert relative_position(moved(0, -30), box) == {"above"}  # y grows downwards
    assert relative_position(moved(30, 30), box) == {"right of", "below"}  # 28/42 each
    assert relative_position(moved(30, 8), box) == {"right of"}
    assert relative_position(box, box) == set()
    assert relative_position(moved(5), box, threshold=0.0) == {"right of"}


@pytest.mark.parametrize(
    ("found", "score", "strict", "accurate"),
    [(1, 1.0, True, True), (0, 0.0, False, False), (3, -1.0, False, True)],
)
def test_single_object(found, score, strict, accurate):
    meta = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}]}
    objects = {"bowl": [det(20 * i, 0, 20 * i + 9, 9) for i in range(found)]}
    assert evaluate_reward(objects, meta, NO_COLOR)[:2] == (strict, score)
    assert evaluate(objects, meta, NO_COLOR)[0] is accurate


def test_two_object():
    meta = {
        "tag": "two_object",
        "include": [{"class": "bowl", "count": 1}, {"class": "skis", "count": 1}],
    }
    both = {"bowl": [det(0, 0, 9, 9)], "skis": [det(50, 0, 59, 9)]}
    assert evaluate_reward(both, meta, NO_COLOR)[:2] == (True, 1.0)
    assert evaluate_reward({"bowl": both["bowl"]}, meta, NO_COLOR)[:2] == (False, 0.5)
    assert evaluate({"bowl": both["bowl"]}, meta, NO_COLOR)[0] is False


def test_counting_scores_the_distance_and_accuracy_honours_exclude():
    meta = {
        "tag": "counting",
        "include": [{"class": "stop sign", "count": 3}],
        "exclude": [{"class": "stop sign", "count": 4}],
    }

    def signs(n: int, score: float = 0.95) -> dict[str, list[Detection]]:
        return {"stop sign": [det(20 * i, 0, 20 * i + 9, 9, score) for i in range(n)]}

    for n, score, strict, accurate in [
        (2, 2 / 3, False, False),
        (3, 1.0, True, True),
        (4, 2 / 3, False, False),  # at least 3, but the exclude clause (>= 4) fails it
    ]:
        strict_got, score_got, _ = evaluate_reward(signs(n), meta, NO_COLOR)
        assert (strict_got, score_got) == (strict, pytest.approx(score))
        assert evaluate(signs(n), meta, NO_COLOR)[0] is accurate
    # Through score_image, three signs at 0.85 do not pass the counting threshold.
    assert score_image(signs(3, 0.85), meta, NO_COLOR).score == 0.0
    assert score_image(signs(3, 0.95), meta, NO_COLOR).score == 1.0


def test_colors():
    meta = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "purple"}]}
    cup = {"cup": [det(0, 0, 9, 9)]}
    purple, blue = fixed_colors("purple"), fixed_colors("blue")
    assert evaluate_reward(cup, meta, purple)[:2] == (True, 1.0)
    assert evaluate_reward(cup, meta, blue)[:2] == (False, 0.5)  # count 1, colour 0
    assert evaluate_reward({}, meta, blue)[:2] == (False, 0.0)  # count 0, colour 0
    assert evaluate(cup, meta, purple)[0] and not evaluate(cup, meta, blue)[0]
    assert blue.calls == [("cup", 1), ("cup", 1)]  # never asked without the object


def test_color_attr_and_colour_of_the_most_confident():
    meta = {
        "tag": "color_attr",
        "include": [
            {"class": "handbag", "count": 1, "color": "pink"},
            {"class": "scissors", "count": 1, "color": "black"},
        ],
    }
    objects = {"handbag": [det(0, 0, 9, 9)], "scissors": [det(50, 0, 59, 9)]}
    pink = fixed_colors("pink")
    assert evaluate_reward(objects, meta, pink)[:2] == (False, 0.75)  # 1, 1, 1, 0
    # GenEval's accuracy judges the colour of the `count` most confident objects only.
    two = {"cup": [det(0, 0, 9, 9, 0.9), det(50, 0, 59, 9, 0.5)]}
    by_score = lambda name, dets: ["red" if d.score > 0.8 else "blue" for d in dets]  # noqa: E731
    meta = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}]}
    assert evaluate(two, meta, by_score)[0] is True
    assert evaluate_reward(two, meta, by_score)[:2] == (False, 0.0)  # 2 found for 1: 1 - 1


def test_position_including_upstream_s_extra_one_after_a_failed_check():
    meta = {
        "tag": "position",
        "include": [
            {"class": "laptop", "count": 1},
            {"class": "cow", "count": 1, "position": ["right of", 0]},
        ],
    }
    laptop, right, left = det(0, 0, 9, 9), det(40, 0, 49, 9), det(-40, 0, -31, 9)
    assert evaluate_reward({"laptop": [laptop], "cow": [right]}, meta, NO_COLOR)[:2] == (
        True,
        1.0,
    )  # 1, 1, 1
    strict, score, reason = evaluate_reward({"laptop": [laptop], "cow": [left]}, meta, NO_COLOR)
    assert (strict, score) == (False, 0.75)  # 1, 1, 0, and the 1 upstream always appends
    assert "left of" in reason
    assert evaluate_reward({"cow": [right]}, meta, NO_COLOR)[:2] == (False, pytest.approx(1 / 3))
    assert evaluate_reward({"laptop": [laptop]}, meta, NO_COLOR)[:2] == (
        False,
        pytest.approx(1 / 3),
    )  # 1, 0 (count), 0 (position)
    assert evaluate({"laptop": [laptop], "cow": [right]}, meta, NO_COLOR)[0] is True
    assert evaluate({"laptop": [laptop], "cow": [left]}, meta, NO_COLOR)[0] is False
    assert evaluate({"cow": [right]}, meta, NO_COLOR)[0] is False


def test_no_include_scores_zero_and_applicability_reads_include():
    assert evaluate_reward({}, {"tag": "x"}, NO_COLOR)[:2] == (True, 0.0)
    meta = [{"include": [{"class": "cup", "count": 1}]}, {}, {"source": "ocr"}]
    assert geneval_applicable(meta, 3).tolist() == [True, False, False]
    assert geneval_applicable(None, 2).tolist() == [False, False]


def test_score_image_only_strict_skips_accuracy():
    meta = {"tag": "single_object", "include": [{"class": "cup", "count": 1}]}
    result = score_image({"cup": [det(0, 0, 9, 9)]}, meta, NO_COLOR, only_strict=True)
    assert (result.score, result.strict_correct, result.correct) == (1.0, True, None)


def test_mask_boxes_match_mmdet_and_labels_map_to_geneval_names():
    masks = torch.zeros(2, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 3:8] = True  # rows 2..4, columns 3..7
    assert mask_boxes(masks).tolist() == [[3.0, 2.0, 8.0, 5.0], [0.0, 0.0, 0.0, 0.0]]
    coco = [_COCO_HF.get(name, name) for name in COCO_CLASSES]
    assert coco_label_names(dict(enumerate(coco))) == COCO_CLASSES
    assert coco_label_names({i: f"LABEL_{i}" for i in range(80)}) == COCO_CLASSES
    variants = {"motorcycle": "motorbike", "couch": "sofa", "potted plant": "potted_plant"}
    older = [variants.get(name, name) for name in coco]
    assert coco_label_names(dict(enumerate(older))) == COCO_CLASSES
    with pytest.raises(ValueError, match="81 labels"):
        coco_label_names({i: f"LABEL_{i}" for i in range(81)})
    with pytest.raises(ValueError, match="label 1 is 'car'"):
        coco_label_names(dict(enumerate([coco[0], coco[2], coco[1], *coco[3:]])))


# ------------------------------------------------------------------ the reward, tiny models

_COCO_HF = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
SIZE = 48
CUP = COCO_CLASSES.index("cup")


def tiny_detector(path: Path) -> Path:
    """A tiny random Mask2Former (Swin backbone) whose one query predicts "cup", with COCO's
    id2label and a small image processor, saved as a hub repo is."""
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former.image_processing_pil_mask2former import (
        Mask2FormerImageProcessorPil,
    )

    coco = [_COCO_HF.get(name, name) for name in COCO_CLASSES]
    # one query: one detection per image, so the colour path runs
    config = tiny_mask2former_config(1, dict(enumerate(coco)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[CUP] = 12.0
    model.save_pretrained(path)
    processor = Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128})
    processor.save_pretrained(path)
    return path


def tiny_clip(path: Path) -> Path:
    """A tiny random CLIPModel with the byte-level tokenizer and CLIP's preprocessing (seed 1)."""
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_clip(path, seed=1)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("geneval")
    return {
        "detector_name_or_path": str(tiny_detector(root / "detector")),
        "clip_name_or_path": str(tiny_clip(root / "clip")),
    }


def images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


COLORS_META = {
    "tag": "colors",
    "include": [{"class": "cup", "count": 1, "color": "red"}],
    "prompt": "a photo of a red cup",
    "source": "geneval",
}
COUNT_META = {
    "tag": "two_object",
    "include": [{"class": "cup", "count": 2}, {"class": "bowl", "count": 1}],
    "exclude": [{"class": "cup", "count": 5}],
    "prompt": "a photo of two cups and a bowl",
    "source": "geneval",
}


def test_reward_end_to_end_matches_the_rules_on_its_detections(tiny):
    reward = build_reward(
        {"name": "geneval", "detector_size": None, "local_files_only": True, **tiny}
    )
    x = images(3)
    meta = [COLORS_META, {}, COUNT_META]
    prompts = [m.get("prompt", "a dog") for m in meta]
    scores = reward(x, prompts, metadata=meta)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert torch.isnan(scores[1]) and torch.isfinite(scores[[0, 2]]).all()
    assert reward.applicable(prompts, meta).tolist() == [True, False, True]
    # The same images detected directly, then scored by the rules with the reward's colours.
    pixels = (x * 255).round().to(torch.uint8)
    detections = reward.detect(pixels[[0, 2]])
    assert [len(d.get("cup", [])) for d in detections] == [1, 1]  # the one query says "cup"
    for row, (i, found) in enumerate(zip([0, 2], detections, strict=True)):
        expected = score_image(found, meta[i], reward._color_fn(pixels[i].float() / 255))
        assert scores[i].item() == pytest.approx(expected.score, abs=1e-6)
        assert reward.last_strict_accuracy[i] == float(expected.strict_correct)
        assert reward.last_accuracy[i] == float(expected.correct)
        assert reward.last_results[i] == expected, row
    assert math.isnan(reward.last_accuracy[1]) and reward.last_results[1] is None
    assert reward.last_tags == ["colors", None, "two_object"]
    assert scores[0].item() in (0.5, 1.0)  # one cup: count 1, colour 0 or 1
    assert scores[2].item() == 0.25  # one cup of two (0.5), no bowl (0)


def test_colour_is_zero_shot_clip_on_the_masked_crop(tiny):
    from transformers import CLIPModel

    from marble_pl.models import tiny_clip_tokenizer
    from marble_pl.rewards.pretrained import clip_crop_transform

    reward = GenEvalReward(detector_size=None, local_files_only=True, **tiny)
    reward.load()
    image = images(1, seed=3)[0]
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[10:30, 5:25] = True
    got = reward.classify_colors(image, "cup", [Detection((5, 10, 25, 30), 0.9, mask)])
    # Directly: grey outside the mask, crop the box, CLIP image vs mean template embeddings.
    clip = CLIPModel.from_pretrained(tiny["clip_name_or_path"]).eval()
    crop = torch.where(mask, image, 153 / 255)[None, :, 10:30, 5:25]
    with torch.no_grad():
        feat = clip.get_image_features(pixel_values=clip_crop_transform(32)(crop))
        feat = getattr(feat, "pooler_output", feat)
        tok = tiny_clip_tokenizer()
        texts = [t for c in COLORS for t in (f"a photo of a {c} cup", f"a photo of a {c}-colored cup", f"a photo of a {c} object")]  # fmt: skip
        ids = tok(texts, padding=True, return_tensors="pt")
        text = clip.get_text_features(**ids)
        text = getattr(text, "pooler_output", text)
    text = torch.nn.functional.normalize(text, dim=-1).view(10, 3, -1).mean(1)
    logits = torch.nn.functional.normalize(feat, dim=-1) @ text.T
    assert got == [COLORS[int(logits.argmax())]]


def test_nothing_is_loaded_until_a_sample_applies(tiny):
    reward = GenEvalReward(local_files_only=True, **tiny)
    scores = reward(images(2), ["a", "b"], metadata=[{}, {"source": "ocr"}])
    assert torch.isnan(scores).all() and not reward.loaded
    assert torch.isnan(reward(images(1), ["a"])).all()  # no metadata at all


def test_missing_detector_offline_is_one_line_naming_the_option(tmp_path, tiny):
    reward = GenEvalReward(
        detector_name_or_path=str(tmp_path / "nope"),
        clip_name_or_path=tiny["clip_name_or_path"],
        local_files_only=True,
    )
    with pytest.raises(RewardLoadError, match="detector_name_or_path") as err:
        reward(images(1), ["a cup"], metadata=[COLORS_META])
    assert "\n" not in str(err.value)


def test_bad_options_are_rejected_early():
    with pytest.raises(ValueError, match="detector_size"):
        GenEvalReward(detector_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        GenEvalReward(batch_size=0)


# ------------------------------------------------------------------ real shapes, no weights


def test_random_weights_build_swin_s_mask2former_and_clip_l_at_their_published_sizes(
    monkeypatch,
):
    """``_build_random`` on the meta device from the shipped configs: Mask2Former Swin-S COCO
    (the Mask2Former paper's 69 M) and CLIP ViT-L/14 (427,616,513, as published)."""
    from accelerate import init_empty_weights

    import marble_pl.random_weights as rw

    def on_meta(build, dtype, seed=0):
        with init_empty_weights(include_buffers=False):
            return build()

    monkeypatch.setattr(rw, "random_module", on_meta)
    config = mask2former_architecture(MASK2FORMER_SWIN_S_COCO)
    assert config.num_labels == 80 and config.backbone_config.depths == [2, 2, 18, 2]
    reward = GenEvalReward(local_files_only=True)
    reward.random_weights = True
    built = reward._build_random()
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in built.items()}
    assert counts == {"detector": 68_741_083, "clip": 427_616_513}
    assert reward.label_names == COCO_CLASSES and reward.processor is not None
    with pytest.raises(RewardLoadError, match="random weights"):
        mask2former_architecture("someone/other-detector")


def test_random_weights_read_local_configs_and_score(tiny):
    """With local config.json files, ``model.random_weights`` builds those (tiny) shapes."""
    reward = GenEvalReward(detector_size=None, local_files_only=True, **tiny)
    reward.random_weights = True
    scores = reward(images(2), ["a red cup", "x"], metadata=[COLORS_META, {}])
    assert torch.isfinite(scores[0]) and torch.isnan(scores[1])
    assert reward.scorer["detector"].config.num_queries == 1
    saved = GenEvalReward(detector_size=None, local_files_only=True, **tiny).load()
    bias = reward.scorer["detector"].class_predictor.bias
    assert not torch.equal(bias, saved["detector"].class_predictor.bias)


# ------------------------------------------------------------------ the remote reward


class _Server:
    """The shipped GenEval server with a stand-in scorer following a plan of steps: "ok",
    "fail" (an exception: 500), "bad" (a ValueError: 400), "slow", "short" (a score short)."""

    def __init__(self) -> None:
        self.plan: list[str] = []
        self.requests: list[tuple[list[Any], list[dict[str, Any]], bool]] = []

        def scorer(images: list[Any], metadata: list[dict[str, Any]], only_strict: bool):
            self.requests.append((images, metadata, only_strict))
            step = self.plan.pop(0) if self.plan else "ok"
            if step == "fail":
                raise RuntimeError("CUDA out of memory")
            if step == "bad":
                raise ValueError("no tag")
            if step == "slow":
                time.sleep(0.6)
            n = len(images) - (step == "short")
            scores = [m["include"][0]["count"] / 4 for m in metadata][:n]
            return {"scores": scores, "strict_accuracy": [1] * n}

        self.httpd = make_server(scorer, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/geneval"


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/geneval"


META4 = [COLORS_META, {}, COUNT_META, COLORS_META]


def test_remote_batches_png_and_metadata_and_fills_nan(server):
    reward = build_reward({"name": "geneval_remote", "url": server.url, "batch_size": 2})
    x = images(4)
    scores = reward(x, ["p"] * 4, metadata=META4)
    assert scores.tolist()[0] == 0.25 and scores.tolist()[2:] == [0.5, 0.25]
    assert math.isnan(scores[1])
    assert [len(images) for images, _, _ in server.requests] == [2, 1]  # 3 applicable, 2 a batch
    assert server.requests[0][1:] == ([COLORS_META, COUNT_META], False)
    sent = torch.from_numpy(server.requests[0][0][1]).permute(2, 0, 1)
    assert torch.equal(sent, (x[2] * 255).round().to(torch.uint8))  # PNG is lossless
    assert reward.last_strict_accuracy.tolist()[2:] == [1.0, 1.0]
    assert torch.isnan(reward.last_accuracy).all()  # not in the answer
    assert reward.last_failure is None
    assert reward.last_tags == ["colors", None, "two_object", "colors"]


def test_remote_retries_a_server_error_with_backoff(server):
    server.plan = ["fail"]
    reward = GenEvalRemote(url=server.url, backoff_s=0.01)
    assert reward(images(1), ["p"], metadata=[COLORS_META]).tolist() == [0.25]
    assert len(server.requests) == 2


@pytest.mark.parametrize("step", ["bad", "short"])
def test_remote_does_not_retry_what_a_retry_cannot_fix(server, step):
    server.plan = [step]
    reward = GenEvalRemote(url=server.url, backoff_s=0.01)
    with pytest.raises(GenEvalServerError, match="after 1 try"):
        reward(images(2), ["p", "p"], metadata=[COLORS_META, COLORS_META])
    assert len(server.requests) == 1


def test_remote_server_down_is_one_line_or_nan_per_policy(caplog):
    url = _closed_port_url()
    reward = GenEvalRemote(url=url, retries=1, backoff_s=0.01)
    with pytest.raises(GenEvalServerError) as err:
        reward(images(1), ["p"], metadata=[COLORS_META])
    message = str(err.value)
    assert "\n" not in message and url in message and "after 2 tries" in message
    assert "on_failure: not_applicable" in message
    lenient = GenEvalRemote(url=url, retries=0, on_failure="not_applicable")
    scores = lenient(images(2), ["p", "p"], metadata=[COLORS_META, {}])
    assert torch.isnan(scores).all() and lenient.last_failure
    assert "2 samples" not in caplog.text and "1 samples score NaN" in caplog.text


def test_remote_timeout(server):
    server.plan = ["slow"]
    reward = GenEvalRemote(url=server.url, timeout_s=0.2, retries=0)
    with pytest.raises(GenEvalServerError, match="timed out"):
        reward(images(1), ["p"], metadata=[COLORS_META])


def test_remote_options_are_checked():
    with pytest.raises(ValueError, match="on_failure"):
        GenEvalRemote(on_failure="ignore")
    with pytest.raises(ValueError, match="http"):
        GenEvalRemote(url="localhost:8000")
    with pytest.raises(ValueError, match="retries"):
        GenEvalRemote(retries=-1)


def test_server_answers_400_to_a_bad_request_and_wraps_upstream_s_scorer(server, monkeypatch):
    import sys
    import types
    import urllib.error
    import urllib.request

    request = urllib.request.Request(server.url, data=b'{"images": 1}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 400 and server.requests == []
    # upstream_scorer maps compute_geneval's (scores, rewards, strict_rewards, ...) to the schema.
    calls = []

    def load_geneval(device):
        def compute(images, metadatas, only_strict=False):
            calls.append((device, [im.size for im in images], metadatas, only_strict))
            return [0.5] * len(images), [1.0] * len(images), [0.0] * len(images), {}, {}

        return compute

    fake = types.ModuleType("flow_grpo.gen_eval")
    fake.load_geneval = load_geneval  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flow_grpo", types.ModuleType("flow_grpo"))
    monkeypatch.setitem(sys.modules, "flow_grpo.gen_eval", fake)
    from marble_pl.rewards.geneval_server import upstream_scorer

    scorer = upstream_scorer("cuda:3")
    pixels = torch.zeros(2, 5, 7, 3, dtype=torch.uint8).numpy()
    answer = scorer(list(pixels), [COLORS_META, COUNT_META], False)
    assert answer == {"scores": [0.5, 0.5], "strict_accuracy": [0.0, 0.0], "accuracy": [1.0, 1.0]}
    assert calls == [("cuda:3", [(7, 5), (7, 5)], [COLORS_META, COUNT_META], False)]
    assert scorer(list(pixels), [COLORS_META, COUNT_META], True)["accuracy"] is None
