"""Submitting stages to a Ray cluster as Ray jobs, and following them.

The project directory travels as the job's `working_dir`, so the cluster runs exactly the code
(and the config) the user has. The MLflow tracking URI goes along as an environment variable so
cluster jobs log to the user's MLflow server, not to a SQLite file on the head node.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Iterator

from ray.job_submission import JobStatus, JobSubmissionClient

STAGE_COMMANDS = {"extract", "distill", "tune", "quantize", "pipeline"}
PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = [".venv", ".git", "runs", "data", "**/__pycache__", ".pytest_cache", "*.egg-info", ".whl", ".gl"]


def auth_token() -> str | None:
    """The cluster's token, where Ray looks for it: `RAY_AUTH_TOKEN`, the file named by
    `RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token` (which `ray start` writes on a local head).
    Ray >= 2.59 enables token authentication on local heads by default."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file():
        return path.read_text().strip() or None
    return None


def client(address: str) -> JobSubmissionClient:
    """A job client that presents the cluster token when there is one."""
    token = auth_token()
    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)


def check_stage(stage: str) -> None:
    if stage not in STAGE_COMMANDS:
        raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(sorted(STAGE_COMMANDS))}")


def entrypoint(stage: str, config: str | None, overrides: list[str], extra: list[str]) -> str:
    check_stage(stage)
    parts = ["python", "-m", "cluster.cli", stage]
    if config:
        parts += ["--config", config]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts + list(extra))


def job_local_outputs(config: str | None, overrides: list[str] | None = None,
                      tracking_uri: str | None = None) -> list[str]:
    """What a submitted job would keep inside its Ray working directory, a temporary copy on the
    node that runs the driver: relative output paths, and MLflow without a tracking URI. One line each."""
    from core.config import load_config

    cfg = load_config(config, overrides)
    paths = {"output_dir": cfg.output_dir, "extract.cache_dir": cfg.extract.cache_dir,
             "distill.storage_dir": cfg.distill.storage_dir, "tune.storage_dir": cfg.tune.storage_dir}
    found = [f"{key} {value!r} is relative: it lands in the job's temporary working directory"
             for key, value in paths.items() if not Path(value).is_absolute()]
    if not (tracking_uri or cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        found.append("no MLflow tracking URI (--tracking-uri, tracking.uri or $MLFLOW_TRACKING_URI): "
                     "the job logs to a SQLite file in its working directory")
    return found


def submit(address: str, stage: str, config: str | None = None, overrides: list[str] | None = None,
           extra: list[str] | None = None, tracking_uri: str | None = None, working_dir: Path = PROJECT_ROOT,
           pip: list[str] | None = None) -> str:
    """Submit `vidkd <stage>` as a Ray job; returns the submission id.

    A config path inside the project travels with the working dir; one outside it is copied in
    as the job's own `_submitted_config.yaml`."""
    config_arg = None
    files_to_clean = []
    if config:
        path = Path(config).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {config}")
        try:
            config_arg = str(path.relative_to(working_dir))
        except ValueError:
            shipped = working_dir / "_submitted_config.yaml"
            shipped.write_text(path.read_text())
            files_to_clean.append(shipped)
            config_arg = shipped.name
    env = {"PYTHONUNBUFFERED": "1"}
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env}
    if pip:
        runtime_env["pip"] = pip
    try:
        return _submit_when_ready(client(address), entrypoint=entrypoint(stage, config_arg, overrides or [], extra or []),
                                  runtime_env=runtime_env, metadata={"vidkd.stage": stage})
    finally:
        for path in files_to_clean:
            path.unlink(missing_ok=True)


def _submit_when_ready(jobs: JobSubmissionClient, wait_s: float = 60.0, **job) -> str:
    """Submit, waiting for the head's job agent: a head just started (`vidkd cluster up` returns
    when Ray answers) refuses jobs with "No available agent" for a few seconds, more on a busy
    machine. Any other refusal is raised at once."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return jobs.submit_job(**job)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def list_jobs(address: str) -> list[dict]:
    jobs = client(address).list_jobs()
    return [
        {"id": job.submission_id, "status": str(job.status.value if hasattr(job.status, "value") else job.status),
         "entrypoint": job.entrypoint, "start_time": job.start_time}
        for job in sorted(jobs, key=lambda j: j.start_time or 0)
    ]


def status(address: str, job_id: str) -> str:
    return str(client(address).get_job_status(job_id).value)


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def follow_logs(address: str, job_id: str, poll_s: float = 1.0) -> Iterator[str]:
    """The job's log as it grows, until the job ends (a polling tail, no websocket needed)."""
    jobs = client(address)
    seen = 0
    while True:
        text = jobs.get_job_logs(job_id)
        if len(text) > seen:
            yield text[seen:]
            seen = len(text)
        if jobs.get_job_status(job_id) in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            text = jobs.get_job_logs(job_id)
            if len(text) > seen:
                yield text[seen:]
            return
        time.sleep(poll_s)


def wait(address: str, job_id: str, timeout_s: float = 1800, poll_s: float = 2.0) -> str:
    jobs = client(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = jobs.get_job_status(job_id)
        if state in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return str(state.value)
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f}s")


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)
