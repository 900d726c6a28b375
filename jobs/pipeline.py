"""The stages as one table: the whole workflow, and each stage with the cached prefix it needs.

    vidkd pipeline --config configs/demo.yaml [--from distill]
    vidkd distill --config configs/demo.yaml      (data, teacher, extract, tune as cached, then distill)

data -> teacher (a config that trains its own: a larger model trained here with no teacher) ->
extract -> tune (optional) -> distill -> baseline (the same student with no teacher, for the
report) -> quantize -> report. `STAGE_TABLE` names each stage, the content key of its output,
what builds it and how to check that its output still exists; `run_stages` is a loop over it.
One MLflow run per command, a child run per stage built. A stage whose output exists for the
same content key is skipped with a log line; `--from STAGE` builds that stage and the ones
after it again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from core.config import DistillConfig, TeacherConfig, VidkdConfig, digest, dump_config, load_config
from core.datasets import VideoRecord, read_manifest, read_msrvtt
from core.locks import exclusive
from jobs.tracking import RunLogger, pipeline_params

if TYPE_CHECKING:  # the stages import Ray when they run, not when the CLI starts
    from jobs.tables import TableSplits

log = logging.getLogger("vidkd.pipeline")


class StageCache:
    """Remembers each stage's outputs under a content key, in <output_dir>/stages/."""

    def __init__(self, cfg: VidkdConfig, from_stage: str | None):
        self.root = Path(cfg.output_dir).resolve() / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.forced = set(STAGES[STAGES.index(from_stage):]) if from_stage else set()

    def from_scratch(self, stage: str, distill: DistillConfig) -> DistillConfig:
        """`distill` as the stage trains it: from scratch when the user asked for the stage again
        (`--from`), rather than continuing or reusing that training's checkpoints in storage_dir."""
        return distill.model_copy(update={"resume": False}) if stage in self.forced else distill

    def run(self, stage: str, key_parts: Any, build: Callable[[], dict], check: Callable[[dict], bool] = lambda o: True,
            label: str | None = None) -> dict:
        label = label or stage
        key = digest(key_parts)
        path = self.root / f"{label}-{key}.json"
        # One builder per stage and key: a second pipeline on the same cache waits for the first
        # to finish the stage, then finds its outputs, rather than training the same model beside it.
        with exclusive(path.with_suffix(".lock"), label):
            if stage not in self.forced and path.exists():
                outputs = json.loads(path.read_text())
                if check(outputs):
                    log.warning("%s: skipped, outputs exist for key %s (%s)", label, key, path)
                    return {**outputs, "skipped": True}
            outputs = build()
            # all or nothing: a driver killed while writing leaves no half record for the next run to read
            partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(outputs, indent=1, default=str))
            os.replace(partial, path)
        return {**outputs, "skipped": False}


def load_records(cfg: VidkdConfig) -> list[VideoRecord]:
    if cfg.data.msrvtt:
        m = cfg.data.msrvtt
        return read_msrvtt(m.data_json, m.train_csv, m.test_csv, m.video_dir, m.val_fraction)
    return read_manifest(cfg.data.manifest_path())


def _exists(*keys: str) -> Callable[[dict], bool]:
    return lambda outputs: all(Path(outputs[k]).exists() for k in keys)


# ------------------------------------------------------------------------------ context
@dataclass
class Context:
    """What the stages of one command share: its config, cache and MLflow run, each built
    stage's outputs, and what the user gave instead of a stage (`--table`, `--checkpoint`)."""

    cfg: VidkdConfig
    cache: StageCache
    run: RunLogger
    outputs: dict[str, dict] = field(default_factory=dict)
    given_table: Path | None = None
    given_checkpoint: Path | None = None
    restart_tune: bool = False
    splits: TableSplits | None = None  # the table's splits, when extract ran in this job
    _records: list[VideoRecord] | None = None

    @property
    def records(self) -> list[VideoRecord]:
        if self._records is None:
            self._records = load_records(self.cfg)
        return self._records

    @property
    def teacher(self) -> TeacherConfig:
        """The teacher trained by the teacher stage, or the configured one."""
        if "teacher" in self.outputs:
            return TeacherConfig(kind="vidkd", path=self.outputs["teacher"]["checkpoint"])
        return self.cfg.extract.teacher

    @property
    def table_dir(self) -> Path:
        return self.given_table or Path(self.outputs["extract"]["table_dir"])

    @property
    def table_key(self) -> str:
        from core.features import read_meta

        return read_meta(self.table_dir).cache_key

    @property
    def distill(self) -> DistillConfig:
        """The student's settings: the search's best when tune ran, else the configured ones."""
        if "tune" in self.outputs:
            return load_config(self.outputs["tune"]["best_config"]).distill
        return self.cfg.distill

    @property
    def baseline(self) -> DistillConfig:
        """The same student with no teacher: what distillation is measured against."""
        distill = self.distill
        return distill.model_copy(update={"teacher_mode": "none",
                                          "loss": distill.loss.model_copy(update={"objective": "none"})})

    @property
    def student(self) -> str:
        return str(self.given_checkpoint) if self.given_checkpoint else self.outputs["distill"]["checkpoint"]

    def child(self, name: str) -> RunLogger:
        return self.run.child(name, {"vidkd.stage": name})


