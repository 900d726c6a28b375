"""Starting or joining Ray, and the few facts about the cluster the stages size themselves by."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import socket
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import ray
import yaml

from core.config import RayConfig

log = logging.getLogger("vidkd")

# `--verbose`: set in the driver's environment, which the workers of a local instance inherit.
VERBOSE_ENV = "VIDKD_VERBOSE"


def set_verbose(verbose: bool) -> None:
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def log_level() -> int:
    """The stages report their progress at WARNING; libraries' INFO lines only at `--verbose`."""
    return logging.INFO if verbose() else logging.WARNING


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
    # Workers log at the driver's level: no INFO lines from libraries (open_clip's model-building
    # steps) in every worker unless `--verbose`.
    level = log_level()
    logging_config = ray.LoggingConfig(encoding="TEXT", log_level=logging.getLevelName(level))
    root_handlers = list(logging.getLogger().handlers)
    if address:
        ray.init(address=address, log_to_driver=True, logging_config=logging_config)
    else:
        if not verbose():
            logging.getLogger(_AUTH_LOGGER).addFilter(_no_token_auth_notice)
        # One node that no cloud reclaims: Ray Train's per-training preemption watcher (an actor
        # polling for node drains, which also logs a C++ error line each time it starts) has
        # nothing to watch.
        with (quiet_ray_data_processes(), temporary_env(RAY_TRAIN_PREEMPTION_ENV, "0"), own_address_for_processes(),
              quiet_env("PYTHONWARNINGS", f"ignore:{_RAY_TRAIN_DEPRECATION}")):
            ray.init(
                address="local",
                num_cpus=cfg.num_cpus,
                include_dashboard=True,  # Ray Train polls the state API (served by the dashboard) for its clean-up
                dashboard_host="127.0.0.1",
                log_to_driver=True,
                configure_logging=True,
                logging_level=level,
                logging_config=logging_config,
            )
    # The logging config also adds a handler to the driver's root logger: with the CLI's own, every
    # line of the driver would be printed twice.
    root = logging.getLogger()
    if root_handlers:
        for handler in root.handlers[:]:
            if handler not in root_handlers:
                root.removeHandler(handler)
    quiet_ray_data()


@contextlib.contextmanager
def own_address_for_processes() -> Iterator[None]:
    """Around the start of a local instance: its GCS on a port chosen here, and that address as
    $RAY_ADDRESS in the environment its processes inherit. Ray's state API, called without an
    address inside a worker (Ray Train's placement-group cleaner polls it), otherwise looks for
    the instance among every GCS running on the machine, and with another user's beside it fails
    with "Found multiple active Ray instances" (a traceback, and a cleaner that no longer runs).
    This process's own environment is as it was after: a later `init_ray` must not join an
    instance that has been shut down."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    saved = {name: os.environ.get(name) for name in (_GCS_PORT_ENV, "RAY_ADDRESS")}
    os.environ[_GCS_PORT_ENV] = str(port)
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
RAY_TRAIN_PREEMPTION_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray Train builds Ray Data options with one Ray deprecates, in the driver and in its actors (the
# split coordinator): a warning per training. As a PYTHONWARNINGS filter the processes of a local
# instance inherit it.
_RAY_TRAIN_DEPRECATION = "`ExecutionOptions.exclude_resources` is deprecated"


def _no_token_auth_notice(record: logging.LogRecord) -> bool:
    """Ray's notice, at each local start, that token authentication is on (the default it keeps)."""
    return not record.getMessage().startswith("Token authentication is enabled")


@contextlib.contextmanager
def temporary_env(name: str, value: str) -> Iterator[None]:
    """`name=value` in the environment for the block (a local instance's processes inherit what
    is set while it starts), unless the user set `name`; gone again after, for whatever this
    process starts later."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def quiet_env(name: str, value: str) -> contextlib.AbstractContextManager:
    """`temporary_env` unless `--verbose`: for a setting that only hides a library's output."""
    return contextlib.nullcontext() if verbose() else temporary_env(name, value)


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """Unless `--verbose`: what the block prints, to stdout or stderr, is held back, and shown
    only if the block raises. For a library whose first import prints a banner and notices. A
    logging handler made inside the block (a library's `basicConfig`) writes to the real stream
    after it."""
    if verbose():
        yield
        return
    held = {"stdout": io.StringIO(), "stderr": io.StringIO()}
    try:
        with contextlib.redirect_stdout(held["stdout"]), contextlib.redirect_stderr(held["stderr"]):
            yield
    except BaseException:
        sys.stderr.write(held["stdout"].getvalue() + held["stderr"].getvalue())
        raise
    finally:
        real = {id(buffer): getattr(sys, name) for name, buffer in held.items()}
        named = logging.root.manager.loggerDict.values()  # placeholders of dotted names are not loggers
        loggers = [logging.root, *(lg for lg in named if isinstance(lg, logging.Logger))]
        for handler in {h for lg in loggers for h in lg.handlers}:
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in real:
                handler.setStream(real[id(handler.stream)])


