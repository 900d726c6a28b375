"""Stage 1 through real Ray Data on real mp4 files, good and bad."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core import features
from core.config import TeacherConfig
from core.datasets import VideoRecord, read_manifest, write_manifest
from core.teachers import build_teacher
from core.video import decode_video
from jobs.extract import ExtractError, run_extract
from jobs.tracking import RunLogger
from tests.conftest import tiny_config


def write_clip(path: Path, frames: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            image = np.full((48, 64, 3), rng.integers(0, 255, 3), np.uint8)
            image[:, (i * 7) % 64 :][:, :8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def mixed_manifest(tmp_path_factory) -> Path:
    """8 good clips (one of them only 2 frames long) and 4 bad inputs."""
    root = tmp_path_factory.mktemp("mixed")
    records = []
    for i in range(8):
        write_clip(root / f"good{i}.mp4", 2 if i == 0 else 12, seed=i)
        split = ["train", "train", "train", "train", "val", "val", "test", "test"][i]
        records.append(VideoRecord(f"good{i}", str(root / f"good{i}.mp4"), [f"clip number {i}", f"video {i}"], split))
    (root / "text.mp4").write_text("this is not a video\n")
    (root / "empty.mp4").write_bytes(b"")
    records += [
        VideoRecord("missing", str(root / "missing.mp4"), ["gone"], "train"),
        VideoRecord("text", str(root / "text.mp4"), ["text file"], "train"),
        VideoRecord("empty", str(root / "empty.mp4"), ["zero bytes"], "train"),
        VideoRecord("nocaption", str(root / "good1.mp4"), [], "train"),
    ]
    write_manifest(records, root / "manifest.jsonl")
    return root / "manifest.jsonl"


def test_table_holds_good_videos_failures_the_bad_ones(ray_local, mixed_manifest, tmp_path, tracking_dir):
    teacher = TeacherConfig(kind="open_clip", name="vidkd-vit-micro")
    cfg = tiny_config(tmp_path, mixed_manifest, extract={"teacher": teacher.model_dump()})
    run = RunLogger.create("extract-test", cfg.tracking, output_dir=str(tracking_dir))
    result = run_extract(cfg, run=run)

    assert not result.cache_hit
    table = features.read_table(result.table_dir)
    assert sorted(table["video_id"].to_pylist()) == [f"good{i}" for i in range(8)]
    reasons = {f["video_id"]: f["reason"] for f in result.failures}
    assert reasons == {"missing": "missing", "text": "corrupt", "empty": "empty", "nocaption": "no_captions"}
    details = {f["video_id"]: f["detail"] for f in result.failures}
    assert details["missing"] == "no such file" and details["nocaption"] == "the manifest gives it no caption"
    assert all(details.values()), details
    assert result.meta.counts == {"train": 4, "val": 2, "test": 2}

    # The 2-frame clip is good input with a mask.
    batch = features.decode_batch(features.arrow_to_columns(table), result.meta)
    short = batch.video_ids.index("good0")
    assert batch.frame_mask[short].tolist() == [1, 1, 0, 0]

    # Embeddings equal what the adapter computes directly, to fp16 tolerance.
    torch.manual_seed(0)
    adapter = build_teacher(teacher)
    frames, mask = zip(*(decode_video(read_path(mixed_manifest, v), 4, 32) for v in batch.video_ids))
    # The frames are stored as JPEG (the default); the teacher saw them as stored.
    assert result.meta.frames_codec == "jpeg"
    assert np.abs(batch.frames.astype(int) - np.stack(frames)).mean() < 3
    video_emb, frame_emb = adapter.encode_video(torch.from_numpy(batch.frames), torch.from_numpy(np.stack(mask)))
    np.testing.assert_allclose(batch.teacher_video_emb.astype(np.float32), video_emb.numpy(), atol=2e-3)
    np.testing.assert_allclose(batch.teacher_frame_emb.astype(np.float32), frame_emb.numpy(), atol=2e-3)
    text = adapter.encode_text(batch.captions[short]).numpy()
    np.testing.assert_allclose(batch.teacher_text_emb[short].astype(np.float32), text, atol=2e-3)

    # MLflow holds params, counts and the failures table.
    data = run.client.get_run(run.run_id).data
    assert data.params["cache_key"] == result.meta.cache_key
    assert data.metrics["videos"] == 8 and data.metrics["failures"] == 4
    assert "failures.json" in [a.path for a in run.client.list_artifacts(run.run_id)]

    # Same inputs: a cache hit. A directory without the commit marker: rebuilt.
    again = run_extract(cfg)
    assert again.cache_hit and again.table_dir == result.table_dir
    (result.table_dir / features.COMMIT_MARKER).unlink()
    # rebuilt with a teacher actor on every CPU of the instance, as extract sizes its pool on a
    # CPU-only cluster: the reads of the work list must not wait for a CPU
    every_cpu = cfg.extract.model_copy(update={"num_actors": int(ray_local.cluster_resources()["CPU"]),
                                               "encode_batch_size": 2})
    rebuilt = run_extract(cfg.model_copy(update={"extract": every_cpu}))
    assert not rebuilt.cache_hit and features.is_committed(rebuilt.table_dir)
    assert features.read_table(rebuilt.table_dir).num_rows == 8
    assert list((rebuilt.table_dir.parent / features.STAGING_DIR).iterdir()) == [], "staging is moved, not copied"


def test_frames_only_table_and_all_failing_input(ray_local, mixed_manifest, tmp_path):
    cfg = tiny_config(tmp_path, mixed_manifest, extract={"frames_codec": "raw"})
    result = run_extract(cfg)
    assert not result.meta.has_teacher
    val = features.read_table(result.table_dir, split="val")
    assert val.num_rows == 2
    batch = features.decode_batch(features.arrow_to_columns(val), result.meta)
    frames = [decode_video(read_path(mixed_manifest, v), 4, 32)[0] for v in batch.video_ids]
    assert result.meta.frames_codec == "raw" and np.array_equal(batch.frames, np.stack(frames)), "raw is exact"

    bad = [r for r in read_manifest(mixed_manifest) if not r.video_id.startswith("good")]
    with pytest.raises(ExtractError, match="every video failed"):
        run_extract(cfg, records=bad)


def read_path(manifest: Path, video_id: str) -> str:
    return next(r.path for r in read_manifest(manifest) if r.video_id == video_id)


def test_two_jobs_building_one_table_never_share_or_delete_each_others_files(tmp_path):
    table_dir = tmp_path / "features" / "key"
    meta = features.TableMeta(num_frames=4, image_size=32, teacher={"kind": "none"}, cache_key="key")
    first, second = features.staging_dir(table_dir), features.staging_dir(table_dir)
    for staging, rows in ((first, 1), (second, 2)):
        staging.mkdir(parents=True)
        pq.write_table(pa.table({"video_id": [f"v{i}" for i in range(rows)]}), staging / "part-000000.parquet")
    assert not features.prepare_table_dir(table_dir)  # a third job starting now removes neither
    assert first.exists() and second.exists()
    assert features.commit_table(first, table_dir, meta, [])
    assert not features.commit_table(second, table_dir, meta, []), "the key was committed first by the other job"
    assert not second.exists() and features.read_table(table_dir).num_rows == 1

    # A staging directory untouched for a day is a killed job's: the next build of the key removes it.
    stale, live = features.staging_dir(table_dir), features.staging_dir(table_dir)
    for staging in (stale, live):
        staging.mkdir()
        (staging / "part-000000.parquet").write_bytes(b"")
    day_ago = time.time() - features.STALE_STAGING_S - 60
    for path in (stale / "part-000000.parquet", stale):
        os.utime(path, (day_ago, day_ago))
    shutil.rmtree(table_dir)
    assert not features.prepare_table_dir(table_dir)
    assert not stale.exists() and live.exists()


def test_frames_codecs_round_trip_and_name_their_tables():
    """raw stores the frames exactly; jpeg within JPEG's error, each frame a file of its own length
    behind a header. A JPEG table has a key of its own; a raw one keeps the key it had before the
    codec was a setting."""
    rng = np.random.default_rng(0)
    smooth = np.clip(np.linspace(0, 255, 32)[None, :, None] + rng.normal(0, 4, (32, 32, 3)), 0, 255)
    clip = np.stack([np.roll(smooth, k, axis=1) for k in range(3)] + [np.zeros((32, 32, 3))]).astype(np.uint8)
    raw = features.encode_frames(clip, "raw")
    assert len(raw) == clip.nbytes and np.array_equal(features.decode_frames([raw], "raw", clip.shape)[0], clip)
    cells = [features.encode_frames(clip, "jpeg"), features.encode_frames(clip[::-1].copy(), "jpeg")]
    header = np.frombuffer(cells[0], "<u4", count=5)
    assert header[0] == 4 and len(cells[0]) == 4 * 5 + header[1:].sum() < clip.nbytes
    back = features.decode_frames(cells, "jpeg", clip.shape)
    assert back.shape == (2, *clip.shape) and back.dtype == np.uint8
    assert np.abs(back[0].astype(int) - clip).mean() < 3 and np.abs(back[1].astype(int) - clip[::-1]).mean() < 3
    rows = [{"video_id": "a", "path": "a.mp4", "captions": ["x"], "split": "train"}]
    key = features.cache_key(rows, {"kind": "none"}, 4, 32)
    assert features.cache_key(rows, {"kind": "none"}, 4, 32, "raw") == key
    assert features.cache_key(rows, {"kind": "none"}, 4, 32, "jpeg") != key
