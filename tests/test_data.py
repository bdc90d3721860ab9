"""Tests of prompt file parsing and the grouped prompt DataModule."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import RandomSampler

from marble_pl.data import GroupCollate, PromptDataModule, PromptFileError, read_prompts
from marble_pl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _prompts_file(tmp_path: Path, n: int) -> Path:
    return _write(tmp_path / "p.txt", "\n".join(f"prompt {i}" for i in range(n)) + "\n")


# --- read_prompts -------------------------------------------------------------------------


def test_txt_strips_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.txt", "  a red apple  \n\n\t\na blue car\r\nlast line")
    assert read_prompts(path) == ["a red apple", "a blue car", "last line"]


def test_txt_accepts_bom_and_unicode(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffun café à Paris\n".encode())
    assert read_prompts(path) == ["un café à Paris"]


def test_jsonl_default_and_custom_key(tmp_path: Path) -> None:
    lines = [{"prompt": " a cat ", "caption": "x"}, {"prompt": "a dog", "caption": "y"}]
    path = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    assert read_prompts(path) == ["a cat", "a dog"]
    assert read_prompts(path, key="caption") == ["x", "y"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    with pytest.raises(PromptFileError, match="does not exist") as info:
        read_prompts(path)
    assert str(path) in str(info.value)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", "a,b\n")
    with pytest.raises(PromptFileError, match=r"\.txt.*\.jsonl") as info:
        read_prompts(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["", "   \n\t\n  \n"], ids=["empty", "whitespace"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_or_whitespace_file(tmp_path: Path, text: str, suffix: str) -> None:
    path = _write(tmp_path / f"p{suffix}", text)
    with pytest.raises(PromptFileError, match="no prompts") as info:
        read_prompts(path)
    assert str(path) in str(info.value)


def test_non_utf8_names_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"ok line\nbad \xff byte\n")
    with pytest.raises(PromptFileError, match="UTF-8") as info:
        read_prompts(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 2" in message
    assert "offset 12" in message
    assert "0xff" in message


def test_bad_json_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", '{"prompt": "ok"}\n\n{"prompt": "oops"\n')
    with pytest.raises(PromptFileError, match="line 3: invalid JSON") as info:
        read_prompts(path)
    assert str(path) in str(info.value)


def test_json_line_not_an_object(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", '["a list"]\n')
    with pytest.raises(PromptFileError, match="line 1: expected a JSON object"):
        read_prompts(path)


def test_missing_key_names_line_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", '{"prompt": "ok"}\n{"text": "no key"}\n')
    with pytest.raises(PromptFileError, match="line 2: missing key 'prompt'") as info:
        read_prompts(path)
    assert str(path) in str(info.value)
    assert "prompt_key" in str(info.value)


def test_non_string_prompt(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", '{"prompt": 3}\n')
    with pytest.raises(PromptFileError, match="line 1: 'prompt' must be a non-empty string"):
        read_prompts(path)


def test_shipped_prompt_files() -> None:
    train = read_prompts(REPO / "configs/prompts/tiny_train.txt")
    val = read_prompts(REPO / "configs/prompts/tiny_val.txt")
    assert len(train) >= 16 and len(set(train)) == len(train)
    assert len(val) >= 2 and not set(val) & set(train)


# --- collate and DataModule ---------------------------------------------------------------


def test_group_collate_repeats_consecutively() -> None:
    batch = GroupCollate(3)(["a", "b"])
    assert batch["prompts"] == ["a", "a", "a", "b", "b", "b"]
    assert batch["group_ids"].dtype == torch.long
    assert batch["group_ids"].tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"group_size": 1}, "group advantages"),
        ({"group_size": 0}, "at least two"),
        ({"val_batch_size": 0}, "val_batch_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_datamodule_rejects_bad_args(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PromptDataModule("unused.txt", **kwargs)


def test_train_batches_structure(tmp_path: Path) -> None:
    dm = PromptDataModule(str(_prompts_file(tmp_path, 7)), batch_size=3, group_size=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 7 prompts, B = 3, drop_last
    seen: list[str] = []
    for batch in batches:
        prompts, ids = batch["prompts"], batch["group_ids"]
        assert len(prompts) == 12 and ids.shape == (12,) and ids.dtype == torch.long
        assert ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        for g in range(3):
            group = prompts[4 * g : 4 * g + 4]
            assert len(set(group)) == 1
            seen.append(group[0])
    assert len(set(seen)) == 6  # no prompt twice in an epoch


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path: Path) -> None:
    path = str(_prompts_file(tmp_path, 20))

    def epochs(seed: int, n: int = 2) -> list[list[str]]:
        dm = PromptDataModule(path, batch_size=4, group_size=2, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [[p for b in loader for p in b["prompts"][::2]] for _ in range(n)]

    first, second = epochs(0), epochs(0)
    assert first == second
    assert first[0] != first[1]
    assert sorted(first[0]) == sorted(first[1])
    assert epochs(1)[0] != first[0]
    assert first[0] != [f"prompt {i}" for i in range(20)]


def test_set_epoch_selects_the_same_order_as_iteration(tmp_path: Path) -> None:
    dm = PromptDataModule(str(_prompts_file(tmp_path, 10)), batch_size=2, group_size=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RandomSampler)  # so Lightning's DDP swaps it
    orders = [list(loader.sampler) for _ in range(3)]
    loader.sampler.set_epoch(1)  # type: ignore[attr-defined]
    assert list(loader.sampler) == orders[1]


def test_no_shuffle_keeps_file_order(tmp_path: Path) -> None:
    dm = PromptDataModule(str(_prompts_file(tmp_path, 4)), batch_size=2, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompts"][::4] == ["prompt 0", "prompt 1"]


def test_fewer_prompts_than_batch_size(tmp_path: Path) -> None:
    dm = PromptDataModule(str(_prompts_file(tmp_path, 2)), batch_size=3)
    with pytest.raises(ConfigError, match=r"data.batch_size=3 is more than the 2 prompts"):
        dm.setup("fit")


def test_dataloader_before_setup_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"setup\('fit'\)"):
        PromptDataModule("unused.txt").train_dataloader()


def test_val_batches_and_no_val_file(tmp_path: Path) -> None:
    val = _write(tmp_path / "v.jsonl", "".join(f'{{"text": "v{i}"}}\n' for i in range(5)))
    train = tmp_path / "t.jsonl"
    train.write_text("".join(f'{{"text": "t{i}"}}\n' for i in range(4)))
    dm = PromptDataModule(str(train), str(val), batch_size=2, prompt_key="text", val_batch_size=3)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert [b["prompts"] for b in batches] == [["v0", "v1", "v2"], ["v3", "v4"]]
    assert batches[1]["group_ids"].tolist() == [0, 1]
    assert [b["indices"].tolist() for b in batches] == [[0, 1, 2], [3, 4]]
    assert PromptDataModule(str(train), prompt_key="text").val_dataloader() == []


class _Rank:
    """What the data module reads of a Trainer under data parallelism."""

    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size = rank, world


def test_val_prompts_are_sharded_without_repeats(tmp_path: Path) -> None:
    """5 prompts on 2 ranks: 3 + 2, each once (Lightning's DistributedSampler would pad to 6)."""
    val = _prompts_file(tmp_path, 5)
    seen = []
    for rank in (0, 1):
        dm = PromptDataModule(str(tmp_path / "unused.txt"), str(val), val_batch_size=2)
        dm.setup("validate")
        dm.trainer = _Rank(rank, 2)
        seen.append([i for b in dm.val_dataloader() for i in b["indices"].tolist()])
    assert seen == [[0, 2, 4], [1, 3]]
    dm.trainer = _Rank(0, 6)  # fewer prompts than processes: named, with the fix
    with pytest.raises(ConfigError, match="5 prompts, fewer than the 6 data-parallel"):
        dm.val_dataloader()


def test_setup_validate_reads_only_val(tmp_path: Path) -> None:
    val = _prompts_file(tmp_path, 3)
    dm = PromptDataModule(str(tmp_path / "missing.txt"), str(val))
    dm.setup("validate")
    assert dm.train_dataset is None
    assert len(next(iter(dm.val_dataloader()))["prompts"]) == 3


def test_shipped_files_through_datamodule() -> None:
    dm = PromptDataModule(
        str(REPO / "configs/prompts/tiny_train.txt"),
        str(REPO / "configs/prompts/tiny_val.txt"),
        batch_size=2,
        group_size=4,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompts"]) == 8
    assert batch["group_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("with_val", [False, True])
def test_trainer_fit_runs_with_and_without_val_file(tmp_path: Path, with_val: bool) -> None:
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.train_sizes: list[int] = []
            self.val_sizes: list[int] = []

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            self.train_sizes.append(len(batch["prompts"]))
            return self.weight.square().sum()

        def validation_step(self, batch: dict, batch_idx: int) -> None:
            self.val_sizes.append(len(batch["prompts"]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    val = str(_write(tmp_path / "v.txt", "x\ny\nz\n")) if with_val else None
    dm = PromptDataModule(str(_prompts_file(tmp_path, 6)), val, batch_size=2, group_size=3)
    probe = Probe()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(probe, dm)
    assert probe.train_sizes == [6, 6, 6]
    assert probe.val_sizes == ([3] if with_val else [])


# --- resumable train loader -----------------------------------------------------------------


class _Recorder:
    """A LightningModule factory whose module records the first prompt of every batch."""

    @staticmethod
    def make() -> Any:
        import lightning as L

        class Probe(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(1))
                self.seen: list[str] = []

            def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
                self.seen.append(batch["prompts"][0])
                return self.weight.square().sum()

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Probe()


def _fit_probe(
    prompts: Path, steps: int, ckpt_dir: Path, ckpt_path: Path | None = None, num_workers: int = 0
) -> list[str]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    probe = _Recorder.make()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)],
    )
    dm = PromptDataModule(str(prompts), batch_size=2, group_size=2, num_workers=num_workers)
    trainer.fit(probe, dm, ckpt_path=ckpt_path)
    return probe.seen


def _firsts(batches: Any) -> list[str]:
    return [b["prompts"][0] for b in batches]


def test_loader_state_round_trip_continues_mid_epoch(tmp_path: Path) -> None:
    dm = PromptDataModule(str(_prompts_file(tmp_path, 10)), batch_size=2, group_size=2)
    dm.setup("fit")
    reference = dm.train_dataloader()
    epochs = [_firsts(reference) for _ in range(2)]
    loader = dm.train_dataloader()
    _firsts(loader)  # epoch 0
    it = iter(loader)
    head = _firsts(next(it) for _ in range(2))  # two batches into epoch 1
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = _firsts(resumed)
    assert head + rest == epochs[1]  # the rest of epoch 1 ...
    assert len(rest) == 3 and len(resumed) == 5  # ... while len() stays the whole epoch
    assert len(_firsts(resumed)) == 5  # then whole epochs again


def test_loader_state_at_epoch_end_skips_nothing(tmp_path: Path) -> None:
    dm = PromptDataModule(str(_prompts_file(tmp_path, 6)), batch_size=2, group_size=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    _firsts(loader)
    resumed = dm.train_dataloader()
    resumed.load_state_dict(loader.state_dict())  # {"epoch": 0, "batches": 3}: epoch 0 is done
    resumed.sampler.set_epoch(1)  # type: ignore[attr-defined]  # as Lightning does next
    assert len(_firsts(resumed)) == 3


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_mid_epoch_continues_the_order_without_warning(
    tmp_path: Path, num_workers: int
) -> None:
    """Stopped at step 4 of 3-batch epochs and resumed: the same prompts as one run of 8 steps."""
    prompts = _prompts_file(tmp_path, 7)  # 3 batches of 2 per epoch, one prompt dropped
    full = _fit_probe(prompts, 8, tmp_path / "full", num_workers=num_workers)
    part = _fit_probe(prompts, 4, tmp_path / "part", num_workers=num_workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rest = _fit_probe(
            prompts, 8, tmp_path / "resumed", tmp_path / "part" / "last.ckpt", num_workers
        )
    assert part + rest == full
    assert not [w for w in caught if "not resumable" in str(w.message)]


# --- metadata in the batch ----------------------------------------------------------------


def test_batches_carry_each_prompts_metadata(tmp_path: Path) -> None:
    """A .txt line's metadata is {}; a .jsonl line's is its whole object, aligned with prompts."""
    txt = PromptDataModule(str(_prompts_file(tmp_path, 4)), batch_size=2, group_size=3)
    txt.setup("fit")
    assert next(iter(txt.train_dataloader()))["metadata"] == [{}] * 6
    lines = [{"prompt": f"p{i}", "tag": "counting", "include": [{"count": i}]} for i in range(4)]
    path = _write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    dm = PromptDataModule(str(path), str(path), batch_size=2, group_size=3, val_batch_size=4)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert [m["prompt"] for m in batch["metadata"]] == batch["prompts"]
        assert [m["include"][0]["count"] for m in batch["metadata"][::3]] == [
            int(p[1:]) for p in batch["prompts"][::3]
        ]
    assert next(iter(dm.val_dataloader()))["metadata"] == lines
