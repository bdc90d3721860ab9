"""Prompt files and the prompt DataModule: B prompts per step, each repeated G times (a group)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from marble_pl.errors import MarbleUserError

__all__ = [
    "EpochSeededSampler",
    "GroupCollate",
    "PromptDataModule",
    "PromptDataset",
    "PromptFileError",
    "read_prompts",
]

PromptBatch = dict[str, list[str] | Tensor]

_SUFFIXES = (".txt", ".jsonl")


class PromptFileError(MarbleUserError, ValueError):
    """A prompt file is missing, empty or malformed; the message names the file and the fix."""


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
                f"{sorted(record)}): add it, or set prompt_key to the key holding the prompt"
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

    def __init__(self, data_source: Sequence[str], seed: int = 0, skip: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0
        self.skip = skip

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of `epoch` for the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data_source) - self.skip

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        # `skip` (set when resuming mid-epoch) drops the indices already trained on, once.
        order, self.skip = order[self.skip :], 0
        return iter(order)


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
        if batch_size < 1:
            raise ValueError(f"batch_size (prompts per step) must be >= 1, got {batch_size}")
        if group_size < 2:
            raise ValueError(
                f"group_size (images per prompt) must be >= 2, got {group_size}: group advantages "
                "compare the images of one prompt with each other, so a group needs at least two"
            )
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1 or None, got {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not prompt_key:
            raise ValueError("prompt_key must be a non-empty string (the jsonl key of the prompt)")
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
        self.val_dataset: PromptDataset | None = None

    def setup(self, stage: str) -> None:
        """Read the prompt files the stage needs; fail early if there are fewer than B prompts."""
        if stage == "fit" and self.train_dataset is None:
            prompts = read_prompts(self.train_file, self.prompt_key)
            if len(prompts) < self.batch_size:
                raise PromptFileError(
                    f"prompt file {self.train_file!r} has {len(prompts)} prompts but batch_size is "
                    f"{self.batch_size}: add prompts or lower batch_size to at most {len(prompts)}"
                )
            self.train_dataset = PromptDataset(prompts)
        if stage in ("fit", "validate") and self.val_file is not None and self.val_dataset is None:
            self.val_dataset = PromptDataset(read_prompts(self.val_file, self.prompt_key))

    def train_dataloader(self) -> DataLoader[str]:
        """B prompts per batch repeated G times; incomplete last batch dropped."""
        if self.train_dataset is None:
            raise RuntimeError("PromptDataModule.train_dataloader: call setup('fit') first")
        dataset = self.train_dataset
        sampler = (
            EpochSeededSampler(dataset.prompts, self.seed, skip=self._consumed_in_epoch())
            if self.shuffle
            else None
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=GroupCollate(self.group_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _consumed_in_epoch(self) -> int:
        """Prompts of the current epoch already trained on, when resuming from a checkpoint.

        Lightning restores the loops' progress before it asks for the dataloader, so a run
        resumed mid-epoch continues with the next unseen prompts of the same permutation
        instead of restarting the epoch (exact resume; single process: under DDP Lightning's
        DistributedSampler takes over the order).
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size > 1:
            return 0
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return (
            int(progress.processed) * self.batch_size
        )  # processed: counted before on_train_batch_end saves

    def val_dataloader(self) -> DataLoader[str] | list[DataLoader[str]]:
        """Each validation prompt once, in file order; `[]` (no validation) without a val_file."""
        if self.val_file is None:
            return []
        if self.val_dataset is None:
            raise RuntimeError("PromptDataModule.val_dataloader: call setup('fit') first")
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            drop_last=False,
            collate_fn=GroupCollate(1),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