# ------------------------------------------------------------------------------ the stages
def _data_key(ctx: Context) -> Any:
    return [ctx.cfg.data.root, ctx.cfg.data.synth.model_dump()]


def _build_data(ctx: Context) -> dict:
    from core.synth import generate_dataset

    return {"manifest": str(generate_dataset(ctx.cfg.data.root, ctx.cfg.data.synth))}


def _teacher_key(ctx: Context) -> Any:
    """What the teacher's weights depend on: its frames-only table (the content key of the videos,
    captions and splits) and the training settings, not how extraction was parallelised."""
    from core.features import cache_key
    from core.teachers import teacher_identity
    from jobs.extract import manifest_rows

    cfg = ctx.cfg
    frames_only = teacher_identity(TeacherConfig(kind="none"))
    frames_table = cache_key(manifest_rows(ctx.records), frames_only, cfg.extract.num_frames, cfg.extract.image_size,
                             cfg.extract.frames_codec)
    return [frames_table, cfg.teacher_training.distill.model_dump()]


def _build_teacher(ctx: Context) -> dict:
    """A teacher trained here: a frames-only table, then a student of its own with no teacher,
    on the larger model of `teacher_training.distill`."""
    from jobs.distill import run_distill
    from jobs.extract import run_extract

    distill = ctx.cache.from_scratch("teacher", ctx.cfg.teacher_training.distill)
    run = ctx.child("teacher")
    with run.running():
        table = run_extract(ctx.cfg, ctx.records, teacher=TeacherConfig(kind="none"), run=run)
        result = run_distill(ctx.cfg, table.table_dir, distill=distill, run=run, name="teacher")
    return {"checkpoint": str(result.checkpoint), "metrics": result.metrics, "run_id": run.run_id,
            "val_curve": [round(float(m["val_t2v_R1"]), 2) for m in result.history]}


def _build_extract(ctx: Context) -> dict:
    """The teacher's feature table. Extraction addresses its own output (the table's content key:
    videos, teacher weights, frame sampling) and reuses a committed table with that key."""
    from jobs.extract import run_extract
    from jobs.tables import split_datasets

    run = ctx.child("extract")
    with run.running():
        table = run_extract(ctx.cfg, ctx.records, teacher=ctx.teacher, run=run)
    if not table.cache_hit:  # read back once for the stages after it: Tune's trials and distill share them
        ctx.splits = split_datasets(table.table_dir, ctx.cfg.distill)
    return {"table_dir": str(table.table_dir), "videos": table.num_videos, "failures": len(table.failures)}


def _tune_key(ctx: Context) -> Any:
    return [ctx.table_key, ctx.cfg.tune.model_dump(), ctx.cfg.distill.model_dump()]


def _build_tune(ctx: Context) -> dict:
    from jobs.tune import ranked_trials, run_tune

    run = ctx.child("tune")
    with run.running():
        result = run_tune(ctx.cfg, ctx.table_dir, ctx.splits, run=run, teacher=ctx.teacher,
                          restart=ctx.restart_tune or "tune" in ctx.cache.forced)
    return {"best_config": str(result.config_path), "best_params": result.best_params,
            "best_metric": result.best_metric, "ranked": ranked_trials(result.trials, list(ctx.cfg.tune.space))}


def _train(name: str, settings: Callable[[Context], DistillConfig]) -> tuple[Callable, Callable]:
    """The key and build of a stage that trains a student with `settings` on the table."""

    def key(ctx: Context) -> Any:
        return [ctx.table_key, settings(ctx).model_dump()]

    def build(ctx: Context) -> dict:
        from jobs.distill import run_distill

        run = ctx.child(name)
        with run.running():
            result = run_distill(ctx.cfg, ctx.table_dir, ctx.splits, distill=ctx.cache.from_scratch("distill", settings(ctx)),
                                 run=run, name=name, teacher=ctx.teacher)
        return {"checkpoint": str(result.checkpoint), "metrics": result.metrics, "run_id": run.run_id}

    return key, build


