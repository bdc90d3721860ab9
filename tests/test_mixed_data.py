"""MARBLE's mixed prompt set: sources under one root, metadata in the batch, stratified steps."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from marble_pl.data import (
    DEFAULT_SOURCES,
    GroupCollate,
    IndexedCollate,
    PromptDataModule,
    PromptFileError,
    StratifiedSampler,
    interleave_sources,
    stratified_steps,
)
from marble_pl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MIXED = REPO / "configs/prompts/mixed"
SOURCES = list(DEFAULT_SOURCES)


class _Rank:
    """What the data module reads of a Trainer under data parallelism."""

    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size = rank, world


def _mixed(root: Path, sizes: dict[str, int], splits: tuple[str, ...] = ("train", "test")) -> Path:
    """A three-source folder in the official layout; prompt i of source s is ``"s i"``."""
    for split in splits:
        for name, n in sizes.items():
            path = root / DEFAULT_SOURCES[name].replace("{split}", split)
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = [f"{name} {split} {i}" for i in range(n)]
            if path.suffix == ".jsonl":
                lines = [json.dumps({"tag": "single_object", "prompt": p}) for p in lines]
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _epoch(loader: Any) -> list[dict]:
    return list(loader)


def _prompts_of(batch: dict, group_size: int) -> list[str]:
    return batch["prompts"][::group_size]


# --- the shipped tiny mixed set ---------------------------------------------------------------


def test_shipped_mixed_set_yields_stratified_batches_with_metadata() -> None:
    dm = PromptDataModule(root=str(MIXED), batch_size=3, group_size=2, val_batch_size=4)
    dm.setup("fit")
    batches = _epoch(dm.train_dataloader())
    assert len(batches) == 8  # 8 prompts per source, one of each per step
    seen: list[str] = []
    for batch in batches:
        prompts, metadata = batch["prompts"], batch["metadata"]
        assert len(metadata) == len(prompts) == 6
        assert batch["group_ids"].tolist() == [0, 0, 1, 1, 2, 2]
        assert sorted(m["source"] for m in metadata[::2]) == sorted(SOURCES)
        for p, m in zip(prompts, metadata, strict=True):
            if m["source"] == "geneval":  # the jsonl line's fields, the prompt among them
                assert m["prompt"] == p and m["tag"] and m["include"]
            else:
                assert m == {"source": m["source"]}
            if m["source"] == "ocr":
                assert p.count('"') == 2
        assert prompts[0::2] == prompts[1::2]  # groups repeat consecutively
        seen += _prompts_of(batch, 2)
    assert len(seen) == len(set(seen)) == 24  # every training prompt once per epoch
    val = list(dm.val_dataloader())
    assert [len(b["prompts"]) for b in val] == [4, 4, 1]
    val_sources = [m["source"] for b in val for m in b["metadata"]]
    assert val_sources == SOURCES * 3  # interleaved: any prefix sees every source
    assert [i for b in val for i in b["indices"].tolist()] == list(range(9))


def test_diffusionnft_file_format(tmp_path: Path) -> None:
    """Lines written exactly as DiffusionNFT's dataset/ files hold them (format, not content)."""
    (tmp_path / "pickscore").mkdir()
    (tmp_path / "ocr").mkdir()
    (tmp_path / "geneval").mkdir()
    pick = "a lone kayak on a glacier lake,mist, by someone unknown,   wideangle, 2020 ,\n"
    ocr = 'A faded shop sign reading "Closed Today" above a wooden door, soft light.\n'
    gen = [
        {
            "tag": "counting",
            "include": [{"class": "kite", "count": 2}],
            "exclude": [{"class": "kite", "count": 3}],
            "prompt": "a photo of two kites",
        },
        {
            "tag": "position",
            "include": [
                {"class": "sink", "count": 1},
                {"class": "toaster", "count": 1, "position": ["left of", 0]},
            ],
            "prompt": "a photo of a toaster left of a sink",
        },
    ]
    for split in ("train", "test"):
        (tmp_path / f"pickscore/{split}.txt").write_text(pick * 2, encoding="utf-8")
        (tmp_path / f"ocr/{split}.txt").write_text(ocr * 2, encoding="utf-8")
        (tmp_path / f"geneval/{split}_metadata.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in gen), encoding="utf-8"
        )
    dm = PromptDataModule(root=str(tmp_path), batch_size=3, group_size=2, shuffle=False)
    dm.setup("fit")
    first = next(iter(dm.train_dataloader()))
    assert first["prompts"][::2] == [pick.strip(), ocr.strip(), "a photo of two kites"]
    assert first["metadata"][::2] == [
        {"source": "pickscore"},
        {"source": "ocr"},
        {**gen[0], "source": "geneval"},
    ]
    val = next(iter(dm.val_dataloader()))
    assert val["metadata"][5] == {**gen[1], "source": "geneval"}


