"""Prompt files and the prompt DataModule: B prompts per step, each repeated G times (a group)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from marble_pl.errors import ConfigError, MarbleUserError

__all__ = [
    "EpochSeededSampler",
    "GroupCollate",
    "IndexedCollate",
    "IndexedPromptDataset",
    "PromptDataModule",
    "PromptDataset",
    "PromptFileError",
    "ResumableDataLoader",
    "read_prompts",
]

PromptBatch = dict[str, list[str] | Tensor]

_SUFFIXES = (".txt", ".jsonl")


class PromptFileError(MarbleUserError, ValueError):
    """A prompt file is missing, empty or malformed; the message names the file and the fix."""


def _check_sizes(
    batch_size: int, group_size: int, val_batch_size: int | None, num_workers: int
) -> None:
    """The data module's sizes are in range (``data.<name>`` in the messages, with the fix)."""
    if batch_size < 1:
        raise ConfigError(
            f"data.batch_size (prompts per step) must be >= 1, got {batch_size}: e.g. 2"
        )
    if group_size < 2:
        raise ConfigError(
            f"data.group_size (images per prompt) must be >= 2, got {group_size}: group "
            "advantages compare the images of one prompt with each other, so with one image "
            "every advantage is zero and nothing trains; set data.group_size to at least two "
            "(e.g. 4 to 16)"
        )
    if val_batch_size is not None and val_batch_size < 1:
        raise ConfigError(
            f"data.val_batch_size must be >= 1, or null for batch_size x group_size, got "
            f"{val_batch_size}"
        )
    if num_workers < 0:
        raise ConfigError(
            f"data.num_workers must be >= 0 (0 reads prompts in the main process), got "
            f"{num_workers}"
        )


def read_prompts(path: str | Path, key: str = "prompt") -> list[str]:
    """Read prompts from a `.txt` (one per non-blank line) or `.jsonl` file (one object per line).

    JSON lines take the prompt from `key`; blank lines are skipped and prompts are stripped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise PromptFileError(
            f"prompt file {str(path)!r} has suffix {path.suffix!r}: use a .txt file (one prompt "
            f'per line) or a .jsonl file (one {{"{key}": "..."}} object per line)'
        )
    if not path.exists():
        raise PromptFileError(
            f"prompt file {str(path)!r} does not exist: check the path (relative paths are "
            f"resolved from {str(Path.cwd())!r})"
        )
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} is not a regular file: pass a file path")
    text = _decode(path.read_bytes(), path)
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        prompts = _parse_jsonl(text, path, key)
    if not prompts:
        raise PromptFileError(
            f"prompt file {str(path)!r} contains no prompts (it is empty or only whitespace): "
            "add at least one prompt"
        )
    return prompts


def _decode(data: bytes, path: Path) -> str:
    """Decode UTF-8 (a leading BOM is allowed), naming the line and byte offset of a bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise PromptFileError(
            f"prompt file {str(path)!r} is not valid UTF-8: byte 0x{data[err.start]:02x} at byte "
            f"offset {err.start} (line {line}): re-save the file as UTF-8"
        ) from err


def _parse_jsonl(text: str, path: Path, key: str) -> list[str]:
    """Parse JSON lines, each an object whose `key` holds a non-empty string prompt."""
    prompts: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(
                f"prompt file {str(path)!r}, line {lineno}: invalid JSON ({err.msg} at column "
                f'{err.colno}): each line must be one JSON object such as {{"{key}": "a red apple"}}'
            ) from err
        if not isinstance(record, dict):
            raise PromptFileError(
                f"prompt file {str(path)!r}, line {lineno}: expected a JSON object, got "
                f'{type(record).__name__}: write {{"{key}": "..."}} on each line'
            )
        if key not in record:
            raise PromptFileError(
                f"prompt file {str(path)!r}, line {lineno}: missing key {key!r} (keys: "
                f"{sorted(record)}): add it, or set data.prompt_key to the key holding the prompt"
            )
        prompt = record[key]
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(
                f"prompt file {str(path)!r}, line {lineno}: {key!r} must be a non-empty string, "
                f"got {prompt!r}: fix or remove that line"
            )
        prompts.append(prompt.strip())
    return prompts