def _quantize_key(ctx: Context) -> Any:
    return [ctx.student, ctx.cfg.quantize.model_dump()]


def _build_quantize(ctx: Context) -> dict:
    from jobs.quantize import run_quantize

    run = ctx.child("quantize")
    with run.running():
        result = run_quantize(ctx.cfg, ctx.student, ctx.table_dir, run=run)
        registered = _register(ctx, run, result.output_dir, result.embed_dim) if ctx.cfg.registry.enabled else {}
    return {"output_dir": str(result.output_dir), "report": result.report, "report_text": result.report_text,
            "registered": registered}


def _register(ctx: Context, run: RunLogger, int4_dir: Path, embed_dim: int) -> dict[str, str]:
    """Both students into the Model Registry, logged under the quantize run, with their lineage."""
    from core.teachers import teacher_identity
    from jobs.registry import register_students

    lineage = {"vidkd.pipeline_run": ctx.run.run_id, "vidkd.teacher": json.dumps(teacher_identity(ctx.teacher)),
               "vidkd.feature_table": str(ctx.table_dir)}
    models = register_students(run.uri, run.run_id, ctx.cfg.registry, ctx.student, int4_dir, embed_dim, lineage)
    return {precision: model.uri for precision, model in models.items()}


def _index_dir(ctx: Context) -> Path:
    return Path(ctx.cfg.index.out or Path(ctx.cfg.output_dir) / "index").resolve()


def _index_key(ctx: Context) -> Any:
    return [ctx.outputs["quantize"]["output_dir"], ctx.cfg.index.split, str(_index_dir(ctx)), ctx.cfg.index.exact_below]


def _build_index(ctx: Context) -> dict:
    """The configured split's videos indexed with the INT4 student (its registered version when
    the registry is on: the index then names it)."""
    from jobs.index import run_index

    quantized = ctx.outputs["quantize"]
    model = quantized.get("registered", {}).get("int4") or quantized["output_dir"]
    records = [r for r in ctx.records if r.split == ctx.cfg.index.split]
    run = ctx.child("index")
    with run.running():
        result = run_index(ctx.cfg, model, None, _index_dir(ctx), records=records)
        run.log_params({"model": model, "split": ctx.cfg.index.split, "index_dir": str(result.index_dir)})
        run.log_metrics({"videos": result.meta.videos, "failures": len(result.meta.failures),
                         "wall_time_s": result.seconds})
    return {"index_dir": str(result.index_dir), "model": model, "videos": result.meta.videos}


@dataclass(frozen=True)
class Stage:
    name: str
    key: Callable[[Context], Any] | None  # the content key of its output; None: the stage keys its own
    build: Callable[[Context], dict]  # builds the output in a child MLflow run; JSON-able
    check: Callable[[dict], bool] = lambda outputs: True  # does a recorded output still exist?
    enabled: Callable[[VidkdConfig], bool] = lambda cfg: True
    label: str | None = None  # its name in the cache and in MLflow, when not `name`
    for_report: bool = False  # built only by the whole pipeline: the report is what reads it
    replaced_by: tuple[str, ...] = ()  # Context fields that, given by the user, stand in for it


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("data", _data_key, _build_data, _exists("manifest"), enabled=lambda cfg: cfg.data.synth is not None,
          replaced_by=("given_table",)),
    Stage("teacher", _teacher_key, _build_teacher, _exists("checkpoint"),
          enabled=lambda cfg: cfg.teacher_training is not None, replaced_by=("given_table",)),
    Stage("extract", None, _build_extract, replaced_by=("given_table",)),
    Stage("tune", _tune_key, _build_tune, _exists("best_config"), enabled=lambda cfg: cfg.tune.enabled,
          replaced_by=("given_checkpoint",)),
    Stage("distill", *_train("distill", lambda ctx: ctx.distill), _exists("checkpoint"),
          replaced_by=("given_checkpoint",)),
    Stage("baseline", *_train("distill-no-teacher", lambda ctx: ctx.baseline), _exists("checkpoint"),
          label="distill-no-teacher", for_report=True),
    Stage("quantize", _quantize_key, _build_quantize, _exists("output_dir")),
    Stage("index", _index_key, _build_index, _exists("index_dir"), enabled=lambda cfg: cfg.index.enabled,
          for_report=True),
)
STAGES = tuple(stage.name for stage in STAGE_TABLE)


