"""Does extract stream, and does training read its table as a stream? Memory and rate against size.

    python bench/scale.py [--sizes 1000 5000 20000] [--base 200] [--placement stream] [--buffer-mib 16]
                          [--out runs/bench-scale]

For each size N: a manifest of N clips, extract (decode -> teacher -> Parquet parts) into a fresh
table, then one distill epoch on it, on one local Ray instance. Sampled every 0.25 s while they
run: the driver's RSS, the RSS of every process of this Ray instance (the largest one and their
sum), and the object store's bytes in use and spilled. Reported per size: wall time and videos/s
of each stage, and those peaks. Streaming means the rate is flat across sizes and the peaks stay
at the smallest size's. The training reads its table as `--placement` says (default `stream`: as
a table too big for the object store is read; `auto` holds these small tables there), reading
ahead at most `--buffer-mib` (distill.stream_buffer_mib: its default of 256 MiB is more than these
tiny tables, so the bench sets a bound they exceed).

The N clips are `--base` rendered clips (tiny: 64x48 at 6 fps, 1-2 s, via `vidkd data synth`),
each linked under N / base names: every video is decoded and encoded on its own, and rendering
20,000 clips (about as long as the measurement) is left out. The teacher and student are the
micro models at 4 frames of 32 px: the bench measures the pipeline's memory and overheads, not
model cost (docs/benchmarks.md, "Extraction throughput", for that).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from core.config import SynthConfig, TeacherConfig, config_from_dict
from core.datasets import VideoRecord, read_manifest, write_manifest
from core.synth import generate_dataset

SAMPLE_S = 0.25


@dataclass
class Peaks:
    """The largest values seen by `Sampler` while a stage ran."""

    driver_rss: int = 0
    worker_rss_max: int = 0
    worker_rss_sum: int = 0
    object_store_used: int = 0
    spilled: int = 0
    samples: int = 0
    largest_worker: str = ""  # the process title of the largest worker at its peak

    def update(self, other: "Peaks") -> None:
        if other.worker_rss_max > self.worker_rss_max:
            self.largest_worker = other.largest_worker
        for name in ("driver_rss", "worker_rss_max", "worker_rss_sum", "object_store_used", "spilled"):
            setattr(self, name, max(getattr(self, name), getattr(other, name)))
        self.samples += 1


@dataclass
class Sampler:
    """In the background, until stopped: the memory of this driver and of its Ray instance's processes."""

    raylet_pid: int
    address: str
    peaks: Peaks = field(default_factory=Peaks)
    trace: list[int] = field(default_factory=list)  # the largest process's RSS at each sample

    def quarters(self) -> list[int]:
        """The largest process's RSS at 25, 50, 75 and 100 % of the stage: growth or one high-water mark?"""
        return [self.trace[max(0, round(len(self.trace) * q) - 1)] for q in (0.25, 0.5, 0.75, 1.0)] \
            if self.trace else []

    def __enter__(self) -> "Sampler":
        from ray._private.internal_api import get_state_from_address

        self._state = get_state_from_address(self.address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self.sample()
            self.peaks.update(sample)
            self.trace.append(sample.worker_rss_max)
            self._stop.wait(SAMPLE_S)

    def sample(self) -> Peaks:
        from ray._private.internal_api import get_memory_info_reply

        rss = []
        for proc in psutil.Process(self.raylet_pid).children(recursive=True):
            try:
                rss.append((proc.memory_info().rss, " ".join(proc.cmdline())[:80]))
            except psutil.Error:  # ended between the listing and the read
                pass
        stats = get_memory_info_reply(self._state, timeout_seconds=5).store_stats
        largest, title = max(rss, default=(0, ""))
        return Peaks(driver_rss=psutil.Process().memory_info().rss, worker_rss_max=largest,
                     worker_rss_sum=sum(r for r, _ in rss), object_store_used=stats.object_store_bytes_used,
                     spilled=stats.spilled_bytes_total, largest_worker=title)


def base_clips(root: Path, count: int) -> list[VideoRecord]:
    """`count` tiny rendered clips (made once, kept under `root`)."""
    manifest = root / "base" / "manifest.jsonl"
    if not manifest.exists():
        generate_dataset(root / "base", SynthConfig(videos=count, seed=0, fps=6, width=64, height=48, min_seconds=1.0,
                                                    max_seconds=2.0, val_fraction=0.1, test_fraction=0.1))
    return read_manifest(manifest)


def scaled_manifest(root: Path, base: list[VideoRecord], size: int) -> Path:
    """`size` clips: the base clips linked under new names, in the base clips' splits."""
    folder = root / f"n{size}"
    manifest = folder / "manifest.jsonl"
    if manifest.exists():
        return manifest
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(size):
        source = base[i % len(base)]
        path = folder / "videos" / f"v{i:06d}.mp4"
        if not path.exists():
            os.link(source.path, path)
        records.append(VideoRecord(f"v{i:06d}", str(path), source.captions, source.split))
    write_manifest(records, manifest)
    return manifest


def measure(root: Path, manifest: Path, size: int, raylet_pid: int, address: str, placement: str,
            buffer_mib: int) -> dict:
    from jobs.distill import run_distill
    from jobs.extract import run_extract

    teacher = TeacherConfig(kind="open_clip", name="vidkd-vit-micro")
    work = root / f"run-n{size}-{int(time.time())}"
    cfg = config_from_dict({
        "data": {"manifest": str(manifest), "root": str(manifest.parent)},
        "extract": {"teacher": teacher.model_dump(), "num_frames": 4, "image_size": 32,
                    "cache_dir": str(work / "features")},
        "distill": {"student": {"model": "vidkd-vit-micro"}, "epochs": 1, "batch_size": 64, "num_workers": 1,
                    "storage_dir": str(work / "train"), "eval_batch_size": 256, "table_placement": placement,
                    "stream_buffer_mib": buffer_mib},
        "output_dir": str(work / "runs"),
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"},
    })
    row: dict = {"videos": size}
    with Sampler(raylet_pid, address) as sampler:
        start = time.perf_counter()
        table = run_extract(cfg)
        row["extract_s"] = time.perf_counter() - start
    row["extract"] = {**sampler.peaks.__dict__, "worker_rss_quarters": sampler.quarters()}
    with Sampler(raylet_pid, address) as sampler:
        start = time.perf_counter()
        run_distill(cfg, table.table_dir)
        row["distill_s"] = time.perf_counter() - start
    row["distill"] = {**sampler.peaks.__dict__, "worker_rss_quarters": sampler.quarters()}
    row["train_videos"] = table.meta.counts.get("train", 0)
    return row


def report(rows: list[dict]) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    out = ["| videos | extract s | extract videos/s | driver RSS MiB | workers RSS MiB (largest / sum) | "
           "object store MiB (peak / spilled) | distill epoch s | train videos/s | distill driver RSS MiB | "
           "distill workers RSS MiB (largest / sum) | distill object store MiB |",
           "|---" * 11 + "|"]
    for r in rows:
        e, d = r["extract"], r["distill"]
        out.append(f"| {r['videos']} | {r['extract_s']:.1f} | {r['videos'] / r['extract_s']:.1f} | {mib(e['driver_rss'])} | "
                   f"{mib(e['worker_rss_max'])} / {mib(e['worker_rss_sum'])} | {mib(e['object_store_used'])} / "
                   f"{mib(e['spilled'])} | {r['distill_s']:.1f} | {r['train_videos'] / r['distill_s']:.1f} | "
                   f"{mib(d['driver_rss'])} | {mib(d['worker_rss_max'])} / {mib(d['worker_rss_sum'])} | "
                   f"{mib(d['object_store_used'])} |")
    small, large = rows[0], rows[-1]
    rate = lambda r: r["videos"] / r["extract_s"]  # noqa: E731
    out.append("")
    out.append(f"- extract videos/s at {large['videos']} against {small['videos']}: "
               f"{rate(large) / rate(small):.2f}x (goal: within 10 %; start-up, about the same at every size, "
               "weighs on the small ones)")
    for a, b in zip(rows, rows[1:]):  # the start-up cancels in the difference
        out.append(f"- extract steady rate from {a['videos']} to {b['videos']}: "
                   f"{(b['videos'] - a['videos']) / (b['extract_s'] - a['extract_s']):.1f} videos/s")
    for stage in ("extract", "distill"):
        out.append(f"- {stage}: the largest worker at {large['videos']}: {large[stage]['largest_worker']}")
        out.append(f"- {stage}: the largest process's RSS at 25 / 50 / 75 / 100 % of the {large['videos']} run: "
                   + " / ".join(mib(b) for b in large[stage]["worker_rss_quarters"])
                   + " MiB (flat: one high-water mark; rising: growth with the videos processed)")
        for key in ("driver_rss", "worker_rss_max", "object_store_used"):
            out.append(f"- {stage} peak {key} at {large['videos']} against {small['videos']}: "
                       f"{large[stage][key] / max(small[stage][key], 1):.2f}x (goal: at most 1.2x)")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--base", type=int, default=200, help="rendered clips behind the links")
    parser.add_argument("--placement", choices=["stream", "auto", "object_store"], default="stream",
                        help="distill.table_placement of the training")
    parser.add_argument("--buffer-mib", type=int, default=16, help="distill.stream_buffer_mib of the training")
    parser.add_argument("--out", default="runs/bench-scale")
    args = parser.parse_args()

    import ray

    from core.config import RayConfig
    from jobs.runtime import init_ray

    root = Path(args.out).resolve()
    base = base_clips(root, args.base)
    manifests = {size: scaled_manifest(root, base, size) for size in sorted(args.sizes)}
    init_ray(RayConfig())
    node = ray._private.worker.global_worker.node
    raylet_pid = node.all_processes["raylet"][0].process.pid
    rows = [measure(root, manifest, size, raylet_pid, node.gcs_address, args.placement, args.buffer_mib)
            for size, manifest in manifests.items()]
    text = report(rows)
    print(text)
    (root / "scale.json").write_text(json.dumps(rows, indent=1))
    (root / "scale.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
