"""Extraction throughput: the Ray Data pipeline against a naive single-process loop.

    python bench/extract.py --manifest data/synth/manifest.jsonl [--teacher vidkd-vit-small --frames 8 --size 64]

Measured in one run, on the same videos and the same teacher, in `--rounds` rounds of every
measurement side by side (medians reported):
- naive: one process, decode a batch of videos, encode it, repeat; once on one thread, once
  with torch's intra-op threads on every core (which already overlaps nothing but parallelises
  the encoder's matrix products);
- decode only and encode only, each on one core, per video: the stage costs;
- ideal pipelined rate on C cores: C / (decode + encode seconds per video), every core busy
  with useful work all the time; with G GPUs, min(C / decode, G / encode seconds per video),
  decoding on the cores while the GPUs encode;
- the Ray Data pipeline of `jobs.extract` (decode tasks feeding a teacher actor pool), writing
  a fresh table: for the videos once and `--repeat` times, end to end (start-up included), and
  the steady rate (extra videos over extra seconds, the fixed start-up cancelled);
- on a GPU machine, the mean GPU utilisation (nvidia-smi) during the naive loop and the Ray run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from core.config import TeacherConfig, VidkdConfig, config_from_dict
from core.datasets import read_manifest
from core.teachers import build_teacher
from core.video import decode_video


def naive(records, teacher, frames: int, size: int, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        decoded = [decode_video(r.path, frames, size) for r in chunk]
        encode(teacher, decoded, chunk)
    return len(records) / (time.perf_counter() - start)


def encode(teacher, decoded, chunk) -> None:
    """One batch through the teacher, waiting for the device to finish (as the actors do when
    they copy the embeddings back)."""
    with torch.no_grad():
        video_emb, _ = teacher.encode_video(torch.from_numpy(np.stack([d[0] for d in decoded])),
                                            torch.from_numpy(np.stack([d[1] for d in decoded])))
        text_emb = teacher.encode_text([c for r in chunk for c in r.captions])
        video_emb.cpu(), text_emb.cpu()


def stage_costs(records, teacher, frames: int, size: int, batch: int) -> tuple[float, float]:
    """Seconds per video of decoding and of encoding, each on one core."""
    with one_thread():
        start = time.perf_counter()
        decoded = [decode_video(r.path, frames, size) for r in records]
        decode_s = (time.perf_counter() - start) / len(records)
        start = time.perf_counter()
        for i in range(0, len(records), batch):
            encode(teacher, decoded[i : i + batch], records[i : i + batch])
        encode_s = (time.perf_counter() - start) / len(records)
    return decode_s, encode_s


@contextmanager
def one_thread():
    """torch's intra-op work on one thread inside the block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ray_pipeline(cfg: VidkdConfig, records) -> float:
    """Seconds for a fresh table of these records, end to end (actor start-up and writing included)."""
    from jobs.extract import run_extract

    start = time.perf_counter()
    result = run_extract(cfg, records)
    assert not result.cache_hit and result.num_videos == len(records)
    return time.perf_counter() - start


@contextmanager
def gpu_utilisation():
    """Samples nvidia-smi every 100 ms while the block runs; yields a dict that gets the mean
    utilisation (%) of the GPUs in use, and the peak memory, when the block ends."""
    result: dict[str, float] = {}
    if not torch.cuda.is_available():
        yield result
        return
    query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "100"]
    sampler = subprocess.Popen(query, stdout=subprocess.PIPE, text=True)
    try:
        yield result
    finally:
        sampler.terminate()
        samples = [[float(v) for v in line.split(",")] for line in sampler.communicate()[0].splitlines() if line]
        if samples:
            result["util_pct"] = float(np.mean([u for u, _ in samples]))
            result["memory_mib"] = max(m for _, m in samples)


def repeated(records, times: int):
    """The same videos under new ids: a longer input with the same per-video costs."""
    return [replace(r, video_id=f"{r.video_id}-r{k}") for k in range(times) for r in records]


