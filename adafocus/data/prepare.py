"""Dataset tools: ``python -m adafocus.data.prepare {build,verify,transcode} ...``.

build  ROOT OUT   split files + class index from a ``ROOT/<class>/<video>`` tree (the Kinetics layout), or
                  ``ROOT/<train>/<class>/<video>`` + ``ROOT/<val>/<class>/<video>`` with ``--split-dirs``;
                  ``--classes FILE`` keeps a subset of classes in that order (e.g. Mini-Kinetics' 200).
                  Frame counts come from the decoder; videos it cannot open are reported and left out.
                  ``OUT/videos`` is made a symlink to ROOT (the layout the data module reads).
verify DATA_DIR --list FILE [--list FILE ...]
                  decodes every listed video in parallel (progress bar), reports missing / unreadable /
                  too-short files, malformed lines and out-of-range labels, and writes a cleaned list
                  (``<name>.clean.txt`` next to it, or ``--in-place``) atomically. ``--manifest`` also writes
                  ``DATA_DIR/videos/manifest.jsonl`` for the good videos (frame counts, sizes, keyframes).
transcode SRC DST [--list FILE ...] [--short-side 360] [--fps native|N] [--keyint G] [--workers N]
                  re-encodes every video under SRC (or those of the list files) to ``DST/<path>.mp4`` for fast
                  reads (H.264, keyframe every G frames, no B-frames, fastdecode; see adafocus.data.transcode)
                  in parallel, writes ``DST/manifest.jsonl``; resumable (finished videos kept), failures go
                  to ``DST/transcode_failures.txt`` and the exit status is 1.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from adafocus.data.io import (
    VIDEO_EXTENSIONS,
    VideoReadError,
    atomic_write_text,
    count_frames,
    detect_frame_template,
    read_frames,
    read_video,
    resolve_video,
)
from adafocus.data.lists import LIST_FORMATS, parse_line, read_class_index, write_list
from adafocus.data.manifest import (
    MANIFEST_NAME,
    ManifestError,
    VideoInfo,
    probe_video,
    read_manifest,
    write_manifest,
)
from adafocus.data.sampling import eval_indices
from adafocus.data.transcode import DEFAULT_CRF, DEFAULT_KEYINT, transcode_video

PRESETS = {  # names of the published files (SPEC §3)
    "generic": ("comma", "train_split.txt", "val_split.txt", "classInd.txt"),
    "actnet": ("comma", "actnet_train_split.txt", "actnet_val_split.txt", "classInd.txt"),
    "fcvid": ("comma", "fcvid_train_split.txt", "fcvid_val_split.txt", "classInd.txt"),
    "minik": ("space", "mini_train_videofolder.txt", "mini_val_videofolder.txt", "minik_classInd.txt"),
}


def _progress(items: Iterable, total: int, description: str, quiet: bool = False) -> Iterable:
    if quiet:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def _pool_map(fn, args: list, workers: int, description: str, quiet: bool) -> list:
    """``[fn(a) for a in args]`` over a process pool (order kept), with a progress bar."""
    if workers <= 1 or len(args) <= 1:
        return list(_progress(map(fn, args), len(args), description, quiet))
    with mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool:
        return list(_progress(pool.imap(fn, args, chunksize=1), len(args), description, quiet))


# ------------------------------------------------------------------ build
def _count_video(path: str) -> tuple[str, int | None, str]:
    import decord

    try:
        if os.path.getsize(path) == 0:
            return path, None, "empty file (0 bytes)"
        return path, len(decord.VideoReader(path, width=32, height=32, num_threads=1)), ""
    except Exception as e:  # noqa: BLE001 — any decoder failure is reported, not fatal
        return path, None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"


def _videos_in(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS
    )


def cmd_build(args: argparse.Namespace) -> int:
    root, out = Path(args.root).resolve(), Path(args.out)
    if not root.is_dir():
        raise SystemExit(f"build: ROOT {root} is not a directory")
    list_format, train_name, val_name, class_name = PRESETS[args.preset]
    list_format = args.format or list_format
    split_roots = (
        {"train": root / args.split_dirs[0], "val": root / args.split_dirs[1]} if args.split_dirs else None
    )
    for split_root in (split_roots or {}).values():
        if not split_root.is_dir():
            raise SystemExit(f"build: split directory {split_root} not found")
    scan_root = split_roots["train"] if split_roots else root
    found = sorted(d.name for d in scan_root.iterdir() if d.is_dir())
    if args.classes:
        classes = read_class_index(args.classes)
        missing = [c for c in classes if not (scan_root / c).is_dir()]
        if missing:
            raise SystemExit(
                f"build: {len(missing)} class(es) of {args.classes} have no folder in {scan_root}: "
                f"{missing[:10]}"
            )
    else:
        classes = found
    if not classes:
        raise SystemExit(f"build: no class folders in {scan_root}")

    rng = random.Random(args.seed)
    assignment: dict[str, list[tuple[Path, int]]] = {"train": [], "val": []}
    for label, name in enumerate(classes):
        if split_roots:
            for split, split_root in split_roots.items():
                assignment[split] += [(p, label) for p in _videos_in(split_root / name)]
        else:
            videos = _videos_in(root / name)
            rng.shuffle(videos)
            n_val = round(len(videos) * args.val_fraction)
            assignment["val"] += [(p, label) for p in sorted(videos[:n_val])]
            assignment["train"] += [(p, label) for p in sorted(videos[n_val:])]

    all_videos = [str(p) for split in ("train", "val") for p, _ in assignment[split]]
    counts = {
        p: (n, msg) for p, n, msg in _pool_map(_count_video, all_videos, args.workers, "counting", args.quiet)
    }
    bad = 0
    for split, name in (("train", train_name), ("val", val_name)):
        rows = []
        for p, label in assignment[split]:
            n, msg = counts[str(p)]
            if n is None:
                print(f"unreadable, left out: {p}: {msg}", file=sys.stderr)
                bad += 1
                continue
            rel = p.relative_to(root).with_suffix("").as_posix()
            rows.append((rel, n, (label,)))
        write_list(out / name, rows, list_format)
        print(f"{split}: {len(rows)} videos -> {out / name}")
    atomic_write_text(out / class_name, "".join(f"{c}\n" for c in classes))
    print(f"classes: {len(classes)} -> {out / class_name}")
    videos_link = out / "videos"
    if not args.no_link and not videos_link.exists():
        videos_link.symlink_to(root, target_is_directory=True)
        print(f"linked {videos_link} -> {root}")
    if bad:
        print(f"{bad} unreadable video(s) left out", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ verify
def _check_video(job: tuple) -> tuple[int, str, str, VideoInfo | None]:
    """-> (line number, status, message, manifest line or None); status: ok/missing/unreadable/short."""
    lineno, data_dir, rel, backend, template, num_frames, min_frames, full, manifest = job
    data_dir = Path(data_dir)
    seen: dict[str, int] = {}
    info = None

    def pick(n: int, keyframes=None) -> list[int]:
        seen["n"] = n
        if n < min_frames:
            return [0]
        return list(range(n)) if full else sorted({*eval_indices(n, num_frames), n - 1})

    try:
        if backend == "video":
            path = resolve_video(data_dir / "videos", rel)
            if full:  # decode every frame, in chunks
                import decord

                vr = decord.VideoReader(str(path), num_threads=1)
                seen["n"] = n = len(vr)
                for start in range(0, n, 64):
                    vr.get_batch(list(range(start, min(n, start + 64)))).asnumpy()
            else:
                read_video(path, pick, short_side=None)
            if manifest:
                info = probe_video(path, rel, data_dir / "videos", full=full)
        else:
            folder = data_dir / "frames" / rel
            if not folder.is_dir():
                return lineno, "missing", f"no frame folder {folder}"
            detect_frame_template(folder, template)
            seen["n"] = count_frames(folder)
            read_frames(folder, pick, template)
    except VideoReadError as e:
        status = "missing" if e.reason.startswith("missing") else "unreadable"
        return lineno, status, f"{e.path}: {e.reason}", None
    except Exception as e:  # noqa: BLE001
        return lineno, "unreadable", f"{rel}: {type(e).__name__}: {e}", None
    n = seen.get("n", 0) if info is None else min(seen.get("n", 0), info.frames)
    if n < min_frames:
        return lineno, "short", f"{rel}: {n} frame(s) < {min_frames}", None
    return lineno, "ok", "", info


def verify_list(
    args: argparse.Namespace, list_file: Path, num_classes: int | None, infos: dict[str, VideoInfo]
) -> dict[str, list[str]]:
    """Check one list; write the cleaned list; return problems by kind; manifest lines go to ``infos``."""
    problems: dict[str, list[str]] = defaultdict(list)
    lines = list_file.read_text(encoding="utf-8").splitlines()
    jobs, kept_text = [], {}
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            rel, _count, labels = parse_line(text, args.format)
        except ValueError as e:
            problems["malformed"].append(f"{list_file}:{lineno}: {e}: {text!r}")
            continue
        if num_classes is not None and any(not 0 <= label < num_classes for label in labels):
            problems["bad_label"].append(
                f"{list_file}:{lineno}: label(s) {list(labels)} outside [0, {num_classes})"
            )
            continue
        kept_text[lineno] = text
        jobs.append(
            (
                lineno,
                str(args.data_dir),
                rel,
                args.backend,
                args.frame_template,
                args.num_frames,
                args.min_frames,
                args.full,
                args.manifest,
            )
        )
    results = _pool_map(_check_video, jobs, args.workers, f"verify {list_file.name}", args.quiet)
    clean = []
    for lineno, status, message, info in results:
        if status == "ok":
            clean.append(kept_text[lineno])
            if info is not None:
                infos[info.video] = info
        else:
            problems[status].append(f"{list_file}:{lineno}: {message}")
    out = list_file if args.in_place else list_file.with_name(f"{list_file.stem}.clean{list_file.suffix}")
    atomic_write_text(out, "".join(t + "\n" for t in clean))
    print(
        f"{list_file}: {len(clean)} of {len(jobs) + len(problems['malformed']) + len(problems['bad_label'])} "
        f"entries ok -> {out}"
    )
    return problems


def cmd_verify(args: argparse.Namespace) -> int:
    args.data_dir = Path(args.data_dir)
    if not args.data_dir.is_dir():
        raise SystemExit(f"verify: DATA_DIR {args.data_dir} is not a directory")
    num_classes = args.num_classes
    if args.class_index:
        class_file = Path(args.class_index)
        class_file = (
            class_file if class_file.is_absolute() or class_file.exists() else args.data_dir / class_file
        )
        num_classes = len(read_class_index(class_file, args.num_classes))
    if args.manifest and args.backend != "video":
        raise SystemExit("verify: --manifest is for videos (--backend video)")
    total: dict[str, list[str]] = defaultdict(list)
    infos: dict[str, VideoInfo] = {}
    for name in args.list:
        list_file = Path(name)
        if not list_file.is_absolute() and not list_file.exists():
            list_file = args.data_dir / list_file
        if not list_file.is_file():
            raise SystemExit(f"verify: list file not found: expected {list_file}")
        for kind, items in verify_list(args, list_file, num_classes, infos).items():
            total[kind] += items
    if args.manifest:
        manifest = args.data_dir / "videos" / MANIFEST_NAME
        try:
            kept = read_manifest(manifest) if manifest.is_file() else {}
        except ManifestError as e:
            print(f"verify: replacing the malformed manifest ({e})", file=sys.stderr)
            kept = {}
        write_manifest(manifest, {**kept, **infos}.values())  # other videos' lines are kept
        print(f"manifest: {len(infos)} video(s) -> {manifest}")
    titles = {
        "missing": "missing files",
        "unreadable": "unreadable videos",
        "short": "too short",
        "malformed": "malformed lines",
        "bad_label": "out-of-range labels",
    }
    for kind, title in titles.items():
        if total.get(kind):
            print(f"{title}: {len(total[kind])}")
            for item in total[kind]:
                print(f"  {item}")
    n_problems = sum(len(v) for v in total.values())
    print(f"{n_problems} problem(s) found" if n_problems else "all entries ok")
    return 1 if (n_problems and args.strict) else 0


# ------------------------------------------------------------------ transcode
def _transcode_one(job: tuple) -> tuple[str, VideoInfo | None, str]:
    """-> (video, manifest line or None, failure reason)."""
    src, dst_root, rel, options = job
    dst = Path(dst_root) / f"{rel}.mp4"
    try:
        if not dst.is_file():  # finished outputs are kept (resume); unfinished ones never had this name
            transcode_video(src, dst, **options)
        return rel, probe_video(dst, rel, dst_root), ""
    except Exception as e:  # noqa: BLE001 — one bad video must not stop the others
        return rel, None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"


def _transcode_sources(src_root: Path, lists: list[str] | None, list_format: str) -> list[tuple[str, str]]:
    """``[(source file, relative path without extension)]``: every video under SRC, or the listed ones
    (a missing one is kept with an empty source: it is reported as a failure)."""
    if not lists:
        return [(str(p), p.relative_to(src_root).with_suffix("").as_posix()) for p in _videos_in(src_root)]
    out, seen = [], set()
    for name in lists:
        list_file = Path(name)
        if not list_file.is_file():
            raise SystemExit(f"transcode: list file not found: expected {list_file}")
        for lineno, text in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                rel = parse_line(text, list_format)[0]
            except ValueError as e:
                raise SystemExit(f"transcode: {list_file}:{lineno}: {e}: {text!r}") from None
            if rel in seen:
                continue
            seen.add(rel)
            try:
                out.append((str(resolve_video(src_root, rel)), rel))
            except VideoReadError:
                out.append(("", rel))
    return out


def cmd_transcode(args: argparse.Namespace) -> int:
    src_root, dst_root = Path(args.src).resolve(), Path(args.dst).resolve()
    if not src_root.is_dir():
        raise SystemExit(f"transcode: SRC {src_root} is not a directory")
    if src_root == dst_root:
        raise SystemExit("transcode: DST must differ from SRC")
    if args.keyint < 1 or args.short_side < 2 or args.workers < 1:
        raise SystemExit("transcode: --keyint >= 1, --short-side >= 2 and --workers >= 1 are required")
    fps = None if args.fps == "native" else float(args.fps)
    if fps is not None and fps <= 0:
        raise SystemExit(f"transcode: --fps must be 'native' or a positive number, got {args.fps}")
    sources = _transcode_sources(src_root, args.list, args.format)
    if not sources:
        raise SystemExit(f"transcode: no videos ({', '.join(VIDEO_EXTENSIONS)}) under {src_root}")
    options = dict(
        short_side=args.short_side, fps=fps, keyint=args.keyint, crf=args.crf, preset=args.preset,
        threads=max(1, (os.cpu_count() or 1) // args.workers),
    )  # fmt: skip
    jobs = [(src, str(dst_root), rel, options) for src, rel in sources if src]
    failures = {rel: f"missing: no file {src_root / rel}.{{{','.join(VIDEO_EXTENSIONS)}}}"
                for src, rel in sources if not src}  # fmt: skip
    infos = []
    for rel, info, reason in _pool_map(_transcode_one, jobs, args.workers, "transcode", args.quiet):
        if info is None:
            failures[rel] = reason
        else:
            infos.append(info)
    manifest = dst_root / MANIFEST_NAME
    try:
        kept = read_manifest(manifest) if manifest.is_file() else {}
    except ManifestError:
        kept = {}
    merged = {**{k: v for k, v in kept.items() if k not in failures}, **{i.video: i for i in infos}}
    write_manifest(manifest, merged.values())
    print(f"transcoded {len(infos)} of {len(sources)} video(s) -> {dst_root}; manifest {manifest}")
    failures_file = dst_root / "transcode_failures.txt"
    if failures:
        atomic_write_text(failures_file, "".join(f"{rel}\t{why}\n" for rel, why in sorted(failures.items())))
        for rel, why in sorted(failures.items())[:20]:
            print(f"  failed: {rel}: {why}", file=sys.stderr)
        print(f"transcode: {len(failures)} video(s) failed; reasons in {failures_file}", file=sys.stderr)
        return 1
    failures_file.unlink(missing_ok=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adafocus.data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="split files + class index from ROOT/<class>/<video>")
    b.add_argument("root", help="video tree ROOT/<class>/<video>")
    b.add_argument("out", help="output data_dir for the list files and class index")
    b.add_argument(
        "--classes", help="class subset file (one name a line, label order), e.g. Mini-Kinetics' 200"
    )
    b.add_argument("--val-fraction", type=float, default=0.1, help="share of each class held out for val")
    b.add_argument(
        "--split-dirs",
        nargs=2,
        metavar=("TRAIN", "VAL"),
        help="ROOT/TRAIN/<class>/<video> and ROOT/VAL/<class>/<video> instead of a random split",
    )
    b.add_argument("--preset", choices=sorted(PRESETS), default="generic", help="file names and list format")
    b.add_argument("--format", choices=LIST_FORMATS, help="list format (default: the preset's)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    b.add_argument("--no-link", action="store_true", help="do not symlink OUT/videos -> ROOT")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("verify", help="decode every listed video; write a cleaned list")
    v.add_argument("data_dir", help="dataset dir holding videos/ (or frames/) and the lists")
    v.add_argument(
        "--list", action="append", required=True, help="list file (repeatable; relative to DATA_DIR)"
    )
    v.add_argument("--format", choices=LIST_FORMATS, default="comma")
    v.add_argument("--num-classes", type=int, help="labels must lie in [0, C)")
    v.add_argument("--class-index", help="class index file (gives C; relative to DATA_DIR)")
    v.add_argument("--backend", choices=("video", "frames"), default="video")
    v.add_argument("--frame-template", default="image_{:05d}.jpg")
    v.add_argument("--num-frames", type=int, default=16, help="T: the eval-sampled frames are decoded")
    v.add_argument("--min-frames", type=int, default=3, help="videos with fewer decoded frames are too short")
    v.add_argument(
        "--full", action="store_true", help="decode every frame (slow) instead of the sampled ones"
    )
    v.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    v.add_argument("--in-place", action="store_true", help="replace the list file (atomically)")
    v.add_argument("--strict", action="store_true", help="exit with status 1 when problems are found")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument(
        "--manifest", action="store_true", help="write DATA_DIR/videos/manifest.jsonl for the good videos"
    )
    v.set_defaults(func=cmd_verify)

    t = sub.add_parser("transcode", help="re-encode videos for fast reads; write DST/manifest.jsonl")
    t.add_argument("src", help="source video tree (e.g. DATA_DIR/videos)")
    t.add_argument("dst", help="output video tree (point DATA_DIR/videos at it)")
    t.add_argument("--list", action="append", help="only the videos of this list file (repeatable)")
    t.add_argument("--format", choices=LIST_FORMATS, default="comma", help="format of the --list files")
    t.add_argument("--short-side", type=int, default=360, help="shorter side of the output (never upscaled)")
    t.add_argument("--fps", default="native", help="'native' (every frame kept) or a frame rate N")
    t.add_argument("--keyint", type=int, default=DEFAULT_KEYINT, help="a keyframe every G frames")
    t.add_argument("--crf", type=int, default=DEFAULT_CRF, help="x264 constant rate factor (quality)")
    t.add_argument("--preset", default="fast", help="x264 preset (encoding speed vs size)")
    t.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel videos")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_transcode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
