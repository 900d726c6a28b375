"""Shared fixtures: one local Ray instance per session, a tiny synthetic dataset, MLflow SQLite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Ray Train's controller polls its workers every 2 s, and a worker's next report waits until the
# last one was collected: a test's epochs take a fraction of that, so every epoch, start and end
# of a training would wait for the poll. (Set before the session's Ray starts: its workers inherit it.)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session. Four logical CPUs on a 2-core machine:
    Ray Data's tasks and the training workers must be able to run side by side."""
    import ray

    from core.config import RayConfig
    from jobs.runtime import init_ray

    if not ray.is_initialized():
        init_ray(RayConfig(num_cpus=4))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """40 short synthetic driving clips at 64x48 (some shorter than 8 frames). Returns the manifest."""
    from core.config import SynthConfig
    from core.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(videos=40, seed=3, fps=6, width=64, height=48, min_seconds=1.0, max_seconds=2.5,
                      val_fraction=0.2, test_fraction=0.2)
    return generate_dataset(root, cfg, progress=False)


@pytest.fixture()
def tracking_dir(tmp_path, monkeypatch) -> Path:
    """A fresh MLflow SQLite store for one test (the default location, under tmp_path)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "runs"


def page_dom(url: str, profile: Path) -> str | None:
    """The page's DOM after its scripts ran, as headless Chromium renders it; None where Chromium
    is not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return None
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    ).stdout


def page_text(url: str, profile: Path) -> str | None:
    """The page's text as headless Chromium renders it; None where Chromium is not installed."""
    dom = page_dom(url, profile)
    if dom is None:
        return None
    return " ".join(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", dom, flags=re.S)).split())


def tiny_config(tmp: Path, manifest: Path, **sections):
    """A VidkdConfig sized for tests: micro models, 4 frames at 32 px, 2 epochs."""
    from core.config import config_from_dict

    raw = {
        "data": {"manifest": str(manifest), "root": str(manifest.parent)},
        "extract": {"num_frames": 4, "image_size": 32, "cache_dir": str(tmp / "features"), "decode_batch_size": 8,
                    "encode_batch_size": 8, "num_actors": 1},
        "distill": {"student": {"model": "vidkd-vit-micro"}, "epochs": 2, "batch_size": 8, "num_workers": 2,
                    "lr": 5e-4, "lr_new": 1e-3, "storage_dir": str(tmp / "train"), "eval_batch_size": 16},
        "tune": {"storage_dir": str(tmp / "tune")},
        "quantize": {"calib_samples": 16},
        "output_dir": str(tmp / "runs"),
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


@pytest.fixture(scope="session")
def teacher_table(ray_local, synth_dataset, tmp_path_factory):
    """One feature table with a micro open_clip teacher, shared by the distill, tune and quantize tests."""
    from core.config import TeacherConfig
    from jobs.extract import run_extract

    tmp = tmp_path_factory.mktemp("teacher-table")
    teacher = TeacherConfig(kind="open_clip", name="vidkd-vit-micro")
    cfg = tiny_config(tmp, synth_dataset, extract={"teacher": teacher.model_dump()})
    return cfg, run_extract(cfg)


@pytest.fixture(scope="session")
def plain_student(teacher_table, tmp_path_factory):
    """A micro student trained for one epoch with plain InfoNCE on one worker: (checkpoint, result)."""
    from jobs.distill import run_distill

    cfg, table = teacher_table
    plain = cfg.distill.model_copy(update={
        "epochs": 1, "num_workers": 1, "teacher_mode": "none",
        "storage_dir": str(tmp_path_factory.mktemp("plain-student")),
        "loss": cfg.distill.loss.model_copy(update={"objective": "none"})})
    result = run_distill(cfg, table.table_dir, distill=plain, name="plain")
    return result.checkpoint, result


@pytest.fixture(autouse=True)
def own_ray_heads(request, tmp_path_factory, monkeypatch):
    """A test marked `own_ray_cluster` records the heads it starts with `vidkd cluster up` in a state
    directory of its own: its `vidkd cluster down` finds those and no other test run's, and a head
    it leaves running (a failure before `down`) is stopped after it."""
    if request.node.get_closest_marker("own_ray_cluster") is None:
        yield
        return
    from cluster import local

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    yield
    for head in local.recorded_heads():
        local.stop_head(head)


def pytest_collection_modifyitems(config, items):
    """Every test that uses the session's Ray instance, or a head of its own, is marked `ray`
    (`make test-fast` leaves them out). Tests marked `own_ray_cluster` start a Ray head of their
    own and stop only that one. They run last, when the session's local instance is no longer
    needed: a head beside it would share the machine's few CPUs with it. Last of all the tests
    marked `multinode`, whose cluster this process joins instead."""
    for item in items:
        if "ray_local" in item.fixturenames or item.get_closest_marker("own_ray_cluster") \
                or item.get_closest_marker("multinode"):
            item.add_marker(pytest.mark.ray)
    # the multi-node tests last of all: their driver leaves the session's instance to join their cluster
    items.sort(key=lambda item: (item.get_closest_marker("multinode") is not None,
                                 item.get_closest_marker("own_ray_cluster") is not None))
