"""Stage 2 with a real TorchTrainer: 2 workers on CPU (DDP on gloo), a forced failure, MLflow."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch

from core.config import DistillConfig, LossConfig
from core.features import TableMeta, read_meta
from core.losses import fgt_target, teachclip_loss, teacher_similarity
from core.student import build_student, load_student
from core.teachers import build_teacher
from core.training import cached_teacher, online_teacher, warmup_cosine
from jobs.distill import check_table, run_distill, training_name
from jobs.extract import run_extract
from jobs.tables import TablePlacement, shuffled_blocks, split_datasets
from jobs.trainer import STATE_FILE, train_videos
from core.features import table_batches
from jobs.tracking import RunLogger
from tests.conftest import tiny_config


def test_training_survives_a_worker_failure_and_a_job_started_again(teacher_table, tmp_path, tracking_dir):
    """A week of GPU time meets two kinds of failure. A worker dies (here: in epoch 1, before its
    checkpoint): Ray Train restarts the worker group from the last checkpoint, in the same MLflow
    run, which shows the epoch run twice once. The whole job dies (here: a second
    failure once max_failures is spent, after the last epoch's checkpoint): started again, under a
    new MLflow run and with other resources, the same training picks up its checkpoint; being
    finished, it is returned as it is, and the new run shows every epoch. (Picking up an unfinished
    one runs the restart path of the worker failure.)"""
    cfg, table = teacher_table
    distill = cfg.distill.model_copy(update={"epochs": 2, "lr": 2e-3, "lr_new": 2e-3, "max_failures": 1,
                                             "storage_dir": str(tmp_path / "train")})
    markers = [tmp_path / "worker-died", tmp_path / "job-died"]
    died = RunLogger.create("died", cfg.tracking, output_dir=str(tracking_dir))
    spent = lambda: set(Path(tempfile.gettempdir()).glob("vidkd-ckpt-*"))  # noqa: E731
    before = spent()
    with pytest.raises(Exception, match="injected worker failure after epoch 1"):
        run_distill(cfg, table.table_dir, distill=distill, run=died,
                    fail_after=[(1, str(markers[0]), "before_report"), (1, str(markers[1]))])
    assert all(m.exists() for m in markers), "the injected failures did not happen"
    assert spent() - before == set(), "each epoch's local checkpoint copy must go once reported"
    client = died.client
    assert [r.info.run_id for r in client.search_runs([died.experiment_id])] == [died.run_id], \
        "a worker restart must not open a second MLflow run"
    died_history = client.get_metric_history(died.run_id, "epoch_time_s")
    assert sorted(m.step for m in died_history) == [0, 1], "each epoch once, the one run again included"
    died_times = {m.step: m.value for m in died_history}

    again = RunLogger.create("again", cfg.tracking, output_dir=str(tracking_dir))
    result = run_distill(cfg, table.table_dir, distill=distill.model_copy(update={"num_workers": 1}), run=again)
    epochs = [h["epoch"] for h in result.history]
    assert epochs == [0, 1], f"the training's epochs, each once, got {epochs}"
    assert {h["epoch"]: h["epoch_time_s"] for h in result.history} == died_times, "an epoch was trained again"
    # The worker restart continued the same optimisation: step count, learning-rate schedule and
    # AdamW state picked up where epoch 0's checkpoint left them. (Whether the loss falls over 6
    # steps of batch 8 is noise; tests/test_student.py shows the objective being learned.)
    per_epoch = result.history[0]["step"]
    total = per_epoch * distill.epochs
    assert per_epoch > 0 and [h["step"] for h in result.history] == [per_epoch * (e + 1) for e in epochs]
    warmup = int(distill.warmup_frac * total)
    expected_lr = [distill.lr * warmup_cosine(per_epoch * (e + 1), total, warmup) for e in epochs]
    assert [h["lr"] for h in result.history] == pytest.approx(expected_lr, abs=1e-9)
    states = [torch.load(p, weights_only=True) for p in Path(distill.storage_dir).rglob(STATE_FILE)]
    last = max(states, key=lambda s: s["epoch"])
    assert last["epoch"] == 1 and {int(p["step"]) for p in last["optimizer"]["state"].values()} == {total}
    for term in ("train_infonce", "train_cgt", "train_fgt"):
        assert term in result.history[0]
    best = max(result.history, key=lambda h: h["val_t2v_R1"])
    assert load_student(result.checkpoint).num_frames == table.meta.num_frames
    assert result.metrics["val_t2v_R1"] == best["val_t2v_R1"]

    tags = client.get_run(again.run_id).data.tags
    assert tags["vidkd.resumed_from_run"] == died.run_id and tags["vidkd.resumed_after_epoch"] == "1"
    val_r1 = client.get_metric_history(again.run_id, "val_t2v_R1")
    assert sorted(m.step for m in val_r1) == [0, 1], "the new run shows every epoch, once"
    artifacts = [a.path for a in client.list_artifacts(again.run_id)]
    assert "model" in artifacts and "plots" in artifacts
    assert [a.path for a in client.list_artifacts(again.run_id, "plots")] == ["plots/training_curves.png"]


def test_what_names_a_training(teacher_table):
    """The same training keeps its Ray Train run name across resources; what it learns changes it;
    resume off makes every run new."""
    cfg, table = teacher_table
    name = lambda d, fresh="x": training_name("distill", table.meta, d, cfg.extract.teacher, fresh)  # noqa: E731
    base = cfg.distill
    assert name(base) == name(base.model_copy(update={"num_workers": 8, "use_gpu": True, "max_failures": 5,
                                                      "stream_buffer_mib": 64}))
    assert name(base) != name(base.model_copy(update={"lr": base.lr * 2}))
    assert name(base) != training_name("teacher", table.meta, base, cfg.extract.teacher, "x")
    fresh = base.model_copy(update={"resume": False})
    assert name(fresh, "run-a") != name(fresh, "run-b") and name(fresh, "run-a").startswith(name(base))


def test_online_teacher_gives_the_loss_what_the_cache_gives(teacher_table):
    """One batch, two views of the teacher: its embeddings as the table cached them (float16) and
    as the online mode computes them from the same frames and captions. The loss must see the
    same teacher either way: the same embeddings, the same CgT and FgT targets, the same terms."""
    cfg, table = teacher_table
    meta = read_meta(table.table_dir)
    batch = next(iter(table_batches(table.table_dir, meta, "train", batch_size=8)))
    picks = [i % len(caps) for i, caps in enumerate(batch.captions)]  # not always the first caption
    captions = [caps[p] for caps, p in zip(batch.captions, picks)]
    frames, mask = torch.from_numpy(batch.frames), torch.from_numpy(batch.frame_mask)
    torch.manual_seed(0)  # as extraction builds a teacher without weights
    online = online_teacher(build_teacher(cfg.extract.teacher), frames, mask, captions)
    cached = cached_teacher(batch, picks, torch.device("cpu"))

    real = mask.bool()  # padded frames carry no teacher knowledge in either view
    tol = {"atol": 2e-3, "rtol": 0}  # the table stores float16
    torch.testing.assert_close(online.video_emb, cached.video_emb, **tol)
    torch.testing.assert_close(online.text_emb, cached.text_emb, **tol)
    torch.testing.assert_close(online.frame_emb[real], cached.frame_emb[real], **tol)
    torch.testing.assert_close(teacher_similarity(online), teacher_similarity(cached), **tol)
    loss_cfg = LossConfig(tau_video=0.05, tau_frame=0.1)
    torch.testing.assert_close(fgt_target(online.frame_emb, online.text_emb, mask, loss_cfg.tau_frame),
                               fgt_target(cached.frame_emb, cached.text_emb, mask, loss_cfg.tau_frame), **tol)

    student = build_student(cfg.distill.student, meta.num_frames)
    with torch.no_grad():
        out = student(frames, mask, captions)
        _, from_online = teachclip_loss(out.video, out.text_emb, student.logit_scale, online, loss_cfg)
        _, from_cache = teachclip_loss(out.video, out.text_emb, student.logit_scale, cached, loss_cfg)
    for term in ("cgt", "fgt", "teacher_video_entropy", "teacher_frame_entropy"):
        assert from_online[term].item() == pytest.approx(from_cache[term].item(), abs=2e-3), term


def test_no_teacher_dldkd_and_the_online_teacher_train(teacher_table, plain_student, tmp_path):
    """The modes beside cached TeachCLIP: no teacher, and DLDKD fed by the online teacher (one
    training runs both: the objective and the teacher's source are independent, and the online
    teacher's equivalence to the cache is pinned in the test above, term by term), on a streamed
    table."""
    cfg, table = teacher_table
    _, result = plain_student
    assert set(k for k in result.history[0] if k.startswith("train_")) >= {"train_loss", "train_infonce"}
    assert "train_cgt" not in result.history[0]

    online_dldkd = cfg.distill.model_copy(update={
        "epochs": 1, "num_workers": 1, "teacher_mode": "online", "storage_dir": str(tmp_path / "b"),
        "table_placement": "stream",  # read from Parquet each epoch, as a table too big to hold is
        "loss": cfg.distill.loss.model_copy(update={"objective": "dldkd"})})
    result = run_distill(cfg, table.table_dir, distill=online_dldkd, name="online-dldkd", teacher=cfg.extract.teacher)
    epoch = result.history[0]
    assert all(math.isfinite(epoch[f"train_{t}"]) for t in ("feat", "kl", "explore")), epoch


@pytest.mark.parametrize("placement", ["object_store", "stream"])
def test_train_splits_choose_the_rows_a_training_reads(ray_local, tmp_path, placement):
    import pyarrow as pa
    import pyarrow.parquet as pq

    splits = ["train", "pool", "val", "test", "pool"] * 4
    for part in range(4):  # a table's parts, each in manifest order
        rows = range(5 * part, 5 * part + 5)
        pq.write_table(pa.table({"video_id": [f"v{i:02d}" for i in rows], "split": [splits[i] for i in rows]}),
                       tmp_path / f"part-{part:06d}.parquet")
    meta = TableMeta(num_frames=4, image_size=32, teacher={"kind": "none"},
                     counts={"train": 4, "pool": 8, "val": 4, "test": 4})
    ids = lambda ds: [r["video_id"] for r in ds.iter_rows()]  # noqa: E731
    student = split_datasets(tmp_path, DistillConfig(table_placement=placement))
    assert student.placement.held == (placement == "object_store")
    if placement == "stream":  # its read-ahead bounded, for Ray Train's shards and a Tune trial's reads
        assert student.execution_options().resource_limits.object_store_memory == 256 * 2**20
        assert student.split("val").context.execution_options.resource_limits.object_store_memory == 256 * 2**20
    else:  # Ray Train's default ingest options (no read-ahead bound), in order
        assert student.execution_options().resource_limits.object_store_memory == float("inf")
    assert student.execution_options().preserve_order
    assert sorted(ids(student.train(seed=0))) == ["v00", "v05", "v10", "v15"]
    assert sorted(ids(student.split("val"))) == ["v02", "v07", "v12", "v17"]
    assert sorted(ids(student.split("test"))) == ["v03", "v08", "v13", "v18"]
    teacher = split_datasets(tmp_path, DistillConfig(train_splits=["train", "pool"], table_placement=placement))
    train = teacher.train(seed=3)  # one dataset, read once per epoch
    epochs = [ids(train) for _ in range(4)]
    assert sorted(epochs[0]) == sorted(f"v{i:02d}" for i in range(20) if splits[i] in ("train", "pool"))
    assert len({tuple(epoch) for epoch in epochs}) > 1  # a new order from one epoch to the next
    assert train_videos(meta, DistillConfig(train_splits=["train", "pool"])) == 12
    with pytest.raises(ValueError, match="has 1 train videos"):
        check_table(TableMeta(num_frames=4, image_size=32, teacher={"kind": "none"}, counts={"train": 1, "val": 1}),
                     DistillConfig(teacher_mode="none", loss={"objective": "none"}, batch_size=2, num_workers=1),
                    "features/abc")


def test_frames_only_table_refuses_cached_mode(ray_local, synth_dataset, tmp_path):
    cfg = tiny_config(tmp_path, synth_dataset)
    table = run_extract(cfg)
    with pytest.raises(ValueError, match="holds no teacher embeddings"):
        run_distill(cfg, table.table_dir)


def test_a_table_is_held_in_the_object_store_only_when_it_fits():
    assert TablePlacement.decide(40 * 2**20, 100 * 2**20, "auto").held
    streamed = TablePlacement.decide(60 * 2**20, 100 * 2**20, "auto")
    assert not streamed.held and streamed.params()["table_placement"] == "stream"
    assert "60.0 MiB against an object store of 100 MiB" in streamed.describe()
    assert TablePlacement.decide(60 * 2**20, 100 * 2**20, "object_store").held
    assert not TablePlacement.decide(1, 100 * 2**20, "stream").held


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



def test_training_sees_the_blocks_in_a_new_order_every_epoch(ray_local):
    """Block order: not the table's, new each epoch, the same again from the same seed."""
    import ray

    table = lambda: ray.data.range(64, override_num_blocks=16).materialize()  # noqa: E731
    order = lambda ds: [row["id"] for row in ds.iter_rows()]  # noqa: E731
    train = shuffled_blocks(table(), seed=7)
    epochs = [order(train) for _ in range(2)]
    assert sorted(epochs[0]) == list(range(64)) and epochs[0] != list(range(64))
    assert epochs[0] != epochs[1]
    assert order(shuffled_blocks(table(), seed=7)) == epochs[0]  # a new job with the same seed


def test_the_loop_spec_travels_as_plain_data():
    import json

    from core.config import TeacherConfig
    from jobs.trainer import LoopSpec

    distill = DistillConfig(loss=LossConfig(tau_video=0.05, tau_frame=0.5), epochs=3)
    meta = TableMeta(num_frames=4, image_size=32, teacher={"kind": "vidkd", "name": "t"}, embed_dim=16,
                     cache_key="k", counts={"train": 8, "val": 2})
    spec = LoopSpec(distill, meta, TeacherConfig(kind="none"), "run", "sqlite:///x.db", "1", [(1, "/m")])
    config = json.loads(json.dumps(spec.to_config()))  # what Ray ships is JSON-able
    assert LoopSpec.from_config(config) == spec


@pytest.mark.parametrize("placement", ["object_store", "stream"])
def test_the_splits_come_in_the_tables_order_whatever_order_the_reads_finish_in(ray_local, tmp_path, placement):
    """A training is the same again from its seed only when its rows reach the seeded shuffle in
    the same order: held, the split is materialized in the table's order, not in the order its
    read tasks finished (two trainings from one seed on the quality bench's table differed);
    streamed, the reads keep the plan's order. The first part here is large, so its read may finish after the others."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    in_order = []
    for part, rows in enumerate([20000] + [50] * 7):
        ids = [f"p{part}-{i:05d}" for i in range(rows)]
        in_order += ids
        pq.write_table(pa.table({"video_id": ids, "split": ["val"] * rows, "pad": [b"x" * 200] * rows}),
                       tmp_path / f"part-{part:06d}.parquet")
    splits = split_datasets(tmp_path, DistillConfig(table_placement=placement))
    assert splits.execution_options().preserve_order  # for Ray Train's shards and a Tune trial's reads
    for _ in range(2):
        assert [row["video_id"] for row in splits.split("val").iter_rows()] == in_order
