"""Starting Ray: a stage without an address gets its own local instance."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import ray
from core.config import RayConfig
from jobs.runtime import init_ray
init_ray(RayConfig(num_cpus=1))
print("CPUS", ray.cluster_resources()["CPU"])
ray.shutdown()
"""


def test_no_address_starts_a_local_instance_even_when_a_head_is_recorded():
    """`ray start` records its head in <ray temp>/ray_current_cluster, and a bare ray.init() joins
    it, where num_cpus is refused. Without an address a stage must start its own instance with the
    CPUs it was configured for, whatever else runs on the machine (CI once failed exactly so)."""
    # Ray's socket paths are long: a short temporary directory keeps them under the Unix limit.
    with tempfile.TemporaryDirectory(prefix="vk", dir="/tmp") as short:
        (Path(short) / "ray").mkdir()
        (Path(short) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # no head answers there
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=short, PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CPUS 1.0" in done.stdout
