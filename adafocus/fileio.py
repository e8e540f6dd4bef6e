"""Writing files so that nothing is ever half-written: a temporary name in the same folder, then a rename
(also for Lightning's checkpoints, whose bytes never pass through the system temporary directory)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.plugins.io import TorchCheckpointIO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; write it in the block. On success it replaces ``path``
    (with the usual umask permissions), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, never a half-written checkpoint. A local file is written by
    ``torch.save`` straight into :func:`atomic_path`'s temporary next to it, synced to disk, then renamed:
    Lightning's own writer stages the bytes in the system temporary directory (fsspec's transaction), where
    a kill leaves them and a small ``/tmp`` fails the save. Remote URLs (``s3://``...) keep Lightning's
    writer."""

    def save_checkpoint(self, checkpoint: dict, path: str | os.PathLike, storage_options: Any = None) -> None:
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for a local file ({path})")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
