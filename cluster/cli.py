"""`vidkd cluster`, `vidkd submit`, `vidkd jobs` and `vidkd ui`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from cluster import local, submit as jobsub

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
) -> None:
    """Submit a stage or the whole pipeline as a Ray job, with this project as its working dir."""
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
    for job in jobsub.list_jobs(address):
        typer.echo(f"{job['id']}  {job['status']:<10} {job['entrypoint']}")


@jobs_app.command("status")
def jobs_status(job_id: str, address: str = AddressOpt) -> None:
    typer.echo(jobsub.status(address, job_id))


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: str = AddressOpt, follow: bool = typer.Option(False, "--follow", "-f")) -> None:
    if not follow:
        typer.echo(jobsub.logs(address, job_id))
        return
    for chunk in jobsub.follow_logs(address, job_id):
        typer.echo(chunk, nl=False)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str = AddressOpt) -> None:
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


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
    app.add_typer(jobs_app, name="jobs")
    app.command("submit")(submit_cmd)
    app.command("ui")(ui)
