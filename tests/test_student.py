"""The CLIP4Clip + AFA student on the tiny `vidkd-vit-micro` CLIP (32 px, 64-d embeddings)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.config import PUBLISHED_TAU_FRAME, PUBLISHED_TAU_VIDEO, LossConfig, StudentConfig
from core.losses import TeacherBatch, dldkd_loss, infonce, similarity, teachclip_loss
from core.student import (VideoOutput, VideoTextStudent, build_student, load_student, read_checkpoint_extra,
                          save_student)

PUBLISHED = LossConfig(tau_video=PUBLISHED_TAU_VIDEO, tau_frame=PUBLISHED_TAU_FRAME)  # TeachCLIP's, as numbers

SIZE, FRAMES, DIM = 32, 4, 64
CAPTIONS = ["a red car turns left", "a truck drives in the rain", "a cyclist crosses the road",
            "a bus stops at night", "a pedestrian waits at a crossing", "a van overtakes a car",
            "a motorbike speeds on the highway", "a taxi parks by the curb"]


def make_student(temporal_layers: int = 1, teacher_dim: int | None = None, seed: int = 0, **kw) -> VideoTextStudent:
    torch.manual_seed(seed)
    cfg = StudentConfig(model="vidkd-vit-micro", temporal_layers=temporal_layers, **kw)
    return build_student(cfg, num_frames=FRAMES, teacher_dim=teacher_dim).eval()


def random_frames(batch: int, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, SIZE, SIZE, 3), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module")
def student() -> VideoTextStudent:
    return make_student()


def test_shapes_norms_and_afa_weights(student):
    frames = random_frames(3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.uint8)
    with torch.no_grad():
        out = student.encode_video(frames, mask)
    assert isinstance(out, VideoOutput)
    assert out.video_emb.shape == (3, DIM) and out.frame_emb.shape == (3, FRAMES, DIM)
    assert out.afa_weights.shape == (3, FRAMES)
    torch.testing.assert_close(out.video_emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.frame_emb.norm(dim=-1), torch.ones(3, FRAMES))
    torch.testing.assert_close(out.afa_weights.sum(dim=1), torch.ones(3))
    assert torch.all(out.afa_weights[mask == 0] == 0)
    assert torch.all(out.afa_weights[mask == 1] > 0)
    # TeachCLIP's AFA: pooling weights softmax(score / 0.1), FgT's weights softmax(score), so
    # the pooling weights are the FgT weights sharpened tenfold (log softmax = score - const).
    sharpened = (out.afa_weights.log() / 0.1).softmax(dim=1)
    torch.testing.assert_close(out.pool_weights, sharpened, atol=1e-5, rtol=0)
    assert torch.all(out.pool_weights[mask == 0] == 0)
    # The video embedding is the normalised pool-weighted sum of the frame embeddings.
    pooled = (out.pool_weights[..., None] * out.frame_emb).sum(dim=1)
    torch.testing.assert_close(out.video_emb, pooled / pooled.norm(dim=-1, keepdim=True))


def test_afa_scores_frame_features_before_they_are_normalised(student):
    seen = []
    handle = student.afa.score.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = student.encode_video(random_frames(2), torch.ones(2, FRAMES))
    finally:
        handle.remove()
    features = seen[0]
    assert not torch.allclose(features.norm(dim=-1), torch.ones(2, FRAMES), atol=1e-3)
    torch.testing.assert_close(F.normalize(features, dim=-1), out.frame_emb)


def test_afa_pool_temperature_one_pools_with_the_fgt_weights():
    model = build_student(StudentConfig(model="vidkd-vit-micro", afa_pool_temperature=1.0), FRAMES)
    with torch.no_grad():
        out = model.encode_video(random_frames(2), torch.ones(2, FRAMES))
    torch.testing.assert_close(out.pool_weights, out.afa_weights)


def test_logit_scale_is_capped_on_the_parameter_after_a_step_not_in_the_forward():
    model = build_student(StudentConfig(model="vidkd-vit-micro"), FRAMES)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(150.0))
    scale = model.logit_scale
    assert scale.item() == pytest.approx(150.0, rel=1e-5)  # the forward pass does not clamp ...
    scale.backward()
    assert model.clip.logit_scale.grad.item() == pytest.approx(150.0, rel=1e-5)  # ... so it keeps its gradient
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(100.0, rel=1e-5)


def test_student_metadata(student):
    assert student.image_size == SIZE and student.num_frames == FRAMES and student.embed_dim == DIM
    assert len(student.mean) == 3 and len(student.std) == 3
    torch.testing.assert_close(student.logit_scale, torch.tensor(1 / 0.07))
    hot = build_student(StudentConfig(model="vidkd-vit-micro"), FRAMES, temperature=0.2)
    torch.testing.assert_close(hot.logit_scale, torch.tensor(5.0))
    assert hot.logit_scale.requires_grad


@pytest.mark.parametrize("temporal_layers, atol", [(0, 1e-6), (2, 1e-5)])
def test_padding_frames_do_not_change_the_video_embedding(temporal_layers, atol):
    model = make_student(temporal_layers)
    frames = random_frames(2, frames=3, seed=1)
    garbage = random_frames(2, frames=1, seed=2)  # padded frames need not be zeros to be ignored
    with torch.no_grad():
        short = model.encode_video(frames, torch.ones(2, 3))
        padded = model.encode_video(torch.cat([frames, garbage], dim=1), torch.tensor([[1, 1, 1, 0]] * 2))
    torch.testing.assert_close(padded.video_emb, short.video_emb, atol=atol, rtol=0)
    torch.testing.assert_close(padded.afa_weights[:, :3], short.afa_weights, atol=atol, rtol=0)
    assert torch.all(padded.afa_weights[:, 3] == 0)


def test_temporal_transformer_mixes_frames():
    """With the transformer, a frame's embedding depends on the other frames; without, it does not."""
    frames = random_frames(1, seed=3)
    changed = frames.clone()
    changed[:, 3] = 255 - changed[:, 3]
    mask = torch.ones(1, FRAMES)
    for layers, should_mix in [(0, False), (1, True)]:
        model = make_student(layers)
        with torch.no_grad():
            a, b = model.encode_video(frames, mask), model.encode_video(changed, mask)
        mixed = not torch.allclose(a.frame_emb[:, 0], b.frame_emb[:, 0], atol=1e-6)
        assert mixed == should_mix