class PromptDataset(Dataset[str]):
    """A map-style dataset of prompt strings, so Lightning can shard it with a DistributedSampler."""

    def __init__(self, prompts: Sequence[str]) -> None:
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]


class IndexedPromptDataset(PromptDataset):
    """Prompts with their position in the file: ``(index, prompt)``, the validation samples' seeds."""

    def __getitem__(self, index: int) -> tuple[int, str]:  # type: ignore[override]
        return index, self.prompts[index]


class IndexedCollate:
    """Collate ``(index, prompt)`` items: one image per prompt, and each prompt's file index.

    Returns ``{"prompts", "group_ids", "indices"}``; ``indices`` seeds each validation sample, so
    its image does not depend on the batch it lands in nor on the data-parallel split.
    """

    def __call__(self, items: Sequence[tuple[int, str]]) -> PromptBatch:
        indices = torch.tensor([i for i, _ in items], dtype=torch.long)
        return {
            "prompts": [p for _, p in items],
            "group_ids": torch.arange(len(items), dtype=torch.long),
            "indices": indices,
        }


class GroupCollate:
    """Collate B prompts into B*G rollouts: each prompt repeated G times, consecutively.

    Returns `{"prompts": list[str] (B*G), "group_ids": LongTensor[B*G]}` with ids 0..B-1.
    A class, not a closure, so it pickles into DataLoader worker processes.
    """

    def __init__(self, group_size: int) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size

    def __call__(self, prompts: Sequence[str]) -> PromptBatch:
        """Repeat each prompt `group_size` times and number the groups."""
        repeated = [p for p in prompts for _ in range(self.group_size)]
        group_ids = torch.arange(len(prompts), dtype=torch.long).repeat_interleave(self.group_size)
        return {"prompts": repeated, "group_ids": group_ids}


