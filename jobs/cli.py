"""The `vidkd` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from core.config import ConfigError, SynthConfig, VidkdConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress video-text retrieval models on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the synthetic set, inspect a manifest.")
app.add_typer(data_app, name="data")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML preset, e.g. configs/demo.yaml")
SetOpt = typer.Option(None, "--set", help="Override a setting: section.key=value (repeatable)")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load(config: Optional[Path], overrides: Optional[list[str]]) -> VidkdConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as error:
        _fail(str(error))


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


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
) -> None:
    """Counts per split, durations, caption examples and a contact sheet of sampled frames."""
    from jobs.inspect import inspect_manifest

    try:
        report = inspect_manifest(manifest, sheet or manifest.parent / "contact_sheet.png", frames, rows)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    typer.echo(report)


# ---------------------------------------------------------------------------------- stages
@app.command()
def extract(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Stage 1: decode videos and extract teacher features into the feature table."""
    from jobs.pipeline import run_single_stage

    _setup_logging()
    run_single_stage("extract", _load(config, set_))


@app.command()
def distill(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    table: Optional[Path] = typer.Option(None, "--table", help="An existing feature table directory"),
) -> None:
    """Stage 2: distill the student from the feature table with Ray Train."""
    from jobs.pipeline import run_single_stage

    _setup_logging()
    run_single_stage("distill", _load(config, set_), table=table)


@app.command()
def tune(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    table: Optional[Path] = typer.Option(None, "--table"),
    restart: bool = typer.Option(False, "--restart", help="Start anew instead of continuing this config's search"),
) -> None:
    """Stage 3: search temperatures and loss weights with Ray Tune."""
    from jobs.pipeline import run_single_stage

    _setup_logging()
    run_single_stage("tune", _load(config, set_), table=table, restart=restart)


@app.command()
def quantize(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A student checkpoint written by distill"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    table: Optional[Path] = typer.Option(None, "--table"),
) -> None:
    """Stage 4: GPTQ INT4 of the student's vision encoder, evaluated against full precision."""
    from jobs.pipeline import run_single_stage

    _setup_logging()
    if not checkpoint.is_file():
        _fail(f"checkpoint not found: {checkpoint}")
    run_single_stage("quantize", _load(config, set_), table=table, checkpoint=checkpoint)


@app.command()
def pipeline(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    from_: Optional[str] = typer.Option(None, "--from", help="Re-run from this stage: data, teacher, extract, "
                                        "tune, distill, quantize. Trainings from it start from scratch; extract "
                                        "still reuses a committed feature table with the same content key (it "
                                        "would be the same table)"),
) -> None:
    """The whole workflow: data -> teacher -> extract -> tune -> distill -> quantize -> report."""
    from jobs.pipeline import STAGES, run_pipeline

    _setup_logging()
    if from_ and from_ not in STAGES:
        _fail(f"--from {from_}: expected one of {', '.join(STAGES)}")
    run_pipeline(_load(config, set_), from_stage=from_)


def run_stage_main(stage: str, argv: list[str] | None = None) -> None:
    """`python -m jobs.<stage>` takes the same options as `vidkd <stage>`."""
    sys.argv = [f"vidkd {stage}"] + list(sys.argv[1:] if argv is None else argv)
    typer.main.get_command(app).main(args=[stage] + sys.argv[1:], prog_name="vidkd")


def main() -> None:
    app()


def _register_cluster_commands() -> None:
    from cluster.cli import register

    register(app)


_register_cluster_commands()


if __name__ == "__main__":
    main()