def test_deterministic_build_and_encode():
    frames, mask = random_frames(2, seed=4), torch.ones(2, FRAMES)
    a, b = make_student(seed=7), make_student(seed=7)
    with torch.no_grad():
        out_a, out_a2, out_b = a.encode_video(frames, mask), a.encode_video(frames, mask), b.encode_video(frames, mask)
    assert torch.equal(out_a.video_emb, out_a2.video_emb)
    assert torch.equal(out_a.video_emb, out_b.video_emb)


def test_encode_text_from_strings_and_tokens(student):
    with torch.no_grad():
        from_strings = student.encode_text(CAPTIONS[:3])
        from_tokens = student.encode_text(student.tokenize(CAPTIONS[:3]))
        alone = student.encode_text(CAPTIONS[1:2])
    assert from_strings.shape == (3, DIM)
    torch.testing.assert_close(from_strings.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(from_strings, from_tokens)
    torch.testing.assert_close(from_strings[1:2], alone, atol=1e-6, rtol=0)
    assert not torch.allclose(from_strings[0], from_strings[1])
    with pytest.raises(TypeError, match="list of strings"):
        student.encode_text("a car")


def test_bad_inputs_fail_with_one_line(student):
    mask = torch.ones(1, FRAMES)
    cases = [
        (random_frames(1).float(), mask, "uint8"),
        (torch.zeros(1, FRAMES, 48, 48, 3, dtype=torch.uint8), mask, "48x48"),
        (random_frames(1, frames=FRAMES + 1), torch.ones(1, FRAMES + 1), "at most 4"),
        (random_frames(1), torch.ones(1, 3), "mask must be"),
        (random_frames(1), torch.zeros(1, FRAMES), "at least one real frame"),
    ]
    for frames, frame_mask, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            student.encode_video(frames, frame_mask)
        assert "\n" not in str(error.value)


def test_save_load_round_trip(tmp_path):
    model = make_student(temporal_layers=2, teacher_dim=32, afa_hidden=16, seed=3)
    path = save_student(model, tmp_path / "ckpt" / "student.pt", extra={"epoch": 3, "val_t2v_R1": 41.5})
    checkpoint = torch.load(path, weights_only=True)  # everything in it is plain data
    assert checkpoint["format"] == "vidkd-student/1" and checkpoint["config"]["temporal_layers"] == 2
    assert read_checkpoint_extra(path) == {"epoch": 3, "val_t2v_R1": 41.5}

    loaded = load_student(path).eval()
    assert loaded.config == model.config and loaded.teacher_dim == 32 and loaded.num_frames == FRAMES
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert all(torch.equal(original_state[k], loaded_state[k]) for k in original_state)
    frames, mask = random_frames(2, seed=5), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        expected, actual = model(frames, mask, CAPTIONS[:2]), loaded(frames, mask, CAPTIONS[:2])
    assert torch.equal(expected.video.video_emb, actual.video.video_emb)
    assert torch.equal(expected.text_emb, actual.text_emb)
    assert torch.equal(expected.projected_video_emb, actual.projected_video_emb)


def test_init_from_starts_a_training_from_a_checkpoint_at_its_own_temperature(tmp_path):
    """Fine-tuning a trained model at another temperature: every weight from the checkpoint, the
    logit scale from the new temperature (1 / 0.02 = 50, not the checkpoint's 1 / 0.07)."""
    trained = make_student(seed=3)
    path = save_student(trained, tmp_path / "trained.pt")
    torch.manual_seed(9)
    cfg = StudentConfig(model="vidkd-vit-micro", init_from=str(path))
    started = build_student(cfg, num_frames=FRAMES, temperature=0.02)
    assert float(started.logit_scale) == pytest.approx(50.0) and float(trained.logit_scale) == pytest.approx(1 / 0.07)
    ours, theirs = started.state_dict(), trained.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k != "clip.logit_scale")

    with pytest.raises(ValueError, match="other weights than this vidkd-vit-micro one"):
        build_student(cfg.model_copy(update={"temporal_layers": 2}), num_frames=FRAMES)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a vidkd student checkpoint"):
        build_student(cfg.model_copy(update={"init_from": str(tmp_path / "other.pt")}), num_frames=FRAMES)


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_student(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a vidkd student checkpoint"):
        load_student(tmp_path / "other.pt")


def test_param_groups_cover_trainable_parameters_once():
    model = make_student(temporal_layers=1, teacher_dim=32)
    for param in model.clip.transformer.resblocks[0].parameters():  # a frozen part is left out
        param.requires_grad_(False)
    groups = model.param_groups(lr_pretrained=1e-4, lr_new=1e-3, weight_decay=0.05)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable

    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert by_name["clip.visual.conv1.weight"]["lr"] == 1e-4
    assert by_name["clip.visual.conv1.weight"]["weight_decay"] == 0.05
    assert by_name["afa.score.0.weight"]["lr"] == 1e-3 and by_name["to_teacher.weight"]["lr"] == 1e-3
    for no_decay in ["clip.logit_scale", "clip.token_embedding.weight", "clip.visual.class_embedding",
                     "clip.ln_final.weight", "afa.score.0.bias", "temporal.frame_position_embedding.weight"]:
        assert by_name[no_decay]["weight_decay"] == 0.0, no_decay
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


def test_forward_and_loss_gradients_are_finite():
    model = make_student(temporal_layers=1, teacher_dim=48).train()
    frames, mask = random_frames(3, seed=6), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]])
    teacher = TeacherBatch(torch.randn(3, 48), torch.randn(3, FRAMES, 48), torch.randn(3, 48), mask)
    for objective in ["teachclip", "dldkd"]:
        model.zero_grad()
        out = model(frames, mask, CAPTIONS[:3])
        if objective == "teachclip":
            loss, _ = teachclip_loss(out.video, out.text_emb, model.logit_scale, teacher, PUBLISHED)
        else:
            loss, _ = dldkd_loss(out.video, out.text_emb, model.logit_scale, out.projected_video_emb, teacher,
                                 LossConfig(objective="dldkd"), progress=0.3)
        loss.backward()
        assert torch.isfinite(loss)
        for name, param in model.named_parameters():
            if objective == "teachclip" and name.startswith("to_teacher"):
                continue  # the teacher projection serves DLDKD only
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{objective}: {name}"


def test_infonce_training_drives_the_loss_down():
    """50 steps on 8 fixed random videos: the student must fit the caption-video pairing."""
    model = make_student(temporal_layers=1, seed=0).train()
    frames, mask = random_frames(8, seed=8), torch.ones(8, FRAMES)
    tokens = model.tokenize(CAPTIONS)
    optimizer = torch.optim.AdamW(model.param_groups(lr_pretrained=1e-3, lr_new=1e-3, weight_decay=0.0))
    losses = []
    for _ in range(50):
        out = model(frames, mask, tokens)
        loss = infonce(similarity(out.video.video_emb, out.text_emb, model.logit_scale))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(8), abs=0.3)  # chance level at the start
    assert sum(losses[-5:]) / 5 < 0.1
