"""The synthetic dataset: real H.264 files decord can read, reproducible, captions that tell clips apart."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import decord
import numpy as np
import pytest
from pydantic import ValidationError

from core.config import SynthConfig
from core.synth import (
    ACTIONS,
    COLOURS,
    TIMES,
    VEHICLES,
    WEATHERS,
    generate_dataset,
    render_scene,
    sample_scene,
    scene_captions,
    split_names,
)

SMALL = dict(width=64, height=48, fps=8, min_seconds=0.5, max_seconds=2.0, val_fraction=0.2, test_fraction=0.2)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """12 clips of 4 to 16 frames at 64x48, rendered by a two-process pool."""
    cfg = SynthConfig(videos=12, seed=7, **SMALL)
    return generate_dataset(tmp_path_factory.mktemp("synth"), cfg, progress=False, workers=2)


def test_writes_h264_mp4_files_that_decord_reads(small_dataset):
    assert small_dataset.name == "manifest.jsonl"
    records = _read_jsonl(small_dataset)
    scenes = {row["video_id"]: row for row in _read_jsonl(small_dataset.parent / "scenes.jsonl")}
    assert len(records) == 12 and len({r["video_id"] for r in records}) == 12
    frame_counts = []
    for record in records:
        assert set(record) == {"video_id", "path", "captions", "split"}
        assert not Path(record["path"]).is_absolute()  # the dataset folder can move
        path = small_dataset.parent / record["path"]
        assert path.read_bytes()[4:8] == b"ftyp"  # an mp4 container
        reader = decord.VideoReader(str(path))
        assert len(reader) == scenes[record["video_id"]]["num_frames"]
        assert 4 <= len(reader) <= 16  # fps x [min_seconds, max_seconds]
        assert reader.get_avg_fps() == pytest.approx(8)
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
        assert frames.shape[1:] == (48, 64, 3)
        assert np.abs(np.diff(frames.astype(int), axis=0)).max() > 30  # things move (even at night in fog)
        frame_counts.append(len(reader))
    assert min(frame_counts) < 8 < max(frame_counts)  # short clips exercise frame padding downstream


def test_splits_follow_the_fractions(small_dataset):
    splits = [record["split"] for record in _read_jsonl(small_dataset)]
    assert {name: splits.count(name) for name in ("train", "val", "test")} == {"train": 8, "val": 2, "test": 2}

    cfg = SynthConfig(videos=200, val_fraction=0.15, test_fraction=0.1)
    names = split_names(200, cfg)
    assert (names.count("val"), names.count("test"), names.count("train")) == (30, 20, 150)
    assert names == split_names(200, cfg)
    tiny = split_names(3, SynthConfig(videos=3, val_fraction=0.1, test_fraction=0.1))
    assert sorted(tiny) == ["test", "train", "val"]  # a nonzero fraction never rounds to an empty split
    assert set(split_names(10, SynthConfig(videos=10, val_fraction=0, test_fraction=0))) == {"train"}


def test_a_pool_split_for_the_teacher_leaves_the_other_splits_alone():
    plain = SynthConfig(videos=200, val_fraction=0.15, test_fraction=0.1)
    pooled = plain.model_copy(update={"pool_fraction": 0.5})
    names, with_pool = split_names(200, plain), split_names(200, pooled)
    assert {n: with_pool.count(n) for n in ("train", "val", "test", "pool")} == {"train": 50, "val": 30, "test": 20,
                                                                                "pool": 100}
    # val and test are the same videos with or without a pool: the pool comes out of train only
    assert [i for i, n in enumerate(names) if n != "train"] == [i for i, n in enumerate(with_pool) if n in ("val", "test")]
    with pytest.raises(ValueError, match="must leave some train videos"):
        SynthConfig(videos=100, val_fraction=0.2, test_fraction=0.2, pool_fraction=0.6)


def test_same_seed_same_dataset_whatever_the_workers(tmp_path):
    cfg = SynthConfig(videos=5, seed=11, **SMALL)
    one = generate_dataset(tmp_path / "one", cfg, progress=False, workers=1)
    two = generate_dataset(tmp_path / "two", cfg, progress=False, workers=2)
    other = generate_dataset(tmp_path / "other", cfg.model_copy(update={"seed": 12}), progress=False, workers=1)
    assert one.read_bytes() == two.read_bytes()
    assert (one.parent / "scenes.jsonl").read_bytes() == (two.parent / "scenes.jsonl").read_bytes()
    assert one.read_bytes() != other.read_bytes()
    for record in _read_jsonl(one):
        first = decord.VideoReader(str(one.parent / record["path"]))[0].asnumpy()
        again = decord.VideoReader(str(two.parent / record["path"]))[0].asnumpy()
        np.testing.assert_array_equal(first, again)


def test_captions_name_every_attribute_and_tell_clips_apart():
    scenes = [sample_scene(np.random.default_rng((5, i)), 24, 8) for i in range(40)]
    captions = [scene_captions(scene, 3, np.random.default_rng((6, i))) for i, scene in enumerate(scenes)]
    assert len({c[0] for c in captions}) >= 36
    for scene, paraphrases in zip(scenes, captions):
        assert len(set(paraphrases)) == 3
        for caption in paraphrases:
            assert scene.colour in caption
            assert caption == caption.lower() and "  " not in caption and "{" not in caption
    # the grammar reaches every value of every attribute
    many = [sample_scene(np.random.default_rng((8, i)), 24, 8) for i in range(400)]
    for field, values in (("vehicle", VEHICLES), ("colour", COLOURS), ("action", ACTIONS), ("time", TIMES),
                          ("weather", WEATHERS)):
        assert {getattr(scene, field) for scene in many} == set(values)


def test_events_cover_part_of_the_clip_and_show_on_screen():
    scene = sample_scene(np.random.default_rng(0), 40, 8)
    scene = replace(scene, vehicle="car", colour="red", action="overtaking", time="day", weather="clear",
                    extra="light_to_green", event=(10, 30), extra_event=(20, 20))
    frames = render_scene(scene, 96, 64).astype(int)
    red, green, blue = frames[..., 0], frames[..., 1], frames[..., 2]
    red_pixels = ((red > 180) & (green < 60) & (blue < 60)).sum(axis=(1, 2))
    green_pixels = ((green > 200) & (red < 120) & (blue < 150)).sum(axis=(1, 2))
    # before the event the only saturated red is the signal; the car adds many more pixels
    assert red_pixels[:10].max() < 25 and red_pixels[10:20].min() > 50 and red_pixels[31:].max() == 0
    assert green_pixels[:20].max() == 0 and green_pixels[20:].min() > 0  # the light turns green at frame 20


def test_bad_config_is_rejected():
    with pytest.raises(ValidationError, match="even"):
        SynthConfig(width=33)
    with pytest.raises(TypeError, match="SynthConfig"):
        generate_dataset("unused", {"videos": 3})
