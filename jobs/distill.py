"""Stage 2 — distill: train the student from the feature table with Ray Train.

    vidkd distill --config configs/demo.yaml [--set distill.epochs=3]

The stage checks the table, calibrates the teacher temperatures, names the training so that a
job started again continues it, and fits the `TorchTrainer` of jobs/trainer.py; the best
checkpoint by val R@1 is the stage's output.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.calibration import Calibration, resolve_temperatures
from core.config import PUBLISHED_TAU_FRAME, PUBLISHED_TAU_VIDEO, DistillConfig, TeacherConfig, VidkdConfig, digest
from core.features import TableMeta, read_meta
from core.teachers import teacher_identity
from jobs.runtime import init_ray, run_path, storage_path
from jobs.tracking import RunLogger
from jobs.tables import TableSplits, split_datasets
from jobs.trainer import CHECKPOINT_FILE, STATE_FILE, TARGET_METRIC, LoopSpec, make_trainer, train_videos, worker_batch_size

log = logging.getLogger("vidkd.distill")


# ------------------------------------------------------------------------------ the stage
@dataclass
class DistillResult:
    checkpoint: Path  # the best student by val R@1
    metrics: dict[str, float]
    history: list[dict]
    run_id: str | None


# Settings that say how a training runs, not what it learns: a job submitted again with more
# workers or GPUs, other retries or another read-ahead, continues the same training.
RUNNING_SETTINGS = {"num_workers", "cpus_per_worker", "use_gpu", "max_failures", "storage_dir", "eval_batch_size",
                    "resume", "stream_buffer_mib"}


def training_name(name: str, meta: TableMeta, distill: DistillConfig, teacher: TeacherConfig, fresh: str) -> str:
    """The Ray Train run's name under storage_dir. With `distill.resume` the same training gets the
    same name: stage name, table, the settings that shape the result and, where it is loaded, the
    teacher. Ray Train then reloads that run's checkpoints, so a job started again after its driver
    died (head node lost, job stopped) continues from the last one. Otherwise `fresh` makes it new."""
    parts: list[Any] = [name, meta.cache_key, distill.model_dump(mode="json", exclude=RUNNING_SETTINGS)]
    if distill.teacher_mode == "online":  # cached: the table's key already covers the teacher
        parts.append(teacher_identity(teacher))
    key = f"{name}-{digest(parts, 12)}"
    return key if distill.resume else f"{key}-{fresh}"


def check_table(meta: TableMeta, distill: DistillConfig, table_dir: str | Path) -> None:
    """Refuse, before any worker starts, a table this training cannot use."""
    if distill.teacher_mode == "cached" and not meta.has_teacher:
        raise ValueError(f"{table_dir} holds no teacher embeddings: use distill.teacher_mode none or online")
    need, have = worker_batch_size(distill, distill.num_workers) * distill.num_workers, train_videos(meta, distill)
    if have < need:
        raise ValueError(f"{table_dir} has {have} {'+'.join(distill.train_splits)} videos; batch_size {distill.batch_size} on "
                         f"{distill.num_workers} workers needs {need} for one step")
    if not meta.counts.get("val"):
        raise ValueError(f"{table_dir} has no val videos: checkpoints are chosen on val (data.synth.val_fraction, "
                         "or val rows in the manifest)")


def log_calibration(calibration: Calibration, run: RunLogger | None) -> None:
    """One line saying what `auto` chose, and the same values as the run's params."""
    video = (f"tau_video {calibration.tau_video:.4g} by NLL on {calibration.nll_videos} held-out videos "
             f"({calibration.video_nll:.3f}; the published {PUBLISHED_TAU_VIDEO:g} gives "
             f"{calibration.published_video_nll:.3f}), target entropy {calibration.video_entropy:.3f}"
             if calibration.method == "nll" else
             f"tau_video {calibration.tau_video:.4g} (target entropy {calibration.video_entropy:.3f}; the published "
             f"{PUBLISHED_TAU_VIDEO:g} gives {calibration.published_video_entropy:.3f})")
    log.warning("distill: calibrated on %d teacher videos: %s, tau_frame %.4g (entropy %.3f; the published %g "
                "gives %.3f)", calibration.videos, video, calibration.tau_frame, calibration.frame_entropy,
                PUBLISHED_TAU_FRAME, calibration.published_frame_entropy)
    if run:
        run.log_params(calibration.params())


def run_distill(
    cfg: VidkdConfig,
    table_dir: str | Path,
    splits: TableSplits | None = None,
    distill: DistillConfig | None = None,
    run: RunLogger | None = None,
    name: str = "distill",
    teacher: TeacherConfig | None = None,
    fail_after: list[tuple] | None = None,
) -> DistillResult:
    """Train a student with a `TorchTrainer`; returns the best checkpoint by val R@1."""
    init_ray(cfg.ray)
    distill = distill or cfg.distill
    teacher = teacher or cfg.extract.teacher
    meta = read_meta(table_dir)
    check_table(meta, distill, table_dir)
    distill, calibration = resolve_temperatures(distill, table_dir, teacher)
    if calibration:
        log_calibration(calibration, run)
    splits = splits or split_datasets(table_dir, distill)
    storage = storage_path(distill.storage_dir)
    run_name = training_name(name, meta, distill, teacher, run.run_id if run else str(int(time.time())))
    if run:
        run.log_params({"distill": distill.model_dump(mode="json"), "feature_table": str(table_dir),
                        "train_run": run_path(storage, run_name), **splits.placement.params()})
    spec = LoopSpec.for_run(distill, meta, teacher, run, fail_after)
    trainer = make_trainer(spec, splits, run_name, storage)
    result = trainer.fit()
    best = result.get_best_checkpoint(TARGET_METRIC, "max") or result.checkpoint
    out_dir = Path(cfg.output_dir).resolve() / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}-{run.run_id if run else meta.cache_key}.pt"
    with best.as_directory() as directory:
        target.write_bytes((Path(directory) / CHECKPOINT_FILE).read_bytes())
    with result.checkpoint.as_directory() as directory:  # the latest holds the whole history
        history = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)["history"]
    best_metrics = max(history, key=lambda m: m[TARGET_METRIC])
    if run:
        run.log_artifact(target, "model")
        run.log_metrics({f"best_{k}": v for k, v in best_metrics.items() if k.startswith("val_")})
        run.set_tags({"best_checkpoint": str(target), "best_epoch": best_metrics["epoch"]})
    return DistillResult(target, best_metrics, history, run.run_id if run else None)
