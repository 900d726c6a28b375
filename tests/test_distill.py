"""Stage 2 with a real TorchTrainer: 2 workers on CPU (DDP on gloo), a forced failure, MLflow."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from core.config import DistillConfig
from core.features import TableMeta
from core.student import load_student
from core.training import warmup_cosine
from jobs.distill import STATE_FILE, check_table, run_distill
from jobs.extract import run_extract
from jobs.tracking import RunLogger
from tests.conftest import tiny_config


def test_two_workers_train_resume_after_failure_and_log_one_run(teacher_table, tmp_path, tracking_dir):
    cfg, table = teacher_table
    distill = cfg.distill.model_copy(update={"epochs": 4, "lr": 2e-3, "lr_new": 2e-3,
                                             "storage_dir": str(tmp_path / "train")})
    run = RunLogger.create("distill-test", cfg.tracking, output_dir=str(tracking_dir))
    marker = tmp_path / "failed-once"
    spent = lambda: set(Path(tempfile.gettempdir()).glob("vidkd-ckpt-*"))  # noqa: E731
    before = spent()
    result = run_distill(cfg, table.table_dir, distill=distill, logger=run, fail_once=(0, str(marker)))

    assert marker.exists(), "the injected failure did not happen"
    assert spent() - before == set(), "each epoch's local checkpoint copy must go once reported"
    epochs = [h["epoch"] for h in result.history]
    assert epochs == [0, 1, 2, 3], f"resume must continue after the checkpointed epoch, got {epochs}"
    # The restart continues the same optimisation: step count, learning-rate schedule and AdamW
    # state pick up where epoch 0's checkpoint left them. (Whether the loss falls over 12 steps of
    # batch 8 is noise; tests/test_student.py shows the objective being learned.)
    per_epoch = result.history[0]["step"]
    total = per_epoch * distill.epochs
    assert per_epoch > 0 and [h["step"] for h in result.history] == [per_epoch * (e + 1) for e in epochs]
    warmup = int(distill.warmup_frac * total)
    expected_lr = [distill.lr * warmup_cosine(per_epoch * (e + 1), total, warmup) for e in epochs]
    assert [h["lr"] for h in result.history] == pytest.approx(expected_lr, abs=1e-9)
    states = [torch.load(p, weights_only=True) for p in Path(distill.storage_dir).rglob(STATE_FILE)]
    last = max(states, key=lambda s: s["epoch"])
    assert last["epoch"] == 3 and {int(p["step"]) for p in last["optimizer"]["state"].values()} == {total}
    for term in ("train_infonce", "train_cgt", "train_fgt"):
        assert term in result.history[0]

    student = load_student(result.checkpoint)
    assert student.num_frames == table.meta.num_frames

    client = run.client
    runs = client.search_runs([run.experiment_id])
    assert [r.info.run_id for r in runs] == [run.run_id], "a restart must not open a second MLflow run"
    val_r1 = client.get_metric_history(run.run_id, "val_t2v_R1")
    assert sorted({m.step for m in val_r1}) == [0, 1, 2, 3]
    artifacts = [a.path for a in client.list_artifacts(run.run_id)]
    assert "model" in artifacts and "plots" in artifacts
    assert [a.path for a in client.list_artifacts(run.run_id, "plots")] == ["plots/training_curves.png"]


def test_no_teacher_and_dldkd_modes(teacher_table, plain_student, tmp_path):
    cfg, table = teacher_table
    _, result = plain_student
    assert set(k for k in result.history[0] if k.startswith("train_")) >= {"train_loss", "train_infonce"}
    assert "train_cgt" not in result.history[0]

    dldkd = cfg.distill.model_copy(update={
        "epochs": 1, "num_workers": 1, "storage_dir": str(tmp_path / "b"),
        "loss": cfg.distill.loss.model_copy(update={"objective": "dldkd"})})
    result = run_distill(cfg, table.table_dir, distill=dldkd, name="dldkd")
    assert {"train_feat", "train_kl", "train_explore"} <= set(result.history[0])


def test_online_teacher_matches_cached_mode_inputs(teacher_table, tmp_path):
    cfg, table = teacher_table
    online = cfg.distill.model_copy(update={"epochs": 1, "num_workers": 1, "teacher_mode": "online",
                                            "storage_dir": str(tmp_path / "c")})
    result = run_distill(cfg, table.table_dir, distill=online, name="online", teacher=cfg.extract.teacher)
    assert result.history[0]["train_cgt"] >= 0


def test_frames_only_table_refuses_cached_mode(ray_local, synth_dataset, tmp_path):
    cfg = tiny_config(tmp_path, synth_dataset)
    table = run_extract(cfg)
    with pytest.raises(ValueError, match="holds no teacher embeddings"):
        run_distill(cfg, table.table_dir)


@pytest.mark.parametrize("counts, distill, message", [
    ({"train": 7, "val": 2}, {"batch_size": 8, "num_workers": 2}, "has 7 train videos; batch_size 8 on 2 workers needs 8"),
    ({"train": 5, "val": 2}, {"batch_size": 2, "num_workers": 3}, "needs 6 for one step"),  # 2 per worker at least
    ({"train": 40}, {}, "has no val videos"),
])
def test_a_table_too_small_for_the_run_is_refused_before_training(counts, distill, message):
    meta = TableMeta(num_frames=4, image_size=32, teacher={"kind": "none"}, counts=counts)
    config = DistillConfig(teacher_mode="none", loss={"objective": "none"}, **distill)
    with pytest.raises(ValueError, match=message):
        check_table(meta, config, "features/abc")
    check_table(TableMeta(num_frames=4, image_size=32, teacher={"kind": "none"}, counts={"train": 8, "val": 1}),
                DistillConfig(teacher_mode="none", loss={"objective": "none"}, batch_size=8), "features/abc")
