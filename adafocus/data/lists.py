"""Reading the published split files and class indexes (SPEC §3).

Formats:
- ``comma`` (ActivityNet, FCVID): ``relative_path,num_frames,label[,label...]`` — multi-label, 0-based.
- ``space`` (Mini-Kinetics): ``relative_path num_frames label`` — the path may contain spaces; the last
  two whitespace-separated fields are the numbers.
Class index: one class a line, either ``name``, ``index name`` or ``index,name`` (0- or 1-based indices,
which must then run consecutively); the line order gives the label.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LIST_FORMATS = ("comma", "space")
MIN_LIST_FRAMES = 3  # the original drops entries with fewer frames (SPEC §3)


class ListFileError(ValueError):
    """A malformed list / class-index file; the message names the file and the line."""


def read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file (a UTF-8 byte-order mark is dropped, not read as part of
    the first path); a line that is not UTF-8 is a :class:`ListFileError` naming the file, line and byte."""
    lines = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ListFileError(
                f"{path}:{lineno}: the {what} is not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at "
                f"column {e.start + 1}); save it as UTF-8"
            ) from None
        lines.append((lineno, text))
    return lines


@dataclass(frozen=True)
class VideoEntry:
    """One line of a split file."""

    path: str  # relative path as written in the list (no extension for the published splits)
    num_frames: int  # as written in the list (informative only: the decoder's count is used)
    labels: tuple[int, ...]  # 0-based, at least one
    line: int  # 1-based line number in the list file


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: expected the file {path}")
    return path


def parse_line(text: str, list_format: str) -> tuple[str, int, tuple[int, ...]]:
    """Parse one non-empty list line into ``(path, num_frames, labels)``; ValueError says what is wrong."""
    if list_format == "comma":
        fields = [f.strip() for f in text.split(",")]
        if len(fields) < 3:
            raise ValueError(
                f"expected 'relative_path,num_frames,label[,label...]', got {len(fields)} field(s)"
            )
        path, numbers = fields[0], fields[1:]
    elif list_format == "space":
        parts = text.rsplit(None, 2)
        if len(parts) != 3:
            raise ValueError("expected 'relative_path num_frames label' (path may contain spaces)")
        path, numbers = parts[0].strip(), parts[1:]
    else:
        raise ValueError(f"list_format must be one of {LIST_FORMATS}, got {list_format!r}")
    if not path:
        raise ValueError("empty relative path")
    try:
        values = [int(v) for v in numbers]
    except ValueError:
        raise ValueError(f"num_frames and labels must be integers, got {numbers}") from None
    return path, values[0], tuple(values[1:])


def parse_list(
    list_file: str | Path,
    list_format: str,
    num_classes: int | None = None,
    min_frames: int = MIN_LIST_FRAMES,
) -> list[VideoEntry]:
    """Read a split file. Raises :class:`ListFileError` naming ``file:line`` for a malformed line or a label
    outside ``[0, num_classes)``, FileNotFoundError naming the expected path when it is missing.

    Entries whose listed frame count is below ``min_frames`` are dropped, as in the original (SPEC §3).
    """
    list_file = _require_file(Path(list_file), "list file")
    if list_format not in LIST_FORMATS:
        raise ValueError(f"dataset.list_format must be one of {LIST_FORMATS}, got {list_format!r}")
    entries: list[VideoEntry] = []
    short: list[str] = []
    for lineno, text in read_lines(list_file, "list file"):
        if not text.strip():
            continue
        try:
            path, count, labels = parse_line(text, list_format)
        except ValueError as e:
            raise ListFileError(
                f"{list_file}:{lineno}: malformed {list_format} list line {text!r}: {e}"
            ) from None
        if num_classes is not None:
            bad = [label for label in labels if not 0 <= label < num_classes]
            if bad:
                raise ListFileError(
                    f"{list_file}:{lineno}: label(s) {bad} outside [0, {num_classes}) in line {text!r}"
                )
        if count < min_frames:
            short.append(f"{lineno}:{path}")
            continue
        entries.append(VideoEntry(path, count, labels, lineno))
    if not entries:
        raise ListFileError(f"{list_file}: no usable video entries (empty, or all below {min_frames} frames)")
    if short:
        log.warning(
            "%s: %d entries with fewer than %d frames left out, as the original does (line:path): %s%s",
            list_file, len(short), min_frames, ", ".join(short[:10]), " ..." if len(short) > 10 else "",
        )  # fmt: skip
    return entries


_INDEXED = re.compile(r"^\s*(\d+)\s*[,\s]\s*(\S.*?)\s*$")


def read_class_index(class_file: str | Path, num_classes: int | None = None) -> list[str]:
    """Class names in label order from a class index file (``name`` / ``idx name`` / ``idx,name`` lines).

    Raises FileNotFoundError naming the expected path, ListFileError if the count differs from
    ``num_classes`` or the file is empty.
    """
    class_file = _require_file(Path(class_file), "class index file")
    lines = [(i, t.strip()) for i, t in read_lines(class_file, "class index")]
    lines = [(i, t) for i, t in lines if t]
    if not lines:
        raise ListFileError(f"{class_file}: empty class index")
    matches = [_INDEXED.match(t) for _, t in lines]
    names = [t for _, t in lines]
    if all(matches):
        idx = [int(m.group(1)) for m in matches]
        start = idx[0]
        if start in (0, 1) and idx == list(range(start, start + len(idx))):
            names = [m.group(2) for m in matches]
    if num_classes is not None and len(names) != num_classes:
        raise ListFileError(f"{class_file}: {len(names)} classes, but dataset.num_classes = {num_classes}")
    return names


def write_list(path: str | Path, entries: list[tuple[str, int, tuple[int, ...]]], list_format: str) -> None:
    """Write ``(path, num_frames, labels)`` rows in ``list_format`` atomically."""
    from adafocus.data.io import atomic_write_text

    rows = []
    for rel, count, labels in entries:
        if list_format == "comma":
            if "," in rel:
                raise ValueError(f"path {rel!r} contains a comma: cannot be written in the comma list format")
            rows.append(",".join([rel, str(count), *map(str, labels)]))
        elif list_format == "space":
            if len(labels) != 1:
                raise ValueError(f"the space list format holds one label per video, got {labels} for {rel!r}")
            rows.append(f"{rel} {count} {labels[0]}")
        else:
            raise ValueError(f"list_format must be one of {LIST_FORMATS}, got {list_format!r}")
    atomic_write_text(path, "".join(r + "\n" for r in rows))
