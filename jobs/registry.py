"""The students in MLflow's Model Registry: each pipeline registers its distilled student (fp32) and
its INT4 version as `mlflow.pyfunc` models, with their lineage, and points the alias `candidate`
at them; `vidkd promote` moves `champion`. Aliases, not the deprecated stages.

A registered student takes a DataFrame with either a `text` column (captions -> text embeddings)
or `frames` and `frame_mask` columns (the feature table's encoding of a clip -> video
embeddings) and returns L2-normalised float32 embeddings [N, D].
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from core.config import RegistryConfig
from core.index import file_stamp
from jobs.runtime import quiet_env, verbose

log = logging.getLogger("vidkd.registry")

CANDIDATE, CHAMPION = "candidate", "champion"
# The pyfunc is a model from code (MLflow's recommended form: no pickled class): this file, copied
# into the model, defines it. Its artifact "student" is a checkpoint file (fp32) or directory (INT4).
PYFUNC_CODE = Path(__file__).with_name("student_pyfunc.py")
STUDENT_ARTIFACT = "student"
NO_PROGRESS_BAR = ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
LINEAGE_TAGS = ("vidkd.pipeline_run", "vidkd.teacher", "vidkd.feature_table", "vidkd.precision")


def signature(embed_dim: int) -> ModelSignature:
    inputs = Schema([ColSpec("string", "text", required=False), ColSpec("binary", "frames", required=False),
                     ColSpec("binary", "frame_mask", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))])
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("frames_codec", "string", "jpeg")]))


@dataclass(frozen=True)
class Registered:
    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_student(client: MlflowClient, run_id: str, name: str, student_path: str | Path, embed_dim: int,
                     lineage: dict[str, str]) -> Registered:
    """Log `student_path` as a pyfunc model under the run `run_id`, register it as a new version of
    `name` with its lineage as version tags, and point `candidate` at it."""
    with tempfile.TemporaryDirectory(prefix="vidkd-model-") as tmp, quiet_env(*NO_PROGRESS_BAR), \
            warnings.catch_warnings():
        if not verbose():  # its advice on type hints and input examples: the signature is given
            warnings.simplefilter("ignore", UserWarning)
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(local, python_model=str(PYFUNC_CODE), artifacts={STUDENT_ARTIFACT: str(student_path)},
                                 signature=signature(embed_dim), pip_requirements=["vidkd"],
                                 metadata={"vidkd": lineage})
        artifact_path = f"registry/{name}"
        client.log_artifacts(run_id, str(local), artifact_path)
    try:
        client.create_registered_model(name, description="vidkd student: text and video embeddings for retrieval")
    except mlflow.exceptions.MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=lineage)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    log.info("registry: %s version %s is the %s", name, version.version, CANDIDATE)
    return Registered(name, str(version.version))


def register_students(uri: str, run_id: str, cfg: RegistryConfig, fp32: str | Path, int4: str | Path, embed_dim: int,
                      lineage: dict[str, str]) -> dict[str, Registered]:
    """Both students of a pipeline, as `cfg.student_name` and `cfg.int4_name`."""
    client = MlflowClient(uri, registry_uri=uri)
    return {"fp32": register_student(client, run_id, cfg.student_name, fp32, embed_dim,
                                     {**lineage, "vidkd.precision": "fp32"}),
            "int4": register_student(client, run_id, cfg.int4_name, int4, embed_dim,
                                     {**lineage, "vidkd.precision": "int4"})}


def promote(uri: str, name: str, version: str | None = None, alias: str = CHAMPION) -> Registered:
    """Point `alias` at `version` of `name` (default: the version `candidate` points at)."""
    client = MlflowClient(uri, registry_uri=uri)
    try:
        target = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, CANDIDATE)
    except mlflow.exceptions.MlflowException as error:
        what = f"version {version}" if version else f"a version with the alias {CANDIDATE}"
        raise ValueError(f"registered model {name!r} has no {what} in {uri}") from error
    client.set_registered_model_alias(name, alias, target.version)
    return Registered(name, str(target.version))


@dataclass(frozen=True)
class ResolvedModel:
    """A student to run: its local file or directory, and where it came from."""

    path: Path
    source: str  # the models:/ URI or path the user gave
    version: dict[str, str]  # name, version, run_id and lineage tags; for a path, its size and mtime


def resolve_model(model: str, uri: str, dst: Path) -> ResolvedModel:
    """`models:/name@alias`, `models:/name/version` or a local student (checkpoint file or quantized
    directory). A registered one is downloaded into the directory `dst`."""
    if not model.startswith("models:/"):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"model not found: {model} (a models:/ URI, a checkpoint file or a quantized directory)")
        size, mtime_ns = file_stamp(path)
        return ResolvedModel(path.resolve(), model, {"size": str(size), "mtime_ns": str(mtime_ns)})
    client = MlflowClient(uri, registry_uri=uri)
    ref = model[len("models:/"):]
    name, _, rest = ref.partition("@") if "@" in ref else ref.partition("/")
    try:
        version = (client.get_model_version_by_alias(name, rest) if "@" in ref
                   else client.get_model_version(name, rest))
    except mlflow.exceptions.MlflowException as error:
        raise ValueError(f"{model}: no such registered model version in {uri}") from error
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    source = client.get_model_version_download_uri(name, version.version)  # not models:/, which reads the
    with quiet_env(*NO_PROGRESS_BAR):  # global registry URI, not this store's
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri))
    student = next((local / "artifacts").iterdir())
    info = {"name": version.name, "version": str(version.version), "run_id": version.run_id or "", **version.tags}
    return ResolvedModel(student, model, info)
