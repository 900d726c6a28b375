"""A local Ray head (`vidkd cluster up|down`) and the MLflow server (`vidkd ui`).

Both bind to 127.0.0.1 unless told otherwise: a dashboard or tracking server on 0.0.0.0 is an
open door to running code on the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from jobs.tracking import default_artifact_root, tracking_uri

DEFAULT_DASHBOARD_PORT = 8265


def _ray_bin() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"


def cluster_up(num_cpus: int | None = None, num_gpus: int | None = None, host: str = "127.0.0.1",
               dashboard_port: int = DEFAULT_DASHBOARD_PORT, port: int = 6379) -> str:
    """Start a Ray head on this machine; returns the job-submission address."""
    command = [_ray_bin(), "start", "--head", f"--port={port}", "--include-dashboard=true",
               f"--dashboard-host={host}", f"--dashboard-port={dashboard_port}", "--disable-usage-stats"]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    # Jobs on this head run `python -m jobs.cli ...`: the `python` on its PATH must be this
    # environment's, also when `vidkd` was called by path with the venv not activated.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    subprocess.run(command, check=True, env=env)
    address = f"http://{host}:{dashboard_port}"
    wait_for_http(f"{address}/api/version", timeout=60)
    return address


def cluster_down() -> None:
    subprocess.run([_ray_bin(), "stop", "--force"], check=True)


def wait_for_http(url: str, timeout: float = 60.0) -> None:
    """Wait until the server answers. An HTTP error below 500 counts as up: Ray >= 2.59 turns token
    authentication on for local heads, so an unauthenticated probe of the dashboard gets a 401."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as error:
            if error.code < 500:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.5)


def mlflow_server_command(output_dir: str = "runs", host: str = "127.0.0.1", port: int = 5000,
                          backend_uri: str | None = None) -> list[str]:
    """`mlflow server` over the SQLite store and artifacts the stages write by default."""
    backend = backend_uri or tracking_uri(None, output_dir)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
            "--default-artifact-root", default_artifact_root(output_dir), "--host", host, "--port", str(port),
            "--workers", "1"]


def start_mlflow_server(output_dir: str = "runs", host: str = "127.0.0.1", port: int = 5000,
                        wait: bool = True) -> subprocess.Popen:
    process = subprocess.Popen(mlflow_server_command(output_dir, host, port), start_new_session=True)
    if wait:
        try:
            wait_for_http(f"http://{host}:{port}/health", timeout=90)
        except TimeoutError:
            process.terminate()
            raise
    return process
