"""core.video on real H.264 mp4 files written with PyAV."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from core.video import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VideoDecodeError,
    decode_video,
    normalize_frames,
    sample_indices,
)

BRIGHTNESS_STEP = 12  # frame i is a flat grey image of brightness 12 * i


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = 8, rotation: int = 0) -> Path:
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def grey_frames(count: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    return [np.full((height, width, 3), BRIGHTNESS_STEP * i, np.uint8) for i in range(count)]


def frame_numbers(frames: np.ndarray) -> np.ndarray:
    """Recover each decoded frame's source index from its brightness."""
    return np.round(frames.reshape(len(frames), -1).mean(1) / BRIGHTNESS_STEP).astype(int)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    stripe = np.zeros((48, 96, 3), np.uint8)
    stripe[:, 16:80] = 255  # white middle two thirds, black sides: shows where the crop went
    band = np.zeros((32, 64, 3), np.uint8)
    band[:, 24:40] = 255  # a vertical band as stored; shown rotated, it is horizontal
    clips = {
        "long": write_mp4(root / "long.mp4", grey_frames(20)),
        "rotated": write_mp4(root / "rotated.mp4", [band] * 3, rotation=90),
        "narrow": write_mp4(root / "narrow.mp4", grey_frames(5, width=48, height=64)),
        "wide": write_mp4(root / "wide.mp4", grey_frames(5, width=96, height=64)),
        "short": write_mp4(root / "short.mp4", grey_frames(2)),
        "stripe": write_mp4(root / "stripe.mp4", [stripe] * 4),
        "portrait": write_mp4(root / "portrait.mp4", grey_frames(6, width=32, height=64)),
    }
    clips["empty"] = root / "empty.mp4"
    clips["empty"].write_bytes(b"")
    clips["text"] = root / "text.mp4"
    clips["text"].write_text("video0,a man is driving a car\n")
    clips["truncated"] = root / "truncated.mp4"  # PyAV writes the moov atom last: cut it off
    clips["truncated"].write_bytes(clips["long"].read_bytes()[:600])
    clips["audio"] = root / "audio.mp4"
    with av.open(str(clips["audio"]), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return clips


def test_sample_indices_segment_centres():
    assert sample_indices(20, 8).tolist() == [1, 3, 6, 8, 11, 13, 16, 18]
    assert sample_indices(12, 4).tolist() == [1, 4, 7, 10]
    assert sample_indices(8, 8).tolist() == list(range(8))
    assert sample_indices(3, 8).tolist() == [0, 1, 2]
    assert sample_indices(0, 8).tolist() == []
    for total in range(9, 200, 7):
        idx = sample_indices(total, 8)
        assert len(idx) == 8 and np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < total
    with pytest.raises(ValueError):
        sample_indices(10, 0)


def test_decode_samples_frames_in_order(clips):
    frames, mask = decode_video(clips["long"], num_frames=8, size=32)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    assert mask.tolist() == [1] * 8
    assert frame_numbers(frames).tolist() == sample_indices(20, 8).tolist()


def test_decode_without_resize_matches_source(clips):
    frames, mask = decode_video(clips["long"], num_frames=20, size=48)
    assert frame_numbers(frames).tolist() == list(range(20))
    assert mask.all()


def test_short_clip_is_padded_and_masked(clips):
    frames, mask = decode_video(clips["short"], num_frames=6, size=32)
    assert mask.tolist() == [1, 1, 0, 0, 0, 0]
    assert frame_numbers(frames[:2]).tolist() == [0, 1]
    assert not frames[2:].any()


@pytest.mark.parametrize("size", [48, 24])
def test_centre_crop_keeps_the_middle(clips, size):
    frames, _ = decode_video(clips["stripe"], num_frames=2, size=size)
    assert frames.shape == (2, size, size, 3)
    # The crop spans the middle half of the width, inside the white stripe.
    assert frames.min() > 200


def test_portrait_clip_is_cropped_vertically(clips):
    frames, mask = decode_video(clips["portrait"], num_frames=4, size=16)
    assert frames.shape == (4, 16, 16, 3) and mask.all()
    assert frame_numbers(frames).tolist() == sample_indices(6, 4).tolist()


def test_display_rotation_is_applied_before_resizing(clips):
    # Shown as 32x64 (w x h) with a white band across rows 24..40: resized to 16x32 the band is
    # rows 12..20, so the centre crop (rows 8..24) is white in rows 4..12. Resizing with the
    # stored 64x32 shape would squash the band to two rows.
    frames, _ = decode_video(clips["rotated"], num_frames=1, size=16)
    row_brightness = frames[0].mean(axis=(1, 2))
    assert (row_brightness[5:11] > 200).all()
    assert (row_brightness[:3] < 50).all() and (row_brightness[-3:] < 50).all()


@pytest.mark.parametrize("name, size", [("narrow", 48), ("wide", 48)])
def test_widths_decord_mis_sizes_still_decode(clips, name, size):
    # decord 0.6 fails on rows 48 or 72 pixels wide: 48x64 read as is, 96x64 resized to 72x48.
    frames, mask = decode_video(clips[name], num_frames=5, size=size)
    assert frames.shape == (5, size, size, 3) and mask.all()
    assert frame_numbers(frames).tolist() == list(range(5))


@pytest.mark.parametrize(
    "name, reason",
    [
        ("missing", "missing"),
        ("empty", "empty"),
        ("text", "corrupt"),
        ("truncated", "corrupt"),
        ("audio", "no_frames"),
    ],
)
def test_bad_files_raise_decode_error(clips, name, reason):
    path = clips.get(name, clips["long"].parent / "missing.mp4")
    with pytest.raises(VideoDecodeError) as caught:
        decode_video(path, num_frames=4, size=32, video_id=f"vid-{name}")
    error = caught.value
    assert (error.reason, error.video_id, error.path) == (reason, f"vid-{name}", str(path))
    assert "\n" not in str(error) and f"vid-{name}" in str(error) and reason in str(error)


def test_a_directory_is_not_called_a_missing_file(tmp_path):
    (tmp_path / "clip.mp4").mkdir()
    with pytest.raises(VideoDecodeError, match="a directory, not a video file") as caught:
        decode_video(tmp_path / "clip.mp4", num_frames=4, size=32)
    assert caught.value.reason == "missing"


DECODE_DAMAGED = """
import sys
from core.video import decode_video, set_decoder_logging
if sys.argv[2:] == ["verbose"]:
    set_decoder_logging(True)
frames, mask = decode_video(sys.argv[1], num_frames=8, size=32)
print("decoded", int(mask.sum()))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_decoder_errors_of_a_damaged_clip_stay_off_stderr_unless_verbose(clips, tmp_path, verbose):
    """A clip with damaged frame data still decodes; ffmpeg's complaints about each damaged
    macroblock are shown only when asked for (the C library writes them: hence a process)."""
    rng = np.random.default_rng(0)
    noise = write_mp4(tmp_path / "noise.mp4", [rng.integers(0, 255, (48, 64, 3), np.uint8) for _ in range(12)])
    data = bytearray(noise.read_bytes())
    frames_start, frames_end = data.find(b"mdat"), data.find(b"moov")  # PyAV writes the index last
    for i in range((frames_start + frames_end) // 2, frames_end - 8, 41):  # the later frames' data
        data[i] ^= 0x5A
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-c", DECODE_DAMAGED, str(damaged)] + (["verbose"] if verbose else [])
    done = subprocess.run(args, capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0 and "decoded 8" in done.stdout, done.stderr[-2000:]
    assert ("error while decoding" in done.stderr) == verbose, done.stderr[-2000:]


def test_video_id_defaults_to_file_stem_and_error_pickles(tmp_path):
    with pytest.raises(VideoDecodeError) as caught:
        decode_video(tmp_path / "video42.mp4", num_frames=4, size=32)
    assert caught.value.video_id == "video42"
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.video_id, copy.path, copy.reason) == ("video42", str(tmp_path / "video42.mp4"), "missing")
    assert str(copy) == str(caught.value)


def test_normalize_frames():
    frames = torch.randint(0, 256, (2, 3, 5, 7, 3), dtype=torch.uint8)
    out = normalize_frames(frames, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert out.shape == (2, 3, 3, 5, 7) and out.dtype == torch.float32 and out.is_contiguous()
    channel = 1
    expected = (frames[..., channel].float() / 255 - OPENAI_CLIP_MEAN[channel]) / OPENAI_CLIP_STD[channel]
    torch.testing.assert_close(out[:, :, channel], expected)
    # numpy input (what decode_video returns) works too
    torch.testing.assert_close(normalize_frames(frames.numpy(), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), out)
    with pytest.raises(ValueError, match="uint8"):
        normalize_frames(frames.float(), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_normalize_frames_on_gpu():
    frames = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    on_gpu = normalize_frames(frames.cuda(), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), normalize_frames(frames, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
