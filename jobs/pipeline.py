"""The whole workflow as one command, and each stage on its own.

    vidkd pipeline --config configs/demo.yaml [--from distill]

data -> teacher (demo only: a larger model trained here with no teacher) -> extract -> tune
(optional) -> distill (plus the no-distillation baseline) -> quantize -> report. One MLflow parent
run, a child run per stage. A stage whose output exists for the same content key is skipped
with a log line; `--from STAGE` re-runs that stage and the ones after it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from core.config import DistillConfig, TeacherConfig, VidkdConfig, digest, dump_config
from core.datasets import read_manifest, read_msrvtt
from jobs.tracking import RunLogger, pipeline_params

log = logging.getLogger("vidkd.pipeline")
STAGES = ("data", "teacher", "extract", "tune", "distill", "quantize")


class StageCache:
    """Remembers each stage's outputs under a content key, in <output_dir>/stages/."""

    def __init__(self, cfg: VidkdConfig, from_stage: str | None):
        self.root = Path(cfg.output_dir).resolve() / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.forced = set(STAGES[STAGES.index(from_stage):]) if from_stage else set()

    def fresh(self, stage: str, dcfg: DistillConfig) -> DistillConfig:
        """A training the user asked to run again (`--from`) starts from scratch rather than
        continuing or reusing the checkpoints of the same training in storage_dir."""
        return dcfg.model_copy(update={"resume": False}) if stage in self.forced else dcfg

    def run(self, stage: str, key_parts: Any, build: Callable[[], dict], check: Callable[[dict], bool] = lambda o: True,
            label: str | None = None) -> dict:
        label = label or stage
        key = digest(key_parts)
        path = self.root / f"{label}-{key}.json"
        if stage not in self.forced and path.exists():
            outputs = json.loads(path.read_text())
            if check(outputs):
                log.warning("%s: skipped, outputs exist for key %s (%s)", label, key, path)
                return {**outputs, "skipped": True}
        outputs = build()
        path.write_text(json.dumps(outputs, indent=1, default=str))
        return {**outputs, "skipped": False}


def load_records(cfg: VidkdConfig):
    if cfg.data.msrvtt:
        m = cfg.data.msrvtt
        return read_msrvtt(m.data_json, m.train_csv, m.test_csv, m.video_dir, m.val_fraction)
    return read_manifest(cfg.data.manifest_path())


def _exists(*keys: str) -> Callable[[dict], bool]:
    return lambda outputs: all(Path(outputs[k]).exists() for k in keys)


# ------------------------------------------------------------------------------ stages
def stage_data(cfg: VidkdConfig, cache: StageCache) -> None:
    if cfg.data.synth is None:
        return
    from core.synth import generate_dataset

    cache.run("data", [cfg.data.root, cfg.data.synth.model_dump()],
              lambda: {"manifest": str(generate_dataset(cfg.data.root, cfg.data.synth))}, check=_exists("manifest"))


def stage_teacher(cfg: VidkdConfig, cache: StageCache, records, parent: RunLogger) -> TeacherConfig:
    """The demo's teacher: a frames-only table, then distill with no teacher on a larger model."""
    if cfg.teacher_training is None:
        return cfg.extract.teacher
    from jobs.distill import run_distill
    from jobs.extract import run_extract

    tcfg = cfg.teacher_training.distill

    def build() -> dict:
        run = parent.child("teacher", {"vidkd.stage": "teacher"})
        with run.running():
            table = run_extract(cfg, records, teacher=TeacherConfig(kind="none"), logger=run)
            result = run_distill(cfg, table.table_dir, distill=cache.fresh("teacher", tcfg), logger=run, name="teacher")
        return {"checkpoint": str(result.checkpoint), "metrics": result.metrics, "run_id": run.run_id}

    # What the teacher's weights depend on: its frames-only table (the content key of the videos,
    # captions and splits) and the training settings, not how extraction was parallelised.
    from core.features import cache_key
    from jobs.extract import manifest_rows, teacher_identity

    frames_only = teacher_identity(TeacherConfig(kind="none"))
    frames_table = cache_key(manifest_rows(records), frames_only, cfg.extract.num_frames, cfg.extract.image_size)
    key = [frames_table, tcfg.model_dump()]
    outputs = cache.run("teacher", key, build, check=_exists("checkpoint"))
    return TeacherConfig(kind="vidkd", path=outputs["checkpoint"])


