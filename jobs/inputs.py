"""What a run will read, checked before Ray or MLflow start: the manifest or MSRVTT files, a
given feature table, the teacher's and students' weights, a given checkpoint. A problem is one
line naming the file (and line) and what to fix."""

from __future__ import annotations

import os
from pathlib import Path

from core.config import TeacherConfig, VidkdConfig

# open_clip's `pretrained` is a tag (laion2b_s34b_b79k) or a local file: these name files.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def check_inputs(cfg: VidkdConfig, stage: str, table: Path | None = None, checkpoint: Path | None = None) -> list[str]:
    """Check the files `stage` will read: the manifest or MSRVTT files (unless the run generates
    the dataset, or `table` is given), the feature table, the teacher's and students' weights,
    the checkpoint. Raises `OSError` or `ValueError` with one line naming the file (and line)
    and what to fix; returns one-line warnings about what the run can live with."""
    if checkpoint is not None:
        _check_path(checkpoint, "--checkpoint", "file")
    reads_data = table is None or stage == "pipeline"
    if not reads_data:
        from core.features import is_committed

        _check_path(table, "--table", "dir")
        if not is_committed(table):
            raise ValueError(f"--table {table}: not a complete feature table (no commit marker); "
                             "give a directory that `vidkd extract` wrote")
    warnings = []
    if reads_data and cfg.data.synth is None:  # a synthetic set is the data stage's to write
        warnings = _check_dataset(cfg)
    if cfg.teacher_training is None and (reads_data or cfg.distill.teacher_mode == "online"):
        _check_teacher(cfg.extract.teacher)
    students = []
    if stage in ("distill", "tune", "pipeline"):
        students.append(("distill.student", cfg.distill.student))
    if cfg.teacher_training is not None and reads_data:
        students.append(("teacher_training.distill.student", cfg.teacher_training.distill.student))
    for field, student in students:
        _check_weights(student.pretrained, f"{field}.pretrained")
        if student.init_from:
            _check_path(Path(student.init_from), f"{field}.init_from", "file")
    return warnings


def _check_dataset(cfg: VidkdConfig) -> list[str]:
    from core.datasets import missing_videos
    from jobs.pipeline import load_records

    manifest = cfg.data.manifest_path()
    records = load_records(cfg)
    source = f"data.msrvtt.video_dir {cfg.data.msrvtt.video_dir}" if cfg.data.msrvtt else manifest
    missing = missing_videos(records, source)
    if not missing:
        return []
    folders = [record for record in missing if Path(record.path).is_dir()]
    what = (f"{len(missing)} of {len(records)} video files do not exist (the first: {missing[0].path})"
            if not folders else f"{len(missing)} of {len(records)} video paths are not files ({len(folders)} of them folders, "
            f"the first: {folders[0].path})")
    return [f"{source}: {what}; extract records them as failures"]


def _check_teacher(teacher: TeacherConfig) -> None:
    if teacher.kind == "open_clip":
        _check_weights(teacher.pretrained, "extract.teacher.pretrained")
    elif teacher.kind == "vidkd":
        _check_path(Path(teacher.path), "extract.teacher.path", "file")
    elif teacher.kind in ("xclip", "internvideo2"):
        path = _check_path(Path(teacher.path), "extract.teacher.path", "dir")
        if not (path / "config.json").is_file():
            raise ValueError(f"extract.teacher.path: {path} is not a Hugging Face model directory (no config.json)")


def _check_weights(pretrained: str | None, field: str) -> None:
    """An open_clip `pretrained` that names a file must exist; a tag is open_clip's to resolve."""
    if pretrained and ("/" in pretrained or os.sep in pretrained or Path(pretrained).suffix in WEIGHT_SUFFIXES):
        _check_path(Path(pretrained), field, "file")


def _check_path(path: Path, field: str, kind: str) -> Path:
    """`path` exists and is a file (`kind` "file") or a directory ("dir"); `field` names the setting."""
    path = path.expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{field}: {path} not found")
    if kind == "file" and path.is_dir():
        raise ValueError(f"{field}: {path} is a directory, not a file")
    if kind == "dir" and not path.is_dir():
        raise ValueError(f"{field}: {path} is a file, not a directory")
    return path


def check_student(path: Path, field: str) -> Path:
    """A student the pipeline wrote: a checkpoint file, or a quantized directory."""
    from core.quant.packing import CONFIG_FILE

    path = path.expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{field}: {path} not found")
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{field}: {path} is a directory but not a quantized student (no {CONFIG_FILE})")
    return path
