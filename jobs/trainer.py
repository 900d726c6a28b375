"""Training in Ray: the per-worker loop, its sessions (a Ray Train worker or a Tune trial), resume
and back-fill, and the one `TorchTrainer` that distill and multi-worker Tune trials both run.

`train_loop` is Ray's `train_func(config)` pattern: it reads its shard of the table, trains with
AdamW + warmup-cosine, evaluates on val every epoch and reports metrics with a checkpoint. What
it needs is a typed `LoopSpec`; only the `Session` it is handed differs between Train and Tune.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train import LoggingConfig as TrainLoggingConfig
from ray.train.torch import TorchTrainer

from core.config import DistillConfig, TeacherConfig
from core.evaluation import evaluate_retrieval
from core.features import FeatureBatch, TableMeta, arrow_to_columns, decode_batch
from core.student import build_student, load_student, save_student
from core.teachers import build_teacher
from core.training import TrainStep, distill_loss, pick_captions, warmup_cosine
from jobs.runtime import quiet_training_worker, want_gpu
from jobs.tables import TableSplits
from jobs.tracking import RunLogger

log = logging.getLogger("vidkd.distill")
CHECKPOINT_FILE = "student.pt"
STATE_FILE = "train_state.pt"
TARGET_METRIC = "val_t2v_R1"
FIRST_STEP_KEY = "first_step_unix"  # reported to Ray, not logged to MLflow
# The MLflow run of the epoch, reported with its metrics. The loop logs no epoch itself: whoever
# registers the epoch's checkpoint does (`EpochLogger`; Tune's driver for a trial), so an epoch
# that a restarted worker runs again (its checkpoint was never registered) is logged once.
RUN_ID_KEY = "mlflow_run_id"


# ------------------------------------------------------------------------------ the spec
@dataclass
class LoopSpec:
    """What one worker's training needs. It travels to the workers as plain data (`to_config`)."""

    distill: DistillConfig  # temperatures resolved to numbers
    meta: TableMeta
    teacher: TeacherConfig  # the online mode encodes with it
    run_id: str | None = None  # the MLflow run of the training
    tracking_uri: str | None = None
    experiment_id: str | None = None
    fail_after: list[tuple] = field(default_factory=list)  # test hook: crash at these epochs (`_maybe_fail`)

    @classmethod
    def for_run(cls, distill: DistillConfig, meta: TableMeta, teacher: TeacherConfig, run: RunLogger | None,
                fail_after: list[tuple] | None = None) -> "LoopSpec":
        return cls(distill, meta, teacher, run.run_id if run else None, run.uri if run else None,
                   run.experiment_id if run else None, list(fail_after or []))

    def to_config(self) -> dict[str, Any]:
        return {"distill": self.distill.model_dump(mode="json"), "meta": self.meta.__dict__,
                "teacher": self.teacher.model_dump(mode="json"), "run_id": self.run_id,
                "tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
                "fail_after": [list(f) for f in self.fail_after]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LoopSpec":
        return cls(DistillConfig.model_validate(config["distill"]), TableMeta(**config["meta"]),
                   TeacherConfig.model_validate(config["teacher"]), config.get("run_id"), config.get("tracking_uri"),
                   config.get("experiment_id"), [tuple(f) for f in config.get("fail_after") or []])

    def run(self) -> RunLogger | None:
        return RunLogger(self.tracking_uri, self.run_id, self.experiment_id) if self.run_id else None


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
def train_loop(config: dict, session: Session | None = None) -> None:
    """One worker's training, from its `LoopSpec` (`config` is `LoopSpec.to_config()`: Ray Train
    calls the loop with it). A Tune trial passes its own `session`; a Ray Train worker makes one."""
    spec = LoopSpec.from_config(config)
    session = session or TrainSession()
    sweep_spent_checkpoints()
    quiet_training_worker()
    cfg, meta = spec.distill, spec.meta
    if "auto" in (cfg.loss.tau_video, cfg.loss.tau_frame):
        raise ValueError("the training loop needs numeric temperatures: resolve_temperatures() first")
    device = session.device()
    torch.manual_seed(cfg.seed + session.rank)
    run = spec.run()
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
            _report_resume(run, state, spec.run_id, cfg.epochs)

    model: torch.nn.Module = TrainStep(student)
    if session.world_size > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)

    teacher = None
    if cfg.teacher_mode == "online":
        torch.manual_seed(0)  # as in extraction: a teacher without weights initialises the same everywhere
        teacher = build_teacher(spec.teacher, device=str(device))

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
        if spec.run_id:
            metrics[RUN_ID_KEY] = spec.run_id

        checkpoint_dir = None
        if is_chief:
            student.eval()
            val = evaluate_retrieval(iter_feature_batches(val_data, meta, cfg.eval_batch_size),
                                     lambda f, m: student.encode_video(f, m).video_emb, student.encode_text, device)
            metrics.update({f"val_{k}": v for k, v in val.items()})
            best = max(best, metrics[TARGET_METRIC])
            metrics["best_" + TARGET_METRIC] = best
            history.append(metrics)
            checkpoint_dir = tempfile.mkdtemp(prefix=f"{CHECKPOINT_PREFIX}{os.getpid()}-")
            save_student(student, Path(checkpoint_dir) / CHECKPOINT_FILE, extra={"epoch": epoch, **_floats(val)})
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                        "history": history, "best": best, "run_id": spec.run_id},
                       Path(checkpoint_dir) / STATE_FILE)
            log.warning("distill epoch %d/%d: loss %.4f  val R@1 %.1f  (%.1fs)", epoch + 1, cfg.epochs,
                        metrics["train_loss"], metrics[TARGET_METRIC], metrics["epoch_time_s"])
        if session.world_size > 1:
            metrics = _broadcast(metrics)
        try:
            _maybe_fail(spec.fail_after, epoch, reported=False)
            session.report(metrics, checkpoint_dir)
        finally:  # reporting copied it to the run's storage; the local copy is spent (also when a trial is stopped)
            if checkpoint_dir:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
        _maybe_fail(spec.fail_after, epoch, reported=True)

    if is_chief and run:
        from jobs.plots import training_curves

        run.log_figure(training_curves(history), "plots/training_curves.png")


