"""Stage 2 — distill: train the student from the feature table with Ray Train.

    python -m jobs.distill --config configs/demo.yaml [--set distill.epochs=3]

`train_loop` is the per-worker function (Ray's `train_func(config)` pattern): it reads its
shard of the table, trains with AdamW + warmup-cosine, evaluates on val every epoch and reports
metrics with a checkpoint. The same loop runs as a single-worker Tune trial (jobs/tune.py):
only the `Session` it is handed differs.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train import LoggingConfig as TrainLoggingConfig
from ray.train.torch import TorchTrainer

from core.calibration import Calibration, resolve_temperatures
from core.config import PUBLISHED_TAU_FRAME, PUBLISHED_TAU_VIDEO, DistillConfig, TeacherConfig, VidkdConfig, digest
from core.evaluation import evaluate_retrieval
from core.features import FeatureBatch, TableMeta, arrow_to_columns, decode_batch, read_meta
from core.student import build_student, load_student, save_student
from core.training import TrainStep, distill_loss, pick_captions, warmup_cosine
from core.teachers import build_teacher
from jobs.extract import teacher_identity
from jobs.runtime import init_ray, quiet_training_worker, run_path, storage_path, want_gpu
from jobs.tracking import RunLogger

log = logging.getLogger("vidkd.distill")
CHECKPOINT_FILE = "student.pt"
STATE_FILE = "train_state.pt"
TARGET_METRIC = "val_t2v_R1"
FIRST_STEP_KEY = "first_step_unix"  # reported to Ray, not logged to MLflow


# ------------------------------------------------------------------------------ sessions
class Session:
    """What the loop needs from Ray: who it is, its data, the last checkpoint, and reporting."""

    rank: int = 0
    world_size: int = 1

    def device(self) -> torch.device:
        return torch.device("cpu")

    def dataset(self, name: str) -> Any:
        raise NotImplementedError

    def checkpoint(self) -> Any:
        raise NotImplementedError

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        raise NotImplementedError


class TrainSession(Session):
    """Inside a Ray Train worker."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def device(self) -> torch.device:
        return ray.train.torch.get_device()

    def dataset(self, name: str) -> Any:
        return ray.train.get_dataset_shard(name)

    def checkpoint(self) -> Any:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class TuneSession(Session):
    """Inside a single-worker Tune function trainable: datasets come in by reference."""

    def __init__(self, datasets: dict[str, Any]) -> None:
        self.datasets = datasets

    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def dataset(self, name: str) -> Any:
        return self.datasets[name]

    def checkpoint(self) -> Any:
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)


# ------------------------------------------------------------------------------ batches
def iter_feature_batches(
    dataset: Any, meta: TableMeta, batch_size: int, shuffle_seed: int | None = None, drop_last: bool = False
) -> Iterator[FeatureBatch]:
    """Batches of decoded table rows from a Ray Dataset or a shard iterator."""
    kwargs: dict[str, Any] = {"batch_size": batch_size, "batch_format": "pyarrow", "drop_last": drop_last}
    if shuffle_seed is not None:
        kwargs.update(local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=shuffle_seed)
    for table in dataset.iter_batches(**kwargs):
        yield decode_batch(arrow_to_columns(table), meta)


