"""Data pipeline benchmark on long web-style videos: ``python -m adafocus.data.bench --from DIR [...]``.

1. ``--from DIR``: makes ``--num-videos`` web-style long videos from the real clips in DIR (``--seconds`` s at
   ``--fps``, ``--height`` and half of it in turn, H.264 with B-frames, a keyframe every ``--source-keyint``
   frames as uploads), looped under a slowly moving crop; or ``--videos DIR_or_LIST``: those videos as is.
2. transcodes them (``prepare transcode``'s encoder, one set per ``--keyint``) and extracts the original's
   JPEG frames (height ``--frames-height``, FFmpeg's default MJPEG quality, as ``ffmpeg -vf scale=-1:360``).
3. prints, per format, its disk and PSNR against the source (frames scaled to the format's size), then clips/s
   on one core (main process, one decoder thread, one torch thread) of the full train and eval pipelines
   (decode + transforms) for: raw videos (exact / keyframe sampling), transcoded (exact / keyframe), each
   decoder, and the JPEG folders read with PIL. The first clip of each run is not timed.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adafocus.data.dataset import VideoClipDataset
from adafocus.data.io import VIDEO_EXTENSIONS, require_decoder
from adafocus.data.lists import VideoEntry
from adafocus.data.manifest import probe_video
from adafocus.data.transcode import transcode_video
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
        raise SystemExit(f"bench: {spec} is neither a video, a directory nor a list file")
    if not videos:
        raise SystemExit(f"bench: no videos ({', '.join(VIDEO_EXTENSIONS)}) in {spec}")
    missing = [str(p) for p in videos if not p.is_file()]
    if missing:
        raise SystemExit(f"bench: missing video file(s): {missing[:5]}")
    return videos


def _decode_rgb(path: Path, max_width: int = 960) -> list[np.ndarray]:
    """Every frame of ``path`` as RGB ``[H, W, 3]``, at most ``max_width`` wide."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        w, h = s.codec_context.width, s.codec_context.height
        scale = min(1.0, max_width / w)
        size = (round(w * scale / 2) * 2, round(h * scale / 2) * 2)
        return [f.to_ndarray(width=size[0], height=size[1], format="rgb24") for f in c.decode(s)]


def make_long_video(
    clip: Path, out: Path, seconds: float, fps: int, height: int, keyint: int, phase: float = 0.0
) -> Path:
    """A web-style long video from a real clip: the clip looped back and forth under a slowly moving 16:9 crop
    (70 % of the clip), scaled to ``height``; H.264 CRF 23 with B-frames and a keyframe every ``keyint``."""
    import av

    frames = _decode_rgb(clip)
    ch, cw = frames[0].shape[:2]
    crop_w = min(cw, round(0.7 * ch * 16 / 9))
    crop_h = min(ch, round(crop_w * 9 / 16))
    width = round(height * 16 / 9 / 2) * 2
    cycle = [*range(len(frames)), *range(len(frames) - 2, 0, -1)]  # ping-pong: no jump at the loop
    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {
            "crf": "23",
            "preset": "fast",
            "x264-params": f"keyint={keyint}:min-keyint={keyint}",
        }
        for t in range(int(seconds * fps)):
            a = 2 * math.pi * t / (fps * 20) + phase  # one slow sweep every 20 s
            top = round((ch - crop_h) * (0.5 + 0.5 * math.sin(a)))
            left = round((cw - crop_w) * (0.5 + 0.5 * math.cos(0.7 * a)))
            rgb = frames[cycle[t % len(cycle)]][top : top + crop_h, left : left + crop_w]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            container.mux(stream.encode(frame.reformat(width=width, height=height, interpolation="BICUBIC")))
        container.mux(stream.encode(None))
    return out


