"""The `vidkd` command line."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

from core.config import ConfigError, SynthConfig, TeacherConfig, VidkdConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress video-text retrieval models on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the synthetic set, inspect a manifest.")
app.add_typer(data_app, name="data")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML preset, e.g. configs/demo.yaml")
SetOpt = typer.Option(None, "--set", help="Override a setting: section.key=value (repeatable)")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Also show the libraries' INFO lines, Ray Data's "
                          "execution plans and ffmpeg's decoder errors")
# open_clip's `pretrained` is a tag (laion2b_s34b_b79k) or a local file: these name files.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load(config: Optional[Path], overrides: Optional[list[str]]) -> VidkdConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as error:
        _fail(str(error))


def _setup_logging(verbose: bool) -> None:
    from jobs.runtime import log_level, set_verbose

    set_verbose(verbose)
    logging.basicConfig(level=log_level(), format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mlflow").setLevel(log_level())  # its own handler: "Creating initial MLflow database tables"


def _prepare(stage: str, config: Optional[Path], overrides: Optional[list[str]], verbose: bool,
             table: Optional[Path] = None, checkpoint: Optional[Path] = None) -> VidkdConfig:
    """Where every stage command starts: logging, the config, then every file the run will read,
    so that a mistake ends in one line and exit status 2 before Ray or MLflow start."""
    _setup_logging(verbose)
    cfg = _load(config, overrides)
    try:
        warnings = check_inputs(cfg, stage, table=table, checkpoint=checkpoint)
    except (OSError, ValueError) as error:
        _fail(str(error))
    for warning in warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    return cfg


# --------------------------------------------------------------------- what a run will read
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
    if stage in ("distill", "tune", "pipeline"):
        _check_weights(cfg.distill.student.pretrained, "distill.student.pretrained")
    if cfg.teacher_training is not None and reads_data:
        _check_weights(cfg.teacher_training.distill.student.pretrained, "teacher_training.distill.student.pretrained")
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
    return [f"{source}: {len(missing)} of {len(records)} video files do not exist (the first: {missing[0].path}); "
            "extract records them as failures"]


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


# ------------------------------------------------------------------------------------ data
@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder for the mp4 files and manifest.jsonl"),
    videos: int = typer.Option(200, "--videos"),
    seed: int = typer.Option(0, "--seed"),
    fps: int = typer.Option(8, "--fps"),
    width: int = typer.Option(96, "--width"),
    height: int = typer.Option(64, "--height"),
    min_seconds: float = typer.Option(1.0, "--min-seconds"),
    max_seconds: float = typer.Option(4.0, "--max-seconds"),
    val_fraction: float = typer.Option(0.15, "--val-fraction"),
    test_fraction: float = typer.Option(0.15, "--test-fraction"),
    pool_fraction: float = typer.Option(0.0, "--pool-fraction", help="Clips only a teacher trains on (split pool)"),
) -> None:
    """Generate the synthetic driving-scene dataset (real H.264 mp4 files + manifest)."""
    from core.config import config_from_dict
    from core.synth import generate_dataset

    try:
        cfg = config_from_dict(
            dict(videos=videos, seed=seed, fps=fps, width=width, height=height, min_seconds=min_seconds,
                 max_seconds=max_seconds, val_fraction=val_fraction, test_fraction=test_fraction,
                 pool_fraction=pool_fraction),
            SynthConfig,
        )
    except ConfigError as error:
        _fail(str(error))
    manifest = generate_dataset(out, cfg)
    typer.echo(f"wrote {videos} videos and {manifest}")


@data_app.command("inspect")
def data_inspect(
    manifest: Path = typer.Argument(..., help="A manifest (JSONL or CSV)"),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="Contact-sheet PNG (default: beside the manifest)"),
    frames: int = typer.Option(8, "--frames"),
    rows: int = typer.Option(6, "--rows"),
    verbose: bool = VerboseOpt,
) -> None:
    """Counts per split, durations, caption examples and a contact sheet of sampled frames."""
    from core.video import set_decoder_logging
    from jobs.inspect import inspect_manifest

    set_decoder_logging(verbose)
    try:
        report = inspect_manifest(manifest, sheet or manifest.parent / "contact_sheet.png", frames, rows)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    typer.echo(report)


# ---------------------------------------------------------------------------------- stages
@app.command()
def extract(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, verbose: bool = VerboseOpt) -> None:
    """Stage 1: decode videos and extract teacher features into the feature table."""
    from jobs.pipeline import run_single_stage

    run_single_stage("extract", _prepare("extract", config, set_, verbose))


@app.command()
def distill(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    table: Optional[Path] = typer.Option(None, "--table", help="An existing feature table directory"),
    verbose: bool = VerboseOpt,
) -> None:
    """Stage 2: distill the student from the feature table with Ray Train."""
    from jobs.pipeline import run_single_stage

    run_single_stage("distill", _prepare("distill", config, set_, verbose, table=table), table=table)


@app.command()
def tune(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    table: Optional[Path] = typer.Option(None, "--table"),
    restart: bool = typer.Option(False, "--restart", help="Start anew instead of continuing this config's search"),
    verbose: bool = VerboseOpt,
) -> None:
    """Stage 3: search temperatures and loss weights with Ray Tune."""
    from jobs.pipeline import run_single_stage

    run_single_stage("tune", _prepare("tune", config, set_, verbose, table=table), table=table, restart=restart)


@app.command()
def quantize(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A student checkpoint written by distill "
                                              "(default: the distill stage's, built or cached)"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    table: Optional[Path] = typer.Option(None, "--table"),
    verbose: bool = VerboseOpt,
) -> None:
    """Stage 4: GPTQ INT4 of the student's vision encoder, evaluated against full precision."""
    from jobs.pipeline import run_single_stage

    cfg = _prepare("quantize", config, set_, verbose, table=table, checkpoint=checkpoint)
    run_single_stage("quantize", cfg, table=table, checkpoint=checkpoint)


@app.command()
def pipeline(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    from_: Optional[str] = typer.Option(None, "--from", help="Re-run from this stage: data, teacher, extract, "
                                        "tune, distill, quantize. Trainings from it start from scratch; extract "
                                        "still reuses a committed feature table with the same content key (it "
                                        "would be the same table)"),
    verbose: bool = VerboseOpt,
) -> None:
    """The whole workflow: data -> teacher -> extract -> tune -> distill -> quantize -> report."""
    from jobs.pipeline import STAGES, run_pipeline

    if from_ and from_ not in STAGES:
        _fail(f"--from {from_}: expected one of {', '.join(STAGES)}")
    run_pipeline(_prepare("pipeline", config, set_, verbose), from_stage=from_)


def main() -> None:
    app()


def _register_cluster_commands() -> None:
    from cluster.cli import register

    register(app)


_register_cluster_commands()


if __name__ == "__main__":
    main()
