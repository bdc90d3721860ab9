"""The FLUX family (:class:`~marble_pl.policies.flux.FluxPolicy`) on the tiny FLUX: its rollout is
``FluxPipeline``'s, ``marble fit`` trains it, ``marble preflight`` reports it, DDP 2 == 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from marble_pl.cli import MarbleCLI, main
from marble_pl.data import PromptDataModule
from marble_pl.errors import ConfigError
from marble_pl.flux.tiny import ensure_tiny_flux
from marble_pl.module import MarbleModule
from marble_pl.policies import policy_class
from marble_pl.policies.flux import FluxPolicy, flux_shift, pack_latents, unpack_latents
from marble_pl.rollout import RolloutConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "tiny-flux")


def hparams(path: Path, **changes) -> dict:
    return {
        "pretrained_model_name_or_path": str(path), "local_files_only": True, "load_t5": True,
        "weights_dtype": "float32", "gradient_checkpointing": False, "lora_rank": 4,
        "lora_alpha": 8.0, "lora_target_modules": ["to_q", "to_k", "to_v"],
        "lora_init": "default", "max_sequence_length": 16, "random_weights": False,
        "architecture_overrides": None, "resolution": 32, "eval_ema_decay": None, "seed": 0,
        **changes,
    }  # fmt: skip


def test_the_family_is_chosen_from_model_index_or_the_name(tiny_flux, tiny_sd3_path):
    assert policy_class(str(tiny_flux)) is FluxPolicy  # model_index.json: FluxPipeline
    assert policy_class("black-forest-labs/FLUX.1-dev") is FluxPolicy  # shipped hub id
    assert policy_class(str(tiny_flux.parent / "new-tiny-flux")) is FluxPolicy  # to be built
    assert policy_class(str(tiny_sd3_path)) is not FluxPolicy


def test_packing_and_the_dynamic_shift_are_fluxs():
    x = torch.randn(2, 16, 8, 6)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 4 * 3, 64) and torch.equal(unpack_latents(tokens, 8, 6), x)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].reshape(-1))  # token (0, 1): a 2x2 patch
    policy = FluxPolicy({})
    policy.scheduler = type("S", (), {"config": {}})()  # the shipped defaults
    for seq_len in (256, 1024, 4096):
        assert flux_shift(policy.scheduler, seq_len) == pytest.approx(calculate_shift(seq_len))


def test_rollout_is_flux_pipelines_and_velocity_its_transformer(tiny_flux):
    """The policy's rollout (guidance embedding 3.5, FLUX's sigmas, packed latents) is bit-equal
    to ``FluxPipeline`` from the same noise (the LoRA starts at B = 0: the base model)."""
    policy = FluxPolicy(hparams(tiny_flux))
    policy.load()
    config = RolloutConfig(num_inference_steps=3, guidance_scale=1.0, height=32, width=32)
    shape = policy.latent_shape(config)
    assert shape == (16, 16, 16) and policy.vae_scale_factor * policy.patch_size == 4
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a dog"]
    out = policy.sample(prompts, torch.Generator().manual_seed(0), "old", noise, config)
    pipe = policy.components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    with policy.use_adapter(None):
        ref = pipe(
            prompts, height=32, width=32, num_inference_steps=3, guidance_scale=3.5,
            max_sequence_length=16, latents=pack_latents(noise), output_type="latent",
        ).images  # fmt: skip
    assert torch.equal(out.latents, unpack_latents(ref, 16, 16))
    assert out.images.shape == (2, 3, 32, 32)
    # the SDE rollout: its step noise from each sample's own generator, so reproducible
    sde = RolloutConfig(num_inference_steps=3, guidance_scale=1.0, height=32, width=32,
                        noise_level=0.7)  # fmt: skip
    draws = [
        policy.sample(
            prompts, [torch.Generator().manual_seed(i) for i in (5, 6)], "old", noise, sde
        ).latents  # fmt: skip
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1]) and not torch.allclose(draws[0], out.latents)
    sigmas = policy.schedule_sigmas(3, shape)
    assert sigmas[0] == 1.0 and torch.all(sigmas[1:] < sigmas[:-1]) and sigmas.shape == (3,)
    # velocity: the transformer's output on packed latents, at t in [0, 1], unpacked
    x, t = torch.randn(2, *shape), torch.tensor([0.3, 0.8])
    v = policy.velocity(x, t, out.prompt_embeds, out.pooled_prompt_embeds)
    direct = policy.transformer(
        hidden_states=pack_latents(x), timestep=t, guidance=torch.full((2,), 3.5),
        pooled_projections=out.pooled_prompt_embeds, encoder_hidden_states=out.prompt_embeds,
        txt_ids=torch.zeros(16, 3), img_ids=pipe._prepare_latent_image_ids(2, 8, 8, "cpu", x.dtype),
        return_dict=False,
    )[0]  # fmt: skip
    assert torch.equal(v, unpack_latents(direct, 16, 16))


def test_marble_fit_trains_the_tiny_flux_from_its_config(tmp_path, monkeypatch):
    """configs/tiny_flux.yaml, 2 steps: the tiny FLUX is built on first use, the FLUX family
    chosen, the LoRA trained (Flow-GRPO's twelve FLUX targets)."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cli = MarbleCLI(
        MarbleModule,
        PromptDataModule,
        run=False,
        args=[
            "--config", "configs/tiny_flux.yaml", "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
        ],
    )  # fmt: skip
    module = cli.model
    cli.trainer.fit(module, cli.datamodule)
    assert isinstance(module.policy, FluxPolicy) and cli.trainer.global_step == 2
    assert (tmp_path / "runs" / "tiny-flux" / "model_index.json").is_file()
    names = [n for n, _ in module.named_parameters() if ".lora_A.default" in n]
    for kind in ("attn.add_q_proj", "ff_context.net.2", "single_transformer_blocks.1.attn.to_q"):
        assert any(f"{kind}.lora_A" in n for n in names), kind
    weights = module.last_step.weights
    assert torch.isfinite(torch.as_tensor(weights)).all()
    trained = dict(module.named_parameters())
    key = "transformer_blocks.0.attn.add_q_proj.lora_B"
    assert trained[f"transformer.{key}.default.weight"].abs().sum() > 0  # B starts at 0
    # LoraExport's file is what FluxPipeline.load_lora_weights reads
    pipe = FluxPipeline.from_pretrained(tmp_path / "runs" / "tiny-flux")
    pipe.load_lora_weights(tmp_path / "runs" / "tiny_flux" / "version_0" / "lora")
    loaded = dict(pipe.transformer.named_parameters())[f"{key}.default_0.weight"]
    assert torch.equal(loaded, trained[f"transformer.{key}.default.weight"].detach())


