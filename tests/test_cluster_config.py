"""ray_cluster.yaml is a config Ray's own launcher accepts."""

import copy
from pathlib import Path

import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

CONFIG = Path(__file__).resolve().parent.parent / "ray_cluster.yaml"


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
