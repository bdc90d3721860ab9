"""The OCR reward: the official rule against hand-computed values, both engines, random weights.

The rule is DiffusionNFT's ``flow_grpo/ocr.py``. The TrOCR engine runs end to end through
``from_pretrained`` on a tiny model of the real classes whose decoder is set by hand to spell
"hello" whatever the image, so the decoded text, and hence the score, is known. The PaddleOCR
engine runs against a stand-in ``paddleocr`` module (PaddlePaddle is not installed here).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from torch import Tensor, nn

from marble_pl.architectures import TROCR_BASE_PRINTED
from marble_pl.errors import ConfigError
from marble_pl.rewards import OCRReward, RewardLoadError, build_reward, ocr_engines
from marble_pl.rewards.ocr_engines import (
    TrOCREngine,
    byte_level_roberta_tokenizer,
    paddle_text,
    to_uint8_hwc,
    vit_transform,
)
from marble_pl.rewards.ocr_rule import has_target, ocr_distance, ocr_score, quoted_target

SIDE = 32  # the tiny ViT's image size

# ------------------------------------------------------------------------------------ the rule


def test_the_target_is_the_text_inside_the_first_pair_of_quotes():
    assert quoted_target('a sign that says "Hello World" next to "Bye"') == "Hello World"
    assert quoted_target("a sign without quotes") is None
    assert quoted_target('an unmatched "quote to the end') == "quote to the end"  # as split('"')[1]
    assert quoted_target('empty "" quotes') == ""


@pytest.mark.parametrize(
    ("recognized", "prompt", "expected"),
    [
        ("WELCOME TO Hello World!", 'a sign "hello world"', 1.0),  # substring: distance 0
        ("H e L L o", 'a sign "hello"', 1.0),  # case and spaces ignored on both sides
        ("HeLLo", 'a sign "h e l l o"', 1.0),
        ("helo", 'a sign "hello"', 1 - 1 / 5),  # one deletion
        ("kitten", 'a sign "sitting"', 1 - 3 / 7),  # the textbook distance 3
        ("ab", 'a sign "abc"', 1 - 1 / 3),
        ("xyzxyzxyzxyz", 'a sign "abc"', 0.0),  # distance 12, capped at len("abc")
        ("", 'a sign "hello"', 0.0),  # nothing read: distance 5 = len
        ("cat", 'say "cat" then "dog"', 1.0),  # the first pair of quotes only
        ("dog", 'say "cat" then "dog"', 0.0),
        ("hello", 'a "Hel lo', 1.0),  # unmatched quote: the rest of the prompt
        (None, 'a sign "hello"', 0.0),  # a failed recognition: upstream's maximum penalty
    ],
)
def test_ocr_score_matches_hand_computed_values(recognized, prompt, expected):
    assert ocr_score(recognized, prompt) == pytest.approx(expected, abs=1e-12)


def test_the_distance_is_capped_and_zero_for_a_substring():
    assert ocr_distance("xxhelloxx", "HELLO") == 0
    assert ocr_distance("qwertyuiop", "abc") == 3
    assert ocr_distance("hallo", "hello") == 1


@pytest.mark.parametrize("prompt", ["no quotes here", 'empty ""', 'only spaces "   "'])
def test_prompts_without_a_target_are_nan_and_not_applicable(prompt):
    assert not has_target(prompt)
    assert math.isnan(ocr_score("anything", prompt))


# ------------------------------------------------------------------- the reward, a fake engine


class FakeEngine(nn.Module):
    """Returns fixed texts and records how many images it was shown."""

    def __init__(self, texts: list[str | None]) -> None:
        super().__init__()
        self.texts = texts
        self.seen: list[int] = []

    def recognize(self, images: Tensor) -> list[str | None]:
        self.seen.append(images.shape[0])
        return self.texts[: images.shape[0]]


def fake_reward(monkeypatch, texts: list[str | None]) -> tuple[OCRReward, FakeEngine]:
    engine = FakeEngine(texts)
    reward = OCRReward(engine="trocr")
    monkeypatch.setattr(reward, "_build", lambda: engine)
    return reward, engine


def test_the_reward_scores_applicable_prompts_and_gives_nan_elsewhere(monkeypatch):
    reward, engine = fake_reward(monkeypatch, ["hello world", "helo", "x"])
    prompts = [
        'a "Hello World" sign',
        "a cat",
        'a "hello" sign',
        'an empty "" sign',
        'a "cab" sign',
    ]
    mask = reward.applicable(prompts)
    assert mask.tolist() == [True, False, True, False, True]
    scores = reward(torch.rand(5, 3, 8, 8), prompts, metadata=[{}] * 5)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert torch.isnan(scores).tolist() == [False, True, False, True, False]
    assert scores[mask].tolist() == pytest.approx([1.0, 0.8, 0.0])
    assert engine.seen == [3]  # the images of non-applicable prompts are not read


def test_no_applicable_prompt_reads_nothing(monkeypatch):
    reward, _ = fake_reward(monkeypatch, [])
    scores = reward(torch.rand(2, 3, 8, 8), ["a cat", "a dog"])
    assert torch.isnan(scores).all() and not reward.loaded


def test_unknown_engine_and_bad_sizes_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="unknown engine 'troc' .*did you mean 'trocr'"):
        OCRReward(engine="troc")
    with pytest.raises(ConfigError, match="batch_size must be an int >= 1"):
        OCRReward(engine="trocr", batch_size=0)


# ------------------------------------------------------------------------------- PaddleOCR


def test_paddle_missing_is_a_one_line_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setattr(ocr_engines, "_installed", lambda module: False)
    with pytest.raises(ConfigError) as info:
        build_reward("ocr")  # paddle is the default engine
    message = str(info.value)
    assert "\n" not in message and 'pip install "marble-pl[ocr]"' in message
    assert "engine: trocr" in message


def test_paddleocr_3_is_refused(monkeypatch):
    monkeypatch.setattr(ocr_engines, "_installed", lambda module: True)
    monkeypatch.setattr(ocr_engines, "_version", lambda dist: "3.7.0")
    with pytest.raises(ConfigError, match="PaddleOCR 2.x API .* found paddleocr 3.7.0"):
        OCRReward(engine="paddle")


def test_paddle_engine_as_upstream_calls_it(monkeypatch):
    """Constructor arguments, uint8 RGB HWC input, confidence > 0 lines joined, ``[None]`` as
    nothing read, an exception as score 0 with a warning."""
    calls: dict[str, list] = {"init": [], "ocr": []}
    replies = iter(
        [
            [[[[0, 0]], ("Hello", 0.9)], [[[0, 0]], ("World", 0.8)], [[[0, 0]], ("zzz", 0.0)]],
            None,  # PaddleOCR 2.x's [None]: nothing found
            RuntimeError("boom"),
        ]
    )

    class StandIn:
        def __init__(self, **kwargs):
            calls["init"].append(kwargs)

        def ocr(self, image, cls=True):
            calls["ocr"].append((image, cls))
            reply = next(replies)
            if isinstance(reply, Exception):
                raise reply
            return [reply]

    monkeypatch.setitem(sys.modules, "paddleocr", types.SimpleNamespace(PaddleOCR=StandIn))
    monkeypatch.setattr(ocr_engines, "_installed", lambda module: True)
    monkeypatch.setattr(ocr_engines, "_version", lambda dist: "2.9.1")
    reward = OCRReward()
    images = torch.rand(4, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    prompts = ['"hello world"', '"hello"', "no target", '"hello"']
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = reward(images, prompts)
    assert [str(w.message) for w in caught if "PaddleOCR" in str(w.message)] == [
        "PaddleOCR failed on an image (RuntimeError: boom); it scores 0, as in the official scorer"
    ]
    assert calls["init"] == [
        {"use_angle_cls": False, "lang": "en", "use_gpu": False, "show_log": False}
    ]
    assert [cls for _, cls in calls["ocr"]] == [False, False, False]
    first = calls["ocr"][0][0]
    expected = (images[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert first.dtype == np.uint8 and first.shape == (6, 5, 3)
    np.testing.assert_array_equal(first, expected)
    assert scores[[0, 1, 3]].tolist() == [1.0, 0.0, 0.0] and math.isnan(scores[2])


def test_paddle_helpers():
    assert paddle_text([[[[0], ("Ab", 0.5)], [[0], ("Cd", 1e-6)]]]) == "AbCd"
    assert paddle_text([None]) == "" and paddle_text([]) == ""
    x = torch.tensor([[[[0.0, 0.5 / 255, 1.0]]]]).expand(1, 3, 1, 3)
    assert to_uint8_hwc(x)[0, 0, :, 0].tolist() == [0, 0, 255]  # round half to even, as numpy


def test_paddle_has_no_random_weights_form(monkeypatch):
    monkeypatch.setattr(ocr_engines, "_installed", lambda module: True)
    monkeypatch.setattr(ocr_engines, "_version", lambda dist: "2.9.1")
    reward = OCRReward(engine="paddle")
    reward.random_weights = True
    with pytest.raises(
        RewardLoadError, match="'paddle' has no random-weights form .*engine: trocr"
    ):
        reward.load()


# ----------------------------------------------------------------------------------- TrOCR


def tiny_trocr(word: str) -> tuple[nn.Module, object]:
    """A tiny ViT + TrOCR ``VisionEncoderDecoderModel`` whose greedy decoding spells ``word``.

    The decoder's weights are zero but its layer norms and two tables: position ``j`` (one-hot
    in dimension ``j``) projects onto the ``j``-th token of ``word``, then ``</s>``. The
    encoder keeps random weights: the image is read, and ignored.
    """
    from transformers import (
        TrOCRConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    tokenizer = byte_level_roberta_tokenizer()
    ids = tokenizer(word, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    width = 16
    encoder = ViTConfig(
        image_size=SIDE,
        patch_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        qkv_bias=False,
    )
    decoder = TrOCRConfig(
        vocab_size=len(tokenizer),
        d_model=width,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        max_position_embeddings=width,
        cross_attention_hidden_size=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    model = VisionEncoderDecoderModel(config).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.zero_()
        for m in model.decoder.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
        positions = model.decoder.model.decoder.embed_positions.weight  # row j + 2: position j
        for j, token in enumerate(ids):
            positions[j + 2, j] = 10.0
            model.decoder.output_projection.weight[token, j] += 1.0
    return model, tokenizer


@pytest.fixture(scope="module")
def trocr_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trocr")
    model, tokenizer = tiny_trocr("hello")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor = {
        "do_resize": True,
        "size": SIDE,  # the old ViTFeatureExtractor's int form, as trocr-base-printed's
        "resample": 2,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_trocr_end_to_end_through_from_pretrained(trocr_dir, dtype):
    reward = build_reward(
        {"name": "ocr", "engine": "trocr", "pretrained_model_name_or_path": str(trocr_dir),
         "batch_size": 2, "local_files_only": True, "dtype": dtype}
    )  # fmt: skip
    prompts = ['a sign "Hello"', "a cat", 'a neon sign saying "help"', '"xyz"', '"HE LLO world"']
    images = torch.rand(5, 3, 48, 40, generator=torch.Generator().manual_seed(1))  # resized to 32
    scores = reward(images, prompts)
    # "hello" read every time: contains "hello"; "help" at distance 2 of 4; "xyz" capped;
    # "helloworld" is not in "hello": distance 5 of 10.
    assert torch.isnan(scores).tolist() == [False, True, False, False, False]
    assert scores[[0, 2, 3, 4]].tolist() == pytest.approx([1.0, 0.5, 0.0, 0.5])
    assert reward.scorer.recognize(images[:3]) == ["hello"] * 3  # type: ignore[union-attr]
    assert next(reward.scorer.parameters()).dtype == getattr(torch, dtype)  # type: ignore[union-attr]


def test_trocr_missing_weights_name_the_fix(tmp_path):
    reward = OCRReward(engine="trocr", pretrained_model_name_or_path=str(tmp_path / "none"))
    with pytest.raises(RewardLoadError, match="could not load the TrOCR model .*check the path"):
        reward(torch.rand(1, 3, 8, 8), ['"a"'])
    offline = OCRReward(engine="trocr", pretrained_model_name_or_path="nobody/no-such-trocr",
                        local_files_only=True)  # fmt: skip
    with pytest.raises(RewardLoadError, match="hf download nobody/no-such-trocr"):
        offline.load()


def test_vit_transform_resizes_to_exactly_the_size():
    image = torch.rand(1, 3, 40, 60)
    for config in ({"size": 24}, {"size": {"height": 24, "width": 24}}):
        out = vit_transform(config)(image)
        assert out.shape == (1, 3, 24, 24)
        assert out.min() >= -1.0 and out.max() <= 1.0  # (x - 0.5) / 0.5
    with pytest.raises(ValueError, match="unsupported image-processor size"):
        vit_transform({"size": {"shortest_edge": 24}})


# --------------------------------------------------------------------------- random weights


def test_trocr_base_printed_has_its_published_shape(monkeypatch):
    """The shipped trocr-base-printed on the meta device: 334 M parameters as published (tied
    output projection), ViT at 384 px."""
    import marble_pl.random_weights as rw

    def on_meta(build, dtype, seed=0):
        with init_empty_weights(include_buffers=False):
            return build()

    monkeypatch.setattr(rw, "random_module", on_meta)
    reward = OCRReward(engine="trocr", local_files_only=True)
    assert reward.pretrained_model_name_or_path == TROCR_BASE_PRINTED
    reward.random_weights = True
    engine = reward._build_random()
    model = engine.model
    assert model.decoder.output_projection.weight is model.decoder.get_input_embeddings().weight
    count = sum(p.numel() for p in model.parameters())
    assert 333.5e6 <= count < 334.5e6
    assert engine.transform.size == (384, 384)


def test_random_weights_read_a_local_config(trocr_dir):
    reward = OCRReward(engine="trocr", pretrained_model_name_or_path=str(trocr_dir))
    reward.random_weights = True
    scores = reward(torch.rand(3, 3, 16, 16), ['"a"', "none", '"bc"'])
    assert torch.isnan(scores).tolist() == [False, True, False]
    assert ((scores[[0, 2]] >= 0) & (scores[[0, 2]] <= 1)).all()
    assert sum(p.numel() for p in reward.scorer.parameters()) < 100_000  # the tiny config's shape


def test_preflight_builds_and_times_the_ocr_reward(tmp_path, monkeypatch, tiny_sd3_path, trocr_dir):
    """``marble preflight`` builds the TrOCR engine from its config with random weights, reports
    it, and scores its (quoted) prompts during the timed step."""
    from marble_pl.preflight import preflight

    shutil.copytree(Path(__file__).resolve().parents[1] / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen: list[int] = []
    recognize = TrOCREngine.recognize
    monkeypatch.setattr(
        TrOCREngine, "recognize", lambda self, x: seen.append(len(x)) or recognize(self, x)
    )
    spec = f"{{name: ocr, engine: trocr, pretrained_model_name_or_path: {trocr_dir}}}"
    report = preflight(
        tmp_path / "configs" / "tiny.yaml",
        steps=1,
        resolution=32,
        overrides=[
            f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
            f"--model.rewards=[brightness, {spec}]",
        ],
    )
    (row,) = [r for r in report.components if r.name == "reward: ocr"]
    model, _ = tiny_trocr("hello")
    assert row.cls == "TrOCREngine" and row.params == sum(p.numel() for p in model.parameters())
    assert seen == [2]  # one step of 1 prompt x 2 images, every preflight prompt quoted
