"""The model-family registry: a pipeline's ``_class_name`` picks its policy class."""

from __future__ import annotations

import json

import pytest

from marble_pl.errors import ConfigError
from marble_pl.module import MarbleModule
from marble_pl.policies import SD3Policy, policy_class
from marble_pl.policies import base as policies


def test_the_tiny_pipeline_is_sd3(tiny_sd3_path):
    assert policies.pipeline_class_name(tiny_sd3_path) == "StableDiffusion3Pipeline"
    assert policy_class(tiny_sd3_path) is SD3Policy


def test_a_registered_family_is_found_by_class_name_or_claim(tmp_path, monkeypatch):
    monkeypatch.setattr(policies, "_REGISTRY", dict(policies._REGISTRY))

    @policies.register_policy("OtherPipeline")
    class Other(SD3Policy):
        @classmethod
        def claims(cls, name: str) -> bool:
            return name.endswith("other-model")

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "OtherPipeline"}))
    assert policy_class(str(tmp_path)) is Other
    assert Other.pipeline_classes == ("OtherPipeline",)
    assert policy_class(str(tmp_path / "an-other-model")) is Other  # no index: its claim
    # no index and no claim, or a class no family registered: the default family
    assert policy_class(str(tmp_path / "missing")) is SD3Policy
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Unknown"}))
    assert policy_class(str(tmp_path)) is SD3Policy


def test_a_policy_must_implement_the_interface():
    class Incomplete(policies.Policy):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete({})


def test_a_family_name_comes_from_the_registry():
    assert policies.family_names()["sd3"] is SD3Policy
    assert policies.family_names()["StableDiffusion3Pipeline"] is SD3Policy
    assert policies.family_class("SD3") is SD3Policy


def test_a_wrong_family_name_is_one_line_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"model.family 'fluxx' .*did you mean 'flux'") as err:
        policies.family_class("fluxx")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"did you mean 'sd3'"):
        MarbleModule(family="sd-3")


def test_a_family_contradicting_model_index_is_one_line(tiny_sd3_path):
    with pytest.raises(ConfigError) as err:
        policy_class(str(tiny_sd3_path), "flux")
    message = str(err.value)
    assert "\n" not in message and "'flux' (FluxPipeline)" in message
    assert "'StableDiffusion3Pipeline'" in message and "model.family: sd3" in message
    assert policy_class(str(tiny_sd3_path), "sd3") is SD3Policy  # agreeing: fine


def test_loading_freezes_all_but_the_denoiser_and_trains_only_its_lora(tiny_sd3_path):
    """``Policy.prepare_training``: the parts other than the transformer are frozen and in eval
    mode; the trainable parameters are exactly the LoRA's."""
    policy = SD3Policy(
        {
            "pretrained_model_name_or_path": str(tiny_sd3_path),
            "local_files_only": True,
            "load_t5": False,
            "weights_dtype": "float32",
            "gradient_checkpointing": False,
            "lora_rank": 4,
            "lora_alpha": 8.0,
            "lora_target_modules": ["to_q", "to_k", "to_v"],
            "lora_init": "default",
            "max_sequence_length": 16,
            "random_weights": False,
            "architecture_overrides": None,
            "resolution": 32,
            "eval_ema_decay": None,
            "seed": 0,
        }
    )
    policy.load()
    assert set(policy.modules()) == set(SD3Policy.module_names)
    for module in policy.frozen_modules():
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    trainable = {id(p) for p in policy.transformer.parameters() if p.requires_grad}
    assert trainable and trainable == {id(p) for p in policy.lora_params}