# --- stratified steps -------------------------------------------------------------------------


def test_stratified_steps_take_equal_counts_without_repeats() -> None:
    sizes = [5, 9, 7]  # blocks [0, 5), [5, 14), [14, 21)
    table = stratified_steps(sizes, 2, torch.Generator().manual_seed(0))
    assert table.shape == (2, 6)  # floor(5 / 2) steps
    source = torch.bucketize(table, torch.tensor([5, 14]), right=True)
    assert (torch.stack([(source == s).sum(1) for s in range(3)]) == 2).all()
    assert table.unique().numel() == table.numel()
    assert source.tolist() != [[0, 1, 2] * 2] * 2  # rows shuffled, not the sources in turn
    again = stratified_steps(sizes, 2, torch.Generator().manual_seed(0))
    other = stratified_steps(sizes, 2, torch.Generator().manual_seed(1))
    assert torch.equal(table, again) and not torch.equal(table, other)
    ordered = stratified_steps(sizes, 2)  # no generator: file order, sources alternating
    assert ordered.tolist() == [[0, 5, 14, 1, 6, 15], [2, 7, 16, 3, 8, 17]]


def test_interleave_sources_round_robin() -> None:
    assert interleave_sources([2, 3, 1]) == [0, 2, 5, 1, 3, 4]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_share_each_step_and_its_union_is_stratified(tmp_path: Path, world: int) -> None:
    root = _mixed(tmp_path, {"pickscore": 13, "ocr": 10, "geneval": 11})
    per_rank: list[list[list[str]]] = []
    for rank in range(world):
        dm = PromptDataModule(root=str(root), batch_size=3, group_size=2, seed=7)
        dm.trainer = _Rank(rank, world)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, StratifiedSampler)  # not replaced by Lightning
        batches = _epoch(loader)
        assert all(m["source"] for b in batches for m in b["metadata"])
        per_rank.append([_prompts_of(b, 2) for b in batches])
    steps = 10 // world  # the smallest source, ocr, gives `world` prompts per step
    assert [len(r) for r in per_rank] == [steps] * world
    everything: list[str] = []
    for step in range(steps):
        union = [p for rank in range(world) for p in per_rank[rank][step]]
        assert all(len(per_rank[rank][step]) == 3 for rank in range(world))
        assert Counter(p.split()[0] for p in union) == dict.fromkeys(SOURCES, world)
        everything += union
    assert len(everything) == len(set(everything))  # no prompt twice in an epoch, any rank
    if world == 3:  # shuffled over ranks: a rank's step is not always one of each source
        assert any(
            Counter(p.split()[0] for p in b) != dict.fromkeys(SOURCES, 1)
            for batches in per_rank
            for b in batches
        )


def test_stratified_order_is_seeded_per_epoch_and_set_epoch_repeats_it(tmp_path: Path) -> None:
    root = _mixed(tmp_path, {"pickscore": 6, "ocr": 6, "geneval": 6})

    def loader(seed: int) -> Any:
        dm = PromptDataModule(root=str(root), batch_size=3, group_size=2, seed=seed)
        dm.setup("fit")
        return dm.train_dataloader()

    first = loader(0)
    epochs = [[p for b in first for p in _prompts_of(b, 2)] for _ in range(2)]
    again = loader(0)
    assert [p for b in again for p in _prompts_of(b, 2)] == epochs[0]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])
    assert [p for b in loader(1) for p in _prompts_of(b, 2)] != epochs[0]
    first.sampler.set_epoch(1)
    assert [p for b in first for p in _prompts_of(b, 2)] == epochs[1]


def test_stratified_loader_resumes_mid_epoch(tmp_path: Path) -> None:
    root = _mixed(tmp_path, {"pickscore": 5, "ocr": 4, "geneval": 6})
    dm = PromptDataModule(root=str(root), batch_size=3, group_size=2)
    dm.setup("fit")
    reference = dm.train_dataloader()
    epochs = [[_prompts_of(b, 2) for b in reference] for _ in range(2)]
    loader = dm.train_dataloader()
    _epoch(loader)
    it = iter(loader)
    head = [_prompts_of(next(it), 2)]
    resumed = dm.train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    assert head + [_prompts_of(b, 2) for b in resumed] == epochs[1]