# ------------------------------------------------------------------------------ the loop
def train_loop(config: dict) -> None:
    """One worker's training. `config` is plain data so Ray can ship it anywhere:
    distill (DistillConfig dict), meta (TableMeta dict), teacher (TeacherConfig dict, for the
    online mode), run_id/tracking_uri/experiment_id (the MLflow run, logged by rank 0),
    fail_after (test hook: [[epoch, marker], ...])."""
    session: Session = config.get("_session") or TrainSession()
    quiet_training_worker()
    cfg = DistillConfig.model_validate(config["distill"])
    if "auto" in (cfg.loss.tau_video, cfg.loss.tau_frame):
        raise ValueError("the training loop needs numeric temperatures: resolve_temperatures() first")
    meta = TableMeta(**config["meta"])
    device = session.device()
    torch.manual_seed(cfg.seed + session.rank)
    logger = RunLogger(config["tracking_uri"], config["run_id"], config["experiment_id"]) if config.get("run_id") else None
    is_chief = session.rank == 0

    teacher_dim = meta.embed_dim if cfg.loss.objective == "dldkd" else None
    student = build_student(cfg.student, meta.num_frames, cfg.loss.temperature, teacher_dim)
    student.to(device)
    optimizer = torch.optim.AdamW(student.param_groups(cfg.lr, cfg.lr_new, cfg.weight_decay))

    per_worker_batch = worker_batch_size(cfg, session.world_size)
    steps_per_epoch = max(1, train_videos(meta, cfg) // session.world_size // per_worker_batch)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_frac * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup))

    start_epoch, history, best = 0, [], -1.0
    checkpoint = session.checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
            student.load_state_dict(load_student(Path(directory) / CHECKPOINT_FILE).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, best = state["epoch"] + 1, state["history"], state["best"]
        if is_chief:
            _report_resume(logger, state, config.get("run_id"), cfg.epochs)

    model: torch.nn.Module = TrainStep(student)
    if session.world_size > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)

    teacher = None
    if cfg.teacher_mode == "online":
        torch.manual_seed(0)  # as in extraction: a teacher without weights initialises the same everywhere
        teacher = build_teacher(TeacherConfig.model_validate(config["teacher"]), device=str(device))

    train_data, val_data = session.dataset("train"), session.dataset("val")
    first_step_at = None  # wall clock of this process's first step: Tune measures trial start-up from it
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        rng = random.Random(cfg.seed * 1000 + epoch * 10 + session.rank)
        sums: dict[str, float] = {}
        steps, epoch_start = 0, time.perf_counter()
        for batch in iter_feature_batches(train_data, meta, per_worker_batch, shuffle_seed=cfg.seed + epoch, drop_last=True):
            first_step_at = first_step_at or time.time()
            frames = torch.from_numpy(batch.frames).to(device)
            mask = torch.from_numpy(batch.frame_mask).to(device)
            captions, picks = pick_captions(batch, rng)
            out, logit_scale = model(frames, mask, student.tokenize(captions).to(device))
            loss, terms = distill_loss(cfg, logit_scale, out, batch, picks, teacher, frames, mask, captions, device,
                                       progress=(epoch + steps / steps_per_epoch) / cfg.epochs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            optimizer.step()
            student.clamp_logit_scale()  # CLIP's cap, on the parameter (see VideoTextStudent.logit_scale)
            scheduler.step()
            for name, value in {"loss": loss.item(), "grad_norm": float(grad_norm), **terms}.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            steps += 1
        metrics = {f"train_{k}": v / max(1, steps) for k, v in sums.items()}
        metrics.update(epoch=epoch, step=scheduler.last_epoch,  # optimizer steps so far, across restarts
                       lr=scheduler.get_last_lr()[0], epoch_time_s=time.perf_counter() - epoch_start,
                       logit_scale=float(student.logit_scale.detach()))
        if first_step_at:
            metrics[FIRST_STEP_KEY] = first_step_at

        checkpoint_dir = None
        if is_chief:
            student.eval()
            val = evaluate_retrieval(iter_feature_batches(val_data, meta, cfg.eval_batch_size),
                                     lambda f, m: student.encode_video(f, m).video_emb, student.encode_text, device)
            metrics.update({f"val_{k}": v for k, v in val.items()})
            best = max(best, metrics[TARGET_METRIC])
            metrics["best_" + TARGET_METRIC] = best
            history.append(metrics)
            checkpoint_dir = tempfile.mkdtemp(prefix="vidkd-ckpt-")
            save_student(student, Path(checkpoint_dir) / CHECKPOINT_FILE, extra={"epoch": epoch, **_floats(val)})
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                        "history": history, "best": best, "run_id": config.get("run_id")},
                       Path(checkpoint_dir) / STATE_FILE)
            if logger:
                _log_epoch(logger, metrics)
            log.warning("distill epoch %d/%d: loss %.4f  val R@1 %.1f  (%.1fs)", epoch + 1, cfg.epochs,
                        metrics["train_loss"], metrics[TARGET_METRIC], metrics["epoch_time_s"])
        if session.world_size > 1:
            metrics = _broadcast(metrics)
        session.report(metrics, checkpoint_dir)
        if checkpoint_dir:  # reporting copied it to the run's storage; the local copy is spent
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        _maybe_fail(config.get("fail_after"), epoch)

    if is_chief and logger:
        from jobs.plots import training_curves

        logger.log_figure(training_curves(history), "plots/training_curves.png")


