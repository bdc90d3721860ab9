"""marble_pl.models: tiny SD3 build/load, load errors, LoRA adapters, prompt encoding."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor

from marble_pl.models import (
    ModelLoadError,
    SD3Components,
    add_lora,
    add_sampling_adapter,
    build_tiny_sd3,
    ema_update_adapter,
    encode_prompts,
    ensure_tiny_sd3,
    load_sd3,
    lora_parameters,
    read_model_index,
    tiny_sd3_is_complete,
    tiny_sd3_pipeline,
    use_adapter,
)

MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def parts(tiny_sd3_path: Path) -> SD3Components:
    return load_sd3(tiny_sd3_path, local_files_only=True)


@torch.no_grad()
def velocity(transformer: torch.nn.Module, seed: int = 0) -> Tensor:
    """One transformer forward on fixed random inputs of the tiny model's shapes.

    Under no_grad: with autograd on, CPU kernels differ in the last bits depending on which
    weights require grad, which would blur the exact comparisons below.
    """
    return forward(transformer, seed)


def forward(transformer: torch.nn.Module, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, 8, generator=g)
    enc = torch.randn(2, 5, 32, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    t = torch.tensor([700.0, 300.0])
    return transformer(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=enc,
        pooled_projections=pooled,
        return_dict=False,
    )[0]


def perturb(params: list[torch.nn.Parameter] | dict[str, torch.nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    values = params.values() if isinstance(params, dict) else params
    with torch.no_grad():
        for p in values:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------------- build / load


def test_tiny_build_saves_and_loads_back_identically(tiny_sd3_path: Path) -> None:
    parts = load_sd3(tiny_sd3_path, local_files_only=True)
    reference = tiny_sd3_pipeline(seed=0)
    for name in MODULES:
        assert_same_weights(getattr(parts, name), getattr(reference, name))
    assert parts.text_encoder_3 is None and parts.tokenizer_3 is None
    assert parts.scheduler.config.shift == 3.0
    assert parts.vae.config.scaling_factor == pytest.approx(1.5305)
    assert parts.vae.config.shift_factor == pytest.approx(0.0609)
    assert parts.vae_scale_factor == 2
    assert len(parts.tokenizer) == 514 and len(parts.tokenizer_2) == 514
    assert list((tiny_sd3_path / "transformer").glob("*.safetensors"))
    total = sum(n_params(getattr(parts, name)) for name in MODULES)
    assert 50_000 < total < 500_000


def test_tiny_build_is_deterministic_given_seed() -> None:
    a, b, c = tiny_sd3_pipeline(seed=3), tiny_sd3_pipeline(seed=3), tiny_sd3_pipeline(seed=4)
    assert_same_weights(a.transformer, b.transformer)
    diff = [
        not torch.equal(x, y)
        for x, y in zip(a.transformer.parameters(), c.transformer.parameters(), strict=True)
    ]
    assert any(diff)


def test_tiny_dims_match_what_encode_prompt_concatenates(parts: SD3Components) -> None:
    cfg = parts.transformer.config
    hidden = parts.text_encoder.config.hidden_size + parts.text_encoder_2.config.hidden_size
    projected = (
        parts.text_encoder.config.projection_dim + parts.text_encoder_2.config.projection_dim
    )
    assert hidden == cfg.joint_attention_dim
    assert projected == cfg.pooled_projection_dim


def test_ensure_tiny_sd3_builds_only_once(tmp_path: Path) -> None:
    target = tmp_path / "lazy" / "tiny"
    ensure_tiny_sd3(target)
    stamp = (target / "model_index.json").stat().st_mtime_ns
    ensure_tiny_sd3(target, seed=5)
    assert (target / "model_index.json").stat().st_mtime_ns == stamp


def test_missing_hub_id_offline_raises_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_sd3("marble-pl-test/no-such-model", local_files_only=True)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "marble-pl-test/no-such-model" in message
    assert "local_files_only=True" in message
    assert "huggingface-cli download marble-pl-test/no-such-model" in message
    assert isinstance(info.value, OSError)


def test_hf_hub_offline_alone_means_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_sd3("marble-pl-test/no-such-model")
    assert time.perf_counter() - start < 10


def test_missing_local_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_sd3(tmp_path / "nowhere", local_files_only=True)
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_sd3(tmp_path, local_files_only=True)


def test_text_encoder_3_null_round_trip(tiny_sd3_path: Path) -> None:
    index = read_model_index(tiny_sd3_path)
    assert index["text_encoder_3"] == [None, None]
    assert load_sd3(tiny_sd3_path, local_files_only=True).text_encoder_3 is None


def test_t5_round_trip_and_opt_out(tiny_sd3_t5_path: Path) -> None:
    parts = load_sd3(tiny_sd3_t5_path, local_files_only=True)
    assert parts.text_encoder_3 is not None and parts.tokenizer_3 is not None
    assert_same_weights(
        parts.text_encoder_3, tiny_sd3_pipeline(seed=0, with_t5=True).text_encoder_3
    )
    embeds, pooled = parts.encode_prompts(["a red cube", "a blue ball"], max_sequence_length=12)
    assert embeds.shape == (2, 77 + 12, 32) and pooled.shape == (2, 64)
    assert embeds[:, 77:].abs().sum() > 0  # the T5 stream is real, not zero padding
    no_t5 = load_sd3(tiny_sd3_t5_path, local_files_only=True, load_t5=False)
    assert no_t5.text_encoder_3 is None and no_t5.tokenizer_3 is None


# ----------------------------------------------------------------------------------- prompts


def test_encode_prompts_shapes_and_content(parts: SD3Components) -> None:
    embeds, pooled = encode_prompts(
        ["a cat", "a dog", "a cat"],
        text_encoder=parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        transformer=parts.transformer,
        device="cpu",
        max_sequence_length=16,
    )
    assert embeds.shape == (3, 77 + 16, 32) and pooled.shape == (3, 64)
    assert not embeds.requires_grad
    assert torch.equal(embeds[0], embeds[2]) and torch.equal(pooled[0], pooled[2])
    assert not torch.allclose(embeds[0], embeds[1]) and not torch.allclose(pooled[0], pooled[1])
    assert embeds[:, 77:].abs().sum() == 0  # no T5: zeros, as diffusers does


def test_encode_prompts_without_t5_needs_the_transformer(parts: SD3Components) -> None:
    with pytest.raises(ValueError, match="transformer="):
        encode_prompts(
            ["x"],
            text_encoder=parts.text_encoder,
            text_encoder_2=parts.text_encoder_2,
            tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2,
        )


# ----------------------------------------------------------------------------------- LoRA


def test_add_lora_trains_only_lora(parts: SD3Components) -> None:
    params = add_lora(parts.transformer, rank=4, alpha=8.0)
    trainable = [p for p in parts.transformer.parameters() if p.requires_grad]
    assert len(params) > 0
    assert {id(p) for p in params} == {id(p) for p in trainable}
    names = {n for n, p in parts.transformer.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    # default init: B = 0, so the adapted model starts as the base model
    assert all(
        p.abs().sum() == 0 for k, p in lora_parameters(parts.transformer).items() if "lora_B" in k
    )


def test_add_lora_bad_target_modules(parts: SD3Components) -> None:
    with pytest.raises(ValueError, match="no_such_layer") as info:
        add_lora(parts.transformer, target_modules=["to_q", "no_such_layer"])
    assert "to_q" in str(info.value)  # lists available names


def test_sampling_adapter_copy_ema_and_switching(parts: SD3Components) -> None:
    tr = parts.transformer
    base = velocity(tr)
    params = add_lora(tr, rank=4)
    perturb(params, seed=1)
    add_sampling_adapter(tr)
    old, new = lora_parameters(tr, "old"), lora_parameters(tr, "default")
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old)
    assert not any(p.requires_grad for p in old.values())
    assert all(p.requires_grad for p in new.values())
    assert tr.active_adapters() == ["default"]
    v_old = velocity(tr)

    perturb(params, seed=2)  # the trained policy moves away from v_old
    v_new = velocity(tr)
    assert (v_new - v_old).abs().max() > 1e-3 and (v_old - base).abs().max() > 1e-3
    flags = {n: p.requires_grad for n, p in tr.named_parameters()}

    with use_adapter(tr, None):
        assert {n: p.requires_grad for n, p in tr.named_parameters()} == flags
        # equal up to CPU kernel choice (wrapping a Linear changes strides, not values)
        torch.testing.assert_close(velocity(tr), base)
    with use_adapter(tr, "old"):
        assert {n: p.requires_grad for n, p in tr.named_parameters()} == flags
        torch.testing.assert_close(velocity(tr), v_old)
    assert {n: p.requires_grad for n, p in tr.named_parameters()} == flags
    assert tr.active_adapters() == ["default"]
    torch.testing.assert_close(velocity(tr), v_new)

    before = {k: v.detach().clone() for k, v in old.items()}
    ema_update_adapter(tr, decay=0.9)
    for k in old:
        assert torch.equal(old[k], 0.9 * before[k] + (1 - 0.9) * new[k].detach())
    assert not any(p.requires_grad for p in old.values())


def test_use_adapter_restores_on_error_and_grads_reach_only_default(parts: SD3Components) -> None:
    tr = parts.transformer
    add_lora(tr, rank=2)
    add_sampling_adapter(tr)
    flags = {n: p.requires_grad for n, p in tr.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), use_adapter(tr, "old"):
        raise RuntimeError("boom")
    assert {n: p.requires_grad for n, p in tr.named_parameters()} == flags
    assert tr.active_adapters() == ["default"]
    with pytest.raises(ValueError, match="nope"), use_adapter(tr, "nope"):
        pass
    forward(tr).square().mean().backward()
    grads = {n for n, p in tr.named_parameters() if p.grad is not None}
    assert grads and all(".default." in n for n in grads)


def test_ema_update_rejects_bad_decay(parts: SD3Components) -> None:
    add_lora(parts.transformer, rank=2)
    add_sampling_adapter(parts.transformer)
    with pytest.raises(ValueError, match="decay"):
        ema_update_adapter(parts.transformer, decay=1.5)


def test_build_tiny_sd3_into_new_directory(tmp_path: Path) -> None:
    out = build_tiny_sd3(tmp_path / "t", seed=1)
    assert (out / "model_index.json").is_file()
    assert load_sd3(str(out), local_files_only=True).transformer.config.num_layers == 2


def test_ensure_tiny_sd3_fills_an_existing_empty_directory(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    ensure_tiny_sd3(target)
    assert (target / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no temp directory left behind


def _drop_transformer_weights(root: Path) -> None:
    (root / "transformer" / "diffusion_pytorch_model.safetensors").unlink()


def _keep_only_model_index(root: Path) -> None:
    for child in root.iterdir():
        if child.name != "model_index.json":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _empty_text_encoders(root: Path) -> None:
    """What a non-zero DDP rank's build left: transformers saves on global rank 0 only."""
    for name in ("text_encoder", "text_encoder_2"):
        shutil.rmtree(root / name)
        (root / name).mkdir()


@pytest.mark.parametrize(
    "damage", [_drop_transformer_weights, _keep_only_model_index, _empty_text_encoders]
)
def test_ensure_tiny_sd3_rebuilds_a_half_written_folder(tmp_path: Path, damage) -> None:
    target = tmp_path / "tiny"
    ensure_tiny_sd3(target)
    damage(target)
    assert not tiny_sd3_is_complete(target)
    ensure_tiny_sd3(target)
    assert tiny_sd3_is_complete(target)
    assert load_sd3(str(target), local_files_only=True).transformer.config.num_layers == 2
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temp or stale folder left


def test_ensure_tiny_sd3_keeps_foreign_files_when_rebuilding(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    (target / "model_index.json").write_text("{}")  # a crashed in-place build
    ensure_tiny_sd3(target)
    assert tiny_sd3_is_complete(target)
    assert (target / "notes.txt").read_text() == "keep me"
