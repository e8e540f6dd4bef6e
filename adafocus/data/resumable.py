"""A training DataLoader that Lightning resumes mid-epoch at the next batch, in the same order."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler


class _ResumableSampler(Sampler[int]):
    """``sampler``'s indices, where a resumed epoch left them. A RandomSampler's order comes from a seed drawn
    from torch's global RNG at the epoch's start, as RandomSampler itself draws it, and kept; after
    :meth:`resume`, the iteration of that epoch replays the order of its seed from index ``skip`` on."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self.epoch = 0
        self.seed: int | None = None
        self._resume: tuple[int, int | None, int] | None = None  # (epoch, seed, skip)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Lightning sets the epoch through the loader's sampler (a DistributedSampler's order needs it)."""
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def resume(self, epoch: int, seed: int | None, skip: int) -> None:
        self._resume = (epoch, seed, skip)
        self.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] != self.epoch:
            resume = None  # the resumed epoch ended without another batch: this is the next one
        if isinstance(self.sampler, RandomSampler):
            draw = resume is None  # RandomSampler's own draw
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item()) if draw else resume[1]
            self.sampler.generator = torch.Generator().manual_seed(self.seed)
        return itertools.islice(iter(self.sampler), 0 if resume is None else resume[2], None)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose place in the epoch is saved in Lightning's checkpoints and restored on resume.

    Lightning's fit loop stores ``state_dict()`` of a training loader that has one (in the checkpoint's
    ``loops.fit_loop.state_dict.combined_loader``) and, resuming a checkpoint written inside an epoch, calls
    ``load_state_dict()`` before iterating again; its epoch loop then runs only the batches the checkpoint had
    not seen. The state is the epoch, its sampling seed and the number of batches yielded: the resumed epoch
    replays the same order and skips those batches' indices without loading them. ``sampler``: any sampler
    (RandomSampler, DistributedSampler...), wrapped. The dataset's own random draws continue as before with
    ``workers=0``, from the random states the checkpoint restores (:class:`adafocus.resume.RandomStates`);
    worker processes start anew after a resume."""

    def __init__(self, dataset: Any, sampler: Sampler[int], **kwargs: Any) -> None:
        super().__init__(dataset, sampler=_ResumableSampler(sampler), **kwargs)
        self._yielded = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()  # now, as DataLoader does: the draws of the epoch's start stay in place
        self._yielded, self._resume_at = self._resume_at, 0
        return self._count(iterator)

    def _count(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "seed": self.sampler.seed, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        batches = int(state.get("batches", 0))
        if not 0 < batches < len(self):
            return  # the epoch had not begun, or it was over: the next iteration starts afresh
        self.sampler.resume(int(state["epoch"]), state.get("seed"), batches * self.batch_size)
        self._resume_at = batches
