"""The built-in InternVideo2 stage-2 teacher against the official code, without the real weights.

The fixtures come from the official repository's code (tests/fixtures/make_internvideo2_reference.py):
the key/shape list of the stage-2 1B training model, and a micro-width model of the same classes
with random weights, its inputs and its retrieval outputs.
"""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer

from core.config import TeacherConfig
from core.teachers import build_teacher, teacher_identity
from core.teachers.internvideo2_model import (VARIANTS, checkpoint_shapes, load_stage2, read_state_dict,
                                              stage2_from_state_dict)
from tests.test_teachers import check_protocol, random_frames

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "internvideo2_stage2-micro_reference.pt", weights_only=True)


def write_tokenizer(directory: Path, words: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def micro_files(reference, tmp_path_factory):
    """The official micro model's weights as a checkpoint file, and its vocabulary as a tokenizer."""
    root = tmp_path_factory.mktemp("internvideo2")
    torch.save(reference["state_dict"], root / "stage2-micro.pt")
    return root / "stage2-micro.pt", write_tokenizer(root / "tokenizer", reference["vocab"])


def micro_teacher(micro_files, **overrides):
    checkpoint, tokenizer = micro_files
    cfg = dict(kind="internvideo2", variant="stage2-micro", checkpoint=str(checkpoint), tokenizer=str(tokenizer))
    return build_teacher(TeacherConfig(**{**cfg, **overrides}))


# ------------------------------------------------------------------------------------ shapes
def test_keys_and_shapes_equal_the_official_models(reference):
    official_1b = json.loads((FIXTURES / "internvideo2_stage2-1b_keys.json").read_text())
    assert checkpoint_shapes(VARIANTS["stage2-1b"]) == {k: tuple(v) for k, v in official_1b.items()}
    assert len(official_1b) == 1023
    assert checkpoint_shapes(VARIANTS["stage2-micro"]) == {k: tuple(v) for k, v in reference["keys"].items()}
    config_variants = typing.get_args(typing.get_args(TeacherConfig.model_fields["variant"].annotation)[0])
    assert set(config_variants) == set(VARIANTS)  # the config accepts exactly the built-in variants


def test_a_checkpoint_shaped_state_dict_loads_strictly_at_full_size():
    """Every key of the 1B checkpoint at its shape (meta tensors: no memory): loads, and the
    model holds the retrieval towers only."""
    shapes = checkpoint_shapes(VARIANTS["stage2-1b"])
    state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    model = stage2_from_state_dict("stage2-1b", state, device="meta")
    kept = set(model.state_dict())
    assert kept < set(shapes)
    assert "text_encoder.bert.encoder.layer.18.output.dense.weight" in kept
    assert not any(k.startswith(("text_encoder.bert.encoder.layer.19.", "text_encoder.cls.", "itm_head.",
                                 "vision_encoder.clip_decoder.")) for k in kept)
    params = sum(t.numel() for t in model.state_dict().values())
    assert 1.2e9 < params < 1.35e9  # the 1B vision tower, 19 BERT-large layers, projections


def test_missing_unexpected_and_misshapen_keys_are_one_error(reference, tmp_path):
    state = dict(reference["state_dict"])
    del state["vision_encoder.blocks.0.attn.qkv.weight"], state["itm_head.bias"]
    state["vision_encoder.extra"] = torch.zeros(1)
    state["text_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as error:
        stage2_from_state_dict("stage2-micro", state, source="model.pt")
    message = str(error.value)
    assert "\n" not in message and message.startswith("model.pt is not an InternVideo2 stage2-micro checkpoint")
    assert "2 missing keys: vision_encoder.blocks.0.attn.qkv.weight, itm_head.bias" in message
    assert "1 unexpected keys: vision_encoder.extra" in message
    assert "text_proj.weight (3, 3) (expected (16, 32))" in message
    with pytest.raises(ValueError, match="unknown InternVideo2 variant"):
        stage2_from_state_dict("stage2-2b", state)


def test_checkpoint_files_are_read_as_tensors_only(reference, tmp_path):
    wrapped = tmp_path / "deepspeed.pt"
    torch.save({"module": reference["state_dict"], "global_steps": torch.tensor(3)}, wrapped)
    assert read_state_dict(wrapped).keys() == reference["state_dict"].keys()
    legacy = tmp_path / "legacy.pt"  # the pre-zip format, which cannot be memory-mapped
    torch.save(reference["state_dict"], legacy, _use_new_zipfile_serialization=False)
    assert read_state_dict(legacy).keys() == reference["state_dict"].keys()

    pickled = tmp_path / "pickled.pt"  # training arguments: an object torch.load would have to rebuild
    torch.save({"model": reference["state_dict"], "args": argparse.Namespace(lr=1e-4)}, pickled)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        read_state_dict(pickled)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "absent.pt")


# ----------------------------------------------------------------------------------- numbers
def test_embeddings_match_the_official_code(reference, micro_files):
    """Same weights, frames and captions as the official demo's get_vid_feat/get_txt_feat, fp32 CPU."""
    teacher = micro_teacher(micro_files)
    model = teacher.model
    with torch.no_grad():
        video = model.get_vid_feat(reference["frames"])
        frame = model.get_vid_feat(reference["frames"].flatten(0, 1)[:, None]).view_as(reference["frame"])
        text = model.get_txt_feat(reference["captions"])
    for ours, theirs in ((video, reference["video"]), (frame, reference["frame"]), (text, reference["text"])):
        assert (ours - theirs).abs().max() < 1e-4
    assert not torch.allclose(video, frame.mean(1), atol=1e-3)  # a clip is more than its frames' mean
    assert teacher.temperature == pytest.approx(float(reference["state_dict"]["temp"]))


# ----------------------------------------------------------------------------------- teacher
def test_builtin_teacher_follows_the_protocol(micro_files):
    teacher = micro_teacher(micro_files)
    assert (teacher.num_frames, teacher.image_size, teacher.embed_dim) == (4, 32, 16)
    assert teacher.mean == (0.485, 0.456, 0.406)
    frames = random_frames(2, 6, 40, seed=4)  # resized to 32 inside
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    video_emb, frame_emb = check_protocol(teacher, frames, mask)

    pixels = teacher.preprocess(frames)
    clips = torch.stack([pixels[0, [0, 2, 3, 5]], pixels[1, [0, 1, 1, 1]]])  # centres; last frame repeated
    torch.testing.assert_close(video_emb, teacher.model.get_vid_feat(clips))
    torch.testing.assert_close(frame_emb[1, :2], teacher.model.get_vid_feat(pixels[1, :2, None]))

    identity = teacher.identity()
    assert identity["kind"] == "internvideo2" and identity["name"] == "stage2-micro"
    assert identity == micro_teacher(micro_files).identity()


def test_the_cache_key_knows_the_checkpoint_and_tokenizer_as_the_teacher_does(micro_files, reference, tmp_path):
    """Extraction keys its table by `teacher_identity(cfg)` without loading the teacher: for a
    built-in teacher it is the loaded teacher's own identity, tokenizer included."""
    checkpoint, tokenizer = micro_files
    cfg = TeacherConfig(kind="internvideo2", variant="stage2-micro", checkpoint=str(checkpoint),
                        tokenizer=str(tokenizer))
    assert teacher_identity(cfg) == micro_teacher(micro_files).identity()
    other = write_tokenizer(tmp_path / "tok", reference["vocab"] + ["extra"])
    assert teacher_identity(cfg.model_copy(update={"tokenizer": str(other)})) != teacher_identity(cfg)


def test_identity_follows_weights_and_tokenizer(reference, micro_files, tmp_path):
    checkpoint, _ = micro_files
    first = micro_teacher(micro_files).identity()
    other_tokenizer = write_tokenizer(tmp_path / "tok", reference["vocab"] + ["extra"])
    assert micro_teacher(micro_files, tokenizer=str(other_tokenizer)).identity() != first
    state = dict(reference["state_dict"], temp=torch.tensor(0.05))
    torch.save(state, tmp_path / "other.pt")
    assert micro_teacher(micro_files, checkpoint=str(tmp_path / "other.pt")).identity() != first


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_and_returns_fp32(micro_files, dtype):
    frames, mask = random_frames(2, 4, 32, seed=8), torch.ones(2, 4, dtype=torch.bool)
    full, half = micro_teacher(micro_files), micro_teacher(micro_files, dtype=dtype)
    assert next(half.model.parameters()).dtype == getattr(torch, dtype)
    video_emb, frame_emb = check_protocol(half, frames, mask)
    expected_video, expected_frames = full.encode_video(frames, mask)
    assert (video_emb * expected_video).sum(-1).min() > 0.99
    assert (frame_emb * expected_frames).sum(-1).min() > 0.99
    assert (half.encode_text(["a red car"]) * full.encode_text(["a red car"])).sum() > 0.99
    assert half.identity()["dtype"] == dtype and half.identity() != full.identity()


def test_config_and_file_errors(micro_files, tmp_path):
    checkpoint, tokenizer = micro_files
    with pytest.raises(ValueError, match="needs `variant`, `checkpoint`"):
        TeacherConfig(kind="internvideo2", variant="stage2-1b", checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match="and no `path`"):
        TeacherConfig(kind="internvideo2", variant="stage2-1b", checkpoint="a.pt", tokenizer="t", path="d")
    with pytest.raises(ValueError, match="variant"):
        TeacherConfig(kind="internvideo2", variant="stage2-2b", checkpoint="a.pt", tokenizer="t")
    with pytest.raises(ValueError, match="trust_remote_code"):  # the remote-code path is unchanged
        TeacherConfig(kind="internvideo2", path="models/iv2")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        micro_teacher(micro_files, tokenizer=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="is not an InternVideo2 stage2-1b checkpoint: .*missing keys"):
        micro_teacher(micro_files, variant="stage2-1b")
    big = write_tokenizer(tmp_path / "big", [f"w{i}" for i in range(200)])
    with pytest.raises(ValueError, match="has 205 tokens, stage2-micro embeds 128"):
        micro_teacher(micro_files, tokenizer=str(big))


def test_load_stage2_moves_and_casts(micro_files):
    model = load_stage2("stage2-micro", micro_files[0], torch.bfloat16)
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    assert not model.training
