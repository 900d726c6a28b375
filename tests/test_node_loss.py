"""Nodes that die under a running job, on a real multi-node Ray cluster on this machine: a head
(the driver's node, no CPUs for work) and worker nodes, each a raylet with its own resources and
object store (`ray.cluster_utils.Cluster`). In each test a worker node that holds part of the job
is removed, its processes killed, while the job runs."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.parquet as pq
import pytest
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from core.config import RayConfig, TeacherConfig
from core.datasets import read_manifest
from jobs.trainer import STATE_FILE
from tests.conftest import tiny_config
from tests.test_pipeline import free_port, pipeline_raw

pytestmark = pytest.mark.multinode

WORKER_CPUS = 2  # per worker node: a training worker and the Ray Data tasks that feed it fit on one
TRIAL_ACTOR = "ImplicitFunc"  # the actor of a Tune function trainable


def add_worker_node(cluster):
    return cluster.add_node(num_cpus=WORKER_CPUS)


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes, this process its driver. These tests run last (conftest), so
    the session's local instance, if one was started, is shut down first: a driver joins one
    cluster at a time. The cluster's files and address file stay in a directory of its own."""
    import ray
    from ray.cluster_utils import Cluster

    from jobs.runtime import init_ray

    if ray.is_initialized():
        ray.shutdown()
    with (tempfile.TemporaryDirectory(prefix="vkc", dir="/tmp", ignore_cleanup_errors=True) as short,
          pytest.MonkeyPatch.context() as env):
        env.setenv("RAY_TMPDIR", short)
        Path(short, "ray").mkdir()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",  # the state API, for Ray Train
            "dashboard_port": free_port(), "temp_dir": f"{short}/ray"})
        try:
            env.setenv("RAY_ADDRESS", cluster.address)  # the processes of every node find this cluster, no other
            for _ in range(2):
                add_worker_node(cluster)
            init_ray(RayConfig(address=cluster.address))
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


def _node_of(class_name: str, cluster) -> object | None:
    """The worker node (a `Cluster` node) where a live actor whose class name starts so runs."""
    from ray.util.state import list_actors

    for actor in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")], limit=1000):
        if actor.class_name.startswith(class_name):
            for node in cluster.worker_nodes:
                if node.node_id == actor.node_id:
                    return node
    return None


@contextlib.contextmanager
def remove_node_when(cluster, ready: Callable[[], bool], actor_class: str, timeout: float = 300) -> Iterator[dict]:
    """In the background: once `ready()` holds, remove the worker node that runs an `actor_class`
    actor (the job's work moves to whichever node has room). Yields a dict that says which node
    went. After the job a fresh node takes its place, so that the next test has two again (a node
    starts only from the main thread: it installs signal handlers)."""
    what: dict = {}
    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline:
            node = _node_of(actor_class, cluster) if ready() else None
            if node is not None:
                what["removed"] = node.node_id
                cluster.remove_node(node, allow_graceful=False)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield what
    finally:
        stop.set()
        thread.join()
        if "removed" in what:
            add_worker_node(cluster)


@pytest.fixture(scope="module")
def cluster_table(cluster, synth_dataset, tmp_path_factory):
    """The session's teacher table, built on this cluster (not on a local instance started only for it)."""
    from jobs.extract import run_extract

    teacher = TeacherConfig(kind="open_clip", name="vidkd-vit-micro")
    cfg = tiny_config(tmp_path_factory.mktemp("cluster-table"), synth_dataset, extract={"teacher": teacher.model_dump()})
    return cfg, run_extract(cfg)


def test_distill_continues_on_the_remaining_nodes(cluster, cluster_table, tmp_path, tracking_dir):
    """The node of the training worker dies after the first epoch's checkpoint: Ray Train starts the
    worker group again on another node, from that checkpoint, and the training finishes. Its MLflow
    run has each epoch once."""
    from jobs.distill import run_distill
    from jobs.tracking import RunLogger

    cfg, table = cluster_table
    distill = cfg.distill.model_copy(update={"epochs": 3, "num_workers": 1, "cpus_per_worker": 1, "max_failures": 2,
                                             "storage_dir": str(tmp_path / "train")})
    run = RunLogger.create("node-loss", cfg.tracking, output_dir=str(tracking_dir))
    # Ray Train's record of a registered checkpoint (a checkpoint's files appear before it is registered)
    checkpointed = lambda: any(Path(distill.storage_dir).rglob(CHECKPOINT_MANAGER_SNAPSHOT_FILENAME))  # noqa: E731
    with remove_node_when(cluster, checkpointed, "RayTrainWorker") as what:
        result = run_distill(cfg, table.table_dir, distill=distill, run=run)
    assert "removed" in what, "the training ended before its node could be removed"
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    history = run.client.get_metric_history(run.run_id, "val_t2v_R1")
    assert sorted(m.step for m in history) == [0, 1, 2], "each epoch once in the MLflow run"
    assert run.client.get_run(run.run_id).info.status == "RUNNING"  # the caller's run, still open


