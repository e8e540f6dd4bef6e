"""Shared pytest fixtures: tiny real H.264 videos and dataset directories (see tests/videos.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from videos import ...` in any test module

from videos import make_video_dataset, numbered_frames, write_video  # noqa: E402


@pytest.fixture(scope="session")
def video_dataset_factory(tmp_path_factory):
    """``factory(name, videos, num_classes, **kwargs) -> Path``: a tiny dataset dir (cached per name).

    ``videos``: ``[(relative_path, num_frames, labels), ...]``; kwargs as :func:`videos.make_video_dataset`.
    """
    cache: dict[str, Path] = {}

    def factory(name: str, videos, num_classes: int, **kwargs) -> Path:
        if name not in cache:
            cache[name] = make_video_dataset(tmp_path_factory.mktemp(name), videos, num_classes, **kwargs)
        return cache[name]

    return factory


@pytest.fixture(scope="session")
def tiny_video(tmp_path_factory) -> Path:
    """One 64x48, 20-frame H.264 mp4 of :func:`videos.numbered_frames`."""
    return write_video(tmp_path_factory.mktemp("tiny") / "tiny.mp4", numbered_frames(20))