def _log_epoch(logger: RunLogger, metrics: dict) -> None:
    """One epoch's metrics into MLflow, at the epoch's step (the first-step time is for Tune only)."""
    logger.log_metrics({k: v for k, v in metrics.items() if k != FIRST_STEP_KEY}, step=metrics["epoch"])


def _report_resume(logger: RunLogger | None, state: dict, run_id: str | None, epochs: int) -> None:
    """Say where training picks up. A checkpoint written under another MLflow run is a job started
    again after its driver died: that run's epochs are logged into this one, so this run alone
    shows the whole training, and a tag names the run they came from."""
    if state["epoch"] + 1 >= epochs:
        log.warning("distill: this training finished before (epoch %d of %d); its result is reused. "
                    "distill.resume=false trains again", state["epoch"] + 1, epochs)
    else:
        log.warning("distill: resumed from the checkpoint of epoch %d", state["epoch"] + 1)
    previous = state.get("run_id")
    if logger is None or previous == run_id:
        return  # a worker restart within this run: its epochs are logged already
    for metrics in state["history"]:
        _log_epoch(logger, metrics)
    logger.set_tags({"vidkd.resumed_from_run": previous or "(not logged)", "vidkd.resumed_after_epoch": state["epoch"]})


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _broadcast(metrics: dict) -> dict:
    """Every worker reports the chief's metrics, so Tune and the checkpoint manager agree."""
    box = [metrics]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _maybe_fail(fail_after: list | None, epoch: int) -> None:
    """Test hook: after each listed epoch's checkpoint was reported, the chief writes the marker
    and crashes, once; Ray Train takes the whole worker group down with it. (Only the chief
    raises: a worker failing first could get the chief killed before the marker is written.)"""
    if not fail_after or ray.train.get_context().get_world_rank() != 0:
        return  # (a Tune trial has no Ray Train context)
    for fail_epoch, marker in fail_after:
        if epoch == fail_epoch and not Path(marker).exists():
            Path(marker).write_text("failed once\n")
            raise RuntimeError(f"injected worker failure after epoch {epoch}")


# ------------------------------------------------------------------------------ the stage
@dataclass
class DistillResult:
    checkpoint: Path  # the best student by val R@1
    metrics: dict[str, float]
    history: list[dict]
    run_id: str | None


def worker_batch_size(distill: DistillConfig, world_size: int) -> int:
    """Each worker's share of the global batch (2 at least: a contrastive batch needs negatives)."""
    return max(2, distill.batch_size // world_size)


# Settings that say how a training runs, not what it learns: a job submitted again with more
# workers or GPUs, or other retries, continues the same training.
RUNNING_SETTINGS = {"num_workers", "cpus_per_worker", "use_gpu", "max_failures", "storage_dir", "eval_batch_size",
                    "resume"}


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


def log_calibration(calibration: Calibration, logger: RunLogger | None) -> None:
    """One line saying what `auto` chose, and the same values as the run's params."""
    log.warning("distill: calibrated on %d teacher videos: tau_video %.4g (target entropy %.3f; the published "
                "%g gives %.3f), tau_frame %.4g (entropy %.3f; the published %g gives %.3f)",
                calibration.videos, calibration.tau_video, calibration.video_entropy, PUBLISHED_TAU_VIDEO,
                calibration.published_video_entropy, calibration.tau_frame, calibration.frame_entropy,
                PUBLISHED_TAU_FRAME, calibration.published_frame_entropy)
    if logger:
        logger.log_params(calibration.params())


def train_videos(meta: TableMeta, distill: DistillConfig) -> int:
    return sum(meta.counts.get(split, 0) for split in distill.train_splits)


def split_datasets(table: Any, meta: TableMeta, train_splits: list[str] | None = None) -> dict[str, Any]:
    """{"train", "val", "test"} Ray Datasets from a materialized dataset or a table directory;
    "train" holds the rows of `train_splits` (default: the train split)."""
    if isinstance(table, (str, Path)):
        table = ray.data.read_parquet(str(table), file_extensions=["parquet"])
    train = " or ".join(f"split == '{split}'" for split in (train_splits or ["train"]))
    splits = {name: table.filter(expr=expr).materialize()
              for name, expr in (("train", train), ("val", "split == 'val'"), ("test", "split == 'test'"))}
    for ds in splits.values():  # read every epoch: the epoch's log line says enough, no bar per pass
        ds.context.enable_progress_bars = False
    return splits


def shuffled_blocks(train: Any, seed: int) -> Any:
    """The train split with its blocks in a new order every epoch, reproducible from the seed.
    A table is in manifest order (for driving data: consecutive clips of one drive) and the local
    shuffle buffer mixes only a few batches, so without this a batch's negatives would come from
    one stretch of the manifest, the same stretch every epoch."""
    return train.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))


