"""``marble evaluate``: every benchmark and reward in the table and JSON, deterministic scores,
the exported LoRA scoring as the checkpoint it came from, and ``n`` = the prompts that apply.

A tiny SD3 trained one step (LoRA B drawn first, evaluation EMA on) writes a Lightning
checkpoint; the specialist rewards run on tiny random models: TrOCR and Mask2Former + CLIP
built by their ``build_tiny_if_missing``, the five of the PickScore set on tiny weights in their
real formats (:func:`test_reward_models.build_reward_weights`).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_module import PROMPTS, make_module, randomise_lora_b
from test_reward_models import build_reward_weights, specs

from marble_pl.cli import main
from marble_pl.data import PromptDataModule
from marble_pl.evaluate import BENCHMARKS, _unknown, evaluate, geneval_summary, parse_rewards
from marble_pl.export import export_checkpoint

PICKSCORE = ["a red apple on a table", "a lighthouse at dusk", "a cat on a sofa"]
OCR = ['a shop sign that reads "OPEN"', "a quiet street at night", 'a mug saying "hi"']
GENEVAL = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a red car"},
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"},
]  # fmt: skip
SETTINGS = dict(num_inference_steps=2, resolution=32, batch_size=2)  # 3 prompts: 2 batches


@dataclass
class Setup:
    config: Path
    ckpt: Path
    lora: Path
    rewards: list[dict[str, object]]
    root: Path


@pytest.fixture(scope="module")
def setup(tiny_sd3_path, tmp_path_factory) -> Setup:
    """A one-step run's checkpoint and its export, a config naming the tiny specialist rewards,
    a three-source prompt root and the PickScore set's tiny reward specs."""
    tmp = tmp_path_factory.mktemp("evaluate")
    module = make_module(tiny_sd3_path, eval_ema_decay=0.9, num_inference_steps=2)
    randomise_lora_b(module, adapters=("old", "ema"))
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        default_root_dir=tmp,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp / "checkpoints", every_n_train_steps=1)],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, PromptDataModule(str(PROMPTS), batch_size=2, group_size=3, seed=0))
    (ckpt,) = (tmp / "checkpoints").glob("*.ckpt")
    export_checkpoint(ckpt, tmp / "lora", local_files_only=True)

    root = tmp / "dataset"
    for folder in ("pickscore", "ocr", "geneval"):
        (root / folder).mkdir(parents=True)
    (root / "pickscore" / "test.txt").write_text("\n".join(PICKSCORE) + "\n")
    (root / "ocr" / "test.txt").write_text("\n".join(OCR) + "\n")
    (root / "geneval" / "test_metadata.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in GENEVAL)
    )
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1},
        "model": {
            "pretrained_model_name_or_path": str(tiny_sd3_path),
            "local_files_only": True,
            "rewards": [
                "brightness",
                {
                    "name": "ocr",
                    "engine": "trocr",
                    "pretrained_model_name_or_path": str(tmp / "tiny-trocr"),
                    "build_tiny_if_missing": True,
                    "local_files_only": True,
                    "max_new_tokens": 8,
                },
                {
                    "name": "geneval",
                    "detector_name_or_path": str(tmp / "tiny-mask2former"),
                    "clip_name_or_path": str(tmp / "tiny-clip"),
                    "build_tiny_if_missing": True,
                    "local_files_only": True,
                    "detector_size": None,
                    "only_strict": True,  # as training may: evaluate turns the accuracy pass on
                },
            ],
            "lora_rank": 4,
            "lora_alpha": 8.0,
            "resolution": 32,
            "max_sequence_length": 16,
            "eval_ema_decay": 0.9,
        },
        "data": {"root": str(root)},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    five = specs(build_reward_weights(tmp / "reward_weights"))
    rewards = [five[name] for name in BENCHMARKS["pickscore"]]
    return Setup(config=path, ckpt=ckpt, lora=tmp / "lora", rewards=rewards, root=root)


def scores(result: dict) -> dict[tuple[str, str], tuple[float | None, int]]:
    return {
        (bench, name): (row["mean"], row["n"])
        for bench, out in result["benchmarks"].items()
        for name, row in out["rewards"].items()
    }


