"""Configuration: one pydantic model per stage, loaded from YAML and overridden with `--set`.

Every model forbids unknown keys, so a typo in a preset or an override is an error before Ray
starts. `load_config` turns pydantic's report into one line that names the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from core.config_base import ConfigError, digest  # noqa: F401 (digest: for importers)
from core.config_base import Strict as _Strict
from core.config_deploy import IndexConfig, QuantizeConfig, QuantKernel, RegistryConfig  # noqa: F401


# --------------------------------------------------------------------------------------- data
class SynthConfig(_Strict):
    """The synthetic driving-scene dataset (`vidkd data synth`)."""

    videos: int = Field(200, ge=3)
    seed: int = 0
    fps: int = Field(8, ge=1, le=60)
    width: int = Field(96, ge=32, le=1920)
    height: int = Field(64, ge=32, le=1080)
    min_seconds: float = Field(1.0, gt=0)
    max_seconds: float = Field(4.0, gt=0)
    captions_per_video: int = Field(3, ge=1, le=10)
    val_fraction: float = Field(0.15, ge=0, lt=0.5)
    test_fraction: float = Field(0.15, ge=0, lt=0.5)
    pool_fraction: float = Field(0.0, ge=0, lt=1)  # split "pool": clips only a teacher trains on

    @model_validator(mode="after")
    def _lengths(self) -> "SynthConfig":
        if self.val_fraction + self.test_fraction + self.pool_fraction >= 1:
            raise ValueError("val_fraction + test_fraction + pool_fraction must leave some train videos")
        if self.max_seconds < self.min_seconds:
            raise ValueError("max_seconds must be >= min_seconds")
        if self.width % 2 or self.height % 2:
            raise ValueError("width and height must be even (H.264 with yuv420p)")
        return self


class MsrvttConfig(_Strict):
    """The MSRVTT download: annotation files plus the folder of `videoNNNN.mp4` files."""

    data_json: str
    train_csv: str
    test_csv: str
    video_dir: str
    val_fraction: float = Field(0.05, ge=0, lt=0.5)


class DataConfig(_Strict):
    root: str = "data/synth"
    manifest: str | None = None  # default: <root>/manifest.jsonl
    synth: SynthConfig | None = None  # set: the pipeline generates the dataset first
    msrvtt: MsrvttConfig | None = None  # set: read the MSRVTT annotation files instead

    def manifest_path(self) -> Path:
        return Path(self.manifest) if self.manifest else Path(self.root) / "manifest.jsonl"


# ------------------------------------------------------------------------------------ extract
TeacherKind = Literal["none", "open_clip", "xclip", "internvideo2", "vidkd"]


class TeacherConfig(_Strict):
    kind: TeacherKind = "none"
    name: str | None = None  # open_clip model name
    pretrained: str | None = None  # open_clip tag, or a local checkpoint file
    path: str | None = None  # local model directory (xclip, internvideo2) or vidkd checkpoint
    trust_remote_code: bool = False  # explicit opt-in for internvideo2's remote code
    # internvideo2 built in: a published checkpoint file of this architecture, and the local
    # tokenizer directory of its text encoder (bert-large-uncased)
    variant: Literal["stage2-1b", "stage2-6b", "stage2-micro", "stage2-6b-micro"] | None = None
    checkpoint: str | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _needs(self) -> "TeacherConfig":
        if self.kind == "open_clip" and not self.name:
            raise ValueError("open_clip teacher needs `name` (an open_clip model name)")
        if self.kind == "internvideo2" and (self.variant or self.checkpoint or self.tokenizer):
            if not (self.variant and self.checkpoint and self.tokenizer) or self.path:
                raise ValueError("internvideo2 built in needs `variant`, `checkpoint` (the .pt file) and "
                                 "`tokenizer` (a local bert-large-uncased directory), and no `path`")
            return self
        if self.kind in ("xclip", "internvideo2", "vidkd") and not self.path:
            raise ValueError(f"{self.kind} teacher needs `path` (a local directory or checkpoint)")
        if self.kind == "internvideo2" and not self.trust_remote_code:
            raise ValueError("internvideo2 runs the checkpoint's own code: set trust_remote_code: true")
        return self


class ExtractConfig(_Strict):
    teacher: TeacherConfig = TeacherConfig()
    num_frames: int = Field(8, ge=1, le=128)
    image_size: int = Field(64, ge=16, le=1024)  # the student's input resolution
    cache_dir: str = "runs/features"
    decode_cpus: float = Field(1.0, gt=0)  # CPUs per decode task
    decode_batch_size: int = Field(8, ge=1)
    encode_batch_size: int = Field(16, ge=1)
    # Teacher actors: one GPU each where GPUs are used, else one CPU each (decoding then runs
    # inside the actor, fused by Ray Data). None: one per GPU, or one per CPU of the cluster.
    num_actors: int | None = Field(None, ge=1)
    use_gpu: Literal["auto"] | bool = "auto"
    # How the table stores frames: JPEG (quality 90) is 14x smaller than raw uint8 at 224 px, for
    # about 9 ms of loader CPU per video of 12 frames (bench/frames_codec.py, docs/feature_table.md).
    frames_codec: Literal["raw", "jpeg"] = "jpeg"


# ------------------------------------------------------------------------------------ distill
class StudentConfig(_Strict):
    model: str = "vidkd-vit-tiny"  # an open_clip model name (configs in core/models/ included)
    pretrained: str | None = None  # open_clip tag or local checkpoint for the CLIP towers
    # A vidkd checkpoint of the same model whose weights this training starts from (fine-tuning a
    # trained student or teacher). Its logit scale is not taken: the training's temperature sets it.
    init_from: str | None = None
    temporal_layers: int = Field(1, ge=0, le=12)
    afa_hidden: int | None = Field(None, ge=1)  # default: the embedding width
    # AFA pools frames with softmax(score / afa_pool_temperature); FgT trains softmax(score).
    # TeachCLIP: 0.1. 1.0 pools with the same distribution FgT trains (a softer pooling).
    afa_pool_temperature: float = Field(0.1, gt=0, le=10)


Temperature = Annotated[float, Field(gt=0, le=10)]
PUBLISHED_TAU_VIDEO = 0.01  # TeachCLIP: CgT on its teacher's own logits (logit scale 100)
PUBLISHED_TAU_FRAME = 1.0  # TeachCLIP: FgT's softmax of frame-text cosines at temperature 1


class CalibrationConfig(_Strict):
    """How `tau_video: auto` / `tau_frame: auto` are solved (core/calibration.py), on batches of up to
    `videos` videos. tau_video, `nll` (default): temperature scaling, the tau at which the teacher's
    in-batch video->text softmax best predicts the true captions of `split`, which it did not train
    on; `entropy`: its targets reach `video_entropy` on the train videos. tau_frame: `frame_entropy`."""

    method: Literal["nll", "entropy"] = "nll"
    split: str = "val"
    video_entropy: float = Field(0.10, gt=0, lt=1)  # as fractions of uniform
    frame_entropy: float = Field(0.99, gt=0, lt=1)
    videos: int = Field(1024, ge=2)
    seed: int = 0


class LossConfig(_Strict):
    """Loss weights and temperatures. TeachCLIP terms first, DLDKD terms after."""

    objective: Literal["teachclip", "dldkd", "none"] = "teachclip"
    temperature: float = Field(0.07, gt=0, le=1)  # InfoNCE temperature at start (learnable)
    # TeachCLIP's published balance: loss = 0.2 InfoNCE + 1.0 CgT + 2.0 FgT
    w_in: float = Field(0.2, ge=0)
    w_cgt: float = Field(1.0, ge=0)
    w_fgt: float = Field(2.0, ge=0)
    # Teacher softmax temperatures on its cosines: `auto` (default) solves them on the teacher's own
    # embeddings as `calibration` says; a number is used as it is. TeachCLIP published
    # PUBLISHED_TAU_VIDEO (its teachers' own logits: scale 100) and PUBLISHED_TAU_FRAME (softmax(cos)).
    tau_video: Temperature | Literal["auto"] = "auto"
    tau_frame: Temperature | Literal["auto"] = "auto"
    calibration: CalibrationConfig = CalibrationConfig()
    # DLDKD
    w_feat: float = Field(1.0, ge=0)
    tau_kl: float = Field(4.0, gt=0)
    tau_explore: float = Field(0.07, gt=0)
    lambda_i0: float = Field(1.0, ge=0)
    gamma_i: float = Field(0.5, ge=0)
    lambda_e0: float = Field(0.5, ge=0)
    gamma_e: float = Field(0.5, ge=0)


class DistillConfig(_Strict):
    student: StudentConfig = StudentConfig()
    loss: LossConfig = LossConfig()
    teacher_mode: Literal["cached", "online", "none"] = "cached"
    # The splits trained on. A teacher trained here may add "pool" (videos no student sees).
    train_splits: list[Literal["train", "pool"]] = Field(default_factory=lambda: ["train"], min_length=1)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=2)  # global batch, split across workers
    lr: float = Field(1e-4, gt=0, le=1)  # pretrained CLIP towers
    lr_new: float = Field(1e-3, gt=0, le=1)  # temporal transformer, AFA, projections
    weight_decay: float = Field(0.05, ge=0)
    warmup_frac: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: Literal["auto"] | bool = "auto"
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    eval_batch_size: int = Field(64, ge=1)
    storage_dir: str = "runs/train"  # Ray Train's checkpoints: a shared path or s3:// on a cluster
    # Started again, the same training (stage, table, teacher, settings) continues from its last
    # checkpoint in storage_dir; a finished one is returned as it is. false: train from scratch.
    resume: bool = True
    # The feature table held in the object store, streamed from Parquet every epoch (reading ahead
    # at most stream_buffer_mib), or auto: held when it fits half the store (jobs/tables.py).
    table_placement: Literal["auto", "object_store", "stream"] = "auto"
    stream_buffer_mib: int = Field(256, ge=8)

    @model_validator(mode="after")
    def _mode(self) -> "DistillConfig":
        if self.teacher_mode == "none" and self.loss.objective != "none":
            raise ValueError("teacher_mode none trains without a teacher: set loss.objective: none")
        return self


# --------------------------------------------------------------------------------------- tune
class SearchDim(_Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> "SearchDim":
        if self.high <= self.low:
            raise ValueError("high must be greater than low")
        if self.log and self.low <= 0:
            raise ValueError("a log-uniform dimension needs low > 0")
        return self


def _default_space() -> dict[str, SearchDim]:  # tau_video over two decades (the teacher decides it); the
    # rest within 3x of the defaults (2x: InfoNCE's): wider, most of 16 trials fell where ASHA stopped them
    return {
        "loss.tau_video": SearchDim(low=0.003, high=0.3, log=True),
        "loss.tau_frame": SearchDim(low=0.33, high=3.0, log=True),
        "loss.temperature": SearchDim(low=0.035, high=0.14, log=True),
        "loss.w_in": SearchDim(low=0.067, high=0.6, log=True),
        "loss.w_cgt": SearchDim(low=0.33, high=3.0, log=True),
        "loss.w_fgt": SearchDim(low=0.67, high=6.0, log=True),
        "lr": SearchDim(low=3.3e-4, high=3e-3, log=True),
        "lr_new": SearchDim(low=3.3e-4, high=3e-3, log=True),
    }


class TuneConfig(_Strict):
    enabled: bool = False  # the pipeline runs the search only when enabled
    num_samples: int = Field(6, ge=1)
    scheduler: Literal["asha", "fifo"] = "asha"  # fifo: every trial runs max_epochs (the full budget)
    max_concurrent: int | None = Field(None, ge=1)  # default: what the cluster fits
    max_epochs: int = Field(3, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    seed: int = 0
    storage_dir: str = "runs/tune"
    space: dict[str, SearchDim] = Field(default_factory=_default_space)

    @field_validator("space")
    @classmethod
    def _known_keys(cls, space: dict[str, SearchDim]) -> dict[str, SearchDim]:
        for key in space:
            _resolve_field(DistillConfig, key)
        return space


def _resolve_field(model: type[BaseModel], dotted: str) -> None:
    current: Any = model
    for part in dotted.split("."):
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            raise ValueError(f"`{dotted}` is not a distill setting")
        current = fields[part].annotation


# ------------------------------------------------------------------------------ tracking, ray
class TrackingConfig(_Strict):
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db
    experiment: str = "vidkd"


class RayConfig(_Strict):
    address: str | None = None  # None: a new local instance; auto: the one running here; or ray://, host:port
    num_cpus: int | None = Field(None, ge=1)  # logical CPUs of a local instance


class ReportConfig(_Strict):  # the pipeline's closing table
    # The student's R@1 std over seeds for this config, as bench/quality.py measured it: the
    # closing table says how large a difference must be to be more than run-to-run noise.
    seed_std_r1: float | None = Field(None, ge=0)


class TeacherTrainingConfig(_Strict):  # the demo trains its own teacher: distill with no teacher, a larger model
    distill: DistillConfig


class VidkdConfig(_Strict):
    data: DataConfig = DataConfig()
    extract: ExtractConfig = ExtractConfig()
    distill: DistillConfig = DistillConfig()
    tune: TuneConfig = TuneConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    registry: RegistryConfig = RegistryConfig()
    index: IndexConfig = IndexConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    teacher_training: TeacherTrainingConfig | None = None
    report: ReportConfig = ReportConfig()
    output_dir: str = "runs"


# ------------------------------------------------------------------------------------ loading
# Mappings whose own keys contain dots: `tune.space.loss.tau_video=...` names one key there.
_DOTTED_KEY_MAPPINGS = (["tune", "space"],)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`distill.lr=3e-4` -> (["distill", "lr"], 0.0003); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path = key.strip().split(".")
    for prefix in _DOTTED_KEY_MAPPINGS:
        if path[: len(prefix)] == prefix and len(path) > len(prefix) + 1:
            path = prefix + [".".join(path[len(prefix):])]
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: `{part}` is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def format_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def config_from_dict(raw: dict[str, Any], model: type[BaseModel] = VidkdConfig) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> VidkdConfig:
    """Read a YAML preset (or the defaults when `path` is None) and apply `--set` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        # Data files named in a config file (the manifest, MSRVTT's annotation files and video
        # folder) resolve against the file's folder, as the manifest's video paths resolve against
        # the manifest's: config and dataset move together. One given with --set is typed in a
        # shell and resolves against the working directory. Either is kept absolute, so a config
        # written out (Tune's best) names the same files from anywhere.
        _absolute_data_paths(raw, path.parent)
    raw = apply_overrides(raw, list(overrides or []))
    _absolute_data_paths(raw, Path.cwd())
    return config_from_dict(raw)


MSRVTT_PATHS = ("data_json", "train_csv", "test_csv", "video_dir")


def _absolute_data_paths(raw: dict[str, Any], folder: Path) -> None:
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    msrvtt = data.get("msrvtt") if isinstance(data.get("msrvtt"), dict) else {}
    for section, key in [(data, "manifest")] + [(msrvtt, key) for key in MSRVTT_PATHS]:
        if isinstance(section.get(key), str) and section[key]:
            section[key] = os.path.abspath(folder / Path(section[key]).expanduser())


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
