"""The model-family registry: a pipeline's ``_class_name`` picks its policy class."""

from __future__ import annotations

import json

import pytest

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
