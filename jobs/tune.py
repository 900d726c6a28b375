"""Stage 3 — tune: search distillation temperatures and loss weights with Ray Tune.

    vidkd tune --config configs/demo.yaml [--restart]

Every trial is a distill run on the one feature table (no trial re-extracts): a plain function
trainable running the training loop for single-worker trials, or a driver function launching a
`TorchTrainer` (metrics flow back through `TuneReportCallback`) for multi-worker trials. ASHA
stops weak trials on val R@1 per epoch; Optuna proposes the next ones.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from core.calibration import Calibration, resolve_temperatures
from core.config import DistillConfig, SearchDim, TeacherConfig, VidkdConfig, digest, dump_config
from core.features import TableMeta, read_meta
from jobs.distill import check_table, log_calibration
from jobs.tables import TableSplits, split_datasets
from jobs.trainer import (FIRST_STEP_KEY, RUN_ID_KEY, TARGET_METRIC, LoopSpec, TuneSession, log_epoch, make_trainer,
                          train_loop)
from jobs.plots import metric_vs_params, trial_curves
from jobs.runtime import cluster_cpus, init_ray, quiet_env, run_path, storage_path
from jobs.tracking import RunLogger

log = logging.getLogger("vidkd.tune")
EXCESSIVE_SNAPSHOT_ENV = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"


@dataclass
class TuneResult:
    best_config: VidkdConfig
    best_params: dict[str, float]
    best_metric: float
    config_path: Path
    trials: list[dict[str, Any]]
    trial_epochs: int
    startup_share: float | None = None  # trial start to first step, as a share of trial time
    failed_trials: int = 0  # trials that raised; what they reported before counts
    default_params: dict[str, float] | None = None  # the search's first point: the settings, calibrated
    calibration: Calibration | None = None  # what `auto` temperatures were solved to
    max_concurrent: int = 1  # trials run at once


class TrialTiming(Callback):
    """Wall-clock start-up of each trial: from Tune starting it to its first training step (the
    loop reports when that happened), against the trial's whole time to its last result."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.first_step: dict[str, float] = {}
        self.last_result: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last_result[trial.trial_id] = time.time()
        if FIRST_STEP_KEY in result:
            self.first_step.setdefault(trial.trial_id, result[FIRST_STEP_KEY])

    def timing(self, trial_id: str) -> dict[str, float]:
        start, first, last = (self.started.get(trial_id), self.first_step.get(trial_id),
                              self.last_result.get(trial_id))
        if start is None or first is None or last is None:
            return {}
        return {"startup_s": max(0.0, first - start), "trial_s": max(1e-9, last - start)}