def run_pipeline(cfg: VidkdConfig, from_stage: str | None = None) -> dict:
    from jobs.distill import run_distill
    from jobs.extract import run_extract
    from jobs.quantize import run_quantize
    from jobs.report import final_report
    from jobs.runtime import init_ray

    start = time.perf_counter()
    cache = StageCache(cfg, from_stage)
    parent = RunLogger.create("pipeline", cfg.tracking, tags={"vidkd.stage": "pipeline"}, output_dir=cfg.output_dir)
    with parent.running():
        parent.log_text(dump_config(cfg), "config.yaml")
        parent.log_params(pipeline_params(cfg))
        stage_data(cfg, cache)
        records = load_records(cfg)
        init_ray(cfg.ray)
        teacher = stage_teacher(cfg, cache, records, parent)

        extract_run = parent.child("extract", {"vidkd.stage": "extract"})
        with extract_run.running():
            table = run_extract(cfg, records, teacher=teacher, logger=extract_run)
        datasets = None
        if table.dataset is not None:  # the same job keeps the table in the object store
            from jobs.distill import split_datasets

            datasets = split_datasets(table.dataset, table.meta, cfg.distill.train_splits)

        distill_cfg = cfg.distill
        if cfg.tune.enabled:
            from jobs.tune import run_tune

            def tune_build() -> dict:
                run = parent.child("tune", {"vidkd.stage": "tune"})
                with run.running():
                    result = run_tune(cfg, table.table_dir, datasets, logger=run, teacher=teacher,
                                      restart="tune" in cache.forced)
                return {"best_config": str(result.config_path), "best_params": result.best_params}

            tuned = cache.run("tune", [table.meta.cache_key, cfg.tune.model_dump(), cfg.distill.model_dump()],
                              tune_build, check=_exists("best_config"))
            from core.config import load_config

            distill_cfg = load_config(tuned["best_config"]).distill

        def train(name: str, dcfg: DistillConfig) -> Callable[[], dict]:
            def build() -> dict:
                run = parent.child(name, {"vidkd.stage": "distill"})
                with run.running():
                    result = run_distill(cfg, table.table_dir, datasets, distill=cache.fresh("distill", dcfg),
                                         logger=run, name=name, teacher=teacher)
                return {"checkpoint": str(result.checkpoint), "metrics": result.metrics, "run_id": run.run_id}

            return build

        student = cache.run("distill", [table.meta.cache_key, distill_cfg.model_dump()], train("distill", distill_cfg),
                            check=_exists("checkpoint"))
        baseline_cfg = distill_cfg.model_copy(
            update={"teacher_mode": "none", "loss": distill_cfg.loss.model_copy(update={"objective": "none"})})
        baseline = cache.run("distill", [table.meta.cache_key, baseline_cfg.model_dump()],
                             train("distill-no-teacher", baseline_cfg), check=_exists("checkpoint"),
                             label="distill-no-teacher")

        def quant_build() -> dict:
            run = parent.child("quantize", {"vidkd.stage": "quantize"})
            with run.running():
                result = run_quantize(cfg, student["checkpoint"], table.table_dir, logger=run)
            return {"output_dir": str(result.output_dir), "report": result.report}

        quant = cache.run("quantize", [student["checkpoint"], cfg.quantize.model_dump()], quant_build,
                          check=_exists("output_dir"))

        summary = final_report(cfg, table.table_dir, teacher, student["checkpoint"], baseline["checkpoint"],
                               quant["output_dir"], parent)
        parent.log_metrics({"pipeline_wall_time_s": time.perf_counter() - start})
    print(summary["text"])
    print(f"\nMLflow: vidkd ui   (or: mlflow ui --backend-store-uri {parent.uri})")
    return summary


def run_single_stage(stage: str, cfg: VidkdConfig, table: Path | None = None, restart: bool = False,
                     checkpoint: Path | None = None) -> Any:
    """`vidkd extract|distill|tune|quantize`: the stage with the table it needs (extracted, or
    reused from the cache, unless `--table` names one), in its own MLflow run."""
    from jobs.extract import run_extract
    from jobs.runtime import init_ray

    init_ray(cfg.ray)
    run = RunLogger.create(stage, cfg.tracking, tags={"vidkd.stage": stage}, output_dir=cfg.output_dir)
    with run.running():
        run.log_text(dump_config(cfg), "config.yaml")
        teacher = cfg.extract.teacher
        if table is None:
            records = load_records(cfg)
            # A config that trains its own teacher (the demo) reuses the pipeline's, or trains it.
            teacher = stage_teacher(cfg, StageCache(cfg, None), records, run)
            extracted = run_extract(cfg, records, teacher=teacher, logger=run if stage == "extract" else None)
            table = extracted.table_dir
            if stage == "extract":
                print(f"feature table: {table} ({extracted.num_videos} videos, {len(extracted.failures)} failures)")
                return extracted
        if stage == "distill":
            from jobs.distill import run_distill

            result = run_distill(cfg, table, logger=run, teacher=teacher)
            print(f"best student: {result.checkpoint} (val R@1 {result.metrics['val_t2v_R1']:.1f})")
        elif stage == "tune":
            from jobs.tune import ranked_trials, run_tune

            result = run_tune(cfg, table, logger=run, restart=restart, teacher=teacher)
            print(ranked_trials(result.trials, list(cfg.tune.space)))
            print(f"best config: {result.config_path} (val R@1 {result.best_metric:.1f})")
        elif stage == "quantize":
            from jobs.quantize import run_quantize

            result = run_quantize(cfg, checkpoint, table, logger=run)
            print(result.report_text)
        return result
