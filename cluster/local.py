"""A local Ray head (`vidkd cluster up|down`) and the MLflow server (`vidkd ui`).

Both bind to 127.0.0.1 unless told otherwise: a dashboard or tracking server on 0.0.0.0 is an
open door to running code on the machine.

`cluster down` stops the head `cluster up` started and nothing else: other Ray instances on the
machine (other users', other test runs', a stage's own local instance) go on running. `up`
records the head's session directory and node id; `down` stops the processes that name either
in their command line (GCS, raylet, dashboard, monitors, client server) and their descendants
(workers, agents, job drivers).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import psutil


DEFAULT_DASHBOARD_PORT = 8265


def _ray_bin() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"


@dataclass
class Head:
    """A Ray head on this machine: its GCS port, job-submission address and what names its processes."""

    port: int
    address: str
    gcs_address: str
    session_dir: str
    node_id: str

    def __post_init__(self) -> None:
        # Both are matched as substrings of command lines: an empty or short one would match
        # processes that are not the head's.
        if not (Path(self.session_dir).is_absolute() and Path(self.session_dir).name.startswith("session_")):
            raise ValueError(f"not a Ray session directory: {self.session_dir!r}")
        if len(self.node_id) < 32 or any(c not in "0123456789abcdef" for c in self.node_id):
            raise ValueError(f"not a Ray node id: {self.node_id!r}")

    def processes(self) -> list[psutil.Process]:
        """The head's processes still running, and all their descendants."""
        roots = [proc for proc, args in _own_processes() if any(self._names(arg) for arg in args)]
        found = {proc.pid: proc for proc in roots}
        for proc in roots:
            try:
                found.update((child.pid, child) for child in proc.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def _names(self, arg: str) -> bool:
        return self.node_id in arg or arg.endswith(self.session_dir) or f"{self.session_dir}/" in arg


def heads_dir() -> Path:
    """Where `cluster up` records the heads it started, one file per GCS port: per user, as Ray's
    processes are, and outside the project so `down` finds them from any directory."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "vidkd" / "ray-heads"


def recorded_heads() -> list[Head]:
    """The heads `cluster up` recorded that still run; records of heads that ended (or that no
    longer read as a head) are dropped."""
    heads = []
    for path in sorted(heads_dir().glob("*.json")):
        try:
            head = Head(**json.loads(path.read_text()))
        except (OSError, TypeError, ValueError):
            head = None
        if head is not None and head.processes():
            heads.append(head)
        else:
            path.unlink(missing_ok=True)
    return heads


def free_port_or(preferred: int) -> int:
    """`preferred` when nothing on this machine listens on it, else a free port the OS picks."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", preferred))
            return preferred
        except OSError:
            probe.bind(("", 0))
            return probe.getsockname()[1]


def cluster_up(num_cpus: int | None = None, num_gpus: int | None = None, host: str = "127.0.0.1",
               dashboard_port: int = DEFAULT_DASHBOARD_PORT, port: int = 6379) -> Head:
    """Start a Ray head on this machine and record it for `cluster_down`."""
    if any(head.port == port for head in recorded_heads()):
        raise ValueError(f"a head started by `vidkd cluster up` runs on port {port}: "
                         f"`vidkd cluster down --port {port}` stops it")
    # Ray's fixed defaults for the head's job agent (52365) and Ray Client (10001) may be held by
    # another Ray instance on the machine (any local `ray.init()` takes 52365): a head whose agent
    # cannot bind starts, but refuses every job with "No available agent". Keep the defaults where
    # they are free.
    command = [_ray_bin(), "start", "--head", f"--port={port}", "--include-dashboard=true",
               f"--dashboard-host={host}", f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port_or(52365)}",
               f"--ray-client-server-port={free_port_or(10001)}"]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    # Jobs on this head run `python -m cluster.cli ...`: the `python` on its PATH must be this
    # environment's, also when `vidkd` was called by path with the venv not activated.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    subprocess.run(command, check=True, env=env)
    head = find_head(port, f"http://{host}:{dashboard_port}")
    heads_dir().mkdir(parents=True, exist_ok=True)
    (heads_dir() / f"{port}.json").write_text(json.dumps(asdict(head)))
    wait_for_http(f"{head.address}/api/version", timeout=60)
    return head


def cluster_down(port: int | None = None, grace_s: float = 10.0) -> Head | None:
    """Stop the head `cluster up` started (the one on `port` where several run); None when none runs."""
    heads = [head for head in recorded_heads() if port is None or head.port == port]
    if not heads:
        return None
    if len(heads) > 1:
        ports = ", ".join(str(head.port) for head in heads)
        raise ValueError(f"`vidkd cluster up` started heads on ports {ports}: pick one with --port")
    stop_head(heads[0], grace_s)
    (heads_dir() / f"{heads[0].port}.json").unlink(missing_ok=True)
    return heads[0]