class EpochSeededSampler(RandomSampler):
    """A RandomSampler whose permutation depends only on `seed + epoch`: reproducible and resumable.

    Lightning calls `set_epoch` before each epoch; used on its own, each new iteration advances
    the epoch by one. Being a RandomSampler, Lightning swaps it for a shuffling DistributedSampler
    under DDP (which then seeds from `seed_everything`, not from `seed`).
    """

    def __init__(self, data_source: Sequence[str], seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of `epoch` for the next iteration."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader that knows how far into the epoch it is, and saves it in checkpoints.

    Lightning's fit loop stores `state_dict()` of a train loader that has one (and then does not
    warn "your dataloader is not resumable") and calls `load_state_dict()` on resume, before the
    first batch is drawn. The position counts batches handed to the training loop, in the main
    process (batches that workers prefetched do not count). After a load, the next pass of the
    same epoch draws and drops the batches already trained on, so the order is the uninterrupted
    one for any sampler (Lightning's DistributedSampler included). `len()` stays the whole epoch:
    Lightning counts the resumed epoch's batches from the restored batch index.
    """

    _epoch: int = 0  # the sampler's epoch during the current pass
    _consumed: int = 0  # batches handed out in the current pass
    _resume: tuple[int, int] | None = None  # (epoch, batches) to skip, from load_state_dict

    def __iter__(self) -> Iterator[Any]:
        """One pass (a generator, so it starts at the first batch, after Lightning's `set_epoch`)."""
        self._epoch = int(getattr(self.sampler, "epoch", 0))
        skip = self._take_skip()
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        self._consumed = skip
        for batch in iterator:
            self._consumed += 1
            yield batch

    def _take_skip(self) -> int:
        """Batches this pass must drop: the loaded position if it is this pass's epoch, else 0."""
        resume, self._resume = self._resume, None
        return resume[1] if resume is not None and resume[0] == self._epoch else 0

    def state_dict(self) -> dict[str, int]:
        """The epoch of the current pass and how many of its batches were handed out."""
        return {"epoch": self._epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue mid-epoch from `state`; a finished epoch leaves nothing to skip."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        self._resume = None
        if 0 < batches < len(self):
            self._resume = (epoch, batches)
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)


class PromptDataModule(LightningDataModule):
    """Prompts from text/jsonl files as groups: B prompts per step, G rollouts per prompt.

    Training batches hold B*G prompts (consecutive repeats) and their group ids, shuffled per epoch
    from `seed`; validation batches hold each validation prompt once, in file order.
    `val_batch_size` defaults to B*G, the number of images of one training rollout.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        batch_size: int = 2,
        group_size: int = 4,
        prompt_key: str = "prompt",
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(batch_size, group_size, val_batch_size, num_workers)
        if not prompt_key:
            raise ConfigError(
                "data.prompt_key must be a non-empty string (the .jsonl key holding the prompt, "
                "e.g. prompt)"
            )
        self.save_hyperparameters()
        self.train_file = train_file
        self.val_file = val_file
        self.batch_size = batch_size
        self.group_size = group_size
        self.prompt_key = prompt_key
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.val_batch_size = val_batch_size or batch_size * group_size
        self.train_dataset: PromptDataset | None = None
        self.val_dataset: IndexedPromptDataset | None = None

    def setup(self, stage: str) -> None:
        """Read the prompt files the stage needs; fail early if there are fewer than B prompts.

        Lightning runs this before ``configure_model``, so a bad prompt file is reported before
        any model is loaded.
        """
        if stage == "fit" and self.train_dataset is None:
            prompts = self._read("data.train_file", self.train_file)
            if len(prompts) < self.batch_size:
                raise ConfigError(
                    f"data.batch_size={self.batch_size} is more than the {len(prompts)} prompts "
                    f"in data.train_file {self.train_file!r}: set data.batch_size to at most "
                    f"{len(prompts)}, or add prompts to the file"
                )
            self.train_dataset = PromptDataset(prompts)
        if stage in ("fit", "validate") and self.val_file is not None and self.val_dataset is None:
            self.val_dataset = IndexedPromptDataset(self._read("data.val_file", self.val_file))

    def _read(self, setting: str, path: str) -> list[str]:
        """:func:`read_prompts`, its error prefixed with the setting that names the file."""
        try:
            return read_prompts(path, self.prompt_key)
        except PromptFileError as err:
            raise PromptFileError(f"{setting}: {err}") from err

    def train_dataloader(self) -> ResumableDataLoader:
        """B prompts per batch repeated G times; incomplete last batch dropped.

        Resumable: the loader's position is saved in checkpoints, so a run resumed mid-epoch
        continues with the next unseen prompts of the same permutation (exact resume).
        """
        if self.train_dataset is None:
            raise RuntimeError("PromptDataModule.train_dataloader: call setup('fit') first")
        dataset = self.train_dataset
        sampler = EpochSeededSampler(dataset.prompts, self.seed) if self.shuffle else None
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=GroupCollate(self.group_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader[str] | list[DataLoader[str]]:
        """Each validation prompt once, in file order; `[]` (no validation) without a val_file.

        Under data parallelism each rank takes every `world_size`-th prompt and NO prompt is
        repeated (Lightning's default DistributedSampler pads the last round with repeats, which
        would count them twice in `val/reward/*`): the metrics are those of one process.
        """
        if self.val_file is None:
            return []
        if self.val_dataset is None:
            raise RuntimeError("PromptDataModule.val_dataloader: call setup('fit') first")
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            sampler=self._val_sampler(),
            drop_last=False,
            collate_fn=IndexedCollate(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _val_sampler(self) -> UnrepeatedDistributedSampler | None:
        """This rank's share of the validation prompts, unpadded; None on one process."""
        trainer = self.trainer  # set by Lightning; None outside a Trainer
        world = trainer.world_size if trainer is not None else 1
        if world <= 1:
            return None
        if len(self.val_dataset) < world:
            raise ConfigError(
                f"data.val_file {self.val_file!r} holds {len(self.val_dataset)} prompts, fewer "
                f"than the {world} data-parallel processes: add prompts to it (at least {world}) "
                "or set data.val_file: null"
            )
        return UnrepeatedDistributedSampler(
            self.val_dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False
        )