CHECKPOINT_PREFIX = "vidkd-ckpt-"  # + the writing process's pid: each epoch's local copy, until reported


def sweep_spent_checkpoints() -> None:
    """Remove the local checkpoint copies of trainings whose process is gone. A copy is removed
    once reported, but a process killed in between (a trial ASHA stops, a lost node, a worker
    killed by a test) leaves it in the temp directory: tens of MB each, every stopped trial."""
    for path in Path(tempfile.gettempdir()).glob(f"{CHECKPOINT_PREFIX}*"):
        pid = path.name.removeprefix(CHECKPOINT_PREFIX).split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # another user's process, alive
            pass


def log_epoch(run: RunLogger, metrics: dict) -> None:
    """One epoch's metrics into MLflow, at the epoch's step (the first-step time is for Tune only)."""
    run.log_metrics({k: v for k, v in metrics.items() if k not in (FIRST_STEP_KEY, RUN_ID_KEY)},
                    step=metrics["epoch"])


class EpochLogger(ray.train.UserCallback):
    """Ray Train's controller logs each epoch into the run once the epoch's checkpoint is
    registered (a worker logging its own epochs would log twice those it runs again after its node
    died between logging and the registration)."""

    def __init__(self, spec: LoopSpec) -> None:
        self.spec, self.run = spec, None

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        if checkpoint is None or not metrics or RUN_ID_KEY not in metrics[0]:
            return
        self.run = self.run or self.spec.run()
        log_epoch(self.run, metrics[0])  # every worker reports the chief's metrics

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "run": None}  # the MLflow client is made where the callback runs


def _report_resume(run: RunLogger | None, state: dict, run_id: str | None, epochs: int) -> None:
    """Say where training picks up. A checkpoint written under another MLflow run is a job started
    again after its driver died: that run's epochs are logged into this one, so this run alone
    shows the whole training, and a tag names the run they came from."""
    if state["epoch"] + 1 >= epochs:
        log.warning("distill: this training finished before (epoch %d of %d); its result is reused. "
                    "distill.resume=false trains again", state["epoch"] + 1, epochs)
    else:
        log.warning("distill: resumed from the checkpoint of epoch %d", state["epoch"] + 1)
    previous = state.get("run_id")
    if run is None or previous == run_id:
        return  # a worker restart within this run: its epochs are logged already
    for metrics in state["history"]:
        log_epoch(run, metrics)
    run.set_tags({"vidkd.resumed_from_run": previous or "(not logged)", "vidkd.resumed_after_epoch": state["epoch"]})


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _broadcast(metrics: dict) -> dict:
    """Every worker reports the chief's metrics, so Tune and the checkpoint manager agree."""
    box = [metrics]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _maybe_fail(fail_after: list | None, epoch: int, reported: bool) -> None:
    """Test hook: for each `(epoch, marker)` entry, once that epoch's checkpoint was reported (or,
    for `(epoch, marker, "before_report")`, once the epoch ran but before its report, so that the
    restart runs it again), the chief writes the marker and crashes, once; Ray Train takes the
    whole worker group down with it. (Only the chief raises: a worker failing first could get the
    chief killed before the marker is written.)"""
    if not fail_after or ray.train.get_context().get_world_rank() != 0:
        return  # (a Tune trial has no Ray Train context)
    for fail_epoch, marker, *when in fail_after:
        if epoch == fail_epoch and (when != ["before_report"]) == reported and not Path(marker).exists():
            Path(marker).write_text("failed once\n")
            raise RuntimeError(f"injected worker failure {'after' if reported else 'in'} epoch {epoch}")


def worker_batch_size(distill: DistillConfig, world_size: int) -> int:
    """Each worker's share of the global batch (2 at least: a contrastive batch needs negatives)."""
    return max(2, distill.batch_size // world_size)


def train_videos(meta: TableMeta, distill: DistillConfig) -> int:
    return sum(meta.counts.get(split, 0) for split in distill.train_splits)


# ------------------------------------------------------------------------------ the trainer
def make_trainer(spec: LoopSpec, splits: TableSplits, name: str, storage: str,
                 callbacks: list | None = None, log_epochs: bool = True) -> TorchTrainer:
    """The `TorchTrainer` of one training: `distill.num_workers` workers on the train split (in a
    new order every epoch) and val, one checkpoint kept (the best by val R@1), Ray's
    worker restarts up to `distill.max_failures`. Distill fits it; a multi-worker Tune trial fits
    it with Tune's report callback (and `log_epochs=False`: Tune's driver logs the trial's epochs)."""
    distill = spec.distill
    return TorchTrainer(
        train_loop,
        train_loop_config=spec.to_config(),
        scaling_config=ScalingConfig(num_workers=distill.num_workers, use_gpu=want_gpu(distill.use_gpu),
                                     resources_per_worker={"CPU": distill.cpus_per_worker}),
        datasets={"train": splits.train(distill.seed), "val": splits.split("val")},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=splits.execution_options()),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            callbacks=[*(callbacks or []), *([EpochLogger(spec)] if spec.run_id and log_epochs else [])],
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=TARGET_METRIC,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=distill.max_failures),
            logging_config=TrainLoggingConfig(log_level="WARNING"),  # no line per checkpoint saved
        ),
    )