def test_extract_commits_every_good_video_once(cluster, synth_dataset, tmp_path):
    """The node of a teacher actor dies once the first Parquet part is written: Ray Data restarts the
    actor and retries its tasks elsewhere. The committed table holds every video of the manifest
    exactly once, and no failure."""
    from jobs.extract import run_extract

    teacher = TeacherConfig(kind="open_clip", name="vidkd-vit-micro")
    cfg = tiny_config(tmp_path, synth_dataset, extract={"teacher": teacher.model_dump(), "num_actors": 2,
                                                        "decode_batch_size": 2, "encode_batch_size": 2})
    from ray.util.state import list_tasks

    def encoded() -> bool:
        tasks = list_tasks(address=cluster.address, filters=[("state", "=", "FINISHED")], limit=10000)
        return sum(t.name.startswith("MapWorker") for t in tasks) >= 2

    with remove_node_when(cluster, encoded, "MapWorker") as what:
        result = run_extract(cfg)
    assert "removed" in what, "the extract ended before a node could be removed"
    ids = [i for part in sorted(Path(result.table_dir).glob("part-*.parquet"))
           for i in pq.read_table(part, columns=["video_id"])["video_id"].to_pylist()]
    expected = sorted(r.video_id for r in read_manifest(synth_dataset))
    assert sorted(ids) == expected, "every video exactly once"
    assert result.failures == []


def test_tune_restarts_the_lost_trials_from_their_checkpoints(cluster, cluster_table, tmp_path):
    """The node of a running trial dies once a trial has a checkpoint: Tune starts the trials it
    held again from their last checkpoints, and the search ends with every configured trial run to
    its last epoch (FIFO: none stopped early), each epoch reported once."""
    from core.config import TuneConfig
    from jobs.tune import run_tune

    cfg, table = cluster_table
    cfg = cfg.model_copy(update={
        "tune": TuneConfig(num_samples=3, max_concurrent=2, max_epochs=3, scheduler="fifo", workers_per_trial=1,
                           storage_dir=str(tmp_path / "tune")),
        "distill": cfg.distill.model_copy(update={"max_failures": 2}),
        "output_dir": str(tmp_path / "runs"),
    })
    checkpointed = lambda: any((tmp_path / "tune").rglob(STATE_FILE))  # noqa: E731
    with remove_node_when(cluster, checkpointed, TRIAL_ACTOR) as what:
        result = run_tune(cfg, table.table_dir)
    assert "removed" in what, "the search ended before a trial's node could be removed"
    assert len(result.trials) == 3 and result.failed_trials == 0
    assert [t["epochs"] for t in result.trials] == [3, 3, 3]
    assert [len(t["curve"]) for t in result.trials] == [3, 3, 3], "an epoch was reported twice: a trial started over"


def test_a_killed_pipeline_and_a_second_one_on_its_cache_finish_with_one_of_each(cluster, tmp_path):
    """A pipeline's driver is killed while it trains its teacher. Started again, at the same moment
    as a second pipeline on the same cache, the two finish with one table per key and one training
    per model: neither repeats a stage that was finished (each waits while the other builds one,
    then skips it), and the killed training continues from its checkpoint."""
    import signal
    import subprocess
    import sys

    import yaml


    raw = pipeline_raw(tmp_path)
    raw["teacher_training"]["distill"]["epochs"] = 3
    raw["ray"] = {"address": cluster.address}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    logs = []

    def pipeline(name: str) -> subprocess.Popen:
        logs.append(tmp_path / f"{name}.log")
        return subprocess.Popen([sys.executable, "-m", "cluster.cli", "pipeline", "--config", "pipeline.yaml"],
                                cwd=tmp_path, env={**env, "PYTHONPATH": str(Path(__file__).parents[1])},
                                stdout=logs[-1].open("w"), stderr=subprocess.STDOUT)

    stages, storage = tmp_path / "runs" / "stages", Path(raw["teacher_training"]["distill"]["storage_dir"])
    first = pipeline("first")
    deadline = time.monotonic() + 300
    # killed once the first epoch's checkpoint is registered: its line is printed before the
    # checkpoint is reported, and Ray Train registers it after (its snapshot file); killed in
    # between, the teacher has nothing to resume from (a window a loaded machine hit)
    checkpointed = lambda: any((tmp_path / storage).rglob(CHECKPOINT_MANAGER_SNAPSHOT_FILENAME))  # noqa: E731
    while not ("distill epoch 1/3" in logs[0].read_text() and checkpointed()) and first.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, f"the pipeline ended before its teacher's first epoch: {logs[0].read_text()[-3000:]}"
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in stages.glob("*.json")}
    assert [n.split("-")[0] for n in done_before] == ["data"], done_before

    again, second = pipeline("again"), pipeline("second")
    for proc, log_file in zip((again, second), logs[1:]):
        assert proc.wait(timeout=600) == 0, log_file.read_text()[-3000:]
    texts = [log_file.read_text() for log_file in logs[1:]]
    assert {p.name: p.stat().st_mtime_ns for p in stages.glob("*.json") if p.name in done_before} == done_before, \
        "a finished stage was built again"
    records = sorted(p.name.rsplit("-", 1)[0] for p in stages.glob("*.json"))
    assert records == ["data", "distill", "distill-no-teacher", "index", "quantize", "teacher"], records
    for label in records:  # built by one of the two, skipped by the other (by both, for data)
        skips = sum(f"vidkd.pipeline: {label}: skipped" in text for text in texts)
        assert skips == (2 if label == "data" else 1), (label, skips)
    assert sum("distill: resumed from the checkpoint of epoch 1" in text for text in texts) == 1, "the teacher's"
    tables = [p for p in Path(raw["extract"]["cache_dir"]).iterdir() if not p.name.startswith(".")]
    assert len(tables) == 2, f"a frames table for the teacher's training and the teacher's table: {tables}"
    assert sum(log_file.read_text().count("extract: wrote") for log_file in logs) == 2, "each table built once"
    assert sorted(p.name.rsplit("-", 1)[0] for p in storage.iterdir()) == ["distill", "distill-no-teacher", "teacher"]
    assert all("Test split:" in text for text in texts), "each prints the closing table"
