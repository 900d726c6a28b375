"""The `vidkd` command line, in one entry module: the datasets, the stages (jobs/), the cluster,
job submission and the MLflow UI (cluster/). Nothing below imports it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

from cluster import local
from core.config import ConfigError, SynthConfig, VidkdConfig, load_config
from jobs.inputs import check_inputs

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress video-text retrieval models on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the synthetic set, inspect a manifest.")
app.add_typer(data_app, name="data")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML preset, e.g. configs/demo.yaml")
SetOpt = typer.Option(None, "--set", help="Override a setting: section.key=value (repeatable)")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Also show the libraries' INFO lines, Ray Data's "
                          "execution plans and ffmpeg's decoder errors")


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
    _check_inputs(cfg, stage, table=table, checkpoint=checkpoint)
    return cfg


def _check_inputs(cfg: VidkdConfig, stage: str, table: Optional[Path] = None, checkpoint: Optional[Path] = None,
                  hint: str = "") -> None:
    """`check_inputs`: an error is one line (with `hint` after it) and exit 2; warnings print."""
    try:
        warnings = check_inputs(cfg, stage, table=table, checkpoint=checkpoint)
    except (OSError, ValueError) as error:
        _fail(f"{error}{hint}")
    for warning in warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


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
                                        "tune, distill, baseline, quantize, index. Trainings from it start from scratch; extract "
                                        "still reuses a committed feature table with the same content key (it "
                                        "would be the same table)"),
    verbose: bool = VerboseOpt,
) -> None:
    """The whole workflow: data -> teacher -> extract -> tune -> distill -> quantize -> report (-> index)."""
    from jobs.pipeline import STAGES, run_pipeline

    if from_ and from_ not in STAGES:
        _fail(f"--from {from_}: expected one of {', '.join(STAGES)}")
    run_pipeline(_prepare("pipeline", config, set_, verbose), from_stage=from_)


# ---------------------------------------------------------------------- using the student
@app.command()
def index(
    model: str = typer.Option(..., "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, a student checkpoint "
                              "file or a quantized student directory"),
    manifest: Path = typer.Option(..., "--manifest", help="The videos to index (JSONL or CSV, as for extract)"),
    out: Path = typer.Option(..., "--out", help="The index directory (updated in place when it exists)"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    kernel: str = typer.Option("auto", "--kernel", help="INT4 kernel: auto, fused or torch"),
    verbose: bool = VerboseOpt,
) -> None:
    """Embed a video collection with a student into a searchable index (a Ray Data job; incremental)."""
    _setup_logging(verbose)
    cfg = _load(config, set_)
    try:
        from core.datasets import read_manifest

        read_manifest(manifest)
        if not model.startswith("models:/"):
            from jobs.inputs import check_student

            check_student(Path(model), "--model")
    except (OSError, ValueError) as error:
        _fail(str(error))
    from jobs.index import run_index

    try:
        result = run_index(cfg, model, manifest, out, kernel=kernel)
    except (FileNotFoundError, ValueError) as error:  # an unknown registered model or alias
        _fail(str(error))
    typer.echo(f"index: {result.meta.videos} videos in {result.index_dir} ({result.embedded} embedded, "
               f"{result.kept} kept, {len(result.meta.failures)} failed)")


@app.command()
def search(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="An index directory written by `vidkd index`"),
    query: str = typer.Argument(..., help="What to look for, in words"),
    k: int = typer.Option(5, "-k", "--top", help="How many hits"),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="Also write a contact sheet of the hits' middle frames (PNG)"),
    verbose: bool = VerboseOpt,
) -> None:
    """Search an index by text: ranked ids, scores and paths."""
    _setup_logging(verbose)
    from core.index import search_index  # neither Ray nor MLflow: the index carries its student

    if k < 1:
        _fail(f"-k {k}: give at least 1")
    try:
        hits = search_index(index_dir, query, k)
    except (OSError, ValueError) as error:
        _fail(str(error))
    width = max([len(hit.video_id) for hit in hits] + [8])
    typer.echo(f"{'rank':>4}  {'video_id':<{width}}  {'score':>6}  path")
    for hit in hits:
        typer.echo(f"{hit.rank:>4}  {hit.video_id:<{width}}  {hit.score:>6.3f}  {hit.path}")
    if sheet is not None:
        from jobs.plots import contact_sheet

        contact_sheet(hits, query).savefig(sheet, dpi=100)
        typer.echo(f"contact sheet: {sheet}")


@app.command()
def serve(
    index_dirs: list[Path] = typer.Argument(..., metavar="INDEX...", help="Index directories written by `vidkd index` "
                                            "(requests name one by its directory name; the first is the default)"),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (127.0.0.1 unless you mean it)"),
    port: int = typer.Option(8000, "--port"),
    replicas: int = typer.Option(1, "--replicas", help="Text-encoder replicas per index (one CPU each)"),
    kernel: str = typer.Option("auto", "--kernel", help="INT4 kernel: auto, fused or torch"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Serve indexes over HTTP with Ray Serve: a search page, GET /search?q=...&k=5, /healthz."""
    _setup_logging(verbose)
    cfg = _load(config, set_)
    from jobs import serve as server

    try:
        indexes = server.ServedIndex.from_dirs(index_dirs)
        if replicas < 1:
            raise ValueError(f"--replicas {replicas}: give at least 1")
        server.check_port(host, port)
    except (OSError, ValueError) as error:
        _fail(str(error))
    from jobs.runtime import init_ray

    init_ray(cfg.ray)  # first: then SIGTERM reaches our handler below, not Ray's, which prints a stack
    with local.exit_on_termination():
        server.serve_until_stopped(indexes, cfg.ray, host, port, kernel, replicas,
                                   ready=lambda url: typer.echo(f"vidkd search: {url}   (GET /search?q=...&k=5, "
                                                                "/healthz; Ctrl-C to stop)"))


