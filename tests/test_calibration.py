"""Calibrated teacher temperatures: hand-computed roots, the published fallbacks, and a table read."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.calibration import (NLL_TAU_MAX, TAU_RANGE, calibrate, fit_temperature, frame_entropy, resolve_temperatures,
                              solve_temperature, teacher_batches, video_entropy, video_nll)
from core.config import PUBLISHED_TAU_FRAME, PUBLISHED_TAU_VIDEO, CalibrationConfig, DistillConfig, LossConfig
from core.features import SCHEMA, TableMeta, commit_table, to_bytes
from core.losses import TeacherBatch

# softmax(1/tau, 0) = (0.9, 0.1) at tau = 1 / ln 9; its entropy as a fraction of ln 2:
TAU_09 = 1.0 / math.log(9.0)
H_09 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2.0)  # 0.468996


def two_by_two(frames: int = 2, pad: bool = False) -> TeacherBatch:
    """Two videos, two captions: video i matches caption i (cos 1) and not the other (cos 0).
    Each video's first frame is its caption (cos 1), its second orthogonal to it (cos 0)."""
    e = torch.eye(3)
    frame_emb = torch.stack([torch.stack([e[0], e[2]] + [e[0]] * (frames - 2)),
                             torch.stack([e[1], e[2]] + [e[1]] * (frames - 2))])
    mask = torch.ones(2, frames, dtype=torch.bool)
    if pad:
        mask[:, 2:] = False  # padded frames, identical to frame 0, must not count
    return TeacherBatch(video_emb=e[:2], frame_emb=frame_emb, text_emb=e[:2], frame_mask=mask)


def test_hand_computed_roots():
    assert H_09 == pytest.approx(0.468996, abs=1e-6)
    batch = [two_by_two()]
    assert video_entropy(batch, TAU_09) == pytest.approx(H_09, abs=1e-6)
    assert frame_entropy(batch, TAU_09) == pytest.approx(H_09, abs=1e-6)
    result = calibrate(batch, video_target=H_09, frame_target=H_09)
    assert result.tau_video == pytest.approx(TAU_09, rel=1e-6)  # 0.455120
    assert result.tau_frame == pytest.approx(TAU_09, rel=1e-6)
    assert result.video_entropy == pytest.approx(H_09, abs=1e-6)
    # padded frames add nothing, whatever they hold
    padded = calibrate([two_by_two(frames=4, pad=True)], video_target=None, frame_target=H_09)
    assert padded.tau_frame == pytest.approx(TAU_09, rel=1e-6)


def one_wrong_of_two() -> TeacherBatch:
    """Two videos, both the first caption's (cos 1 with it, 0 with the second): row 0 ranks its own
    caption first, row 1 ranks the other's first."""
    e = torch.eye(3)
    return TeacherBatch(video_emb=torch.stack([e[0], e[0]]), frame_emb=torch.stack([e[:2], e[:2]]),
                        text_emb=e[:2], frame_mask=torch.ones(2, 2, dtype=torch.bool))


def test_nll_calibration_makes_the_teachers_confidence_its_accuracy():
    """Temperature scaling, by hand: 3 rows of 4 rank their own caption first by a cosine margin
    of 1, one ranks the other first by 1. NLL(b = 1/tau) = (3 log(1 + e^-b) + log(1 + e^b)) / 4,
    whose minimum has sigmoid(b) = 3/4: b = ln 3, tau = 1 / ln 3 = 0.910239, where the teacher's
    probability of the true caption is its accuracy, 0.75."""
    held_out = [two_by_two(), one_wrong_of_two()]
    tau = 1.0 / math.log(3.0)
    nll = lambda t: (3 * math.log1p(math.exp(-1 / t)) + math.log1p(math.exp(1 / t))) / 4  # noqa: E731
    assert video_nll(held_out, tau) == pytest.approx(nll(tau), abs=1e-6)
    assert video_nll(held_out, 0.3) == pytest.approx(nll(0.3), abs=1e-6)
    result = calibrate([two_by_two()], video_target=0.5, frame_target=None, nll_batches=held_out)
    assert result.method == "nll" and result.tau_video == pytest.approx(tau, rel=1e-5)
    assert result.video_nll == pytest.approx(nll(tau), abs=1e-6) and result.nll_videos == 4
    assert result.published_video_nll == pytest.approx(nll(PUBLISHED_TAU_VIDEO), abs=1e-4)  # 25.0: confidently wrong
    assert result.video_entropy == pytest.approx(video_entropy([two_by_two()], tau)), "reported on the train batches"
    # a teacher right every time: sharper is always better, the bracket's edge
    assert fit_temperature(lambda t: video_nll([two_by_two()], t)) == pytest.approx(TAU_RANGE[0], rel=1e-3)
    assert fit_temperature(lambda t: (math.log(t) - math.log(0.05)) ** 2) == pytest.approx(0.05, rel=1e-6)
    # a teacher wrong as often as right says nothing: the softest temperature a config takes
    chance = [two_by_two(), TeacherBatch(torch.eye(3)[:2], torch.eye(3)[:2, None].expand(-1, 2, -1),
                                         torch.eye(3)[[1, 0]], torch.ones(2, 2, dtype=torch.bool))]
    soft = calibrate([two_by_two()], video_target=0.5, frame_target=None, nll_batches=chance)
    assert soft.tau_video == pytest.approx(NLL_TAU_MAX, rel=1e-3) and LossConfig(tau_video=soft.tau_video)