def test_marble_preflight_reports_fluxs_memory_per_gpu(tmp_path, monkeypatch, capsys):
    """``marble preflight`` on a FLUX config prints the per-GPU memory table (the tiny FLUX of
    configs/tiny_flux.yaml before its first build: its configs, no run)."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["preflight", "--config", "configs/tiny_flux.yaml", "--random-weights"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "| transformer | FluxTransformer2DModel |" in printed
    assert "| **update peak** |" in printed and "DDP fits" in printed
    assert not (tmp_path / "runs").exists()  # preflight writes nothing


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_on_the_tiny_flux_equals_one_process(tmp_path, tiny_flux):
    """2 DDP processes (gloo) == 1 process on the concatenated batch, in the gramian space with
    micro-batches, as tests/test_distributed.py checks SD3 (same runner, same tolerances)."""
    from test_distributed import assert_global_grams_match, ddp_and_single

    common = {"model": tiny_flux, "space": "gramian", "steps": 2, "advantage_std": "group"}
    r0, r1, ref, _ = ddp_and_single(tmp_path, timesteps_per_image=2, micro_batch_size=4, **common)
    assert r0["applied"] == r1["applied"] and len(ref["applied"]) == 2
    torch.testing.assert_close(
        torch.tensor(r0["applied"]), torch.tensor(ref["applied"]), atol=1e-4, rtol=1e-4
    )
    assert_global_grams_match(r0["grams"], ref["grams"])
    assert any("single_transformer_blocks" in k for k in ref["lora"])  # FLUX's own blocks
    for key, value in ref["lora"].items():
        torch.testing.assert_close(r0["lora"][key], value, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r1["lora"][key], r0["lora"][key], atol=0, rtol=0)


@pytest.mark.slow
def test_flux_dev_config_as_shipped_trains_a_step_on_the_tiny_flux(
    tmp_path, tiny_flux, monkeypatch
):
    """configs/flux_dev.yaml AS SHIPPED (bf16 weights, bf16-mixed, gradient checkpointing, the
    Flow-GRPO LoRA (rank 64, Gaussian A), KL, evaluation EMA, every callback) on the tiny FLUX at
    32 px with cheap rewards: its keys parse and a step trains."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train_prompts.txt").write_text("a cat\na dog\n")
    (data / "val_prompts.txt").write_text("a cat\n")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU bf16 kernels are slow with a busy second core
    try:
        cli = MarbleCLI(
            MarbleModule,
            PromptDataModule,
            run=False,
            args=[
                "--config", str(ROOT / "configs" / "flux_dev.yaml"),
                f"--model.pretrained_model_name_or_path={tiny_flux}",
                "--model.local_files_only=true", "--model.resolution=32",
                "--model.max_sequence_length=16", "--model.num_inference_steps=2",
                "--model.rewards=[brightness, saturation, compressibility]",
                "--model.micro_batch_size=2", "--model.rollout_chunk_size=2",
                "--trainer.accelerator=cpu", "--trainer.max_steps=1",
                "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                "--data.batch_size=1", "--data.group_size=2",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            ],
        )  # fmt: skip
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        torch.set_num_threads(threads)
    module = cli.model
    assert isinstance(module.policy, FluxPolicy) and cli.trainer.global_step == 1
    assert cli.trainer.precision == "bf16-mixed" and module.transformer.dtype == torch.bfloat16
    assert module.transformer.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in module.lora_params)
    assert {"default", "old", "ema"} <= set(module.transformer.peft_config)
    assert module.transformer.peft_config["default"].r == 64
    trained = [p for n, p in module.named_parameters() if "lora_B.default." in n]
    assert all(torch.isfinite(p).all() for p in trained) and any(p.abs().sum() > 0 for p in trained)


