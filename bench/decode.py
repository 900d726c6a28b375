"""Decode throughput of `core.video.decode_video` on one CPU core, as a markdown table row.

    python bench/decode.py --manifest data/synth/manifest.jsonl --frames 12 --size 64

The process is pinned to one core and decord, torch and PyAV decode with one thread each, so
the figure is per core: the extract stage runs one decode task per CPU, and its throughput is
this times the number of decode CPUs. Every video in the manifest (or the first `--limit`) is
decoded once after one untimed warm-up decode; failures are counted, not timed out.

Columns: videos, frames, size, seconds, videos/s, frames/s, failures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from core.datasets import read_manifest  # noqa: E402
from core.video import VideoDecodeError, decode_video  # noqa: E402

HEADER = "| videos | frames | size | seconds | videos/s | frames/s | failures |\n|---|---|---|---|---|---|---|"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="JSONL or CSV manifest")
    parser.add_argument("--frames", type=int, default=12, help="frames sampled per video")
    parser.add_argument("--size", type=int, default=64, help="output side in pixels")
    parser.add_argument("--limit", type=int, default=None, help="decode only the first N videos")
    parser.add_argument("--no-header", action="store_true", help="print the row only")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)

    records = read_manifest(args.manifest)[: args.limit]
    try:  # warm-up: library and codec initialisation
        decode_video(records[0].path, args.frames, args.size)
    except VideoDecodeError:
        pass
    failures = 0
    start = time.perf_counter()
    for record in records:
        try:
            decode_video(record.path, args.frames, args.size, video_id=record.video_id, num_threads=1)
        except VideoDecodeError as error:
            failures += 1
            print(error, file=sys.stderr)
    seconds = time.perf_counter() - start

    if not args.no_header:
        print(HEADER)
    n = len(records)
    print(
        f"| {n} | {args.frames} | {args.size} | {seconds:.2f} | {n / seconds:.1f} "
        f"| {n * args.frames / seconds:.0f} | {failures} |"
    )


if __name__ == "__main__":
    main()
