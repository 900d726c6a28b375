"""Stage 4 end to end: a tiny trained student, GPTQ INT4 packed to disk, reloaded, evaluated."""

from __future__ import annotations

import json

import numpy as np
import torch

from core.features import arrow_to_columns, decode_batch, read_meta, read_table
from core.quant import read_quantize_config
from core.student import load_student
from core.video import normalize_frames
from core.features import table_batches
from core.student import load_quantized_student
from jobs.quantize import calibration_images, run_quantize
from jobs.tracking import RunLogger


def test_quantize_student_report_and_reload(teacher_table, plain_student, tmp_path, tracking_dir):
    cfg, table = teacher_table
    cfg = cfg.model_copy(update={"quantize": cfg.quantize.model_copy(update={"calib_samples": 32, "act_order": True}),
                                 "output_dir": str(tmp_path / "runs")})
    student_ckpt, _ = plain_student

    run = RunLogger.create("quantize-test", cfg.tracking, output_dir=str(tracking_dir))
    result = run_quantize(cfg, student_ckpt, table.table_dir, run=run)

    qcfg = read_quantize_config(result.output_dir)
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 128 and qcfg["desc_act"] is True
    assert all(name.startswith("clip.visual.") for name in qcfg["quantized_modules"])
    assert len(qcfg["quantized_modules"]) == 4 * 2  # 4 linears x 2 blocks of vidkd-vit-micro

    sizes = result.report["sizes"]["gptq"]
    assert 4.0 < sizes["quantized_bits_per_weight"] < 4.5
    assert sizes["vision_compression"] > 2.0
    assert sizes["file_bytes"] < result.report["checkpoint_bytes"]
    for method in ("fp32", "gptq", "rtn"):
        metrics = result.report["metrics"][method]
        assert 0 <= metrics["t2v_R1"] <= metrics["t2v_R5"] <= metrics["t2v_R10"] <= 100

    # The reloaded INT4 student runs and stays close to full precision.
    fp = load_student(student_ckpt).eval()
    q = load_quantized_student(result.output_dir)
    frames = torch.randint(0, 255, (2, 4, 32, 32, 3), dtype=torch.uint8)
    mask = torch.ones(2, 4, dtype=torch.uint8)
    with torch.no_grad():
        a, b = fp.encode_video(frames, mask).video_emb, q.encode_video(frames, mask).video_emb
    assert a.shape == b.shape and torch.nn.functional.cosine_similarity(a, b).min() > 0.9

    client = run.client
    metrics = client.get_run(run.run_id).data.metrics
    assert {"fp32_t2v_R1", "gptq_t2v_R1", "rtn_t2v_R1", "r1_drop_gptq", "gptq_quantized_bits_per_weight"} <= set(metrics)
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"quantized_model", "quantization_report.txt", "quantization_report.json"} <= artifacts
    report = json.loads(client.download_artifacts(run.run_id, "quantization_report.json", str(tmp_path)) and
                        (tmp_path / "quantization_report.json").read_text())
    assert len(report["layers"]["gptq"]["layers"]) == 8


def test_calibration_reads_only_the_chosen_videos_and_picks_real_frames(teacher_table, plain_student):
    """The same frames as drawing from every real frame of the train split held in memory."""
    cfg, table = teacher_table
    student = load_student(plain_student[0])
    meta = read_meta(table.table_dir)
    images = calibration_images(table.table_dir, meta, student, count=10, seed=5)

    batches = table_batches(table.table_dir, meta, "train")
    every_real_frame = np.concatenate([b.frames[b.frame_mask.astype(bool)] for b in batches])
    pick = np.sort(np.random.default_rng(5).permutation(len(every_real_frame))[:10])
    expected = normalize_frames(torch.from_numpy(every_real_frame[pick]), student.mean, student.std)
    assert images.shape == (10, 3, meta.image_size, meta.image_size)
    torch.testing.assert_close(images, expected)
    assert read_table(table.table_dir, split="train", columns=["video_id"], video_ids=["nope"]).num_rows == 0


def test_a_split_is_read_as_a_stream_of_batches_in_the_tables_order(teacher_table):
    """Evaluation streams a split: batches of the asked size (the last one shorter) in the table's
    order, decoded as a whole read of the split decodes them, and a second pass reads it again."""
    _, table = teacher_table
    meta = read_meta(table.table_dir)
    whole = read_table(table.table_dir, split="train")
    assert whole.num_rows % 5, "the last batch should be a short one"
    batches = table_batches(table.table_dir, meta, "train", batch_size=5)
    first = list(batches)
    assert [len(b) for b in first] == [5] * (whole.num_rows // 5) + [whole.num_rows % 5]
    assert [v for b in first for v in b.video_ids] == whole.column("video_id").to_pylist()
    expected = decode_batch(arrow_to_columns(whole.slice(5, 5)), meta)
    assert np.array_equal(first[1].frames, expected.frames) and first[1].captions == expected.captions
    assert np.array_equal(first[1].teacher_video_emb, expected.teacher_video_emb)
    assert [b.video_ids for b in batches] == [b.video_ids for b in first]
