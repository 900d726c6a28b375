"""The whole workflow on a tiny config: as one command, and through the MLflow server and UI. (As a
Ray job submitted to a local head: tests/test_cluster_local.py.)"""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from pathlib import Path

import pytest

from jobs.pipeline import run_pipeline
from tests.conftest import page_text, tiny_config


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


def api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), None)
