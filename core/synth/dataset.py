"""The dataset on disk: clips encoded as H.264 mp4 by a process pool, their splits, the manifest."""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from core.config import SynthConfig
from core.datasets import VideoRecord, write_manifest
from core.synth.captions import scene_captions
from core.synth.render import render_scene
from core.synth.scene import Scene, sample_scene

# ------------------------------------------------------------------------------- the dataset
def write_mp4(frames: np.ndarray, path: str | Path, fps: int) -> None:
    """H.264 (libx264, yuv420p) in mp4, with one encoder thread."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        for index, frame in enumerate(frames):
            # Converted to yuv420p here, not inside encode(): that made x264's output vary less
            # often between runs (8 variants in 16 clips x 30 encodes before, none after, on an
            # idle machine); under load some clips still differ slightly, cause not found.
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
            picture.pts = index
            container.mux(stream.encode(picture))
        container.mux(stream.encode())


def _seed_entropy(seed: int) -> int:
    return seed % 2**64  # numpy seed sequences take non-negative integers only


def _make_video(index: int, cfg: SynthConfig, video_dir: Path) -> tuple[str, list[str], Scene]:
    """Sample, caption, render and encode video `index`; runs in a worker process."""
    rng = np.random.default_rng((_seed_entropy(cfg.seed), 1, index))
    seconds = rng.uniform(cfg.min_seconds, cfg.max_seconds)
    scene = sample_scene(rng, max(1, round(seconds * cfg.fps)), cfg.fps)
    captions = scene_captions(scene, cfg.captions_per_video, rng)
    video_id = f"synth{index:05d}"
    write_mp4(render_scene(scene, cfg.width, cfg.height), video_dir / f"{video_id}.mp4", cfg.fps)
    return video_id, captions, scene


def split_names(count: int, cfg: SynthConfig) -> list[str]:
    """train/val/test/pool per video index: a seeded shuffle; each nonzero fraction gets one video at least."""
    sizes = [max(round(count * fraction), 1 if fraction > 0 else 0)
             for fraction in (cfg.test_fraction, cfg.val_fraction, cfg.pool_fraction)]
    order = np.random.default_rng((_seed_entropy(cfg.seed), 0)).permutation(count)
    names = ["train"] * count
    bounds = np.cumsum(sizes)
    for position, index in enumerate(order[: bounds[-1]]):
        names[index] = ("test", "val", "pool")[int(np.searchsorted(bounds, position, side="right"))]
    return names


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def generate_dataset(out_dir: str | Path, cfg: SynthConfig, progress: bool = True,
                     workers: int | None = None) -> Path:
    """Render `cfg.videos` clips into `out_dir/videos/`, write `out_dir/manifest.jsonl`, return its path.

    `out_dir/scenes.jsonl` records each clip's attributes and event frames (for inspection and
    per-attribute evaluation). Clips are rendered by a process pool (`workers`, default one per
    CPU); the manifest is written last, so an interrupted run leaves none.
    """
    if not isinstance(cfg, SynthConfig):
        raise TypeError(f"cfg must be a SynthConfig, got {type(cfg).__name__}")
    out_dir = Path(out_dir)
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers or _default_workers(), cfg.videos))

    results: dict[int, tuple[str, list[str], Scene]] = {}
    with tqdm(total=cfg.videos, desc="synth videos", unit="video", disable=not progress) as bar:
        if workers == 1:
            for index in range(cfg.videos):
                results[index] = _make_video(index, cfg, video_dir)
                bar.update()
        else:
            # spawn, not fork: the caller may hold threads (torch, Ray) that a fork would copy mid-state.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_make_video, index, cfg, video_dir): index for index in range(cfg.videos)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()

    splits = split_names(cfg.videos, cfg)
    records, scenes = [], []
    for index in range(cfg.videos):
        video_id, captions, scene = results[index]
        records.append(VideoRecord(video_id, str(video_dir / f"{video_id}.mp4"), captions, splits[index]))
        scenes.append(json.dumps({"video_id": video_id, "split": splits[index], **asdict(scene)}))
    (out_dir / "scenes.jsonl").write_text("\n".join(scenes) + "\n")
    manifest = out_dir / "manifest.jsonl"
    write_manifest(records, manifest)
    return manifest

