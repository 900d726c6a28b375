"""The processes `vidkd ui` and `vidkd cluster up` start end with them, and only those."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from cluster import local
from jobs.tracking import RunLogger
from tests.conftest import page_text

ROOT = Path(__file__).resolve().parent.parent
VIDKD = [sys.executable, "-m", "cluster.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        local.wait_for_http(url, timeout=0)
    except TimeoutError:
        return False
    return True


def read_until(stream, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


@pytest.mark.browser
def test_ui_stops_its_server_on_sigterm(tracking_dir):
    """SIGTERM to `vidkd ui` (what a process manager or `kill` sends) ends the mlflow server it
    started, uvicorn included; the URL it prints opens our experiment's runs table."""
    pipeline = RunLogger.create("pipeline")
    pipeline.child("extract").end()
    experiment = pipeline.experiment_id
    port = free_port()
    ui = subprocess.Popen(VIDKD + ["ui", "--runs", str(tracking_dir), "--port", str(port)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server: list[psutil.Process] = []
    try:
        url = read_until(ui.stdout, r"^MLflow UI: (\S+)", timeout=150).group(1)
        assert url == f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning"
        server = psutil.Process(ui.pid).children(recursive=True)
        assert any("mlflow" in " ".join(p.cmdline()) for p in server) and len(server) >= 2, server
        assert answers(f"http://127.0.0.1:{port}/health")
        page = page_text(url, tracking_dir.parent / "chromium")
        if page is not None:  # MLflow 3.17 opens its GenAI overview without the link's workflowType
            assert page.startswith("Runs - Experiment") and "pipeline" in page and "2 matching runs" in page, page[:2000]

        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(server, timeout=10)
        assert not alive, f"left running: {alive}"
        assert not answers(f"http://127.0.0.1:{port}/health")
    finally:
        if ui.poll() is None:
            ui.kill()
        for proc in server:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        ui.wait(timeout=30)


def test_stop_head_ends_what_names_the_head_and_its_descendants(tmp_path):
    """Without Ray: stand-ins for a head's processes (one names its session dir, one its node id,
    a child that ignores SIGTERM) and for another head's, whose session dir has ours as a prefix."""
    stubborn_child = ("import signal, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                      "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); "
                      "time.sleep(600)")
    session = f"{tmp_path}/session_2026-01-01_00-00-00_000000_1"
    ours, theirs = "ab" * 28, "cd" * 28

    def start(*args: str) -> psutil.Process:
        return psutil.Process(subprocess.Popen([sys.executable, "-c", stubborn_child, *args]).pid)

    started = [start(f"--session-dir={session}"), start(f"--log_dir={session}/logs"), start(f"--node-id={ours}"),
               start(f"--session-dir={session}0", f"--node-id={theirs}")]
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 30
        while sum(len(p.children()) for p in started) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        children = [child for p in started for child in p.children()]
        head = local.Head(port=1, address="", gcs_address="127.0.0.1:1", session_dir=session, node_id=ours)
        assert {p.pid for p in head.processes()} == {p.pid for p in started[:3] + children[:3]}

        local.stop_head(head, grace_s=1)
        for proc in started[:3]:
            assert proc.wait(timeout=5) is not None  # our children: the exit status
        assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children[:3])
        assert started[3].is_running() and children[3].is_running()
    finally:
        for proc in started + children:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(started, timeout=10)


def run_job(jobs, text: str) -> str:
    """Run a job that prints `text` on the head `jobs` talks to; its final status, once it printed."""
    from cluster.submit import _submit_when_ready

    job = _submit_when_ready(jobs, entrypoint=f"python -c \"print('{text}')\"")
    deadline = time.monotonic() + 120
    while not jobs.get_job_status(job).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    assert text in jobs.get_job_logs(job)
    return str(jobs.get_job_status(job))