@app.command()
def promote(
    name: str = typer.Argument("vidkd-student-int4", help="The registered model"),
    version: Optional[str] = typer.Option(None, "--version", help="Default: the version aliased candidate"),
    alias: str = typer.Option("champion", "--alias"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Point an alias (champion) at a registered student's version (default: the candidate)."""
    cfg = _load(config, set_)
    from jobs.registry import promote as promote_version
    from jobs.tracking import tracking_uri

    try:
        model = promote_version(tracking_uri(cfg.tracking, cfg.output_dir), name, version, alias)
    except ValueError as error:
        _fail(str(error))
    typer.echo(f"{name}@{alias} -> version {model.version}")


# ------------------------------------------------------------------------- cluster and jobs
DEFAULT_ADDRESS = os.environ.get("RAY_API_SERVER_ADDRESS") or f"http://127.0.0.1:{local.DEFAULT_DASHBOARD_PORT}"
AddressOpt = typer.Option(DEFAULT_ADDRESS, "--address", help="The cluster's dashboard / job API, http://HOST:8265")

cluster_app = typer.Typer(no_args_is_help=True, help="A local Ray head: up and down.")
jobs_app = typer.Typer(no_args_is_help=True, help="Ray jobs on a cluster: list, status, logs, stop.")


@cluster_app.command("up")
def up(
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus"),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus"),
    host: str = typer.Option("127.0.0.1", "--host", help="Dashboard bind address (127.0.0.1 unless you mean it)"),
    dashboard_port: int = typer.Option(local.DEFAULT_DASHBOARD_PORT, "--dashboard-port"),
    port: int = typer.Option(6379, "--port", help="The head's GCS port"),
) -> None:
    """Start a Ray head on this machine (dashboard on 127.0.0.1)."""
    try:
        head = local.cluster_up(num_cpus, num_gpus, host, dashboard_port, port)
    except ValueError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    typer.echo(f"Ray head is up. Submit with: vidkd submit pipeline --address {head.address} --config configs/demo.yaml")
    typer.echo(f"Stop it with: vidkd cluster down --port {head.port}")


@cluster_app.command("down")
def down(
    port: Optional[int] = typer.Option(None, "--port", help="The head's GCS port, where `cluster up` started several"),
) -> None:
    """Stop the Ray head `vidkd cluster up` started, with its workers; other Ray instances keep running."""
    try:
        head = local.cluster_down(port)
    except ValueError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if head is None:
        typer.echo("no Ray head started by `vidkd cluster up` is running" + (f" on port {port}" if port else ""))
    else:
        typer.echo(f"stopped the Ray head on port {head.port} ({head.session_dir})")


def submit_cmd(
    stage: str = typer.Argument(..., help="extract | distill | tune | quantize | pipeline"),
    address: str = AddressOpt,
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    set_: Optional[list[str]] = typer.Option(None, "--set"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow server for the job "
                                               "(default: $MLFLOW_TRACKING_URI)"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream the job's logs until it ends"),
    check_inputs_here: bool = typer.Option(True, "--check-inputs/--no-check-inputs",
                                           help="Check the files the job will read on this machine first "
                                           "(--no-check-inputs where only the cluster's nodes have them)"),
) -> None:
    """Submit a stage or the whole pipeline as a Ray job, with this project as its working dir.

    The config, and (unless --no-check-inputs) every file the job will read, are checked here
    first, as a local run checks them: a mistake is one line and exit 2, and no job is started.
    The job checks them again on the cluster before it starts Ray."""
    from cluster import submit as jobsub
    try:
        jobsub.check_stage(stage)
    except ValueError as error:
        _fail(str(error))
    cfg = _load(config, set_)
    if check_inputs_here:
        _check_inputs(cfg, stage, hint=" (checked on this machine; --no-check-inputs submits anyway, where only "
                      "the cluster's nodes have the file)")
    try:
        for line in jobsub.job_local_outputs(str(config) if config else None, set_ or [], tracking_uri):
            typer.secho(f"warning: {line}", fg=typer.colors.YELLOW, err=True)
        job_id = jobsub.submit(address, stage, str(config) if config else None, set_ or [], tracking_uri=tracking_uri)
    except (ValueError, FileNotFoundError) as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    typer.echo(f"submitted {job_id}")
    if follow:
        for chunk in jobsub.follow_logs(address, job_id):
            typer.echo(chunk, nl=False)
        typer.echo(f"\n{job_id}: {jobsub.status(address, job_id)}")


@jobs_app.command("list")
def jobs_list(address: str = AddressOpt) -> None:
    from cluster import submit as jobsub

    for job in jobsub.list_jobs(address):
        typer.echo(f"{job['id']}  {job['status']:<10} {job['entrypoint']}")


@jobs_app.command("status")
def jobs_status(job_id: str, address: str = AddressOpt) -> None:
    from cluster import submit as jobsub

    typer.echo(jobsub.status(address, job_id))


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: str = AddressOpt, follow: bool = typer.Option(False, "--follow", "-f")) -> None:
    from cluster import submit as jobsub

    if not follow:
        typer.echo(jobsub.logs(address, job_id))
        return
    for chunk in jobsub.follow_logs(address, job_id):
        typer.echo(chunk, nl=False)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str = AddressOpt) -> None:
    from cluster import submit as jobsub

    typer.echo("stopped" if jobsub.stop(address, job_id) else "already finished")


def ui(
    output_dir: str = typer.Option("runs", "--runs", help="Where the SQLite store and artifacts are"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(5000, "--port"),
) -> None:
    """Start the MLflow UI on the SQLite store under runs/ (127.0.0.1 by default)."""
    with local.exit_on_termination():
        process = local.start_mlflow_server(output_dir, host, port)
        try:
            typer.echo(f"MLflow UI: {local.mlflow_ui_url(host, port)}   (Ctrl-C to stop)")
            process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            local.stop_process_group(process)

app.add_typer(cluster_app, name="cluster")
app.add_typer(jobs_app, name="jobs")
app.command("submit")(submit_cmd)
app.command("ui")(ui)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