def test_published_entropies_and_kept_values():
    batch = [two_by_two()]
    # at the published tau_video 0.01 the 2x2 target is one-hot; at tau_frame 1: softmax(1, 0)
    p = 1.0 / (1.0 + math.exp(-1.0))
    h_published_frame = -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2.0)
    result = calibrate(batch, video_target=None, frame_target=None, tau_video=0.2, tau_frame=0.7)
    assert (result.tau_video, result.tau_frame) == (0.2, 0.7), "no target: the given values stay"
    assert result.published_video_entropy == pytest.approx(0.0, abs=1e-6)
    assert result.published_frame_entropy == pytest.approx(h_published_frame, abs=1e-6)  # 0.838
    assert result.params()["calibration.tau_video"] == 0.2


def test_a_target_out_of_reach_keeps_the_given_value():
    # every frame equal: the frame target is uniform at every temperature
    flat = two_by_two()
    flat = TeacherBatch(flat.video_emb, flat.frame_emb[:, :1].expand(-1, 2, -1), flat.text_emb, flat.frame_mask)
    assert solve_temperature(lambda t: frame_entropy([flat], t), 0.5) is None
    result = calibrate([flat], video_target=H_09, frame_target=0.5)
    assert result.tau_frame == PUBLISHED_TAU_FRAME and result.frame_entropy == pytest.approx(1.0)
    assert result.tau_video == pytest.approx(TAU_09, rel=1e-6)


def test_entropy_grows_with_the_temperature():
    torch.manual_seed(0)
    batch = teacher_batches(*random_embeddings(40), batch_size=16)
    taus = np.geomspace(*TAU_RANGE, 30)
    values = [video_entropy(batch, t) for t in taus]
    assert all(b >= a - 1e-6 for a, b in zip(values, values[1:]))
    assert values[0] < 0.05 and values[-1] > 0.99


def test_batches_are_shaped_as_training_shapes_them():
    video, frames, texts, mask = random_embeddings(10)
    batches = teacher_batches(video, frames, texts, mask, batch_size=4)
    assert [len(b.video_emb) for b in batches] == [4, 4], "the last partial batch is dropped"
    assert batches[0].frame_emb.shape == (4, 3, 8) and batches[0].frame_mask.dtype == torch.bool
    again = teacher_batches(video, frames, texts, mask, batch_size=4)
    assert torch.equal(batches[1].text_emb, again[1].text_emb), "seeded: the same videos and captions"
    assert len(teacher_batches(video[:3], frames[:3], texts[:3], mask[:3], batch_size=32)) == 1


def test_auto_is_the_default_and_published_values_are_pinned():
    loss = LossConfig()
    assert (loss.tau_video, loss.tau_frame) == ("auto", "auto")
    assert (PUBLISHED_TAU_VIDEO, PUBLISHED_TAU_FRAME) == (0.01, 1.0)
    assert (loss.calibration.video_entropy, loss.calibration.frame_entropy) == (0.10, 0.99)
    assert (loss.calibration.method, loss.calibration.split) == ("nll", "val")
    with pytest.raises(ValueError):
        LossConfig(tau_video="sharp")


def test_resolve_without_a_teacher_term_needs_no_table(tmp_path):
    missing = tmp_path / "no-table"
    plain = DistillConfig(teacher_mode="none", loss=LossConfig(objective="none"))
    resolved, calibration = resolve_temperatures(plain, missing)
    assert calibration is None and (resolved.loss.tau_video, resolved.loss.tau_frame) == (0.01, 1.0)
    fixed = DistillConfig(loss=LossConfig(tau_video=0.05, tau_frame=0.5))
    assert resolve_temperatures(fixed, missing) == (fixed, None), "numbers are used as they are"


