"""SampleGrid without prompts of its own: the data module's validation prompts and metadata."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from marble_pl.callbacks import SampleGrid
from marble_pl.callbacks.sample_grid import score_text

from marble_pl.data import PromptDataModule
from marble_pl.errors import ConfigError

MIXED = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "mixed"


class FakeModule:
    """Samples flat images; scores ``[brightness, ocr-like]``: the second column is NaN where the
    image's metadata is not from the ``ocr`` source (a specialist that does not apply)."""

    reward_names = ["brightness", "ocr"]

    def __init__(self) -> None:
        self.metadata: list[dict] | None = None

    def sample(self, prompts, generator, adapter=None, config=None):
        images = torch.rand(len(prompts), 3, 8, 8, generator=generator)
        return SimpleNamespace(images=images)

    def score(self, images, prompts, metadata=None):
        self.metadata = metadata
        ocr = [1.0 if (m or {}).get("source") == "ocr" else math.nan for m in metadata or []]
        return torch.stack([images.mean(dim=(1, 2, 3)), torch.tensor(ocr)], dim=1)


def fake_trainer(datamodule, tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(
        datamodule=datamodule,
        global_step=0,
        is_global_zero=True,
        loggers=[],
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
    )


def test_without_prompts_the_grid_takes_the_validation_prompts_and_their_metadata(tmp_path):
    data = PromptDataModule(root=str(MIXED), batch_size=3, group_size=2)
    data.setup("fit")
    trainer, module = fake_trainer(data, tmp_path), FakeModule()
    grid = SampleGrid(every_n_steps=1, images_per_prompt=2, max_prompts=4)
    grid.setup(trainer, module, "fit")
    assert grid.prompts == data.val_dataset.prompts[:4]
    sources = [m["source"] for m in grid.metadata]
    assert sources == ["pickscore", "ocr", "geneval", "pickscore"]  # interleaved sources
    path = grid.render(trainer, module)
    assert path is not None and path.is_file()
    # Each image carries its prompt's metadata (GenEval's include clauses too).
    assert [m["source"] for m in module.metadata] == [s for s in sources for _ in range(2)]
    assert module.metadata[4]["include"] == data.val_dataset.metadata[2]["include"]
    scores = module.score(torch.zeros(8, 3, 2, 2), grid.prompts, module.metadata)
    rows = grid._caption([p for p in grid.prompts for _ in range(2)], scores, module).splitlines()
    assert rows[0] == "| prompt | seed | brightness | ocr |"
    ocr_cells = [row.rsplit("|", 2)[1].strip() for row in rows[2:]]
    assert ocr_cells == ["n/a", "n/a", "1", "1", "n/a", "n/a", "n/a", "n/a"]
    assert "nan" not in "\n".join(rows).lower()


def test_explicit_prompts_win_over_the_validation_prompts(tmp_path):
    data = PromptDataModule(root=str(MIXED), batch_size=3, group_size=2)
    data.setup("fit")
    grid = SampleGrid(prompts=["a red cube"])
    grid.setup(fake_trainer(data, tmp_path), FakeModule(), "fit")
    assert grid.prompts == ["a red cube"] and grid.metadata == [{}]


def test_a_jsonl_prompt_file_gives_its_fields_as_metadata(tmp_path):
    file = tmp_path / "val.jsonl"
    file.write_text('{"prompt": "a cup", "tag": "single_object", "include": []}\n')
    grid = SampleGrid(prompt_file=str(file))
    assert grid.prompts == ["a cup"] and grid.metadata[0]["tag"] == "single_object"


def test_no_prompts_and_no_validation_data_is_one_line(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("a cat\na dog\n")
    data = PromptDataModule(train_file=str(train), batch_size=2, group_size=2)
    data.setup("fit")
    with pytest.raises(ConfigError, match="SampleGrid has no prompts") as info:
        SampleGrid().setup(fake_trainer(data, tmp_path), FakeModule(), "fit")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="SampleGrid has no prompts"):
        SampleGrid().setup(fake_trainer(None, tmp_path), FakeModule(), "fit")


@pytest.mark.parametrize(("value", "text"), [(0.5, "0.5"), (1 / 3, "0.3333"), (math.nan, "n/a")])
def test_score_text(value, text):
    assert score_text(value) == text
    assert score_text(math.inf) == "n/a"


def test_at_start_renders_the_base_once_and_never_on_resume(tmp_path):
    """``at_start``: a grid before the first update (step 0); a run resumed at a later step does
    not render one at its start; without ``at_start`` nothing is rendered at the start."""
    trainer, module = fake_trainer(None, tmp_path), FakeModule()
    grid = SampleGrid(prompts=["a red cube"], at_start=True)
    grid.setup(trainer, module, "fit")
    grid.on_train_start(trainer, module)
    assert grid.last_path is not None and grid.last_path.name == "validation_step000000.png"
    resumed = SampleGrid(prompts=["a red cube"], at_start=True)
    trainer.global_step = 40
    resumed.setup(trainer, module, "fit")
    resumed.on_train_start(trainer, module)
    plain = SampleGrid(prompts=["a red cube"])
    trainer.global_step = 0
    plain.setup(trainer, module, "fit")
    plain.on_train_start(trainer, module)
    assert resumed.last_path is None and plain.last_path is None


def test_upscale_to_repeats_each_pixel_by_the_smallest_whole_factor():
    from marble_pl.grid import upscale_to

    images = torch.rand(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    big = upscale_to(images, 20)  # shorter side 6 -> factor ceil(20 / 6) = 4
    assert big.shape == (2, 3, 32, 24)
    assert torch.equal(big[:, :, ::4, ::4], images)  # every block is its source pixel
    assert torch.equal(big[:, :, 3::4, 3::4], images)
    assert upscale_to(images, 0) is images and upscale_to(images, 6) is images


def test_min_cell_size_enlarges_the_saved_grid(tmp_path):
    """8x8 samples with ``min_cell_size=64``: cells of 64 px (factor 8), 2 px padding, so a
    row of two images is 2 + 2 * (64 + 2) px wide (the pixels: test above)."""
    from PIL import Image

    trainer, module = fake_trainer(None, tmp_path), FakeModule()
    grid = SampleGrid(prompts=["a red cube"], images_per_prompt=2, min_cell_size=64)
    grid.setup(trainer, module, "fit")
    path = grid.render(trainer, module)
    assert Image.open(path).size == (2 + 2 * 66, 2 + 66)
    with pytest.raises(ConfigError, match="min_cell_size >= 0"):
        SampleGrid(prompts=["a"], min_cell_size=-1)


def test_repeated_validation_prompts_give_one_row_each(tmp_path):
    """A validation file that repeats prompts (more noise per prompt) gives the grid each
    distinct (prompt, metadata) once, in first-seen order."""
    val = tmp_path / "val.txt"
    val.write_text("a handwritten 0\na handwritten 2\na handwritten 0\na handwritten 7\n")
    train = tmp_path / "train.txt"
    train.write_text("a cat\n")
    data = PromptDataModule(train_file=str(train), val_file=str(val), batch_size=1, group_size=2)
    data.setup("fit")
    grid = SampleGrid(max_prompts=8)
    grid.setup(fake_trainer(data, tmp_path), FakeModule(), "fit")
    assert grid.prompts == ["a handwritten 0", "a handwritten 2", "a handwritten 7"]