class TrialEpochLogger(Callback):
    """The driver logs each trial's epoch into the trial's MLflow run as Tune takes in the result
    and its checkpoint: once per epoch, also when a trial started again on its checkpoint runs an
    epoch a second time, and also for the epoch at which ASHA stops the trial."""

    def __init__(self, parent: RunLogger) -> None:
        self.parent, self.runs = parent, {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = result.get(RUN_ID_KEY)
        if not run_id:
            return
        if run_id not in self.runs:
            self.runs[run_id] = RunLogger(self.parent.uri, run_id, self.parent.experiment_id)
        log_epoch(self.runs[run_id], {k: v for k, v in result.items() if k not in AUTO_RESULT_KEYS
                                      and isinstance(v, (int, float)) and not isinstance(v, bool)})

    def __getstate__(self) -> dict:
        return {"parent": self.parent, "runs": {}}  # the clients are made again where it is restored


def apply_params(base: DistillConfig, params: dict[str, float]) -> DistillConfig:
    """A distill config with dotted keys (`loss.tau_video`) set from a trial's sample."""
    data = base.model_dump(mode="json")
    for key, value in params.items():
        node, leaf = _slot(data, key)
        node[leaf] = value
    return DistillConfig.model_validate(data)


def default_point(space: dict[str, SearchDim], distill: DistillConfig) -> dict[str, float]:
    """The distill settings (temperatures calibrated) as a point of the space, clipped into its
    bounds: the search evaluates it first, so the best config it reports is at least as good."""
    data = distill.model_dump(mode="json")
    point = {}
    for key, dim in space.items():
        node, leaf = _slot(data, key)
        point[key] = min(max(float(node[leaf]), dim.low), dim.high)
    return point


def _slot(data: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    """Where a dotted key (`loss.tau_video`) lives in a dumped config: (parent mapping, leaf name)."""
    *parents, leaf = key.split(".")
    for part in parents:
        data = data[part]
    return data, leaf


def search_space(cfg: VidkdConfig) -> dict[str, Any]:
    return {
        key: (tune.loguniform if dim.log else tune.uniform)(dim.low, dim.high)
        for key, dim in cfg.tune.space.items()
    }


def scheduler(tune_cfg):
    """ASHA on val R@1 per epoch; FIFO runs every trial to max_epochs (the full-budget baseline)."""
    if tune_cfg.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=tune_cfg.max_epochs, grace_period=tune_cfg.grace_period,
                         reduction_factor=tune_cfg.reduction_factor)


def rungs(tune_cfg) -> list[int]:
    """The epochs at which the configured ASHA compares trials; none for FIFO, which stops no trial."""
    if tune_cfg.scheduler == "fifo":
        return []
    return asha_rungs(tune_cfg.max_epochs, tune_cfg.grace_period, tune_cfg.reduction_factor)


def asha_rungs(max_epochs: int, grace_period: int, reduction_factor: int) -> list[int]:
    """Where Ray's ASHA places its rungs (one bracket): grace_period * reduction_factor^k up to max_epochs."""
    count = int(math.log(max_epochs / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor ** k for k in range(count)]


def experiment_name(cfg: VidkdConfig, table_key: str) -> str:
    """Stable for the same table and search, so a search started again finds its experiment."""
    return "tune-" + digest([table_key, cfg.tune.model_dump(mode="json"), cfg.distill.model_dump(mode="json")], 12)


def tune_trial(params: dict, *, base: dict, meta: dict, teacher: dict, parent: RunLogger | None,
               storage: str, splits: TableSplits) -> None:
    """One trial: a distill run with the sampled settings, logged as a child of the search."""
    distill = apply_params(DistillConfig.model_validate(base), params)
    trial_id = tune.get_context().get_trial_id()
    run = parent.child_once(f"trial-{trial_id}", {"vidkd.stage": "tune-trial"}) if parent else None
    if run:
        run.log_params({"trial_id": trial_id, **params})
    spec = LoopSpec.for_run(distill, TableMeta(**meta), TeacherConfig.model_validate(teacher), run)
    if distill.num_workers == 1:
        train_loop(spec.to_config(), TuneSession({"train": splits.train(distill.seed), "val": splits.split("val")}))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    make_trainer(spec, splits, f"trial-{trial_id}", storage, callbacks=[TuneReportCallback()], log_epochs=False).fit()


def run_tune(cfg: VidkdConfig, table_dir: str | Path, splits: TableSplits | None = None,
             run: RunLogger | None = None, restart: bool = False,
             teacher: TeacherConfig | None = None) -> TuneResult:
    """Search the distill settings of `cfg.tune.space`; `teacher` as in `run_distill`.

    The same search (table, search and distill settings) keeps one experiment name, so a search
    started again after its driver died continues where it stopped, as distill does; a finished
    one is returned as it is. `restart` deletes that experiment's trials and starts anew."""
    init_ray(cfg.ray)
    tune_cfg = cfg.tune
    meta = read_meta(table_dir)
    base = cfg.distill.model_copy(update={"epochs": tune_cfg.max_epochs, "num_workers": tune_cfg.workers_per_trial,
                                          "cpus_per_worker": tune_cfg.cpus_per_worker})
    base = base.model_copy(update={"use_gpu": tune_cfg.gpus_per_worker > 0})  # trials use what the search asks for
    check_table(meta, base, table_dir)
    base, calibration = resolve_temperatures(base, table_dir, teacher or cfg.extract.teacher)
    if calibration:
        log_calibration(calibration, run)
    splits = splits or split_datasets(table_dir, base)
    trial_resources = {"cpu": tune_cfg.cpus_per_worker, "gpu": tune_cfg.gpus_per_worker}
    if tune_cfg.workers_per_trial > 1:
        trial_resources = {"cpu": 0}  # the trial only drives a TorchTrainer, whose workers hold the resources
    cpus_per_trial = tune_cfg.cpus_per_worker * tune_cfg.workers_per_trial
    max_concurrent = tune_cfg.max_concurrent or max(1, int(cluster_cpus() // cpus_per_trial))
    storage = storage_path(tune_cfg.storage_dir)
    name = experiment_name(cfg, meta.cache_key)
    if run:
        run.log_params({"tune": tune_cfg.model_dump(mode="json"), "max_concurrent": max_concurrent,
                        "experiment": name, **splits.placement.params()})

    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, base=base.model_dump(mode="json"), meta=meta.__dict__,
                             teacher=(teacher or cfg.extract.teacher).model_dump(mode="json"), parent=run,
                             storage=storage, splits=splits),
        trial_resources,
    )
    path = run_path(storage, name)
    default = default_point(tune_cfg.space, base)
    timing = TrialTiming()
    if restart and tune.Tuner.can_restore(path):
        log.warning("tune: --restart: deleting the earlier search in %s", path)
        filesystem, directory = pyarrow.fs.FileSystem.from_uri(path)
        filesystem.delete_dir(directory)
    if tune.Tuner.can_restore(path):
        log.warning("tune: continuing the search in %s (a finished one is returned as it is; --restart starts "
                    "anew)", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, restart_errored=False)
    else:
        searcher = ConcurrencyLimiter(OptunaSearch(points_to_evaluate=[default], seed=tune_cfg.seed),
                                      max_concurrent=max_concurrent)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=TARGET_METRIC,
                mode="max",
                search_alg=searcher,
                scheduler=scheduler(tune_cfg),
                num_samples=tune_cfg.num_samples,
                max_concurrent_trials=max_concurrent,
            ),
            # a trial resumes (ASHA) from its latest checkpoint only: keep no others. A trial whose
            # process or node dies starts again from that checkpoint, up to `distill.max_failures` times.
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      callbacks=[timing, *([TrialEpochLogger(run)] if run else [])],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=base.max_failures)),
        )
    # Keeping one checkpoint per trial makes Tune snapshot its experiment state at every trial's
    # checkpoint (so that a resume never points at a deleted one), and warn whenever two come within
    # 5 s, which short epochs always do. On local storage a snapshot is a small file copy.
    with quiet_env(EXCESSIVE_SNAPSHOT_ENV, "0"):
        grid = tuner.fit()

    failures = [result.error for result in grid if result.error is not None]
    if failures:
        log.warning("tune: %d of %d trials failed; what they reported before counts. The first: %s",
                    len(failures), len(grid), str(failures[0]).strip().splitlines()[-1])
    trials = []
    for result in grid:
        if result.metrics is None or TARGET_METRIC not in (result.metrics or {}):
            continue
        history = result.metrics_dataframe
        curve = [float(v) for v in history[TARGET_METRIC]] if history is not None and TARGET_METRIC in history else []
        best_in_trial = max(curve) if curve else result.metrics[TARGET_METRIC]
        trials.append({**{k: result.config[k] for k in cfg.tune.space}, TARGET_METRIC: best_in_trial,
                       "curve": curve,  # val R@1 per epoch run
                       "epochs": int(result.metrics.get("training_iteration", 0)),
                       "trial_id": result.metrics.get("trial_id"), "failed": result.error is not None,
                       **timing.timing(result.metrics.get("trial_id"))})
    if not trials:
        raise RuntimeError("no Tune trial reported a metric; see the trial errors above")
    # ties go to the first trial by id, so a search returned again after a restore names the same best
    best = max(sorted(trials, key=lambda t: str(t["trial_id"])), key=lambda t: t[TARGET_METRIC])
    best_params = {k: best[k] for k in cfg.tune.space}
    best_distill = apply_params(cfg.distill.model_copy(update={"loss": base.loss}), best_params)  # calibrated
    best_config = cfg.model_copy(update={"distill": best_distill})
    out = Path(cfg.output_dir).resolve() / "tune" / f"{name}-best.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_config(best_config))
    trial_epochs = sum(t["epochs"] for t in trials)
    timed = [t for t in trials if "startup_s" in t]
    startup_share = sum(t["startup_s"] for t in timed) / sum(t["trial_s"] for t in timed) if timed else None
    log.warning("tune: best val R@1 %.1f with %s (%d trial-epochs)", best[TARGET_METRIC], best_params, trial_epochs)

    if run:
        _close_trial_runs(run, trials, tune_cfg.max_epochs)
        run.log_metrics({"best_" + TARGET_METRIC: best[TARGET_METRIC], "trials": len(trials),
                            "trial_epochs": trial_epochs, "failed_trials": len(failures),
                            **({"trial_startup_share": startup_share} if startup_share is not None else {})})
        run.set_tags({f"best.{k}": f"{v:.6g}" for k, v in best_params.items()})
        run.log_artifact(out, "best_config")
        run.log_dict({"trials": trials}, "trials.json")
        log_params = {k for k, d in cfg.tune.space.items() if d.log}
        run.log_figure(metric_vs_params(trials, list(cfg.tune.space), TARGET_METRIC, log_params),
                          "plots/val_R1_vs_hyperparameters.png")
        curves = {f"trial-{t['trial_id']}": t["curve"] for t in trials if t["curve"]}
        if curves:
            run.log_figure(trial_curves(curves, rungs(tune_cfg), TARGET_METRIC), "plots/val_R1_per_trial_and_rung.png")
    return TuneResult(best_config, best_params, best[TARGET_METRIC], out, trials, trial_epochs, startup_share,
                      len(failures), default, calibration, max_concurrent)


def ranked_trials(trials: list[dict], space: list[str], top: int = 5) -> str:
    """The best `top` trials as a table: rank, val R@1, epochs run, then each searched setting."""
    ranked = sorted(trials, key=lambda t: t[TARGET_METRIC], reverse=True)[:top]
    header = ["rank", "val R@1", "epochs"] + space
    rows = [[str(i + 1), f"{t[TARGET_METRIC]:.1f}", str(t["epochs"])] + [f"{t[k]:.4g}" for k in space]
            for i, t in enumerate(ranked)]
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return f"top {len(ranked)} of {len(trials)} trials\n" + "\n".join(lines)


def _close_trial_runs(parent: RunLogger, trials: list[dict], max_epochs: int) -> None:
    """Trials stopped early by ASHA never return; close their runs as KILLED, those that raised as
    FAILED, the rest FINISHED."""
    for trial in trials:
        run = parent.find_child(f"trial-{trial['trial_id']}")
        if run:
            run.end("FAILED" if trial["failed"] else "FINISHED" if trial["epochs"] >= max_epochs else "KILLED")
