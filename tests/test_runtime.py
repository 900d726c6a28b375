"""Starting Ray: a stage without an address gets its own local instance, quiet unless --verbose."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobs.runtime import VERBOSE_ENV, quiet_training_worker

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import ray
from core.config import RayConfig
from jobs.runtime import init_ray
init_ray(RayConfig(num_cpus=1))
print("CPUS", ray.cluster_resources()["CPU"])
ray.shutdown()
"""


@pytest.mark.ray
def test_no_address_starts_a_local_instance_even_when_a_head_is_recorded():
    """`ray start` records its head in <ray temp>/ray_current_cluster, and a bare ray.init() joins
    it, where num_cpus is refused. Without an address a stage must start its own instance with the
    CPUs it was configured for, whatever else runs on the machine."""
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


LOG_PROBE = """
import logging
import ray
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")  # as the CLI does
from core.config import RayConfig
from jobs.runtime import init_ray, log_level
init_ray(RayConfig(num_cpus=1))
import os
print("AFTER START", os.environ.get("RAY_DATA_LOGGING_CONFIG"),  # the workers have it; nothing later inherits it
      os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"))
print("WORKER", ray.get(ray.remote(lambda: os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")).remote()))
# the workers' state API finds this instance, not any other on the machine; the driver's env is as it was
own = ray.get(ray.remote(lambda: os.environ.get("RAY_ADDRESS")).remote()) == ray.get_runtime_context().gcs_address
print("OWN ADDRESS", own, os.environ.get("RAY_ADDRESS"), os.environ.get("RAY_GCS_SERVER_PORT"))
import warnings
from ray.data._internal.execution.interfaces.execution_options import ExecutionOptions, ExecutionResources
with warnings.catch_warnings(record=True) as caught:  # under the filters in place (Ray's: once per module)
    ExecutionOptions(exclude_resources=ExecutionResources.zero())  # as Ray Train builds its options
print("DEPRECATION", len(caught))


@ray.remote
def deprecations():  # Ray Train's split coordinator builds the same options in an actor
    with warnings.catch_warnings(record=True) as caught:
        ExecutionOptions(exclude_resources=ExecutionResources.zero())
    return len(caught)


print("WORKER DEPRECATION", ray.get(deprecations.remote()))
logging.getLogger("vidkd.extract").warning("extract: wrote 3 videos")
logging.getLogger("ray.data.dataset").warning(
    "Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang")
print("ROWS", ray.data.range(3).materialize().count())


@ray.remote(num_cpus=0)
class Worker:  # reads its split as a training worker does, two epochs, in another process
    def read(self, split):
        return sum(len(batch["id"]) for _ in range(2) for batch in split.iter_batches(batch_size=2))


split_ds = ray.data.range(4)
split_ds.context.enable_progress_bars = False
split_ds.materialize()  # here too, without a bar: no warning that there is none
print("SPLIT", ray.get(Worker.remote().read.remote(split_ds.streaming_split(1)[0])))
import tempfile
import pyarrow as pa
import pyarrow.parquet as pq
from core.config import DistillConfig
from jobs.tables import split_datasets
with tempfile.TemporaryDirectory() as table:  # a table's parts, read as a training reads them
    for part in range(2):
        pq.write_table(pa.table({"id": [f"v{part}{i}" for i in range(3)], "split": ["train", "val", "test"]}),
                       f"{table}/part-{part}.parquet")
    splits = split_datasets(table, DistillConfig())
    print("TABLE", {"train": splits.train(0).count(), **{name: splits.split(name).count() for name in ("val", "test")}})
ray.shutdown()
"""