@pytest.fixture(scope="module")
def from_ckpt(setup) -> tuple[dict, str, dict]:
    """``marble evaluate --ckpt_path ...`` through the ``marble`` command: (JSON, table, the
    same run again in-process)."""
    out = setup.config.parent / "eval.json"
    args = [
        "evaluate",
        f"--config={setup.config}",
        f"--ckpt_path={setup.ckpt}",
        f"--rewards={json.dumps(setup.rewards)}",
        "--num-inference-steps=2",
        "--resolution=32",
        "--batch-size=2",
        f"--out={out}",
    ]
    import contextlib
    import io

    table = io.StringIO()
    with contextlib.redirect_stdout(table), pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    again = evaluate(setup.config, ckpt_path=setup.ckpt, rewards=setup.rewards, **SETTINGS)
    return json.loads(out.read_text()), table.getvalue(), again


def test_table_and_json_have_every_benchmark_and_reward(from_ckpt):
    result, table, _ = from_ckpt
    expected = {(b, r) for b, names in BENCHMARKS.items() for r in names}
    assert set(scores(result)) == expected
    for bench, name in expected:
        assert f"| {bench} | {name} |" in table
    s = result["settings"]
    assert (s["num_inference_steps"], s["resolution"], s["guidance_scale"]) == (2, 32, 1.0)
    assert s["adapter"] == "ema"  # the run kept an evaluation EMA: it is what is evaluated
    gen = result["benchmarks"]["geneval"]["geneval"]["geneval"]
    assert set(gen["tags"]) == {"single_object", "colors"}
    assert "| single_object | 2 |" in table and "| colors | 1 |" in table
    assert gen["accuracy"] is not None  # only_strict of the config's spec is turned off
    for key in ("accuracy", "strict_accuracy"):
        assert 0.0 <= gen[key] <= 1.0


def test_n_scored_is_the_prompts_that_apply(from_ckpt):
    """OCR scores the two prompts that quote a text; every other reward all three prompts."""
    result, _, _ = from_ckpt
    for (bench, name), (mean, n) in scores(result).items():
        assert n == (2 if bench == "ocr" else 3), (bench, name)
        assert mean is not None
        assert result["benchmarks"][bench]["prompts"] == 3
    assert result["benchmarks"]["geneval"]["geneval"]["geneval"]["n"] == 3


def test_scores_are_deterministic(from_ckpt):
    result, _, again = from_ckpt
    assert scores(again) == scores(result)
    assert again["benchmarks"]["geneval"]["geneval"] == result["benchmarks"]["geneval"]["geneval"]


def test_exported_lora_scores_as_its_checkpoint(setup, from_ckpt):
    """``lora/`` holds the evaluation EMA the checkpoint evaluates: the same images, the same
    scores; ``lora_raw/`` (the trained adapter) gives other images."""
    result, _, _ = from_ckpt
    kw = dict(SETTINGS, benchmarks=["pickscore", "ocr"], rewards=setup.rewards)
    lora = evaluate(setup.config, lora=setup.lora, **kw)
    want = {k: v for k, v in scores(result).items() if k[0] != "geneval"}
    assert scores(lora) == want
    raw = evaluate(setup.config, lora=setup.lora.with_name("lora_raw"), **kw)
    assert scores(raw) != want


def test_geneval_summary_per_tag():
    nan = float("nan")
    out = geneval_summary([1.0, 0.0, 1.0, nan], [1.0, 0.0, 0.0, nan], ["a", "a", "b", None])
    assert out["n"] == 3
    assert out["accuracy"] == pytest.approx(2 / 3) and out["strict_accuracy"] == pytest.approx(
        1 / 3
    )
    assert out["tags"] == {
        "a": {"n": 2, "accuracy": 0.5, "strict_accuracy": 0.5},
        "b": {"n": 1, "accuracy": 1.0, "strict_accuracy": 0.0},
    }
    assert out["overall"] == pytest.approx(0.75)  # the mean of the tags' accuracies


def test_overrides_pass_with_their_values_and_nothing_else():
    args = ["--data.root", "/d", "--model.lora_rank=8", "stray", "--trainer.devices", "1", "--x"]
    assert _unknown(args) == ["stray", "--x"]


