"""Prompt files, MARBLE's mixed prompt set and the DataModule: B prompts a step, each G times."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from math import gcd
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from marble_pl.errors import ConfigError, MarbleUserError

__all__ = [
    "DEFAULT_SOURCES",
    "EpochSeededSampler",
    "GroupCollate",
    "IndexedCollate",
    "IndexedPromptDataset",
    "PromptDataModule",
    "PromptDataset",
    "PromptFileError",
    "ResumableDataLoader",
    "StratifiedSampler",
    "check_layout",
    "interleave_sources",
    "read_prompt_records",
    "read_prompts",
    "read_sources",
    "resolve_sources",
    "stratified_per_source",
    "stratified_steps",
]

PromptBatch = dict[str, list[str] | list[dict[str, Any]] | Tensor]

_SUFFIXES = (".txt", ".jsonl")

DEFAULT_SOURCES: dict[str, str] = {
    "pickscore": "pickscore/{split}.txt",
    "ocr": "ocr/{split}.txt",
    "geneval": "geneval/{split}_metadata.jsonl",
}
"""MARBLE's mixed prompt set: source name -> file under ``data.root`` (``{split}``: train, test).

The layout of DiffusionNFT's ``dataset/`` folder, which the official MARBLE code reads."""

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")  # usable in a TensorBoard tag


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


def _check_origin(
    train_file: str | None, val_file: str | None, root: str | None, sources: object
) -> None:
    """The prompts come from files or from ``data.root``, not both (and from somewhere)."""
    if root is not None and (train_file is not None or val_file is not None):
        raise ConfigError(
            f"data.root {root!r} and data.train_file/data.val_file are exclusive (the folder "
            "holds its own train and test splits): set data.train_file: null and "
            "data.val_file: null (--data.train_file=null --data.val_file=null), or data.root: null"
        )
    if root is None and train_file is None and val_file is None:
        raise ConfigError(
            "no prompts: set data.train_file (a .txt or .jsonl prompt file) or data.root (a "
            "folder in the layout of DiffusionNFT's dataset/: pickscore/, ocr/, geneval/)"
        )
    if root is None and sources is not None:
        raise ConfigError(
            f"data.sources {sources!r} selects sources under data.root, which is not set: set "
            "data.root, or data.sources: null"
        )


def read_prompts(path: str | Path, key: str = "prompt") -> list[str]:
    """Read prompts from a `.txt` (one per non-blank line) or `.jsonl` file (one object per line).

    JSON lines take the prompt from `key`; blank lines are skipped and prompts are stripped.
    """
    return read_prompt_records(path, key)[0]


def read_prompt_records(
    path: str | Path, key: str = "prompt"
) -> tuple[list[str], list[dict[str, Any]]]:
    """:func:`read_prompts` and each prompt's metadata: ``{}`` for a `.txt` line, the whole JSON
    object for a `.jsonl` line (GenEval's ``tag``, ``include``, ... reach the rewards)."""
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
        records: list[dict[str, Any]] = [{} for _ in prompts]
    else:
        prompts, records = _parse_jsonl(text, path, key)
    if not prompts:
        raise PromptFileError(
            f"prompt file {str(path)!r} contains no prompts (it is empty or only whitespace): "
            "add at least one prompt"
        )
    return prompts, records


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