def run_stages(ctx: Context, until: str | None = None) -> Context:
    """Build the stages in order, through the cache, up to and including `until` (all of them
    when None). A stage the config disables is passed over unless it is `until` itself (`vidkd
    tune` searches whatever `tune.enabled` says); one the user's `--table`/`--checkpoint` stands
    in for is not built."""
    from jobs.runtime import init_ray

    for stage in STAGE_TABLE:
        given = any(getattr(ctx, field_name) is not None for field_name in stage.replaced_by)
        wanted = stage.name == until or (stage.enabled(ctx.cfg) and not (stage.for_report and until is not None))
        if wanted and not given:
            if stage.name != "data":
                init_ray(ctx.cfg.ray)
            if stage.key is None:
                ctx.outputs[stage.name] = stage.build(ctx)
            else:
                ctx.outputs[stage.name] = ctx.cache.run(stage.name, stage.key(ctx), lambda: stage.build(ctx),
                                                        check=stage.check, label=stage.label)
        if stage.name == until:
            break
    return ctx


# ------------------------------------------------------------------------------ commands
def run_pipeline(cfg: VidkdConfig, from_stage: str | None = None) -> dict:
    from jobs.report import final_report

    start = time.perf_counter()
    parent = RunLogger.create("pipeline", cfg.tracking, tags={"vidkd.stage": "pipeline"}, output_dir=cfg.output_dir)
    with parent.running():
        parent.log_text(dump_config(cfg), "config.yaml")
        parent.log_params(pipeline_params(cfg))
        ctx = run_stages(Context(cfg, StageCache(cfg, from_stage), parent))
        summary = final_report(cfg, ctx.table_dir, ctx.teacher, ctx.student, ctx.outputs["baseline"]["checkpoint"],
                               ctx.outputs["quantize"]["output_dir"], parent)
        parent.log_metrics({"pipeline_wall_time_s": time.perf_counter() - start})
    print(summary["text"])
    if "index" in ctx.outputs:
        print(index_lines(ctx.outputs["index"], cfg.index.queries, cfg.index.top_k))
    print(f"\nMLflow: vidkd ui   (or: mlflow ui --backend-store-uri {parent.uri})")
    return summary


def index_lines(index: dict, queries: list[str], k: int) -> str:
    """The demo's closing search: the top hits of each query, and the command to search more."""
    from core.index import Searcher

    lines = [f"\nIndex: {index['videos']} videos embedded by {index['model']} in {index['index_dir']}"]
    searcher = Searcher(index["index_dir"])
    for query in queries:
        hits = searcher.search(query, k)
        lines.append(f'  "{query}": ' + ", ".join(f"{h.video_id} ({h.score:.2f})" for h in hits))
    example = queries[0] if queries else "a red car turning left at night"
    lines.append(f'Search it: vidkd search {index["index_dir"]} "{example}" -k 5 --sheet hits.png')
    lines.append(f'Serve it:  vidkd serve {index["index_dir"]} --port 8000   (then open http://127.0.0.1:8000/)')
    return "\n".join(lines)


def run_single_stage(stage: str, cfg: VidkdConfig, table: Path | None = None, restart: bool = False,
                     checkpoint: Path | None = None) -> dict:
    """`vidkd extract|distill|tune|quantize`: the stages before it as cached (or what `--table` and
    `--checkpoint` give instead), then the stage, in one MLflow run of the stage's name, with the
    pipeline run's key settings as params. Returns the stage's outputs."""
    run = RunLogger.create(stage, cfg.tracking, tags={"vidkd.stage": stage}, output_dir=cfg.output_dir)
    with run.running():
        run.log_text(dump_config(cfg), "config.yaml")
        run.log_params(pipeline_params(cfg))
        ctx = Context(cfg, StageCache(cfg, "tune" if restart else None), run, given_table=table,
                      given_checkpoint=checkpoint, restart_tune=restart)
        run_stages(ctx, until=stage)
    outputs = ctx.outputs.get(stage, {})
    if stage == "extract":
        print(f"feature table: {outputs['table_dir']} ({outputs['videos']} videos, {outputs['failures']} failures)")
    elif stage == "distill":
        print(f"best student: {outputs['checkpoint']} (val R@1 {outputs['metrics']['val_t2v_R1']:.1f})")
    elif stage == "tune":
        print(outputs.get("ranked", ""))
        print(f"best config: {outputs['best_config']} (val R@1 {outputs.get('best_metric', float('nan')):.1f})")
    elif stage == "quantize":
        print(outputs.get("report_text", ""))
    return outputs