def import_quant_backend() -> None:
    """gptqmodel, imported once before a stage quantizes or loads an INT4 student: its first
    import prints a banner, a version table and environment notices, shown only at `--verbose`,
    and its own logger ("logbar") logs at the stages' level from then on."""
    from core.quant import import_backend

    with quiet_output():
        import_backend()
    logging.getLogger("logbar").setLevel(log_level())


def quiet_ray_data() -> None:
    """Unless `--verbose`: no execution plan each time a dataset is read (every epoch, for each
    split; the datasets made from here on copy this context, wherever they are read), no line
    each time one is done or written in this process (the progress bars say so), and no warning
    that a dataset "will hang" for want of CPUs, which Ray Data gives whenever all CPUs are busy at
    the moment it starts (training workers, the teacher's actors finishing) and which then passes,
    nor that a dataset read without a bar (a training split) shows none, nor that progress is
    logged, not drawn, when stdout is no terminal."""
    from ray.data import DataContext

    DataContext.get_current().print_on_execution_start = verbose()
    if not verbose():  # Ray Train's own use of a Ray Data option it deprecates, once per training
        warnings.filterwarnings("ignore", message=re.escape(_RAY_TRAIN_DEPRECATION))
    for name in ("ray.data._internal.execution.streaming_executor", "ray.data.dataset",
                 "ray.data._internal.datasource.parquet_datasource"):  # its estimates at each read
        logging.getLogger(name).setLevel(logging.NOTSET if verbose() else logging.WARNING)
    for name, noise in (("ray.data.dataset", _no_cpu_warning), ("ray.data._internal.progress", _no_bars_warning)):
        if verbose():
            logging.getLogger(name).removeFilter(noise)
        else:
            logging.getLogger(name).addFilter(noise)


RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"


@contextlib.contextmanager
def quiet_ray_data_processes() -> Iterator[None]:
    """Around the start of a local instance, unless `--verbose` (or a logging config of the
    user's own): Ray Data's console lines at WARNING in every process its workers start (they
    inherit the environment of that moment), as `quiet_ray_data` sets them in this one. Otherwise
    the coordinator of each training split prints "Dataset ... execution finished" every epoch,
    and "Progress bars disabled" once. Ray Data's own default config with the console handler's
    level raised: its session log file still gets everything. The variable is gone again after,
    so that nothing started later from this process (a second instance, `--verbose`) inherits it."""
    if verbose() or os.environ.get(RAY_DATA_LOGGING_ENV):
        yield
        return
    from ray.data._internal.logging import DEFAULT_CONFIG

    config = copy.deepcopy(DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "WARNING"
    config["loggers"]["ray.data._internal.progress"] = {"level": "ERROR"}  # "Progress bars disabled"
    # read by each worker when it first imports Ray Data, for the life of the instance: kept (the
    # same content every time, replaced whole so that a concurrent start never reads half of it)
    path = Path(tempfile.gettempdir()) / f"vidkd-ray-data-logging-{os.getuid()}.yaml"
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, delete=False) as part:
        part.write(yaml.safe_dump(config))
    os.replace(part.name, path)
    with temporary_env(RAY_DATA_LOGGING_ENV, str(path)):
        yield


def _no_cpu_warning(record: logging.LogRecord) -> bool:
    return "does not have any available CPUs" not in record.getMessage()


def _no_bars_warning(record: logging.LogRecord) -> bool:
    """Ray Data's warning, once, that a dataset read without a bar (a training split's) shows none,
    and its notice, once, that progress is logged because stdout is no terminal (the progress then
    logged comes from a logger of its own, below this one, and stays)."""
    message = record.getMessage()
    return not (message.startswith("Progress bars disabled") or message.startswith("Progress will be logged"))


def quiet_training_worker() -> None:
    """In a training worker. Ray Train sets the worker's root logger to INFO, so libraries' INFO
    lines (open_clip's, at each model build) would show: back to the driver's level. And no
    per-report dump of every metric from Ray Train's context, whose logger is named after its
    file. (The datasets it reads carry their own no-progress-bar context from
    `jobs.tables.split_datasets`.)"""
    logging.getLogger().setLevel(log_level())
    quiet_ray_data()
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