def measure_round(args, records, teacher, cfg, cores: int, gpus: int) -> dict[str, float]:
    """One round of every measurement, side by side: the naive loops, the stage costs, and the
    Ray pipeline on the videos once and `--repeat` times."""
    m: dict[str, float] = {}
    with gpu_utilisation() as naive_gpu:
        m["naive"] = naive(records, teacher, args.frames, args.size, args.batch)
    with one_thread():
        m["naive_1t"] = naive(records, teacher, args.frames, args.size, args.batch)
    decode_s, encode_s = stage_costs(records, teacher, args.frames, args.size, args.batch)
    m["decode"], m["encode"] = 1 / decode_s, 1 / encode_s
    m["ideal"] = min(cores / decode_s, gpus / encode_s) if gpus else cores / (decode_s + encode_s)
    seconds = {}
    for times in (1, args.repeat):
        run_cfg = cfg.model_copy(update={"extract": cfg.extract.model_copy(
            update={"cache_dir": f"{cfg.extract.cache_dir}/{time.monotonic_ns()}"})})
        with gpu_utilisation() as ray_gpu:
            seconds[times] = ray_pipeline(run_cfg, repeated(records, times))
    m["ray"] = len(records) / seconds[1]
    m["ray_long"] = len(records) * args.repeat / seconds[args.repeat]
    # The steady pipelined rate: extra videos over extra seconds, fixed start-up costs cancelled.
    m["steady"] = len(records) * (args.repeat - 1) / (seconds[args.repeat] - seconds[1])
    m["startup_s"] = seconds[1] - len(records) / m["steady"]
    for name, gpu in (("naive", naive_gpu), ("ray", ray_gpu)):
        if gpu:
            m[f"{name}_gpu_util"], m[f"{name}_gpu_mib"] = gpu["util_pct"], gpu["memory_mib"]
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--teacher", default="vidkd-vit-small", help="an open_clip model name (or one of core/models)")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint (default: random init)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5, help="the long Ray run: the videos this many times")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all measurements; medians are reported")
    parser.add_argument("--actors", type=int, default=None, help="teacher actors (default: one per GPU, else per CPU)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    device = "cuda" if gpus else "cpu"
    threads = torch.get_num_threads()

    records = read_manifest(args.manifest)[: args.videos]
    teacher_cfg = {"kind": "open_clip", "name": args.teacher, "pretrained": args.pretrained}
    torch.manual_seed(0)
    teacher = build_teacher(TeacherConfig(**teacher_cfg), device=device)
    naive(records[: args.batch], teacher, args.frames, args.size, args.batch)  # warm-up

    from core.config import RayConfig
    from jobs.runtime import init_ray

    init_ray(RayConfig(num_cpus=cores))
    with tempfile.TemporaryDirectory() as cache:
        cfg = config_from_dict({
            "extract": {"teacher": teacher_cfg, "num_frames": args.frames, "image_size": args.size,
                        "cache_dir": cache, "decode_batch_size": args.batch, "encode_batch_size": args.batch,
                        "num_actors": args.actors},
        })
        ray_pipeline(cfg, records[: args.batch * 2])  # warm-up: workers start, imports load
        rounds = [measure_round(args, records, teacher, cfg, cores, gpus) for _ in range(args.rounds)]

    def med(key: str) -> float:
        return float(np.median([r[key] for r in rounds]))

    def ratios(key: str) -> str:
        per_round = [f"{r[key] / r['naive_1t']:.2f}x/{r[key] / r['ideal']:.0%}" for r in rounds]
        return (f"naive 1 thread {np.median([r[key] / r['naive_1t'] for r in rounds]):.2f}x, "
                f"naive {threads} threads {np.median([r[key] / r['naive'] for r in rounds]):.2f}x, "
                f"ideal {np.median([r[key] / r['ideal'] for r in rounds]):.0%}  (rounds: {', '.join(per_round)})")

    unit = "1 GPU" if gpus else "1 core"
    long_n = len(records) * args.repeat
    print(f"{len(records)} videos, {args.frames} frames at {args.size}px, teacher {args.teacher}, "
          f"{cores} cores, {gpus} GPUs; medians of {args.rounds} rounds")
    print("| measure | videos/s |\n|---|---|")
    print(f"| decode only (1 core) | {med('decode'):.1f} |\n| encode only ({unit}) | {med('encode'):.1f} |")
    print(f"| naive loop (1 process, 1 thread) | {med('naive_1t'):.1f} |")
    print(f"| naive loop (1 process, torch on {threads} threads) | {med('naive'):.1f} |")
    print(f"| ideal pipelined ({cores} cores{f', {gpus} GPUs' if gpus else ''}) | {med('ideal'):.1f} |")
    print(f"| Ray Data pipeline, {len(records)} videos end to end | {med('ray'):.1f} |")
    print(f"| Ray Data pipeline, {long_n} videos end to end | {med('ray_long'):.1f} |")
    print(f"| Ray Data pipeline, steady rate (start-up cancelled) | {med('steady'):.1f} |")
    print(f"fixed start-up of a Ray run: {med('startup_s'):.1f} s")
    print(f"Ray ({long_n} videos) against " + ratios("ray_long"))
    print("Ray (steady) against " + ratios("steady"))
    if gpus:
        print(f"GPU utilisation: naive loop {med('naive_gpu_util'):.0f} %, Ray Data pipeline "
              f"{med('ray_gpu_util'):.0f} % (peak memory {med('ray_gpu_mib'):.0f} MiB)")


if __name__ == "__main__":
    main()
