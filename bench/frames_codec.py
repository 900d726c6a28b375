"""Frames in the feature table: raw uint8 against JPEG, at the resolution real teachers use.

    python bench/frames_codec.py [--videos 24 --frames 12 --size 224 --batch 32]

On `--videos` synthetic driving clips rendered at 320x240 (MSRVTT's usual size), 4 s at 8 fps,
one thread throughout (torch, decord and the JPEG codec), so every figure is per core:
- decode: seconds per video to decode `--frames` frames at `--size` px (the extract stage's cost
  before the teacher, and the first input of docs/scale.md's model);
- bytes per video of the frames as the table stores them (`core.features.encode_frames`): raw
  uint8, and JPEG at the table's quality (frames past a clip's end, zeros, are stored too);
- JPEG encode: seconds per video (paid once, in extract);
- the training loader's CPU time for one batch of `--batch` videos: from the stored cells to a
  uint8 array [batch, frames, size, size, 3] (`core.features.decode_frames`: raw, one copy;
  JPEG, a decode per frame);
- the JPEG round trip's error: mean absolute difference per pixel value (of 255), and PSNR.
Times are medians over `--rounds` rounds, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.config import SynthConfig
from core.datasets import read_manifest
from core.features import JPEG_QUALITY, decode_frames, encode_frames
from core.synth import generate_dataset
from core.video import decode_video


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_dataset(Path(tmp), SynthConfig(videos=args.videos, seed=0, fps=8, width=320, height=240,
                                                           min_seconds=4.0, max_seconds=4.0), progress=False)
        paths = [r.path for r in read_manifest(manifest)]
        decode_video(paths[0], args.frames, args.size)  # warm-up
        decoded, decode_s = [], []
        for path in paths:
            start = time.perf_counter()
            decoded.append(decode_video(path, args.frames, args.size)[0])
            decode_s.append(time.perf_counter() - start)

    shape = (args.frames, args.size, args.size, 3)
    raw = [encode_frames(f, "raw") for f in decoded]
    encode_s = median_time(lambda: [encode_frames(f, "jpeg") for f in decoded], args.rounds) / len(decoded)
    jpeg = [encode_frames(f, "jpeg") for f in decoded]
    batch = [i % len(decoded) for i in range(args.batch)]
    load_raw = median_time(lambda: decode_frames([raw[i] for i in batch], "raw", shape), args.rounds)
    load_jpeg = median_time(lambda: decode_frames([jpeg[i] for i in batch], "jpeg", shape), args.rounds)
    err = np.abs(decode_frames(jpeg, "jpeg", shape).astype(np.float64) - np.stack(decoded))
    psnr = 10 * np.log10(255.0**2 / np.mean(err**2))
    raw_bytes = statistics.fmean(len(r) for r in raw)
    jpeg_bytes = statistics.fmean(len(cell) for cell in jpeg)

    print(f"{args.videos} clips 320x240, {args.frames} frames at {args.size} px, one thread; JPEG quality "
          f"{JPEG_QUALITY}; loader batch {args.batch}\n")
    print("| codec | bytes/video | vs raw | extract-side s/video | loader ms/batch | mean abs error | PSNR dB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| raw | {raw_bytes:,.0f} | 1.00 | 0 | {load_raw * 1e3:.1f} | 0 | inf |")
    print(f"| jpeg q{JPEG_QUALITY} | {jpeg_bytes:,.0f} | {jpeg_bytes / raw_bytes:.3f} | {encode_s:.4f} | "
          f"{load_jpeg * 1e3:.1f} | {err.mean():.2f} | {psnr:.1f} |")
    print(f"\ndecode at {args.size} px: {statistics.median(decode_s):.4f} s/video (median of {len(decode_s)}; one core)")
    print(f"JPEG loader cost: {load_jpeg / args.batch / args.frames * 1e3:.2f} ms per frame, "
          f"{(load_jpeg - load_raw) / args.batch * 1e3:.1f} ms per video more than raw")


if __name__ == "__main__":
    main()