# --- a resumed fit sees the prompts of an uninterrupted one -----------------------------------


def _fit(root: Path, steps: int, ckpt_dir: Path, ckpt_path: Path | None = None) -> list[list]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list] = []

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            self.seen.append([batch["prompts"], batch["metadata"]])
            return self.weight.square().sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)],
    )
    dm = PromptDataModule(root=str(root), batch_size=3, group_size=2, seed=3)
    trainer.fit(probe, dm, ckpt_path=ckpt_path)
    return probe.seen


def test_resumed_fit_continues_the_stratified_order(tmp_path: Path) -> None:
    """Stopped at step 4 of 3-step epochs: the resumed run trains on an unbroken run's batches."""
    root = _mixed(tmp_path / "data", {"pickscore": 4, "ocr": 3, "geneval": 5})
    full = _fit(root, 7, tmp_path / "full")
    part = _fit(root, 4, tmp_path / "part")
    rest = _fit(root, 7, tmp_path / "resumed", tmp_path / "part" / "last.ckpt")
    assert part + rest == full
    assert all(m["source"] for _, metadata in full for m in metadata)


# --- validation -------------------------------------------------------------------------------


def test_validation_shards_the_mixed_test_split_without_repeats(tmp_path: Path) -> None:
    root = _mixed(tmp_path, {"pickscore": 3, "ocr": 1, "geneval": 3})
    seen: list[tuple[int, str, str]] = []
    for rank in (0, 1):
        dm = PromptDataModule(root=str(root), val_batch_size=2)
        dm.trainer = _Rank(rank, 2)
        dm.setup("validate")
        assert dm.train_dataset is None  # validate reads the test split only
        for b in dm.val_dataloader():
            sources = [m["source"] for m in b["metadata"]]
            seen += zip(b["indices"].tolist(), b["prompts"], sources, strict=True)
    assert sorted(i for i, _, _ in seen) == list(range(7))
    assert all(p.split()[0] == s for _, p, s in seen)
    assert PromptDataModule(root=str(root), val_split=None).val_dataloader() == []


# --- options and errors -----------------------------------------------------------------------