def run_distill(
    cfg: VidkdConfig,
    table_dir: str | Path,
    datasets: dict[str, Any] | None = None,
    distill: DistillConfig | None = None,
    logger: RunLogger | None = None,
    name: str = "distill",
    teacher: TeacherConfig | None = None,
    fail_after: list[tuple[int, str]] | None = None,
) -> DistillResult:
    """Train a student with a `TorchTrainer`; returns the best checkpoint by val R@1."""
    init_ray(cfg.ray)
    distill = distill or cfg.distill
    teacher = teacher or cfg.extract.teacher
    meta = read_meta(table_dir)
    check_table(meta, distill, table_dir)
    distill, calibration = resolve_temperatures(distill, table_dir, teacher)
    if calibration:
        log_calibration(calibration, logger)
    datasets = datasets or split_datasets(table_dir, meta, distill.train_splits)
    storage = storage_path(distill.storage_dir)
    run_name = training_name(name, meta, distill, teacher, logger.run_id if logger else str(int(time.time())))
    if logger:
        logger.log_params({"distill": distill.model_dump(mode="json"), "feature_table": str(table_dir),
                           "train_run": run_path(storage, run_name)})
    use_gpu = want_gpu(distill.use_gpu)
    loop_config = {
        "distill": distill.model_dump(mode="json"),
        "meta": meta.__dict__,
        "teacher": teacher.model_dump(),
        "run_id": logger.run_id if logger else None,
        "tracking_uri": logger.uri if logger else None,
        "experiment_id": logger.experiment_id if logger else None,
        "fail_after": [list(f) for f in fail_after or []],
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=distill.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": distill.cpus_per_worker}),
        datasets={"train": shuffled_blocks(datasets["train"], distill.seed), "val": datasets["val"]},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=TARGET_METRIC,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=distill.max_failures),
            logging_config=TrainLoggingConfig(log_level="WARNING"),  # no line per checkpoint saved
        ),
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(TARGET_METRIC, "max") or result.checkpoint
    out_dir = Path(cfg.output_dir).resolve() / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}-{logger.run_id if logger else meta.cache_key}.pt"
    with best.as_directory() as directory:
        target.write_bytes((Path(directory) / CHECKPOINT_FILE).read_bytes())
    with result.checkpoint.as_directory() as directory:  # the latest holds the whole history
        history = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)["history"]
    best_metrics = max(history, key=lambda m: m[TARGET_METRIC])
    if logger:
        logger.log_artifact(target, "model")
        logger.log_metrics({f"best_{k}": v for k, v in best_metrics.items() if k.startswith("val_")})
        logger.set_tags({"best_checkpoint": str(target), "best_epoch": best_metrics["epoch"]})
    return DistillResult(target, best_metrics, history, logger.run_id if logger else None)


def main(argv: list[str] | None = None) -> None:
    from jobs.cli import run_stage_main

    run_stage_main("distill", argv)


if __name__ == "__main__":
    main()