def extract_jpegs(video: Path, folder: Path, height: int = 360) -> int:
    """The original's frames: ``ffmpeg -i VIDEO -vf scale=-1:HEIGHT FOLDER/image_%05d.jpg`` done with PyAV
    (FFmpeg's MJPEG encoder and image2 muxer at their default settings, bicubic scale). Returns the count."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    with av.open(str(video)) as source:
        stream = source.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        width = max(2, round(w * height / h / 2) * 2)
        rate = stream.average_rate or 30
        n = 0
        with av.open(str(folder / "image_%05d.jpg"), mode="w", format="image2") as out:
            jpeg = out.add_stream("mjpeg", rate=rate)
            jpeg.width, jpeg.height, jpeg.pix_fmt = width, height, "yuvj420p"
            jpeg.codec_context.time_base = 1 / rate
            for frame in source.decode(stream):
                scaled = frame.reformat(
                    width=width, height=height, format="yuvj420p", interpolation="BICUBIC"
                )
                scaled.pts, scaled.time_base = n, jpeg.codec_context.time_base
                out.mux(jpeg.encode(scaled))
                n += 1
            out.mux(jpeg.encode(None))
    return n


def psnr(source: Path, frames_of, count: int = 8) -> float:
    """Mean PSNR (dB) over ``count`` evenly spread frames: ``frames_of(indices, width, height)`` (uint8
    ``[k, H, W, 3]`` of the format) against the source frames scaled to that size (bicubic)."""
    import av

    with av.open(str(source)) as c:
        s = c.streams.video[0]
        decoded = list(c.decode(s))
    indices = np.linspace(0, len(decoded) - 1, count).round().astype(int).tolist()
    test = frames_of(indices)
    height, width = test.shape[1:3]
    ref = np.stack(
        [
            decoded[i].to_ndarray(width=width, height=height, format="rgb24", interpolation="BICUBIC")
            for i in indices
        ]
    )
    mse = ((ref.astype(np.float64) - test.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def _video_frames(path: Path):
    def frames_of(indices: list[int]) -> np.ndarray:
        import decord

        return decord.VideoReader(str(path), num_threads=1).get_batch(indices).asnumpy()

    return frames_of


def _jpeg_frames(folder: Path):
    def frames_of(indices: list[int]) -> np.ndarray:
        from PIL import Image

        return np.stack(
            [np.asarray(Image.open(folder / f"image_{i + 1:05d}.jpg").convert("RGB")) for i in indices]
        )

    return frames_of


def clips_per_second(dataset: VideoClipDataset, clips: int) -> float:
    """Clips/s of ``dataset[i]`` (decode + transforms) in this process; the first clip is not timed."""
    dataset[0]
    start = time.perf_counter()
    for k in range(clips):
        dataset[k % len(dataset)]
    return clips / (time.perf_counter() - start)


def _disk(paths: list[Path]) -> int:
    return sum(p.stat().st_size for path in paths for p in ([path] if path.is_file() else path.rglob("*")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adafocus.data.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="from_dir", help="real clips to make long web-style videos from")
    source.add_argument("--videos", help="use these videos as they are (directory, file or list)")
    parser.add_argument("--work", help="keep the generated files here (default: a temporary directory)")
    parser.add_argument("--num-videos", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--height", type=int, default=720, help="height of the even long videos (odd: half)")
    parser.add_argument("--source-keyint", type=int, default=150, help="keyframe interval of the long videos")
    parser.add_argument("--keyint", type=int, nargs="+", default=[8], help="transcode: one set per interval")
    parser.add_argument("--short-side", type=int, default=360, help="transcode / decode shorter side")
    parser.add_argument("--frames-height", type=int, default=360, help="height of the extracted JPEG frames")
    parser.add_argument("--decoders", nargs="+", default=["decord", "torchcodec"])
    parser.add_argument("--clips", type=int, default=16, help="timed clips per measurement")
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=224)
    args = parser.parse_args(argv)
    for decoder in args.decoders:
        require_decoder(decoder)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="adafocus-bench-") as tmp:
        work = Path(args.work or tmp)
        if args.from_dir:
            clips = find_videos(args.from_dir)
            raw = []
            for i in range(args.num_videos):
                out = work / "raw" / "videos" / f"{i}.mp4"
                if not out.is_file():
                    height = args.height if i % 2 == 0 else args.height // 4 * 2  # 720p, 360p
                    make_long_video(clips[i % len(clips)], out, args.seconds, args.fps, height,
                                    args.source_keyint, phase=i)  # fmt: skip
                raw.append(out)
        else:  # linked as videos/<i>.<ext>, the layout the dataset reads
            raw = []
            for i, p in enumerate(find_videos(args.videos)):
                link = work / "raw" / "videos" / f"{i}{p.suffix}"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(p.resolve())
                raw.append(link)
        infos = [probe_video(p, str(i), p.parent) for i, p in enumerate(raw)]
        sizes = sorted({f"{i.width}x{i.height}" for i in infos})
        print(f"{len(raw)} source videos: {', '.join(sizes)}, {sum(i.frames for i in infos)} frames, "
              f"keyframe every ~{np.mean([i.frames / len(i.keyframes) for i in infos]):.0f}; "
              f"T={args.num_frames}, S={args.input_size}, {args.clips} clips a run, one core")  # fmt: skip

        formats = []  # (name, backend, manifest, files, frames_of per video)
        formats.append(("raw", "video", None, raw, [_video_frames(p) for p in raw]))
        for g in args.keyint:
            folder = work / f"transcoded_g{g}"
            fast, fast_infos = [], {}
            for i, p in enumerate(raw):
                out = folder / f"{i}.mp4"
                if not out.is_file():
                    transcode_video(p, out, short_side=args.short_side, keyint=g, threads=1)
                fast.append(out)
                fast_infos[str(i)] = probe_video(out, str(i), folder)
            formats.append((f"transcoded G={g}", "video", fast_infos, fast, [_video_frames(p) for p in fast]))
        jpeg_root = work / "jpeg"
        for i, p in enumerate(raw):
            folder = jpeg_root / "frames" / str(i)
            if not folder.is_dir():  # extracted under a temporary name, then renamed
                partial = folder.with_name(f".{i}.partial")
                shutil.rmtree(partial, ignore_errors=True)
                extract_jpegs(p, partial, args.frames_height)
                partial.rename(folder)
        jpegs = [jpeg_root / "frames" / str(i) for i in range(len(raw))]
        formats.append(("JPEG frames", "frames", None, jpegs, [_jpeg_frames(f) for f in jpegs]))

        lines = ["| format | disk (MB) | bytes vs JPEG | PSNR vs source (dB) |", "|---|---|---|---|"]
        jpeg_bytes = _disk(jpegs)
        for name, _backend, _infos, paths, readers in formats:
            disk = _disk(paths)
            quality = np.mean([psnr(src, read) for src, read in zip(raw, readers, strict=True)])
            lines.append(f"| {name} | {disk / 1e6:.1f} | {disk / jpeg_bytes:.2f} | {quality:.1f} |")
        print("\n".join(lines), flush=True)

        rows = []
        entries = [VideoEntry(str(i), info.frames, (0,), i + 1) for i, info in enumerate(infos)]
        for name, backend, manifest, paths, _ in formats:
            data_dir = paths[0].parent.parent  # raw/ (videos/<i>.mp4) or jpeg/ (frames/<i>/)
            samplings = ["exact"] if backend == "frames" else ["exact", "keyframe"]
            decoders = ["PIL"] if backend == "frames" else args.decoders
            for decoder in decoders:
                for sampling in samplings:
                    rates = {}
                    for mode in ("train", "eval"):
                        ds = VideoClipDataset(
                            entries, data_dir, args.num_frames,
                            VideoTransform(args.input_size, train=mode == "train"), train=mode == "train",
                            backend=backend, decode_short_side=args.short_side, on_error="raise",
                            sampling=sampling, decoder="decord" if decoder == "PIL" else decoder,
                            manifest=manifest, manifest_root=paths[0].parent,
                        )  # fmt: skip
                        rates[mode] = clips_per_second(ds, args.clips)
                    rows.append((name, decoder, sampling, rates["train"], rates["eval"]))
                    print(f"  {name:18s} {decoder:10s} {sampling:8s} train {rates['train']:6.2f}  "
                          f"eval {rates['eval']:6.2f} clips/s", flush=True)  # fmt: skip
    jpeg_train = rows[-1][3]
    print("\n| source | decoder | sampling | train clips/s | eval clips/s | train vs JPEG |")
    print("|---|---|---|---|---|---|")
    for name, decoder, sampling, train, evaluate in rows:
        print(
            f"| {name} | {decoder} | {sampling} | {train:.2f} | {evaluate:.2f} | {train / jpeg_train:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