@pytest.mark.ray
@pytest.mark.parametrize("verbose", [False, True])
def test_the_driver_prints_its_lines_once_and_ray_data_quietly_unless_verbose(verbose):
    """Ray's logging config adds a second handler to the driver's root logger; Ray Data prints a
    plan and a closing line whenever a dataset is read (in the driver, and in the coordinator
    process of a worker's split each epoch), and warns that it "will hang" whenever all CPUs are
    busy."""
    with tempfile.TemporaryDirectory(prefix="vk", dir="/tmp") as short:
        # a fresh process as a user starts it: no RAY_AUTH_MODE, which Ray sets in the environment of
        # a process whose local instance it started (this session's), and children then inherit
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", VERBOSE_ENV, "RAY_AUTH_MODE")}
        env.update(RAY_TMPDIR=short, PYTHONPATH=str(ROOT), **({VERBOSE_ENV: "1"} if verbose else {}))
        done = subprocess.run([sys.executable, "-c", LOG_PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=180)
    assert done.returncode == 0 and "ROWS 3" in done.stdout and "SPLIT 8" in done.stdout, done.stderr[-2000:]
    assert "AFTER START None None" in done.stdout
    assert "OWN ADDRESS True None None" in done.stdout, done.stdout[-2000:]
    assert "WORKER 0" in done.stdout, "a local instance's processes run Ray Train without its preemption watcher"
    assert ("Token authentication is enabled" in done.stderr) == verbose  # Ray's notice at each local start
    assert f"\nDEPRECATION {int(verbose)}" in done.stdout and f"WORKER DEPRECATION {int(verbose)}" in done.stdout
    assert done.stderr.count("extract: wrote 3 videos") == 1, done.stderr[-2000:]
    assert ("Execution plan of Dataset" in done.stderr) == verbose, done.stderr[-2000:]
    assert ("execution finished" in done.stderr) == verbose, done.stderr[-2000:]
    assert ("will hang" in done.stderr) == verbose, done.stderr[-2000:]
    assert ("Progress bars disabled" in done.stderr) == verbose, done.stderr[-2000:]
    assert ("Progress will be logged" in done.stderr) == verbose, done.stderr[-2000:]  # stdout is no terminal here
    assert "Total Progress" in done.stderr, "the progress itself is logged"
    assert "TABLE {'train': 2, 'val': 2, 'test': 2}" in done.stdout, done.stdout[-2000:]
    assert "Parquet dataset sampling" not in done.stderr, done.stderr[-2000:]
    assert ("Estimated parquet" in done.stderr) == verbose, done.stderr[-2000:]


@pytest.mark.parametrize("verbose", [False, True])
def test_a_training_worker_shows_no_info_lines_of_model_building_unless_verbose(verbose, monkeypatch):
    """Ray Train leaves a worker's root logger at INFO, where open_clip logs each step of a model
    build."""
    from ray.data import DataContext

    from core.modelzoo import create_clip

    context = DataContext.get_current()
    monkeypatch.setattr(context, "print_on_execution_start", context.print_on_execution_start)
    if verbose:
        monkeypatch.setenv(VERBOSE_ENV, "1")
    else:
        monkeypatch.delenv(VERBOSE_ENV, raising=False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.INFO)  # as Ray Train configures it; restored after
    for name in ("ray.data.dataset", "ray.data._internal.execution.streaming_executor"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "filters", list(logger.filters))
        monkeypatch.setattr(logger, "level", logger.level)
    root.addHandler(handler)
    try:
        quiet_training_worker()
        create_clip("vidkd-vit-micro")
    finally:
        root.removeHandler(handler)
    assert any("Parsing model identifier" in r.getMessage() for r in records) == verbose
    assert context.print_on_execution_start == verbose


QUANT_PROBE = """
import logging
from jobs.runtime import import_quant_backend
import_quant_backend()
import gptqmodel, core.quant.fused
print("LOGBAR", logging.getLevelName(logging.getLogger("logbar").level))
logging.getLogger().warning("AFTER")  # a handler made during the import writes to the real stream
"""


def test_gptqmodel_imports_without_its_banner():
    """gptqmodel's first import prints a banner, a version table and environment notices (on
    stdout and stderr); a stage imports it inside `import_quant_backend`, which holds them back
    unless `--verbose` and then keeps its logger at the stages' level."""
    env = {k: v for k, v in os.environ.items() if k != VERBOSE_ENV}
    env.update(PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", QUANT_PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "LOGBAR WARNING", (done.stdout + done.stderr)[-2000:]
    assert done.stderr.strip() == "WARNING:root:AFTER", done.stderr[-2000:]


def test_spent_checkpoint_copies_of_dead_trainings_are_swept(tmp_path, monkeypatch):
    """A training process killed between writing an epoch's local checkpoint copy and reporting it
    (a stopped trial, a lost node) leaves the copy behind; the next training removes those of
    processes that are gone, and nothing of a live one."""
    import subprocess
    import sys
    import tempfile

    from jobs import trainer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{trainer.CHECKPOINT_PREFIX}{gone.stdout.strip()}-abc"
    alive = tmp_path / f"{trainer.CHECKPOINT_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{trainer.CHECKPOINT_PREFIX}notapid"
    for path in (dead, alive, other):
        path.mkdir()
        (path / "student.pt").write_bytes(b"x")
    trainer.sweep_spent_checkpoints()
    assert not dead.exists() and alive.exists() and other.exists()