def test_model_family_chooses_flux_for_a_path_not_built_yet(tmp_path):
    """``model.family: flux`` needs no "flux" in the path's name: the tiny FLUX is built there."""
    path = tmp_path / "my-model"
    assert policy_class(str(path)) is not FluxPolicy  # auto: no index, no name to guess from
    for family in ("flux", "FLUX", "FluxPipeline"):
        assert policy_class(str(path), family) is FluxPolicy
    module = MarbleModule(
        pretrained_model_name_or_path=str(path), family="flux", build_tiny_if_missing=True,
        local_files_only=True, resolution=32, max_sequence_length=16, lora_rank=4,
    )  # fmt: skip
    module.configure_model()
    assert isinstance(module.policy, FluxPolicy)
    assert (path / "model_index.json").is_file()


def _guidance_seen(module: MarbleModule) -> torch.Tensor:
    """The ``guidance`` the transformer is called with in one velocity evaluation."""
    seen = {}

    def spy(_, args, kwargs):
        seen["guidance"] = kwargs["guidance"]

    handle = module.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
        module.velocity(x, torch.tensor(0.5), *module.encode(["a cat", "a dog"]))
    finally:
        handle.remove()
    return seen["guidance"]


def test_distilled_guidance_reaches_the_guidance_embedding(tiny_flux):
    common = {
        "pretrained_model_name_or_path": str(tiny_flux), "local_files_only": True,
        "resolution": 32, "max_sequence_length": 16, "lora_rank": 4,
    }  # fmt: skip
    for value, expected in ((None, 3.5), (2.0, 2.0)):
        module = MarbleModule(distilled_guidance=value, **common)
        module.configure_model()
        assert torch.equal(_guidance_seen(module), torch.full((2,), expected))
    with pytest.raises(ConfigError, match=r"model.distilled_guidance must be > 0"):
        MarbleModule(distilled_guidance=0.0, **common)


def test_distilled_guidance_is_refused_for_sd3(tiny_sd3_path):
    """SD3 has no guidance embedding: an explicit family says so at once, auto when chosen."""
    with pytest.raises(ConfigError, match=r"no guidance embedding.*flux") as err:
        MarbleModule(family="sd3", distilled_guidance=3.5)
    assert "\n" not in str(err.value)
    module = MarbleModule(pretrained_model_name_or_path=str(tiny_sd3_path), distilled_guidance=3.5)
    with pytest.raises(ConfigError, match=r"model.distilled_guidance is 3.5 but the sd3 family"):
        module.configure_model()  # before any weight loads


def test_print_config_shows_family_and_distilled_guidance(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/tiny_flux.yaml", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "  family: flux\n" in printed and "  distilled_guidance: null\n" in printed
