"""MLflow helpers: where runs go, and runs that other processes (Ray workers, Tune trials,
cluster jobs) can log to by id.

One pipeline is one parent run; each stage is a child run; each Tune trial a grandchild. A run
is created once by the driver and handed to workers by id, so a worker that restarts after a
failure keeps logging to the same run instead of opening a new one.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from core.config import TrackingConfig, VidkdConfig

DEFAULT_DIR = "runs"

# MLflow 3's UI has a GenAI side (overview, traces) and a model-training side (the runs table).
# This experiment tag says which one an experiment is; it is what the UI's own "experiment type"
# setting writes. 3.17 decides the landing page by its workflow switch before the tag, so
# `vidkd ui` also links to the training side (cluster/local.py).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"


def tracking_uri(cfg: TrackingConfig | None = None, output_dir: str = DEFAULT_DIR) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite store under `output_dir`.

    The SQLite path is made absolute so Ray workers, whose working directory differs from the
    driver's, write to the same database."""
    if cfg is not None and cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_root(output_dir: str = DEFAULT_DIR) -> str:
    return (Path(output_dir).resolve() / "artifacts").as_uri()


def get_experiment_id(uri: str, name: str, output_dir: str = DEFAULT_DIR) -> str:
    """The experiment's id, created when missing, and tagged as a model-training experiment (an
    experiment from before the tag gets it; a kind someone chose in the UI stays)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # Artifacts of a local SQLite store go under runs/artifacts; a remote server decides itself.
        location = default_artifact_root(output_dir) if uri.startswith("sqlite:") else None
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:
            # another process created it first
            experiment = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
    return experiment.experiment_id


# The loss settings each objective reads (core/losses.py): the others would be columns of
# numbers that changed nothing.
_OBJECTIVE_LOSS_PARAMS = {
    "teachclip": ("w_in", "w_cgt", "w_fgt", "temperature", "tau_video", "tau_frame"),
    "dldkd": ("w_feat", "lambda_i0", "gamma_i", "lambda_e0", "gamma_e", "temperature", "tau_kl", "tau_explore"),
    "none": ("w_in", "temperature"),
}


def pipeline_params(cfg: VidkdConfig) -> dict[str, str | float]:
    """The settings that tell two pipelines apart, as params of the pipeline run, so the runs
    table compares them side by side (config.yaml, logged beside them, has all the rest).

    Values are the config's: `auto` temperatures are calibrated at distill time (the distill
    run's `calibration.*` params), and with `tune.enabled` the search starts from them."""
    distill, loss = cfg.distill, cfg.distill.loss
    params: dict[str, str | float] = {"teacher": _teacher_param(cfg), "student": distill.student.model,
                                      "objective": loss.objective, "teacher_mode": distill.teacher_mode,
                                      "epochs": distill.epochs}
    if cfg.teacher_training is not None:
        params["teacher.epochs"] = cfg.teacher_training.distill.epochs
    params.update({f"loss.{name}": getattr(loss, name) for name in _OBJECTIVE_LOSS_PARAMS[loss.objective]})
    params["tune"] = f"{cfg.tune.num_samples} trials" if cfg.tune.enabled else "off"
    return params


def _teacher_param(cfg: VidkdConfig) -> str:
    if cfg.teacher_training is not None:  # the demo's: trained by the pipeline without a teacher
        return f"trained {cfg.teacher_training.distill.student.model}"
    teacher = cfg.extract.teacher
    parts = [teacher.kind, teacher.name or teacher.variant, teacher.pretrained or teacher.path or teacher.checkpoint]
    return " ".join(part for part in parts if part)


class RunLogger:
    """Logs to one MLflow run by id, from any process. Cheap to pickle (uri + ids)."""

    def __init__(self, uri: str, run_id: str, experiment_id: str):
        self.uri, self.run_id, self.experiment_id = uri, run_id, experiment_id

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    # -------------------------------------------------------------------- creating runs
    @classmethod
    def create(
        cls,
        name: str,
        cfg: TrackingConfig | None = None,
        parent: "RunLogger | str | None" = None,
        tags: Mapping[str, str] | None = None,
        output_dir: str = DEFAULT_DIR,
        uri: str | None = None,
    ) -> "RunLogger":
        """A new run, the child of `parent` when given (a RunLogger or a run id)."""
        uri = uri or (parent.uri if isinstance(parent, RunLogger) else tracking_uri(cfg, output_dir))
        experiment = cfg.experiment if cfg else "vidkd"
        experiment_id = (
            parent.experiment_id if isinstance(parent, RunLogger) else get_experiment_id(uri, experiment, output_dir)
        )
        all_tags = {MLFLOW_RUN_NAME: name, **(tags or {})}
        parent_id = parent.run_id if isinstance(parent, RunLogger) else parent
        if parent_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_id
        run = MlflowClient(uri).create_run(experiment_id, tags=all_tags, run_name=name)
        return cls(uri, run.info.run_id, experiment_id)

    def child(self, name: str, tags: Mapping[str, str] | None = None) -> "RunLogger":
        return RunLogger.create(name, parent=self, tags=tags)

    def find_child(self, name: str) -> "RunLogger | None":
        """An existing child run by name (used when a restarted trial must not open a twin)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.run_id}' and tags.`{MLFLOW_RUN_NAME}` = '{name}'",
            max_results=1,
        )
        return RunLogger(self.uri, runs[0].info.run_id, self.experiment_id) if runs else None

    def child_once(self, name: str, tags: Mapping[str, str] | None = None) -> "RunLogger":
        return self.find_child(name) or self.child(name, tags)

    # -------------------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, _short(v)) for k, v in flatten(params).items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if _is_number(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, _short(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_dict(self, data: Any, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    @contextmanager
    def running(self) -> Iterator["RunLogger"]:
        """Marks the run FAILED when the body raises, FINISHED otherwise."""
        try:
            yield self
        except BaseException:
            self.end("FAILED")
            raise
        self.end("FINISHED")

    def __repr__(self) -> str:
        return f"RunLogger(run_id={self.run_id!r})"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
