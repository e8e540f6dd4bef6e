"""Data pipeline benchmark: ``python -m adafocus.data.bench --videos DIR_or_LIST [--workers 0 2 4] ...``.

Prints clips/s of the train and eval pipelines (decord, decoding only the sampled frames at reduced size
inside the decoder) per DataLoader worker count, and of the same pipelines reading the same clips from
JPEG frame folders with PIL — the original's way. The frame folders are extracted once with PyAV (height
``--frames-height``, 360 as the original's ``ffmpeg -vf scale=-1:360``) into a temporary directory.
The first batch of each run (worker start-up) is not timed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from adafocus.data.dataset import ClipCollate, VideoClipDataset
from adafocus.data.io import VIDEO_EXTENSIONS
from adafocus.data.lists import VideoEntry
from adafocus.data.transforms import VideoTransform


def find_videos(spec: str) -> list[Path]:
    """One video file, the videos in a directory (recursively), or those listed in a text file (one path a
    line, or the first field of a comma list line; relative paths are taken from the list's directory)."""
    src = Path(spec)
    if src.is_dir():
        videos = sorted(p for p in src.rglob("*") if p.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS)
    elif src.is_file() and src.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS:
        videos = [src]
    elif src.is_file():
        videos = []
        for line in src.read_text(encoding="utf-8").splitlines():
            if line.strip():
                p = Path(line.split(",")[0].strip())
                videos.append(p if p.is_absolute() else src.parent / p)
    else:
        raise SystemExit(f"bench: --videos {spec} is neither a directory nor a list file")
    if not videos:
        raise SystemExit(f"bench: no videos ({', '.join(VIDEO_EXTENSIONS)}) in {spec}")
    missing = [str(p) for p in videos if not p.is_file()]
    if missing:
        raise SystemExit(f"bench: missing video file(s): {missing[:5]}")
    return videos


def extract_frames(video: Path, folder: Path, height: int = 360, quality: int = 90) -> int:
    """Decode every frame with PyAV, scale to ``height`` (aspect kept, even width), save as 1-based JPEGs."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            width = max(2, round(frame.width * height / frame.height / 2) * 2)
            frame.reformat(width=width, height=height, format="rgb24").to_image().save(
                folder / f"image_{n + 1:05d}.jpg", quality=quality
            )
            n += 1
    return n


def time_pipeline(dataset: VideoClipDataset, workers: int, batch_size: int) -> tuple[float, int]:
    """(clips/s, clips timed) of one pass over ``dataset``; the first batch is not timed."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=ClipCollate(dataset.num_frames, dataset.transform.input_size, dataset.max_labels),
        shuffle=False,
    )
    it = iter(loader)
    next(it)
    start, clips = time.perf_counter(), 0
    for batch in it:
        clips += batch["video"].shape[0]
    elapsed = time.perf_counter() - start
    return (clips / elapsed if elapsed > 0 else float("nan")), clips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adafocus.data.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--videos", required=True, help="directory of videos, or a file listing them")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--clips", type=int, default=64, help="clips per measurement (videos are repeated)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--decode-short-side", type=int, default=360, help="0 = native size")
    parser.add_argument("--frames-height", type=int, default=360, help="height of the extracted JPEG frames")
    parser.add_argument("--no-frames", action="store_true", help="skip the JPEG-folder baseline")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the main process")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    videos = find_videos(args.videos)
    reps = -(-max(args.clips, args.batch_size * 2) // len(videos))
    short_side = args.decode_short_side or None
    rows: list[tuple[str, str, int, float, int]] = []

    def run(backend: str, data_dir: Path, paths: list[str]) -> None:
        entries = [VideoEntry(p, 0, (0,), i + 1) for i, p in enumerate(paths * reps)][: max(args.clips, 1)]
        for mode in ("train", "eval"):
            train = mode == "train"
            dataset = VideoClipDataset(
                entries, data_dir, args.num_frames, VideoTransform(args.input_size, train=train), train=train,
                backend=backend, decode_short_side=short_side, on_error="raise",
            )  # fmt: skip
            for w in args.workers:
                rate, n = time_pipeline(dataset, w, args.batch_size)
                rows.append((backend, mode, w, rate, n))
                print(f"  {backend:6s} {mode:5s} workers={w}: {rate:8.1f} clips/s ({n} clips)", flush=True)

    sizes = []
    for v in videos:
        import av

        with av.open(str(v)) as c:
            s = c.streams.video[0]
            sizes.append(f"{s.codec_context.width}x{s.codec_context.height}/{s.frames or '?'}f")
    print(
        f"{len(videos)} video(s): {', '.join(sorted(set(sizes)))}; T={args.num_frames}, "
        f"S={args.input_size}, batch={args.batch_size}, decode_short_side={short_side}"
    )
    run("video", Path("/"), [str(v.resolve()) for v in videos])
    if not args.no_frames:
        with tempfile.TemporaryDirectory(prefix="adafocus-bench-") as tmp:
            start = time.perf_counter()
            counts = [
                extract_frames(v, Path(tmp) / "frames" / str(i), args.frames_height)
                for i, v in enumerate(videos)
            ]
            print(
                f"extracted {sum(counts)} JPEG frames (height {args.frames_height}) in "
                f"{time.perf_counter() - start:.1f}s"
            )
            run("frames", Path(tmp), [str(i) for i in range(len(videos))])

    from rich.console import Console
    from rich.table import Table

    table = Table(title="clips/s (higher is better)")
    for col in ("source", "pipeline", "workers", "clips/s", "ms/clip"):
        table.add_column(col, justify="right")
    for backend, mode, w, rate, _n in rows:
        name = "decord video" if backend == "video" else "JPEG folders (PIL)"
        table.add_row(
            name, mode, str(w), f"{rate:.1f}", f"{1000 / rate:.1f}" if rate == rate and rate > 0 else "-"
        )
    Console().print(table)
    return 0 if np.isfinite([r[3] for r in rows]).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
