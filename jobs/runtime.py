"""Starting or joining Ray, and the few facts about the cluster the stages size themselves by."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from core.config import RayConfig

log = logging.getLogger("vidkd")


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join the cluster in `cfg.address` (or $RAY_ADDRESS), else start a new local instance.

    `auto` joins the cluster already running on this machine (`vidkd cluster up`, `ray start`).
    Without an address a fresh instance is started even when one is running: a stage must not
    land on some other cluster by accident, with other CPU counts than it was configured for.
    A local instance binds its dashboard to 127.0.0.1. Inside a Ray job (`vidkd submit`) Ray sets
    $RAY_ADDRESS and the job's own cluster is joined."""
    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Workers log at WARNING, as the driver does: no INFO lines from libraries (open_clip's
    # model-building steps) in every worker; the stages report their progress at WARNING.
    logging_config = ray.LoggingConfig(encoding="TEXT", log_level="WARNING")
    if address:
        ray.init(address=address, log_to_driver=True, logging_config=logging_config)
        return
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus,
        include_dashboard=True,  # Ray Train polls the state API (served by the dashboard) for its clean-up
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
        logging_config=logging_config,
    )


def quiet_training_worker() -> None:
    """In a training worker: no per-report dump of every metric from Ray Train's context, whose
    logger is named after its file. (The datasets it reads carry their own no-progress-bar
    context from `jobs.distill.split_datasets`.)"""
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # Ray Train V1, or the module moved: only noise is at stake
        pass


def storage_path(path: str) -> str:
    """Where Ray Train and Tune keep checkpoints: a URI (s3://, gs://) as given, a local path made
    absolute (workers do not share the driver's working directory)."""
    return path if "://" in path else str(Path(path).resolve())


def run_path(storage: str, name: str) -> str:
    """A Ray Train or Tune run's directory under `storage_path(...)` (a URI or a local path)."""
    return f"{storage.rstrip('/')}/{name}"


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def want_gpu(setting: bool | str) -> bool:
    """`auto` means: use GPUs when the cluster has them."""
    return cluster_gpus() > 0 if setting == "auto" else bool(setting)