def _parse_jsonl(text: str, path: Path, key: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Parse JSON lines, each an object whose `key` holds a non-empty string prompt."""
    prompts: list[str] = []
    records: list[dict[str, Any]] = []
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
        records.append(record)
    return prompts, records


# --- the mixed prompt set: several sources under one root ---------------------------------


def resolve_sources(sources: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``data.sources`` as ``name -> file pattern`` (``{split}`` stands for the split name).

    None: MARBLE's three (:data:`DEFAULT_SOURCES`); a list picks some of them by name; a mapping
    names its own sources and files.
    """
    if sources is None:
        return dict(DEFAULT_SOURCES)
    if isinstance(sources, str):
        raise ConfigError(
            f"data.sources must be a list of source names or a name -> file mapping, got the "
            f"string {sources!r}: write [{sources}]"
        )
    if isinstance(sources, Mapping):
        resolved = dict(sources)
    else:
        names = list(sources)
        unknown = [n for n in names if n not in DEFAULT_SOURCES]
        if unknown:
            raise ConfigError(
                f"data.sources: unknown source(s) {unknown}: the built-in ones are "
                f"{list(DEFAULT_SOURCES)}; name your own with a mapping such as "
                "{mine: mine/{split}.txt}"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources lists a source twice: {names}; list each once")
        resolved = {n: DEFAULT_SOURCES[n] for n in names}
    if not resolved:
        raise ConfigError(
            "data.sources is empty: list at least one source, or null for all of "
            f"{list(DEFAULT_SOURCES)}"
        )
    for name, pattern in resolved.items():
        if not isinstance(name, str) or not _SOURCE_NAME.match(name):
            raise ConfigError(
                f"data.sources: invalid source name {name!r}: use letters, digits, '_', '-' or "
                "'.' (it tags the prompts and names their logs), e.g. 'ocr'"
            )
        if not isinstance(pattern, str) or Path(pattern).suffix.lower() not in _SUFFIXES:
            raise ConfigError(
                f"data.sources.{name} must be a .txt or .jsonl file pattern under data.root, "
                f"got {pattern!r}: e.g. {name}/{{split}}.txt"
            )
    return resolved


def _source_path(root: Path, pattern: str, split: str) -> Path:
    """The file of one source and split: ``root / pattern`` with ``{split}`` replaced."""
    return root / pattern.replace("{split}", split)


def check_layout(root: str | Path, sources: Mapping[str, str], splits: Sequence[str]) -> None:
    """Every source's file of every split exists under `root`; else ONE error listing them all."""
    root = Path(root)
    layout = ", ".join(f"{pattern}" for pattern in sources.values())
    where = f"with {{split}} = {' and '.join(repr(s) for s in splits)}"
    if not root.is_dir():
        raise PromptFileError(
            f"data.root {str(root)!r} is not a folder: point it at a folder holding {layout} "
            f"({where}; DiffusionNFT's dataset/ folder has this layout)"
        )
    missing: list[str] = []
    for pattern in sources.values():
        for split in splits:
            path = _source_path(root, pattern, split)
            entry = f"{path.parent}/ (folder)" if not path.parent.is_dir() else str(path)
            if not path.is_file() and entry not in missing:
                missing.append(entry)
    if missing:
        raise PromptFileError(
            f"data.root {str(root)!r} lacks {', '.join(missing)}: expected {layout} ({where}; "
            "the layout of DiffusionNFT's dataset/ folder); add them, or list the sources you "
            "have in data.sources"
        )


def read_sources(
    root: str | Path, sources: Mapping[str, str], split: str, key: str = "prompt"
) -> tuple[list[str], list[dict[str, Any]], dict[str, int]]:
    """The prompts of every source's `split`, concatenated in source order, and their metadata.

    Each prompt's metadata is its line's JSON object (``{}`` for `.txt`) plus ``"source"``: the
    source's name (it replaces a ``source`` field of the line). Also returns each source's count.
    """
    prompts: list[str] = []
    metadata: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    for name, pattern in sources.items():
        try:
            found, records = read_prompt_records(_source_path(Path(root), pattern, split), key)
        except PromptFileError as err:
            raise PromptFileError(f"data.root, source {name!r}: {err}") from err
        prompts += found
        metadata += [{**record, "source": name} for record in records]
        sizes[name] = len(found)
    return prompts, metadata, sizes


def interleave_sources(sizes: Sequence[int]) -> list[int]:
    """Indices of contiguous source blocks taken round-robin: any prefix mixes the sources.

    Validation reads the mixed test split in this order, so ``limit_val_batches`` still sees
    every source.
    """
    pairs = list(zip(_offsets(sizes), sizes, strict=True))
    return [o + i for i in range(max(sizes, default=0)) for o, n in pairs if i < n]


def _offsets(sizes: Sequence[int]) -> list[int]:
    """Where each contiguous block of `sizes` starts."""
    return [sum(sizes[:s]) for s in range(len(sizes))]


def stratified_per_source(batch_size: int, world: int, sizes: Mapping[str, int]) -> int:
    """Prompts each source gives one step, ``B x W / S``; a ConfigError when that is not whole
    or a source holds fewer."""
    total, count = batch_size * world, len(sizes)
    if total % count:
        step = count // gcd(world, count)
        fix = -(-batch_size // step) * step
        raise ConfigError(
            f"data.stratified takes the same number of prompts from each of the {count} sources "
            f"every step, but data.batch_size x processes = {batch_size} x {world} = {total} is "
            f"not a multiple of {count}: set data.batch_size to a multiple of {step} (e.g. "
            f"{fix}), or data.stratified: false"
        )
    per = total // count
    small = [f"{name!r} has {n}" for name, n in sizes.items() if n < per]
    if small:
        raise ConfigError(
            f"data.stratified takes {per} prompts per step from each source (data.batch_size x "
            f"processes / sources = {total} / {count}), but {', '.join(small)}: add prompts, "
            "lower data.batch_size, or set data.stratified: false"
        )
    return per


def stratified_steps(
    sizes: Sequence[int], per_source: int, generator: torch.Generator | None = None
) -> Tensor:
    """``LongTensor[T, S * per_source]``: row t holds the dataset indices of step t, all ranks.

    Sources are contiguous blocks of the dataset (``sizes`` in order); each is read without
    repeats in a random permutation (file order without `generator`), ``per_source`` prompts a
    step, so ``T = min_s floor(n_s / per_source)``. In a row the sources alternate; with a
    generator the row is then shuffled, so which rank gets which source changes every step.
    """
    steps = min(n // per_source for n in sizes)
    blocks = []
    for offset, n in zip(_offsets(sizes), sizes, strict=True):
        order = torch.arange(n) if generator is None else torch.randperm(n, generator=generator)
        blocks.append(order[: steps * per_source].view(steps, per_source) + offset)
    table = torch.stack(blocks, dim=2).reshape(steps, -1)
    if generator is not None:
        table = table.gather(1, torch.rand(table.shape, generator=generator).argsort(dim=1))
    return table


class StratifiedSampler(DistributedSampler):
    """MARBLE's ``stratified_sampling``: every step takes as many prompts from each source.

    Step t's ``B x W`` prompts (B per rank, W ranks) are row t of :func:`stratified_steps`;
    rank r takes positions ``[r B, (r + 1) B)``, so the union over ranks of every step is
    stratified. The order depends only on ``seed + epoch``, identically on every rank. A
    DistributedSampler, so Lightning uses it as it is under DDP. Like
    :class:`EpochSeededSampler`, each iteration advances the epoch unless `set_epoch` is called.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(
            range(sum(sizes.values())),
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.per_source = stratified_per_source(batch_size, num_replicas, sizes)
        self.sizes = list(sizes.values())
        self.batch_size = batch_size
        self.steps = min(n // self.per_source for n in self.sizes)

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch) if self.shuffle else None
        self.epoch += 1
        table = stratified_steps(self.sizes, self.per_source, generator)
        mine = table[:, self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return iter(mine.reshape(-1).tolist())


# --- datasets and collates ------------------------------------------------------------------


PromptItem = tuple[str, dict[str, Any]]


class PromptDataset(Dataset[PromptItem]):
    """A map-style dataset of ``(prompt, metadata)``, so Lightning can shard it by prompt.

    ``metadata`` (one dict per prompt, default ``{}``) is what the rewards receive with each image.
    """

    def __init__(
        self, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
    ) -> None:
        self.prompts = list(prompts)
        self.metadata = [{} for _ in self.prompts] if metadata is None else list(metadata)
        if len(self.metadata) != len(self.prompts):
            raise ValueError(
                f"{len(self.prompts)} prompts but {len(self.metadata)} metadata dicts: pass one "
                "per prompt"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> PromptItem:
        return self.prompts[index], self.metadata[index]


class IndexedPromptDataset(PromptDataset):
    """Prompts with their position in the file: ``(index, prompt, metadata)``; the index seeds the
    validation sample."""

    def __getitem__(self, index: int) -> tuple[int, str, dict[str, Any]]:  # type: ignore[override]
        return index, self.prompts[index], self.metadata[index]


def _unpack(item: str | Sequence[Any]) -> PromptItem:
    """``(prompt, metadata)`` from a dataset item: a bare string has ``{}``; the dict is copied,
    so a reward that edits one image's metadata does not edit its group's."""
    if isinstance(item, str):
        return item, {}
    prompt, metadata = item
    return prompt, dict(metadata)


class IndexedCollate:
    """Collate ``(index, prompt[, metadata])`` items: one image per prompt, with its file index.

    Returns ``{"prompts", "metadata", "group_ids", "indices"}``; ``indices`` seeds each validation
    sample, so its image does not depend on the batch it lands in nor on the data-parallel split.
    """

    def __call__(self, items: Sequence[tuple[Any, ...]]) -> PromptBatch:
        indices = torch.tensor([item[0] for item in items], dtype=torch.long)
        pairs = [_unpack(item[1] if len(item) == 2 else item[1:]) for item in items]
        return {
            "prompts": [p for p, _ in pairs],
            "metadata": [m for _, m in pairs],
            "group_ids": torch.arange(len(items), dtype=torch.long),
            "indices": indices,
        }


class GroupCollate:
    """Collate B prompts into B*G rollouts: each prompt repeated G times, consecutively.

    Returns `{"prompts": list[str] (B*G), "metadata": list[dict] (B*G), "group_ids":
    LongTensor[B*G]}` with ids 0..B-1; items are prompts or `(prompt, metadata)` pairs (a bare
    prompt's metadata is `{}`). A class, not a closure, so it pickles into DataLoader workers.
    """

    def __init__(self, group_size: int) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size

    def __call__(self, items: Sequence[str | PromptItem]) -> PromptBatch:
        """Repeat each prompt and its metadata `group_size` times and number the groups."""
        pairs = [_unpack(item) for item in items]
        g = range(self.group_size)
        group_ids = torch.arange(len(pairs), dtype=torch.long).repeat_interleave(self.group_size)
        return {
            "prompts": [p for p, _ in pairs for _ in g],
            "metadata": [dict(m) for _, m in pairs for _ in g],
            "group_ids": group_ids,
        }


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
    """Prompts as groups: B prompts per step (per process), G rollouts per prompt.

    The prompts come from files (``train_file``, ``val_file``: `.txt` or `.jsonl`) or from
    MARBLE's mixed set (``root``, exclusive with the files): one folder per source, the layout of
    DiffusionNFT's ``dataset/``::

        data:
          root: path/to/DiffusionNFT/dataset   # pickscore/{split}.txt, ocr/{split}.txt,
          train_split: train                   # geneval/{split}_metadata.jsonl
          val_split: test                      # null: no validation
          sources: null                        # all three; or [pickscore, ocr]; or {name: pattern}
          stratified: true                     # the same number of prompts per source every step

    Training batches hold B*G prompts (consecutive repeats), their ``metadata`` (one dict per
    image: a `.jsonl` line's fields, plus ``source`` with ``root``; ``{}`` for a `.txt` file's
    line) and group ids, shuffled per epoch from `seed`. ``stratified`` (with ``root`` only)
    samples each step as :class:`StratifiedSampler`: ``batch_size x processes`` must be a multiple
    of the number of sources. Validation batches hold each validation prompt once (the sources
    interleaved with ``root``). `val_batch_size` defaults to B*G, the images of one rollout.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        batch_size: int = 2,
        group_size: int = 4,
        prompt_key: str = "prompt",
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        root: str | None = None,
        sources: list[str] | dict[str, str] | None = None,
        train_split: str = "train",
        val_split: str | None = "test",
        stratified: bool = True,
    ) -> None:
        super().__init__()
        _check_sizes(batch_size, group_size, val_batch_size, num_workers)
        if not prompt_key:
            raise ConfigError(
                "data.prompt_key must be a non-empty string (the .jsonl key holding the prompt, "
                "e.g. prompt)"
            )
        _check_origin(train_file, val_file, root, sources)
        self.save_hyperparameters()
        self.root = root
        self.sources = resolve_sources(sources) if root is not None else {}
        self.train_split = train_split
        self.val_split = val_split
        self.stratified = stratified
        self._train_sizes: dict[str, int] = {}
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
        if self.root is not None:
            self._setup_root(stage)
            return
        if stage == "fit" and self.train_dataset is None:
            if self.train_file is None:
                raise ConfigError(
                    "data.train_file is not set: training needs a prompt file (or data.root)"
                )
            prompts, metadata = self._read("data.train_file", self.train_file)
            self._check_batch_fits(len(prompts), f"in data.train_file {self.train_file!r}")
            self.train_dataset = PromptDataset(prompts, metadata)
        if stage in ("fit", "validate") and self.val_file is not None and self.val_dataset is None:
            self.val_dataset = IndexedPromptDataset(*self._read("data.val_file", self.val_file))

    def _check_batch_fits(self, n: int, where: str) -> None:
        """A step needs ``batch_size`` distinct prompts from the training set."""
        if n < self.batch_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is more than the {n} prompts {where}: set "
                f"data.batch_size to at most {n}, or add prompts"
            )

    def _read(self, setting: str, path: str) -> tuple[list[str], list[dict[str, Any]]]:
        """:func:`read_prompt_records`, its error prefixed with the setting that names the file."""
        try:
            return read_prompt_records(path, self.prompt_key)
        except PromptFileError as err:
            raise PromptFileError(f"{setting}: {err}") from err

    def _setup_root(self, stage: str) -> None:
        """Read the mixed set's splits the stage needs (all missing files named in one error)."""
        train = stage == "fit" and self.train_dataset is None
        val = stage in ("fit", "validate") and self.val_split is not None
        val = val and self.val_dataset is None
        splits = [s for s, wanted in ((self.train_split, train), (self.val_split, val)) if wanted]
        check_layout(self.root, self.sources, list(dict.fromkeys(splits)))
        if train:
            prompts, metadata, sizes = read_sources(
                self.root, self.sources, self.train_split, self.prompt_key
            )
            if self.stratified:
                stratified_per_source(self.batch_size, self._world()[0], sizes)
            else:
                where = f"of split {self.train_split!r} under data.root {self.root!r}"
                self._check_batch_fits(len(prompts), where)
            self.train_dataset = PromptDataset(prompts, metadata)
            self._train_sizes = sizes
        if val:
            prompts, metadata, sizes = read_sources(
                self.root, self.sources, self.val_split, self.prompt_key
            )
            order = interleave_sources(list(sizes.values()))
            self.val_dataset = IndexedPromptDataset(
                [prompts[i] for i in order], [metadata[i] for i in order]
            )

    def _world(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the Trainer; ``(1, 0)`` outside one."""
        trainer = self.trainer  # set by Lightning; None outside a Trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self) -> ResumableDataLoader:
        """B prompts per batch repeated G times; incomplete last batch dropped.

        Resumable: the loader's position is saved in checkpoints, so a run resumed mid-epoch
        continues with the next unseen prompts of the same permutation (exact resume).
        """
        if self.train_dataset is None:
            raise RuntimeError("PromptDataModule.train_dataloader: call setup('fit') first")
        dataset = self.train_dataset
        sampler = EpochSeededSampler(dataset.prompts, self.seed) if self.shuffle else None
        if self.root is not None and self.stratified:
            world, rank = self._world()
            sampler = StratifiedSampler(
                self._train_sizes, self.batch_size, world, rank, self.seed, self.shuffle
            )
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
        if self.val_file is None and (self.root is None or self.val_split is None):
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
        world, rank = self._world()
        if world <= 1:
            return None
        if len(self.val_dataset) < world:
            where, off = f"data.val_file {self.val_file!r}", "data.val_file: null"
            if self.root is not None:
                where = f"split {self.val_split!r} under data.root {self.root!r}"
                off = "data.val_split: null"
            raise ConfigError(
                f"{where} holds {len(self.val_dataset)} prompts, fewer than the {world} "
                f"data-parallel processes: add prompts to it (at least {world}) or set {off}"
            )
        return UnrepeatedDistributedSampler(
            self.val_dataset, num_replicas=world, rank=rank, shuffle=False
        )
