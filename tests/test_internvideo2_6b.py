"""The built-in InternVideo2 stage-2 6B layout against the official code, without the real weights.

The fixtures come from the official repository's code (tests/fixtures/make_internvideo2_reference.py):
the key/shape list of the 6B's training class (`InternVideo2_Stage2_audiovisual`: vision, text and
BEATs audio towers) built on the meta device, and that class at micro width with random weights,
its inputs and its retrieval embeddings as the official evaluation computes them.
"""

from __future__ import annotations

import gzip
import json
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from core.config import TeacherConfig
from core.teachers import build_teacher
from core.teachers.internvideo2_model import VARIANTS, checkpoint_shapes, read_state_dict, stage2_from_state_dict
from tests.test_internvideo2 import write_tokenizer
from tests.test_teachers import check_protocol, random_frames

FIXTURES = Path(__file__).parent / "fixtures"
AUDIOVISUAL = ("audio_encoder.", "audio_proj.", "av_concat_audio_proj.", "av_concat_vision_proj.", "av_fusion.",
               "avtm_head.")


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "internvideo2_stage2-6b-micro_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def micro_files(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("internvideo2-6b")
    torch.save(reference["state_dict"], root / "stage2-6b-micro.pt")
    return root / "stage2-6b-micro.pt", write_tokenizer(root / "tokenizer", reference["vocab"])


def official_6b_shapes() -> dict[str, tuple[int, ...]]:
    keys = json.loads(gzip.decompress((FIXTURES / "internvideo2_stage2-6b_keys.json.gz").read_bytes()))
    return {key: tuple(shape) for key, shape in keys.items()}


# ------------------------------------------------------------------------------------ shapes
def test_6b_keys_and_shapes_equal_the_official_model(reference):
    official = official_6b_shapes()
    assert checkpoint_shapes(VARIANTS["stage2-6b"]) == official
    assert len(official) == 1389
    # what differs from the 1B beyond widths: the audio side, and fusion layers that read it
    assert sum(k.startswith("audio_encoder.") for k in official) == 250
    assert official["text_encoder.bert.encoder.layer.19.crossattention.self.key.weight"] == (1024, 768)
    assert "vision_encoder.img_pos_embed" not in official
    assert checkpoint_shapes(VARIANTS["stage2-6b-micro"]) == {k: tuple(v) for k, v in reference["keys"].items()}


def test_a_6b_checkpoint_shaped_state_dict_loads_strictly_without_allocating():
    """Every key of the 6B checkpoint at its shape as meta tensors: loads strictly, stays on the
    meta device (nothing is allocated), and keeps the retrieval towers only."""
    shapes = official_6b_shapes()
    state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    model = stage2_from_state_dict("stage2-6b", state, torch.bfloat16, device="meta")
    kept = model.state_dict()
    assert {t.device.type for t in kept.values()} == {"meta"} and {t.dtype for t in kept.values()} == {torch.bfloat16}
    assert set(kept) < set(shapes)
    assert not any(k.startswith(AUDIOVISUAL + ("text_encoder.bert.encoder.layer.19.", "text_encoder.cls.",
                                               "itm_head.", "vision_encoder.clip_decoder.",
                                               "vision_encoder.final_clip_decoder.",
                                               "vision_encoder.clip_pos_embed")) for k in kept)
    assert "vision_encoder.clip_projector.cross_attn.q.weight" in kept  # the attention pooling stays
    assert kept["vision_proj.weight"].shape == (768, 768) and kept["text_proj.weight"].shape == (768, 1024)
    params = sum(t.numel() for t in kept.values())
    assert 6.1e9 < params < 6.3e9  # the 6B vision tower, 19 BERT-large layers, projections


def test_a_6b_checkpoint_without_its_audio_encoder_is_refused(reference):
    state = {k: v for k, v in reference["state_dict"].items() if not k.startswith("audio_encoder.")}
    with pytest.raises(ValueError, match=r"is not an InternVideo2 stage2-6b-micro checkpoint: \d+ missing keys: "
                                         r"audio_encoder\."):
        stage2_from_state_dict("stage2-6b-micro", state)


# ----------------------------------------------------------------------------------- numbers
def test_6b_layout_embeddings_match_the_official_evaluation(reference, micro_files):
    """Same weights, frames and captions as the official evaluation path of the 6B class (fp32
    CPU); single frames take the video position embedding averaged over time, as the 6B does."""
    checkpoint, tokenizer = micro_files
    teacher = build_teacher(TeacherConfig(kind="internvideo2", variant="stage2-6b-micro",
                                          checkpoint=str(checkpoint), tokenizer=str(tokenizer)))
    model = teacher.model
    assert not hasattr(model.vision_encoder, "img_pos_embed")
    with torch.no_grad():
        video = model.get_vid_feat(reference["frames"])
        frame = model.get_vid_feat(reference["frames"].flatten(0, 1)[:, None]).view_as(reference["frame"])
        text = model.get_txt_feat(reference["captions"])
    for ours, theirs in ((video, reference["video"]), (frame, reference["frame"]), (text, reference["text"])):
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-4
    assert teacher.embed_dim == 12 and teacher.temperature == pytest.approx(float(reference["state_dict"]["temp"]))
    check_protocol(teacher, random_frames(2, 5, 40, seed=3), torch.ones(2, 5, dtype=torch.bool))


# ------------------------------------------------------------------------------------- files
def training_easydict() -> type:
    """A class pickled under the name of the training code's `utils.easydict.EasyDict`: a dict
    whose items are mirrored as attributes (so its pickle carries both)."""

    class EasyDict(dict):
        def __init__(self, items=None, **kwargs):
            super().__init__()
            for key, value in {**(items or {}), **kwargs}.items():
                setattr(self, key, value)

        def __setattr__(self, name, value):
            value = EasyDict(value) if isinstance(value, dict) and not isinstance(value, EasyDict) else value
            super().__setattr__(name, value)
            self[name] = value

    EasyDict.__module__, EasyDict.__qualname__ = "utils.easydict", "EasyDict"
    return EasyDict


def test_a_checkpoint_saved_with_its_training_config_is_read_without_the_training_code(reference, tmp_path,
                                                                                       monkeypatch):
    """The published 6B file holds `model` beside the trainer's `config`, an EasyDict of the
    training code: read as plain data under weights_only=True, the code never imported."""
    easydict = training_easydict()
    package, module = types.ModuleType("utils"), types.ModuleType("utils.easydict")
    package.easydict, module.EasyDict = module, easydict
    monkeypatch.setitem(sys.modules, "utils", package)
    monkeypatch.setitem(sys.modules, "utils.easydict", module)
    config = easydict(model=dict(vision_encoder=dict(d_model=3200)), seed=42)
    path = tmp_path / "stage2.pt"
    torch.save({"model": reference["state_dict"], "config": config, "epoch": 4}, path)
    monkeypatch.delitem(sys.modules, "utils.easydict")
    monkeypatch.delitem(sys.modules, "utils")

    with pytest.raises(pickle.UnpicklingError, match="utils.easydict.EasyDict"):
        torch.load(path, weights_only=True)  # plain weights_only refuses the class
    safe_before = set(torch.serialization.get_safe_globals())  # a set underneath: its order can change
    state = read_state_dict(path)
    assert state.keys() == reference["state_dict"].keys()
    assert torch.equal(state["text_proj.weight"], reference["state_dict"]["text_proj.weight"])
    assert "utils.easydict" not in sys.modules  # nothing of the training code was imported
    assert set(torch.serialization.get_safe_globals()) == safe_before  # allowed for this read only