def test_sources_select_and_name_their_own(tmp_path: Path) -> None:
    root = _mixed(tmp_path, {"pickscore": 4, "ocr": 4})  # no geneval folder
    dm = PromptDataModule(root=str(root), sources=["ocr", "pickscore"], batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(m["source"] for m in batch["metadata"][::4]) == ["ocr", "pickscore"]
    custom = PromptDataModule(
        root=str(root), sources={"signs": "ocr/{split}.txt"}, batch_size=2, stratified=False
    )
    custom.setup("fit")
    assert {m["source"] for b in custom.train_dataloader() for m in b["metadata"]} == {"signs"}


def test_unstratified_mixed_set_shuffles_all_prompts(tmp_path: Path) -> None:
    root = _mixed(tmp_path, {"pickscore": 6, "ocr": 2, "geneval": 2})
    dm = PromptDataModule(root=str(root), batch_size=2, group_size=2, stratified=False)
    dm.setup("fit")
    batches = _epoch(dm.train_dataloader())
    assert len(batches) == 5  # 10 prompts, B = 2: every prompt, whatever its source
    assert Counter(m["source"] for b in batches for m in b["metadata"][::2])["pickscore"] == 6


def test_missing_sources_are_named_in_one_line(tmp_path: Path) -> None:
    root = _mixed(tmp_path, {"pickscore": 3, "ocr": 3, "geneval": 3})
    shutil.rmtree(root / "ocr")
    (root / "geneval/test_metadata.jsonl").unlink()
    dm = PromptDataModule(root=str(root))
    with pytest.raises(PromptFileError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message
    assert f"{root / 'ocr'}/ (folder)" in message
    assert str(root / "geneval/test_metadata.jsonl") in message
    assert str(root / "pickscore") not in message
    assert "geneval/{split}_metadata.jsonl" in message and "DiffusionNFT" in message
    with pytest.raises(PromptFileError, match="is not a folder"):
        PromptDataModule(root=str(tmp_path / "nowhere")).setup("fit")


@pytest.mark.parametrize(
    ("batch_size", "world", "match"),
    [
        (2, 1, r"1 = 2 is not a multiple of 3: set data.batch_size to a multiple of 3 \(e.g. 3\)"),
        (4, 2, r"2 = 8 is not a multiple of 3: set data.batch_size to a multiple of 3 \(e.g. 6\)"),
        (9, 1, r"takes 3 prompts per step from each source .* 'ocr' has 2"),
    ],
)
def test_stratified_sizes_are_checked_at_setup(
    tmp_path: Path, batch_size: int, world: int, match: str
) -> None:
    root = _mixed(tmp_path, {"pickscore": 4, "ocr": 2, "geneval": 4})
    dm = PromptDataModule(root=str(root), batch_size=batch_size)
    dm.trainer = _Rank(0, world)
    with pytest.raises(ConfigError, match=match):
        dm.setup("fit")


def test_stratified_batch_size_fix_accounts_for_the_world() -> None:
    """Four sources on two ranks: B = 2 already gives 4 prompts a step; B = 1 is named."""
    sizes = {s: 4 for s in "abcd"}
    assert StratifiedSampler(sizes, 2, num_replicas=2, rank=1).per_source == 1
    with pytest.raises(ConfigError, match=r"multiple of 2 \(e.g. 2\)"):
        StratifiedSampler(sizes, 1, num_replicas=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"root": "x", "train_file": "t.txt"}, "exclusive"),
        ({"root": "x", "val_file": "v.txt"}, r"--data.train_file=null --data.val_file=null"),
        ({}, "set data.train_file .* or data.root"),
        ({"train_file": "t.txt", "sources": ["ocr"]}, "data.root, which is not set"),
        ({"root": "x", "sources": ["ocr", "sketch"]}, r"unknown source\(s\) \['sketch'\]"),
        ({"root": "x", "sources": ["ocr", "ocr"]}, "twice"),
        ({"root": "x", "sources": []}, "empty"),
        ({"root": "x", "sources": "ocr"}, r"write \[ocr\]"),
        ({"root": "x", "sources": {"a b": "a/{split}.txt"}}, "invalid source name"),
        ({"root": "x", "sources": {"a": "a/{split}.csv"}}, r"data.sources.a must be a .txt"),
    ],
)
def test_origin_options_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PromptDataModule(**kwargs)


def test_collates_carry_metadata_copies() -> None:
    batch = GroupCollate(2)([("a", {"source": "ocr"}), "b"])
    assert batch["metadata"] == [{"source": "ocr"}, {"source": "ocr"}, {}, {}]
    batch["metadata"][0]["seen"] = True  # one image's dict is its own
    assert batch["metadata"][1] == {"source": "ocr"}
    val = IndexedCollate()([(4, "a", {"tag": "x"}), (7, "b")])
    assert val["metadata"] == [{"tag": "x"}, {}] and val["indices"].tolist() == [4, 7]


# --- under real DDP (2 gloo processes) ---------------------------------------------------------


class _SeenProbe(L.LightningModule):
    """Saves every batch's sources and prompts, one file per rank (picklable for ddp_spawn)."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        sources = [m["source"] for m in batch["metadata"]]
        self.seen.append([f"{s}|{p}" for s, p in zip(sources, batch["prompts"], strict=True)])
        return self.weight.square().sum()

    def on_train_end(self) -> None:
        path = self.out / f"rank{self.global_rank}.json"
        path.write_text(json.dumps(self.seen), encoding="utf-8")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_ranks_get_their_share_of_each_stratified_step(tmp_path: Path) -> None:
    root = _mixed(tmp_path / "data", {"pickscore": 6, "ocr": 5, "geneval": 4})
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    dm = PromptDataModule(root=str(root), batch_size=3, group_size=2, seed=5)
    trainer.fit(_SeenProbe(tmp_path), dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r) for r in ranks] == [2, 2]
    seen: list[str] = []
    for step in range(2):
        union = [s for r in ranks for s in r[step][::2]]  # B = 3 per rank, each G = 2 times
        assert all(len(r[step]) == 6 for r in ranks)
        assert Counter(s.split("|")[0] for s in union) == dict.fromkeys(SOURCES, 2)
        assert all(s.split("|")[1].startswith(s.split("|")[0]) for s in union)
        seen += union
    assert len(set(seen)) == 12  # the two ranks never share a prompt
