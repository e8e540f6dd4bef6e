"""Re-encode one video for fast training reads (PyAV: its bundled FFmpeg and libx264, no system package).

H.264 yuv420p, shorter side ``short_side`` (never upscaled), a keyframe exactly every ``keyint`` frames (x264
``keyint = min-keyint = G``, ``scenecut=0``: no scene-cut keyframes), no B-frames, ``tune=fastdecode``, no
audio; ``fps`` None keeps every frame (constant rate at the source's average rate), a number resamples with
FFmpeg's ``fps`` filter (frames dropped / repeated). Written to a temporary name in the output folder, then
renamed: an interrupted run leaves no half-written video.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

from adafocus.fileio import atomic_path

DEFAULT_KEYINT = 8  # see README "Fast video data": the measured speed/disk trade-off
DEFAULT_CRF = 23


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``short_side`` (kept when already smaller), both even."""
    scale = min(1.0, short_side / min(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def transcode_video(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    short_side: int = 360,
    fps: float | None = None,
    keyint: int = DEFAULT_KEYINT,
    crf: int = DEFAULT_CRF,
    preset: str = "fast",
    threads: int = 1,
) -> int:
    """Re-encode ``src`` to ``dst`` (mp4); returns the number of frames written."""
    import av

    dst = Path(dst)
    with av.open(str(src)) as source:
        if not source.streams.video:
            raise ValueError("no video stream")
        stream = source.streams.video[0]
        stream.thread_type, stream.thread_count = "AUTO", threads
        rate = Fraction(fps).limit_denominator(1001) if fps else (stream.average_rate or stream.guessed_rate)
        if not rate:
            raise ValueError("the source has no frame rate: give --fps N")
        width, height = output_size(stream.codec_context.width, stream.codec_context.height, short_side)

        graph = av.filter.Graph()
        chain = [graph.add_buffer(template=stream)]
        if fps:
            chain.append(graph.add("fps", f"fps={rate.numerator}/{rate.denominator}"))
        chain += [
            graph.add("scale", f"{width}:{height}:flags=bicubic"),  # as ffmpeg -vf scale
            graph.add("format", "yuv420p"),
            graph.add("buffersink"),
        ]
        for a, b in zip(chain[:-1], chain[1:], strict=True):
            a.link_to(b)
        graph.configure()

        written = 0
        with atomic_path(dst) as tmp, av.open(tmp, mode="w", format="mp4") as out:
            video = out.add_stream("libx264", rate=rate)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            video.codec_context.time_base = 1 / rate
            video.codec_context.gop_size = keyint
            video.codec_context.max_b_frames = 0
            video.options = {
                "crf": str(crf),
                "preset": preset,
                "tune": "fastdecode",
                "threads": str(threads),
                "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=0",
            }

            def encode(frame) -> None:
                nonlocal written
                frame.pts, frame.time_base = written, video.codec_context.time_base  # one frame a tick
                frame.pict_type = av.video.frame.PictureType.NONE  # let x264 place the keyframes
                out.mux(video.encode(frame))
                written += 1

            def drain() -> None:
                while True:
                    try:
                        encode(graph.pull())
                    except (av.BlockingIOError, av.EOFError):
                        return

            for frame in source.decode(stream):
                graph.push(frame)
                drain()
            graph.push(None)
            drain()
            out.mux(video.encode(None))
            if written == 0:
                raise ValueError("no frame decoded")
    return written