@pytest.mark.own_ray_cluster
def test_a_job_submitted_to_our_head_and_cluster_down_beside_an_unrelated_head(tmp_path):
    """`vidkd cluster up`, `vidkd submit distill`, wait, read the logs, `vidkd jobs list`, `vidkd
    cluster down`, all beside an unrelated Ray head (another user's job, another test run). The job
    runs the stages up to distill (synthetic data, Ray Data extraction, Ray Train), each as `vidkd
    pipeline` runs it; the whole pipeline, quantization included, is tests/test_pipeline.py's.
    Submission is the same for every stage: the entrypoint is `vidkd <stage>`. Then our head is
    gone, and the unrelated one still runs jobs."""
    import ray
    import yaml
    from mlflow.tracking import MlflowClient

    from cluster import submit
    from cluster.submit import client
    from tests.test_pipeline import pipeline_raw

    ray.shutdown()  # the session's local instance: its CPUs go to the heads this test starts
    raw = pipeline_raw(tmp_path)
    raw["ray"] = {"address": None, "num_cpus": None}
    # A ready-made teacher (the pipeline test covers teacher training).
    raw["teacher_training"] = None
    raw["extract"]["teacher"] = {"kind": "open_clip", "name": "vidkd-vit-micro"}
    raw["data"]["synth"]["videos"] = 20
    config = tmp_path / "submitted.yaml"
    config.write_text(yaml.safe_dump(raw))

    env = {**os.environ, "RAY_ADDRESS": ""}
    # Under the system temp dir itself: Ray's socket paths below its temp dir must fit in 107 bytes.
    other_tmp = tempfile.mkdtemp(prefix="vidkd-ray-")
    other_port, other_dashboard = free_port(), free_port()
    other, port = None, None
    try:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={other_port}",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={other_dashboard}",
                        # Ray's default job-agent port where it is free: our head must then take another
                        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={local.free_port_or(52365)}",
                        "--num-cpus=1", f"--temp-dir={other_tmp}", "--disable-usage-stats"],
                       check=True, env=env, timeout=180, capture_output=True)
        other = local.find_head(other_port, f"http://127.0.0.1:{other_dashboard}")
        other_core = [p for p in other.processes() if p.name() in ("gcs_server", "raylet")]
        assert len(other_core) == 2

        port, dashboard = free_port(), free_port()
        up = subprocess.run(VIDKD + ["cluster", "up", "--num-cpus", "4", "--port", str(port),
                                     "--dashboard-port", str(dashboard)],
                            cwd=ROOT, env=env, timeout=180, capture_output=True, text=True)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        assert f"vidkd cluster down --port {port}" in up.stdout
        [own] = local.recorded_heads()
        own_processes = own.processes()
        names = {p.name() for p in own_processes}
        assert own.port == port and {"gcs_server", "raylet"} <= names and len(own_processes) >= 5, names
        assert not {p.pid for p in own_processes} & {p.pid for p in other.processes()}

        # Its job agent runs beside the other's: the submitted distill job.
        address = f"http://127.0.0.1:{dashboard}"
        job = submit.submit(address, "distill", str(config), tracking_uri=f"sqlite:///{tmp_path / 'job-mlflow.db'}")
        state = submit.wait(address, job, timeout_s=900)
        logs = submit.logs(address, job)
        assert state == "SUCCEEDED", logs[-3000:]
        assert "best student:" in logs, logs[-3000:]
        listed = subprocess.run(VIDKD + ["jobs", "list", "--address", address], capture_output=True, text=True,
                                cwd=ROOT, env=env, check=True).stdout
        assert job in listed and "SUCCEEDED" in listed
        tracking = MlflowClient(f"sqlite:///{tmp_path / 'job-mlflow.db'}")
        runs = tracking.search_runs([e.experiment_id for e in tracking.search_experiments()],
                                    filter_string="tags.`vidkd.stage` = 'distill'")
        [stage_run] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # not its training child
        params = stage_run.data.params  # the key settings, as on a pipeline run: comparable in the runs table
        assert params["student"] == raw["distill"]["student"]["model"] and params["objective"] == "teachclip"
        own_processes = own.processes()  # with the job's workers, which must end with the head

        down = subprocess.run(VIDKD + ["cluster", "down"], cwd=ROOT, env=env, timeout=120, capture_output=True,
                              text=True)
        assert down.returncode == 0 and f"stopped the Ray head on port {port}" in down.stdout, down.stderr[-3000:]
        _, alive = psutil.wait_procs(own_processes, timeout=5)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]  # no init reaps them in some containers
        assert not alive, f"left running: {alive}"
        assert not answers(f"http://127.0.0.1:{dashboard}/api/version") and local.recorded_heads() == []

        assert all(p.is_running() for p in other_core)
        assert run_job(client(other.address), "still here") == "SUCCEEDED"

        again = subprocess.run(VIDKD + ["cluster", "down"], cwd=ROOT, env=env, timeout=60, capture_output=True,
                               text=True)
        assert again.returncode == 0 and "no Ray head started by `vidkd cluster up` is running" in again.stdout
    finally:
        if port is not None and any(head.port == port for head in local.recorded_heads()):  # a failure above
            subprocess.run(VIDKD + ["cluster", "down", "--port", str(port)], cwd=ROOT, env=env, timeout=120)
        if other is not None:
            local.stop_head(other)
        shutil.rmtree(other_tmp, ignore_errors=True)