def test_a_checkpoint_that_does_not_fit_the_config_is_one_line(setup, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "evaluate",
                f"--config={setup.config}",
                f"--ckpt_path={setup.ckpt}",
                "--model.lora_rank",
                "8",
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("marble: error: the checkpoint's LoRA does not fit"), err


def test_parse_rewards():
    assert parse_rewards("imagereward, pickscore") == ["imagereward", "pickscore"]
    assert parse_rewards("[{name: pickscore, dtype: float16}, hpsv2]") == [
        {"name": "pickscore", "dtype": "float16"},
        "hpsv2",
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ckpt_path=a.ckpt", "--lora=b"], "not both"),
        (["--benchmarks=geneval,drawbench"], "unknown ['drawbench']"),
        (["--ckpt_path=missing.ckpt"], "checkpoint not found"),
        (["--rewards={}"], "--rewards"),
        (["--rewards=[{name: pickscore"], "--rewards"),
        (["--steps=3"], "unknown argument(s) ['--steps=3']"),
    ],
)
def test_bad_arguments_are_one_line(extra, message, capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", f"--config={config}", *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("marble: error: ") and message in err and "\n" not in err, err
    assert not torch.cuda.is_initialized()


def test_random_weights_evaluates_the_base_model_without_weights(setup):
    """``--random-weights``: the config's architecture with random weights, no adapter."""
    result = evaluate(
        setup.config,
        random_weights=True,
        benchmarks=["pickscore"],
        rewards=["brightness"],
        limit=1,
        **SETTINGS,
    )
    assert result["settings"]["random_weights"] and result["settings"]["adapter"] is None
    ((mean, n),) = scores(result).values()
    assert n == 1 and 0.0 <= mean <= 1.0


class ValidationRecord(Callback):
    """``trainer.callback_metrics`` after each validation, with the step it ran at."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.records.append((trainer.global_step, metrics))


def test_best_checkpoint_is_selected_by_the_mean_of_the_validation_rewards(tiny_sd3_path, tmp_path):
    """``val/reward_mean`` is the mean of the ``val/reward/<name>`` means at every validation,
    and ``ModelCheckpoint(monitor="val/reward_mean", mode="max")`` keeps the best of them."""
    module = make_module(
        tiny_sd3_path, num_inference_steps=2, optimizer=lambda p: torch.optim.Adam(p, lr=0.05)
    )  # Adam: every LoRA weight moves ~lr a step, so the tiny policy's rewards move (SGD barely does)
    randomise_lora_b(module)
    record = ValidationRecord()
    best = ModelCheckpoint(
        dirpath=tmp_path,
        monitor="val/reward_mean",
        mode="max",
        save_top_k=1,
        filename="best-{step}",
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record, best],
        num_sanity_val_steps=0,
    )
    data = PromptDataModule(
        str(PROMPTS), val_file=str(PROMPTS), batch_size=2, group_size=3, val_batch_size=3, seed=0
    )
    trainer.fit(module, data)
    assert [step for step, _ in record.records] == [1, 2, 3]
    eps = torch.finfo(torch.float32).eps
    for _, metrics in record.records:
        per_reward = [metrics[f"val/reward/{name}"] for name in module.reward_names]
        bound = eps * sum(abs(v) for v in per_reward)  # float32 sum and division, vs float64
        assert metrics["val/reward_mean"] == pytest.approx(sum(per_reward) / 3, abs=bound)
    means = [metrics["val/reward_mean"] for _, metrics in record.records]
    # The policy moves: the selection has a choice to make, by margins far above float32 noise.
    assert min(abs(a - b) for a, b in itertools.combinations(means, 2)) > 1e-5
    step = record.records[means.index(max(means))][0]
    assert float(best.best_model_score) == pytest.approx(max(means), rel=eps)
    assert [p.name for p in tmp_path.glob("*.ckpt")] == [f"best-step={step}.ckpt"]


def test_the_official_recipe_keeps_the_best_checkpoint_by_val_reward_mean():
    config = yaml.safe_load(
        (Path(__file__).parents[1] / "configs" / "marble_sd35.yaml").read_text()
    )
    monitored = [
        c["init_args"]
        for c in config["trainer"]["callbacks"]
        if c["class_path"].endswith("ModelCheckpoint") and "monitor" in c.get("init_args", {})
    ]
    assert monitored == [
        {"monitor": "val/reward_mean", "mode": "max", "save_top_k": 1, "filename": "best-{step}"}
    ]
