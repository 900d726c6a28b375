"""Stage 3: a tiny real Ray Tune search (Optuna + ASHA) over distill runs on one feature table."""

from __future__ import annotations

import logging

import yaml

from core.config import TuneConfig, load_config
from jobs.tracking import RunLogger
from jobs.tune import TARGET_METRIC, ranked_trials, rungs, run_tune


def test_tiny_search_logs_trials_and_writes_a_distill_config(teacher_table, tmp_path, tracking_dir):
    cfg, table = teacher_table
    cfg = cfg.model_copy(update={
        "tune": TuneConfig(num_samples=4, max_concurrent=2, max_epochs=3, grace_period=1, workers_per_trial=1,
                           storage_dir=str(tmp_path / "tune")),
        "distill": cfg.distill.model_copy(update={"lr": 2e-3, "lr_new": 2e-3}),
        "output_dir": str(tmp_path / "runs"),
    })
    parent = RunLogger.create("tune-test", cfg.tracking, output_dir=str(tracking_dir))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    snapshots = logging.getLogger("ray.tune.execution.experiment_state")
    snapshots.addHandler(handler)
    try:
        result = run_tune(cfg, table.table_dir, run=parent)
    finally:
        snapshots.removeHandler(handler)
    # Tune's warning whenever two trial checkpoints come within 5 s (each forces a snapshot of
    # the experiment's state when a trial keeps one checkpoint): every epoch of a tiny trial
    assert not [r for r in records if "snapshotting" in r.getMessage()], "shown only at --verbose"

    assert len(result.trials) == 4 and result.failed_trials == 0
    assert 1 <= min(t["epochs"] for t in result.trials) and max(t["epochs"] for t in result.trials) == 3
    # The configured default, its temperatures calibrated on the teacher, is the search's first
    # point, so the best is at least as good as it.
    default = result.default_params
    assert result.calibration is not None
    assert default["loss.tau_video"] == min(max(result.calibration.tau_video, 0.003), 0.3)
    default_trials = [t for t in result.trials if all(abs(t[k] - v) < 1e-9 for k, v in default.items())]
    assert len(default_trials) == 1
    assert result.best_metric >= default_trials[0][TARGET_METRIC]
    assert result.best_metric == max(t[TARGET_METRIC] for t in result.trials)
    assert result.trial_epochs <= 4 * 3
    assert result.startup_share is not None and 0 < result.startup_share < 1
    trial_dirs = [d for d in (tmp_path / "tune").glob("tune-*/*") if d.is_dir()]
    assert len(trial_dirs) == 4 and all(len(list(d.glob("checkpoint_*"))) == 1 for d in trial_dirs), \
        "a trial keeps its latest checkpoint only"

    # The best config is a complete preset that `vidkd distill --config` takes as it is.
    best = load_config(result.config_path)
    for key, value in result.best_params.items():
        section, name = key.split(".") if "." in key else (None, key)
        got = getattr(getattr(best.distill, section), name) if section else getattr(best.distill, name)
        assert abs(got - value) < 1e-9
    assert yaml.safe_load(result.config_path.read_text())["distill"]["epochs"] == cfg.distill.epochs

    client = parent.client
    children = client.search_runs([parent.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    assert len(children) == 4, "one child run per trial, none twice"
    epochs_by_trial = {t["trial_id"]: t["epochs"] for t in result.trials}
    for child in children:
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_t2v_R1"))
        assert steps == list(range(epochs_by_trial[child.data.params["trial_id"]])), \
            "each epoch the trial ran once, the one ASHA stopped it at included"
        assert "mlflow_run_id" not in child.data.metrics and "training_iteration" not in child.data.metrics
        assert child.info.status in ("FINISHED", "KILLED")
    tags = client.get_run(parent.run_id).data.tags
    assert {f"best.{k}" for k in result.best_params} <= set(tags)
    artifacts = {a.path for a in client.list_artifacts(parent.run_id)}
    assert {"best_config", "plots", "trials.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.run_id, "plots")}
    assert plots == {"plots/val_R1_vs_hyperparameters.png", "plots/val_R1_per_trial_and_rung.png"}

    # Started again with no flag (as after its driver died), the same search continues its
    # experiment: finished, it is returned as it is, with no trial run again.
    again = run_tune(cfg, table.table_dir)
    assert sorted(t["trial_id"] for t in again.trials) == sorted(t["trial_id"] for t in result.trials)
    assert again.best_metric == result.best_metric and again.best_params == result.best_params

    table_text = ranked_trials(result.trials, list(cfg.tune.space), top=3)
    lines = table_text.splitlines()
    assert lines[0] == "top 3 of 4 trials" and lines[1].split()[:3] == ["rank", "val", "R@1"]
    assert float(lines[2].split()[1]) == round(result.best_metric, 1)


def test_search_with_the_online_teacher(teacher_table, tmp_path):
    """Trials get the teacher the online mode encodes with, as a distill run does."""
    cfg, table = teacher_table
    cfg = cfg.model_copy(update={
        "tune": TuneConfig(num_samples=1, max_epochs=1, workers_per_trial=1, storage_dir=str(tmp_path / "tune")),
        "distill": cfg.distill.model_copy(update={"teacher_mode": "online"}),
        "output_dir": str(tmp_path / "runs"),
    })
    result = run_tune(cfg, table.table_dir, teacher=cfg.extract.teacher)
    assert len(result.trials) == 1 and result.trials[0]["epochs"] == 1 and result.failed_trials == 0
    # --restart: the earlier search is gone and a new one runs (a new trial)
    again = run_tune(cfg, table.table_dir, teacher=cfg.extract.teacher, restart=True)
    assert len(again.trials) == 1 and again.trials[0]["trial_id"] != result.trials[0]["trial_id"]


def test_rungs_are_where_rays_asha_puts_them():
    from ray.tune.schedulers import ASHAScheduler

    for max_epochs, grace, factor in ((3, 1, 2), (4, 1, 2), (20, 2, 3), (40, 5, 2), (9, 3, 3)):
        tune_cfg = TuneConfig(max_epochs=max_epochs, grace_period=grace, reduction_factor=factor)
        asha = ASHAScheduler(time_attr="training_iteration", max_t=max_epochs, grace_period=grace,
                             reduction_factor=factor)
        assert rungs(tune_cfg) == sorted(milestone for milestone, _ in asha._brackets[0]._rungs)
    assert rungs(TuneConfig(scheduler="fifo")) == []