def stop_head(head: Head, grace_s: float = 10.0) -> None:
    """SIGTERM to the head's processes, as `ray stop` sends without --force, SIGKILL after `grace_s`."""
    processes = head.processes()
    for proc in processes:
        _signal(proc, signal.SIGTERM)
    alive = _wait_gone(processes, grace_s)
    # and whatever the head started while it was shutting down
    alive = list({proc.pid: proc for proc in alive + head.processes()}.values())
    for proc in alive:
        _signal(proc, signal.SIGKILL)
    _wait_gone(alive, 10)
    _forget_address(head.gcs_address)


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still alive after up to `timeout` s. A zombie counts as gone: where no init
    reaps orphans (a container without one) it stays a zombie however long one waits."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [proc for proc in processes if _alive(proc)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def find_head(port: int, address: str = "") -> Head:
    """The Ray head of this user whose GCS listens on `port`, known by its GCS server's arguments."""
    for proc, args in _own_processes():
        if Path(args[0]).name == "gcs_server" and f"--gcs_server_port={port}" in args:
            flags = dict(arg[2:].split("=", 1) for arg in args[1:] if arg.startswith("--") and "=" in arg)
            return Head(port=port, address=address, gcs_address=f"{flags['node-ip-address']}:{port}",
                        session_dir=flags["session-dir"], node_id=flags["node-id"])
    raise RuntimeError(f"no Ray GCS server of this user listens on port {port}")


def _own_processes() -> Iterator[tuple[psutil.Process, list[str]]]:
    uid = os.getuid()
    for proc in psutil.process_iter(["uids", "cmdline"]):
        uids, args = proc.info["uids"], proc.info["cmdline"]
        if uids is not None and uids.real == uid and args:
            yield proc, args


def _signal(proc: psutil.Process, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except psutil.NoSuchProcess:
        pass


def _forget_address(gcs_address: str) -> None:
    """Ray's record of the last head started here, read by `ray.init()` without an address,
    goes when it names the stopped head (as `ray stop` removes it); a later head's stays."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    try:
        if path.read_text().strip() == gcs_address:
            path.unlink()
    except OSError:
        pass


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
    from jobs.tracking import default_artifact_root, tracking_uri  # MLflow's import: only the UI pays it

    backend = backend_uri or tracking_uri(None, output_dir)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
            "--default-artifact-root", default_artifact_root(output_dir), "--host", host, "--port", str(port),
            "--workers", "1"]


def start_mlflow_server(output_dir: str = "runs", host: str = "127.0.0.1", port: int = 5000,
                        wait: bool = True) -> subprocess.Popen:
    """The server in a process group of its own (it runs uvicorn beneath it): `stop_process_group`
    ends all of it, and a Ctrl-C in the terminal reaches only the caller, which decides.

    Its job runner is off unless the environment turns it on: it runs GenAI jobs (scorers, trace
    roll-ups) on nothing we log, and its seven worker processes slow the server's start and stop."""
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    process = subprocess.Popen(mlflow_server_command(output_dir, host, port), start_new_session=True, env=env)
    if wait:
        try:
            wait_for_http(f"http://{host}:{port}/health", timeout=90)
        except BaseException:
            stop_process_group(process)
            raise
    return process


def stop_process_group(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the group `process` leads, SIGKILL to what is left of it after `timeout`."""
    deadline = time.monotonic() + timeout
    signum = signal.SIGTERM
    while True:
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        process.poll()  # reaps the leader, which would otherwise keep the group alive as a zombie
        time.sleep(0.2)
        if time.monotonic() > deadline:
            signum = signal.SIGKILL
        elif signum == signal.SIGTERM:
            signum = 0  # sent once; from here on only ask whether the group is still there
    process.wait()


@contextmanager
def exit_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP end the process as SystemExit, the way Ctrl-C ends it as
    KeyboardInterrupt, so `finally` blocks (stopping the servers it started) run. Python's
    default is to die on the spot, leaving them running."""

    def exit_(signum: int, _frame) -> None:
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, exit_) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def mlflow_ui_url(host: str, port: int) -> str:
    """Where to open the UI: our experiment's runs table, on the UI's model-training side (its
    `workflowType` switch, which MLflow 3.17 reads before the experiment's kind tag and which
    otherwise starts on the GenAI side). With several experiments, their list."""
    from mlflow.tracking import MlflowClient

    from jobs.tracking import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND

    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    ours = MlflowClient(base).search_experiments(
        filter_string=f"tags.`{EXPERIMENT_KIND_TAG}` = '{TRAINING_EXPERIMENT_KIND}'", max_results=2)
    page = f"experiments/{ours[0].experiment_id}/runs" if len(ours) == 1 else "experiments"
    return f"http://{host}:{port}/#/{page}?workflowType=machine_learning"
