"""ray_cluster.yaml is a config Ray's own launcher accepts."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

from cluster.submit import job_local_outputs

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "ray_cluster.yaml"


def test_cluster_yaml_passes_ray_launcher_validation():
    raw = yaml.safe_load(CONFIG.read_text())
    validate_config(fillout_defaults(copy.deepcopy(raw)))  # Ray's JSON schema and its own checks

    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    head, gpu = types[raw["head_node_type"]], types["gpu_worker"]
    assert head["resources"]["GPU"] == 0 and gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and raw["max_workers"] >= gpu["max_workers"]
    assert any("pip install -e" in c for c in raw["setup_commands"])
    assert any("--head" in c and "--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in raw["worker_start_ray_commands"])
    assert "type: local" in CONFIG.read_text(), "the on-prem variant is documented in comments"


def test_submit_names_what_would_stay_in_the_job_working_dir(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    found = job_local_outputs(str(ROOT / "configs/demo.yaml"))
    assert "output_dir 'runs' is relative: it lands in the job's temporary working directory" in found
    assert any(line.startswith("no MLflow tracking URI") for line in found) and len(found) == 5
    # The real-scale preset keeps everything on shared storage; only MLflow is the user's to give.
    assert job_local_outputs(str(ROOT / "configs/msrvtt.yaml"), tracking_uri="http://mlflow:5000") == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert len(job_local_outputs(str(ROOT / "configs/demo.yaml"))) == 4
    with pytest.raises(ValueError, match="config file not found"):
        job_local_outputs("nope.yaml")


def test_submit_waits_for_a_new_heads_job_agent_and_raises_anything_else(monkeypatch):
    """A head just started refuses jobs with "No available agent" for a few seconds (what the
    dashboard answers until the head's agent registers): submit waits for it; any other refusal,
    or one that outlasts the wait, is raised."""
    from cluster import submit

    monkeypatch.setattr(submit.time, "sleep", lambda s: None)

    class Jobs:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def submit_job(self, **job):
            self.calls += 1
            if self.errors:
                raise RuntimeError(self.errors.pop(0))
            return f"raysubmit_{job['entrypoint']}"

    agent = "Request failed with status code 500: No available agent to submit job, please try again later."
    jobs = Jobs([agent, agent])
    assert submit._submit_when_ready(jobs, entrypoint="x") == "raysubmit_x" and jobs.calls == 3
    with pytest.raises(RuntimeError, match="status code 400"):
        submit._submit_when_ready(Jobs(["Request failed with status code 400: bad runtime_env"]), entrypoint="x")
    with pytest.raises(RuntimeError, match="No available agent"):
        submit._submit_when_ready(Jobs([agent] * 3), wait_s=-1, entrypoint="x")
