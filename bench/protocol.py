"""What the quality benchmarks share: one data set, teachers trained here, students trained on a
teacher's table and scored on its test split. Every training is a stage of its own in the
StageCache, so a benchmark that stops part-way continues where it stopped.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import DistillConfig, TeacherTrainingConfig, VidkdConfig

if TYPE_CHECKING:
    from jobs.tables import TableSplits

METRICS = ("t2v_R1", "t2v_R5", "t2v_R10", "t2v_MdR", "v2t_R1")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f}"


@dataclass
class TeacherSetup:
    """A teacher trained here, its feature table and what it scores on the test split."""

    teacher: Any  # TeacherConfig of the trained teacher
    table_dir: Path
    meta: Any  # TableMeta
    splits: TableSplits
    test: list  # the table's test batches
    row: dict[str, Any]  # test metrics, and the teacher's own logit scale


class Protocol:
    """Runs a benchmark's trainings under one MLflow parent run and one StageCache."""

    def __init__(self, cfg: VidkdConfig, parent: Any):
        from jobs.pipeline import StageCache

        self.cfg, self.parent = cfg, parent
        self.cache = StageCache(cfg, None)

    def teacher(self, training: TeacherTrainingConfig | None = None, label: str = "teacher",
                pinned: str | None = None) -> TeacherSetup:
        """The pipeline's stages up to extract, with `training` as the teacher to train (default:
        the config's own teacher_training), or the checkpoint `pinned` trained before (no training:
        the same teacher on any machine, its weights' hash in the row), under a child run `label`;
        then the teacher's test row."""
        from core.evaluation import evaluate_teacher_table
        from core.features import read_meta
        from core.student import load_student
        from jobs.pipeline import Context, run_stages
        from core.features import table_batches
        from jobs.tables import split_datasets

        from core.config import TeacherConfig

        cfg = self.cfg if training is None else self.cfg.model_copy(update={"teacher_training": training})
        if pinned is not None:
            extract = cfg.extract.model_copy(update={"teacher": TeacherConfig(kind="vidkd", path=str(pinned))})
            cfg = cfg.model_copy(update={"teacher_training": None, "extract": extract})
        run = self.parent.child(label, {"vidkd.stage": "bench-teacher"})
        with run.running():
            ctx = run_stages(Context(cfg, self.cache, run), until="extract")
        meta = read_meta(ctx.table_dir)
        splits = ctx.splits or split_datasets(ctx.table_dir, cfg.distill)
        test = table_batches(ctx.table_dir, meta, "test")
        row = evaluate_teacher_table(test)
        teacher = ctx.teacher
        if teacher.kind == "vidkd":  # a teacher trained here: its own logit scale, 1 / the tau it trained at
            from core.teachers.base import hash_state_dict

            model = load_student(teacher.path)
            row["logit_scale"] = float(model.logit_scale.detach())
            row["weights_sha256"] = hash_state_dict(model.state_dict())  # which teacher the students learned from
            row["val_curve"] = ctx.outputs.get("teacher", {}).get("val_curve")  # has it reached its plateau?
        return TeacherSetup(teacher, ctx.table_dir, meta, splits, test, row)

    def student(self, setup: TeacherSetup, distill: DistillConfig, name: str, tags: dict | None = None,
                test: bool = True) -> dict[str, Any]:
        """Train one student on `setup`'s table (cached by table and settings); its best val epoch,
        the temperatures it trained at, and (with `test`) its test metrics."""
        import torch

        from core.calibration import resolve_temperatures
        from core.student import load_student
        from jobs.distill import log_calibration, run_distill
        from core.evaluation import evaluate_student

        distill, calibration = resolve_temperatures(distill, setup.table_dir, setup.teacher)
        if calibration:
            log_calibration(calibration, None)

        def build() -> dict:
            run = self.parent.child(name, {"vidkd.stage": "distill", **(tags or {})})
            start = time.perf_counter()
            with run.running():
                result = run_distill(self.cfg, setup.table_dir, setup.splits, distill=distill, run=run,
                                     name=name, teacher=setup.teacher)
            return {"checkpoint": str(result.checkpoint), "val": result.metrics,
                    "train_s": time.perf_counter() - start, "run_id": result.run_id}

        out = self.cache.run("distill", [setup.meta.cache_key, distill.model_dump()], build,
                             check=lambda o: Path(o["checkpoint"]).exists(), label=f"bench-{name}")
        row = {"name": name, "seed": distill.seed, "checkpoint": out["checkpoint"], "val_R1": out["val"]["val_t2v_R1"],
               "best_epoch": out["val"]["epoch"], "train_s": out.get("train_s"),
               "tau_video": distill.loss.tau_video, "tau_frame": distill.loss.tau_frame,
               "calibrated": calibration is not None}
        for key in ("train_teacher_video_entropy", "train_teacher_frame_entropy"):
            if key in out["val"]:  # how much the teacher's targets say (1.0 = uniform)
                row[key.removeprefix("train_")] = out["val"][key]
        if test:
            student = load_student(out["checkpoint"]).eval()
            with torch.no_grad():
                metrics = evaluate_student(student, setup.test, "cpu")
            row.update({k: metrics[k] for k in METRICS})
        return row
