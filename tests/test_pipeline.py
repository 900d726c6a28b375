"""The whole workflow on a tiny config: as one command, through the MLflow server and UI, and as
a Ray job submitted to a local head."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from jobs.pipeline import run_pipeline
from tests.conftest import page_text, tiny_config

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipeline_raw(tmp: Path) -> dict:
    data_root = tmp / "data"
    cfg = tiny_config(tmp, data_root / "manifest.jsonl")
    raw = cfg.model_dump(mode="json")
    raw["data"]["synth"] = {"videos": 30, "seed": 1, "fps": 6, "width": 64, "height": 48, "min_seconds": 1.0,
                            "max_seconds": 2.0, "val_fraction": 0.2, "test_fraction": 0.2,
                            "pool_fraction": 0.2}
    raw["teacher_training"] = {"distill": {**raw["distill"], "epochs": 1, "num_workers": 1, "teacher_mode": "none",
                                           "train_splits": ["train", "pool"],
                                           "loss": {**raw["distill"]["loss"], "objective": "none"}}}
    raw["distill"].update(epochs=1, num_workers=1)
    raw["quantize"]["calib_samples"] = 16
    return raw


@pytest.fixture(scope="module")
def pipeline_run(ray_local, tmp_path_factory):
    from core.config import config_from_dict

    tmp = tmp_path_factory.mktemp("pipeline")
    cwd = os.getcwd()
    os.chdir(tmp)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        cfg = config_from_dict(pipeline_raw(tmp))
        summary = run_pipeline(cfg)
        again = run_pipeline(cfg)  # every stage's output exists now
    finally:
        os.chdir(cwd)
    return tmp, cfg, summary, again


def test_pipeline_summary_and_skips(pipeline_run):
    tmp, cfg, summary, again = pipeline_run
    assert set(summary["rows"]) == {"teacher", "student", "student (no distillation)", "student INT4"}
    for row in summary["rows"].values():
        assert 0 <= row["t2v_R1"] <= 100
    assert summary["rows"]["student INT4"]["size_mb"] < summary["rows"]["student"]["size_mb"]
    assert "R@1" in summary["text"] and "ms/video" in summary["text"]
    lines = summary["text"].splitlines()
    assert lines[0].startswith("Test split: 6 videos, 18 caption queries")
    assert lines[-1].startswith("Expected run-to-run spread of R@1")
    assert again["rows"]["student"]["t2v_R1"] == summary["rows"]["student"]["t2v_R1"]
    stages = sorted(p.name.split("-")[0] for p in (tmp / "runs" / "stages").glob("*.json"))
    assert stages == ["data", "distill", "distill", "quantize", "teacher"]


def test_mlflow_server_shows_the_run_tree(pipeline_run):
    """`vidkd ui`'s server over the pipeline's SQLite store, checked through MLflow's REST API,
    then the experiment page in headless Chromium."""
    tmp, cfg, _, _ = pipeline_run
    port = free_port()
    from cluster.local import start_mlflow_server, stop_process_group

    server = start_mlflow_server(str(tmp / "runs"), port=port)
    try:
        base = f"http://127.0.0.1:{port}"
        experiment = api(base, "experiments/get-by-name?experiment_name=vidkd")["experiment"]
        runs = api(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        by_id = {r["info"]["run_id"]: r for r in runs}
        names = {r["info"]["run_id"]: tag(r, "mlflow.runName") for r in runs}
        parents = [r for r in runs if tag(r, "mlflow.runName") == "pipeline"]
        assert len(parents) == 2  # the run and the re-run
        children = {names[i] for i, r in by_id.items() if tag(r, "mlflow.parentRunId") == parents[-1]["info"]["run_id"]}
        assert {"teacher", "extract", "distill", "distill-no-teacher", "quantize"} <= children

        text = page_text(f"{base}/#/experiments/{experiment['experiment_id']}/runs", tmp / "chromium")
        if text is None:
            pytest.skip("chromium is not installed (make test installs it)")
        # The runs table lists the parent runs (children fold under them) and counts every run.
        assert "Training runs" in text and "pipeline" in text, text[:2000]
        assert f"{len(runs)} matching runs" in text, text[:2000]
    finally:
        stop_process_group(server)


@pytest.mark.own_ray_cluster
def test_submit_pipeline_to_a_local_head(tmp_path):
    """`vidkd cluster up`, `vidkd submit distill`, wait, read the logs, `vidkd cluster down`. The
    job runs the stages up to distill (synthetic data, Ray Data extraction, Ray Train), each as
    `vidkd pipeline` runs it; the whole pipeline, quantization included, is the test above's.
    Submission is the same for every stage: the entrypoint is `vidkd <stage>`."""
    import ray

    ray.shutdown()  # the session's local instance: its CPUs go to the head this test starts
    raw = pipeline_raw(tmp_path)
    raw["ray"] = {"address": None, "num_cpus": None}
    # A ready-made teacher (the pipeline above covers teacher training).
    raw["teacher_training"] = None
    raw["extract"]["teacher"] = {"kind": "open_clip", "name": "vidkd-vit-micro"}
    raw["data"]["synth"]["videos"] = 20
    config = tmp_path / "submitted.yaml"
    config.write_text(yaml.safe_dump(raw))
    dashboard = free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    vidkd = [sys.executable, "-m", "cluster.cli"]
    subprocess.run(vidkd + ["cluster", "up", "--num-cpus", "4", "--dashboard-port", str(dashboard),
                            "--port", str(free_port())], check=True, cwd=ROOT, env=env, timeout=180)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        from cluster import submit

        job = submit.submit(address, "distill", str(config),
                            tracking_uri=f"sqlite:///{tmp_path / 'job-mlflow.db'}")
        state = submit.wait(address, job, timeout_s=900)
        logs = submit.logs(address, job)
        assert state == "SUCCEEDED", logs[-3000:]
        assert "best student:" in logs, logs[-3000:]
        listed = subprocess.run(vidkd + ["jobs", "list", "--address", address], capture_output=True, text=True,
                                cwd=ROOT, env=env, check=True).stdout
        assert job in listed and "SUCCEEDED" in listed
        from mlflow.tracking import MlflowClient

        tracking = MlflowClient(f"sqlite:///{tmp_path / 'job-mlflow.db'}")
        runs = tracking.search_runs([e.experiment_id for e in tracking.search_experiments()],
                                    filter_string="tags.`vidkd.stage` = 'distill'")
        [stage_run] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # not its training child
        params = stage_run.data.params  # the key settings, as on a pipeline run: comparable in the runs table
        assert params["student"] == raw["distill"]["student"]["model"] and params["objective"] == "teachclip"
    finally:
        subprocess.run(vidkd + ["cluster", "down"], cwd=ROOT, env=env, timeout=120)


def api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), None)