def test_resolve_reads_the_train_split_of_a_table(tmp_path):
    table = write_table(tmp_path, train=24, val=6)
    distill = DistillConfig(batch_size=8, loss=LossConfig(tau_frame=0.5, calibration=CalibrationConfig(
        videos=16, method="entropy")))
    resolved, calibration = resolve_temperatures(distill, table)
    assert calibration.videos == 16 and calibration.batch_size == 8
    assert resolved.loss.tau_frame == 0.5 and calibration.tau_frame == 0.5, "a number is kept"
    assert resolved.loss.tau_video == calibration.tau_video
    assert calibration.video_entropy == pytest.approx(0.10, abs=1e-4)
    # the same 16 train videos, batched the same way, give the same root
    video, frames, texts, mask = random_embeddings(30, seed=1)
    again = calibrate(teacher_batches(video[:16], frames[:16], texts[:16], mask[:16], 8), 0.10, None, tau_frame=0.5)
    assert again.tau_video == pytest.approx(calibration.tau_video, rel=1e-3)  # float16 in the table

    with pytest.raises(ValueError, match="at least 2 videos"):
        resolve_temperatures(distill.model_copy(update={"train_splits": ["pool"]}), table)


def test_resolve_by_nll_reads_the_held_out_split(tmp_path):
    """The default: tau_video by NLL on the val rows (batched as training batches), tau_frame by
    entropy on the train rows; a split without videos is a one-line error."""
    table = write_table(tmp_path, train=24, val=12)
    distill = DistillConfig(batch_size=4, loss=LossConfig(calibration=CalibrationConfig(videos=16)))
    resolved, calibration = resolve_temperatures(distill, table)
    video, frames, texts, mask = random_embeddings(36, seed=1)
    held_out = teacher_batches(video[24:], frames[24:], texts[24:], mask[24:], 4)
    expected = fit_temperature(lambda t: video_nll(held_out, t))
    assert calibration.method == "nll" and calibration.nll_videos == 12 and calibration.videos == 16
    assert resolved.loss.tau_video == calibration.tau_video == pytest.approx(expected, rel=1e-2)  # float16 in the table
    assert calibration.frame_entropy == pytest.approx(0.99, abs=1e-4)
    assert calibration.params()["calibration.method"] == "nll"
    with pytest.raises(ValueError, match="at least 2 videos in test"):
        resolve_temperatures(distill.model_copy(update={"loss": distill.loss.model_copy(update={
            "calibration": CalibrationConfig(split="test")})}), table)


# ------------------------------------------------------------------------------ helpers
def random_embeddings(n: int, frames: int = 3, dim: int = 8, captions: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    frame = torch.nn.functional.normalize(video[:, None] + 0.5 * torch.randn(n, frames, dim, generator=g), dim=-1)
    text = torch.nn.functional.normalize(video[:, None] + 0.8 * torch.randn(n, captions, dim, generator=g), dim=-1)
    mask = torch.ones(n, frames, dtype=torch.uint8)
    return list(video), list(frame), list(text), list(mask)


def write_table(root, train: int, val: int, frames: int = 3, dim: int = 8):
    """A committed feature table, written with pyarrow alone: `train` train rows first (the
    embeddings of random_embeddings(train + val, seed=1)), then `val`."""
    video, frame, text, mask = random_embeddings(train + val, frames, dim, seed=1)
    rows = {name: [] for name in SCHEMA.names}
    for i in range(train + val):
        rows["video_id"].append(f"v{i:03d}")
        rows["split"].append("train" if i < train else "val")
        rows["frames"].append(bytes(frames * 4 * 4 * 3))
        rows["frame_mask"].append(to_bytes(mask[i].numpy(), "uint8"))
        rows["captions"].append(["a", "b"])
        rows["teacher_frame_emb"].append(to_bytes(frame[i].numpy(), "float16"))
        rows["teacher_video_emb"].append(to_bytes(video[i].numpy(), "float16"))
        rows["teacher_text_emb"].append(to_bytes(text[i].numpy(), "float16"))
    staging = root / "staging"
    staging.mkdir()
    pq.write_table(pa.table(rows, schema=SCHEMA), staging / "part-000000.parquet")
    meta = TableMeta(num_frames=frames, image_size=4, teacher={"kind": "vidkd", "name": "t"}, embed_dim=dim,
                     cache_key="k", counts={"train": train, "val": val})
    commit_table(staging, root / "table", meta, [])
    return root / "table"
