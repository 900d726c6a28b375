"""Teacher adapters on tiny real models: open_clip (shipped and runtime-registered configs, local
checkpoints), X-CLIP and InternVideo2 from local Hugging Face directories (the latter with its
own remote code), and a vidkd student checkpoint."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from tokenizers import pre_tokenizers
from transformers import AutoModel, AutoConfig, BertTokenizer, CLIPTokenizer, XCLIPConfig, XCLIPModel

from core.config import StudentConfig, TeacherConfig
from core.modelzoo import create_clip
from core.student import build_student, save_student
from core.teachers import build_teacher
from core.teachers.base import sample_clip, tile_windows
from core.video import normalize_frames
from core.teachers.internvideo2 import InternVideo2Teacher

CAPTIONS = ["a red car turns left", "a truck waits at the light", "rain on an empty road"]


def random_frames(batch: int, num_frames: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, num_frames, size, size, 3), dtype=torch.uint8, generator=generator)


def assert_unit_rows(x: torch.Tensor) -> None:
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[:-1]), atol=1e-5, rtol=0)


def check_protocol(teacher, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes, unit norms on real frames, zeros on padding, same input -> same output."""
    video_emb, frame_emb = teacher.encode_video(frames, mask)
    batch, length = mask.shape
    assert video_emb.shape == (batch, teacher.embed_dim)
    assert frame_emb.shape == (batch, length, teacher.embed_dim)
    assert_unit_rows(video_emb)
    assert_unit_rows(frame_emb[mask.bool()])
    assert torch.count_nonzero(frame_emb[~mask.bool()]) == 0
    again = teacher.encode_video(frames.clone(), mask.clone())
    assert torch.equal(video_emb, again[0]) and torch.equal(frame_emb, again[1])
    text_emb = teacher.encode_text(CAPTIONS)
    assert text_emb.shape == (len(CAPTIONS), teacher.embed_dim)
    assert_unit_rows(text_emb)
    assert torch.equal(text_emb, teacher.encode_text(list(CAPTIONS)))
    assert teacher.encode_text([]).shape == (0, teacher.embed_dim)
    return video_emb, frame_emb


# ----------------------------------------------------------------------------------- helpers
def test_sample_clip_and_tile_windows():
    short = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    clip = sample_clip(short, 4)
    assert clip.index.tolist() == [[0, 1, 2, 2]] and clip.fresh.tolist() == [[True, True, True, False]]
    assert torch.equal(tile_windows(short, 4).index, clip.index)

    long = torch.ones(1, 10, dtype=torch.bool)
    assert sample_clip(long, 4).index.tolist() == [[1, 3, 6, 8]]  # segment centres
    windows = tile_windows(long, 4)
    assert windows.index.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
    assert windows.fresh.sum() == 10

    holes = torch.tensor([[0, 1, 0, 1]], dtype=torch.bool)  # real frames need not be a prefix
    assert sample_clip(holes, 3).index.tolist() == [[1, 3, 3]]


def test_bad_inputs_are_one_line_errors(micro_checkpoint):
    teacher = build_teacher(TeacherConfig(kind="open_clip", name="vidkd-vit-micro", pretrained=str(micro_checkpoint)))
    frames = random_frames(1, 2, 32)
    with pytest.raises(ValueError, match="uint8"):
        teacher.encode_video(frames.float(), torch.ones(1, 2))
    with pytest.raises(ValueError, match="mask must be"):
        teacher.encode_video(frames, torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least one real frame"):
        teacher.encode_video(frames, torch.zeros(1, 2))
    with pytest.raises(TypeError, match="list of strings"):
        teacher.encode_text("a car")
    with pytest.raises(ValueError, match="no teacher"):
        build_teacher(TeacherConfig(kind="none"))


# --------------------------------------------------------------------------------- open_clip
@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, _ = create_clip("vidkd-vit-micro")
    path = tmp_path_factory.mktemp("open_clip") / "micro.pt"
    torch.save(model.state_dict(), path)
    return path


def test_open_clip_local_checkpoint_reproduces_the_model(micro_checkpoint):
    model, tokenizer = create_clip("vidkd-vit-micro", str(micro_checkpoint))
    teacher = build_teacher(TeacherConfig(kind="open_clip", name="vidkd-vit-micro", pretrained=str(micro_checkpoint)))
    assert (teacher.num_frames, teacher.image_size, teacher.embed_dim) == (None, 32, 64)
    frames, mask = random_frames(2, 3, 32), torch.ones(2, 3, dtype=torch.bool)
    video_emb, frame_emb = check_protocol(teacher, frames, mask)

    preprocess = model.visual.preprocess_cfg
    pixels = normalize_frames(frames.flatten(0, 1), preprocess["mean"], preprocess["std"])
    with torch.no_grad():
        expected_frames = F.normalize(model.eval().encode_image(pixels), dim=-1).view(2, 3, -1)
        expected_text = F.normalize(model.encode_text(tokenizer(CAPTIONS)), dim=-1)
    torch.testing.assert_close(frame_emb, expected_frames)
    torch.testing.assert_close(video_emb, F.normalize(expected_frames.mean(dim=1), dim=-1))
    torch.testing.assert_close(teacher.encode_text(CAPTIONS), expected_text)


def test_open_clip_padding_and_resizing(micro_checkpoint):
    teacher = build_teacher(TeacherConfig(kind="open_clip", name="vidkd-vit-micro", pretrained=str(micro_checkpoint)))
    frames = random_frames(2, 4, 48)  # extraction resolution 48, the model's 32
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    video_emb, frame_emb = check_protocol(teacher, frames, mask)

    other_padding = frames.clone()
    other_padding[1, 3] = 255 - other_padding[1, 3]
    assert torch.equal(teacher.encode_video(other_padding, mask)[0], video_emb)
    unpadded_video, unpadded_frames = teacher.encode_video(frames[1:, :3], torch.ones(1, 3))
    torch.testing.assert_close(unpadded_video[0], video_emb[1])
    torch.testing.assert_close(unpadded_frames[0], frame_emb[1, :3])

    small = teacher.encode_video(frames[:, :, 8:40, 8:40], mask)[0]  # a centre crop is different input
    assert not torch.allclose(small, video_emb)


def test_open_clip_identity_follows_the_weights(micro_checkpoint, tmp_path):
    def identity(pretrained):
        cfg = TeacherConfig(kind="open_clip", name="vidkd-vit-micro", pretrained=str(pretrained))
        return build_teacher(cfg).identity()

    first = identity(micro_checkpoint)
    assert first == identity(micro_checkpoint)
    assert first["kind"] == "open_clip" and first["name"] == "vidkd-vit-micro" and first["dtype"] == "float32"
    renamed = tmp_path / "renamed.pt"
    renamed.write_bytes(micro_checkpoint.read_bytes())
    assert identity(renamed) == first  # the bytes matter, not the file name

    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save(create_clip("vidkd-vit-micro")[0].state_dict(), other)
    assert identity(other)["weights_sha256"] != first["weights_sha256"]


def test_open_clip_runtime_registered_config(tmp_path):
    """A model config registered at run time, as users add their own; no pretrained weights, so
    the identity is a hash of the state dict."""
    config = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path / "test-vit-nano.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    cfg = TeacherConfig(kind="open_clip", name="test-vit-nano")

    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    assert (teacher.image_size, teacher.embed_dim) == (16, 24)
    check_protocol(teacher, random_frames(2, 3, 24), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert teacher.identity() == teacher.identity()
    torch.manual_seed(0)
    assert build_teacher(cfg).identity() == teacher.identity()
    torch.manual_seed(1)
    assert build_teacher(cfg).identity() != teacher.identity()


# ------------------------------------------------------------------------------------ X-CLIP
def write_clip_tokenizer(directory) -> int:
    """A byte-level BPE tokenizer in CLIP's format (one merge), saved beside the model."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet] + ["ca", "car</w>"]
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    merges_file.write_text("#version: 0.2\nc a\nca r</w>\n")
    CLIPTokenizer.from_pretrained(directory).save_pretrained(directory)
    return len(vocab)


@pytest.fixture(scope="module")
def xclip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("xclip")
    vocab_size = write_clip_tokenizer(directory)
    config = XCLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_frames=4, mit_hidden_size=16, mit_intermediate_size=32,
                           mit_num_hidden_layers=1, mit_num_attention_heads=2),
        projection_dim=16, prompt_layers=1, prompt_num_attention_heads=2,
    )
    torch.manual_seed(0)
    XCLIPModel(config).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }))
    return directory


def test_xclip_matches_transformers(xclip_dir):
    teacher = build_teacher(TeacherConfig(kind="xclip", path=str(xclip_dir)))
    assert (teacher.num_frames, teacher.image_size, teacher.embed_dim) == (4, 32, 16)
    frames, mask = random_frames(2, 4, 32), torch.ones(2, 4, dtype=torch.bool)
    video_emb, _ = check_protocol(teacher, frames, mask)

    model = XCLIPModel.from_pretrained(xclip_dir).eval()
    tokens = teacher.tokenizer(CAPTIONS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected_video = model.get_video_features(pixel_values=teacher.preprocess(frames)).pooler_output
        expected_text = model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    torch.testing.assert_close(video_emb, F.normalize(expected_video, dim=-1))
    torch.testing.assert_close(teacher.encode_text(CAPTIONS), F.normalize(expected_text, dim=-1))


def test_xclip_fits_any_frame_count_to_its_clip(xclip_dir):
    teacher = build_teacher(TeacherConfig(kind="xclip", path=str(xclip_dir)))
    frames = random_frames(1, 8, 40, seed=3)  # resized to 32 inside

    # Short video: the last real frame fills the clip, as if it had been repeated by the caller.
    short_mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    video_emb, frame_emb = check_protocol(teacher, frames[:, :4], short_mask)
    repeated = frames[:, [0, 1, 2, 2]]
    expected_video, expected_frames = teacher.encode_video(repeated, torch.ones(1, 4))
    torch.testing.assert_close(video_emb, expected_video)
    torch.testing.assert_close(frame_emb[:, :3], expected_frames[:, :3])

    # Long video: the clip samples segment centres; frames are embedded in windows of 4.
    video_emb, frame_emb = check_protocol(teacher, frames, torch.ones(1, 8, dtype=torch.bool))
    torch.testing.assert_close(video_emb, teacher.encode_video(frames[:, [1, 3, 5, 7]], torch.ones(1, 4))[0])
    torch.testing.assert_close(frame_emb[:, :4], teacher.encode_video(frames[:, :4], torch.ones(1, 4))[1])
    torch.testing.assert_close(frame_emb[:, 4:], teacher.encode_video(frames[:, 4:], torch.ones(1, 4))[1])


def test_xclip_identity_hashes_the_directory(xclip_dir):
    identity = build_teacher(TeacherConfig(kind="xclip", path=str(xclip_dir))).identity()
    assert identity == build_teacher(TeacherConfig(kind="xclip", path=str(xclip_dir))).identity()
    assert identity["kind"] == "xclip" and len(identity["weights_sha256"]) == 64


# ------------------------------------------------------------------------------ InternVideo2
CONFIGURATION_CODE = '''
from transformers import PretrainedConfig


class TinyInternVideo2Config(PretrainedConfig):
    model_type = "tiny_internvideo2"

    def __init__(self, num_frames=4, size_t=32, patch_size=8, width=32, embed_dim=16, vocab_size=32,
                 max_txt_l=12, **kwargs):
        self.num_frames, self.size_t, self.patch_size = num_frames, size_t, patch_size
        self.width, self.embed_dim, self.vocab_size, self.max_txt_l = width, embed_dim, vocab_size, max_txt_l
        super().__init__(**kwargs)
'''

MODELING_CODE = '''
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_tiny_internvideo2 import TinyInternVideo2Config


def _encoder(width):
    layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)


class TinyInternVideo2Stage2(PreTrainedModel):
    """InternVideo2_Stage2's retrieval interface on a miniature: space-time patch tokens with
    separate video and image position embeddings, a BERT-like text tower, two projections."""

    config_class = TinyInternVideo2Config

    def __init__(self, config, tokenizer=None):
        super().__init__(config)
        self.tokenizer = tokenizer
        patches = (config.size_t // config.patch_size) ** 2
        self.patch_embed = nn.Conv3d(3, config.width, (1, config.patch_size, config.patch_size),
                                     stride=(1, config.patch_size, config.patch_size))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, config.num_frames * patches, config.width))
        self.img_pos_embed = nn.Parameter(0.02 * torch.randn(1, patches, config.width))
        self.vision_encoder = _encoder(config.width)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.width)
        self.text_encoder = _encoder(config.width)
        self.vision_proj = nn.Linear(config.width, config.embed_dim)
        self.text_proj = nn.Linear(config.width, config.embed_dim)
        self.post_init()

    def encode_vision(self, image, test=False):
        use_image = image.shape[1] == 1
        x = self.patch_embed(image.permute(0, 2, 1, 3, 4).to(self.dtype))  # [B,T,C,H,W] -> [B,C,T,H,W]
        x = x.flatten(2).transpose(1, 2) + (self.img_pos_embed if use_image else self.pos_embed)
        x = self.vision_encoder(x)
        return x, x.mean(dim=1)

    def encode_text(self, text):
        x = self.text_encoder(self.word_embeddings(text.input_ids), src_key_padding_mask=text.attention_mask == 0)
        return x, x[:, 0]

    def get_vid_feat(self, frames):
        with torch.no_grad():
            _, vfeat = self.encode_vision(frames, test=True)
            vfeat = self.vision_proj(vfeat)
            vfeat /= vfeat.norm(dim=-1, keepdim=True)
        return vfeat

    def get_txt_feat(self, text):
        with torch.no_grad():
            text = self.tokenizer(text, padding="max_length", truncation=True, max_length=self.config.max_txt_l,
                                  return_tensors="pt").to(self.device)
            _, tfeat = self.encode_text(text)
            tfeat = self.text_proj(tfeat)
            tfeat /= tfeat.norm(dim=-1, keepdim=True)
        return tfeat
'''


@pytest.fixture(scope="module")
def internvideo2_dir(tmp_path_factory):
    """A local model directory with its own code, as a trust_remote_code checkpoint ships."""
    directory = tmp_path_factory.mktemp("internvideo2")
    (directory / "configuration_tiny_internvideo2.py").write_text(CONFIGURATION_CODE)
    (directory / "modeling_tiny_internvideo2.py").write_text(MODELING_CODE)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "tiny_internvideo2",
        "auto_map": {"AutoConfig": "configuration_tiny_internvideo2.TinyInternVideo2Config",
                     "AutoModel": "modeling_tiny_internvideo2.TinyInternVideo2Stage2"},
        "num_frames": 4, "size_t": 32,
    }))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for c in CAPTIONS for w in c.split()})
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    AutoModel.from_config(config, trust_remote_code=True).save_pretrained(directory)
    return directory


def test_internvideo2_needs_the_remote_code_opt_in(internvideo2_dir):
    with pytest.raises(ValueError, match="trust_remote_code"):
        TeacherConfig(kind="internvideo2", path=str(internvideo2_dir))
    with pytest.raises(ValueError, match="trust_remote_code"):
        InternVideo2Teacher.from_remote_code(internvideo2_dir)


def test_internvideo2_uses_the_checkpoints_retrieval_methods(internvideo2_dir):
    teacher = build_teacher(TeacherConfig(kind="internvideo2", path=str(internvideo2_dir), trust_remote_code=True))
    assert (teacher.num_frames, teacher.image_size, teacher.embed_dim) == (4, 32, 16)
    assert teacher.mean == (0.485, 0.456, 0.406)
    frames = random_frames(2, 5, 32, seed=4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    video_emb, frame_emb = check_protocol(teacher, frames, mask)

    model, pixels = teacher.model, teacher.preprocess(frames)
    clips = torch.stack([pixels[0, [0, 1, 3, 4]], pixels[1, [0, 1, 1, 1]]])  # centres; last frame repeated
    torch.testing.assert_close(video_emb, model.get_vid_feat(clips))
    torch.testing.assert_close(frame_emb[1, :2], model.get_vid_feat(pixels[1, :2, None]))  # one-frame clips
    torch.testing.assert_close(teacher.encode_text(CAPTIONS), model.get_txt_feat(CAPTIONS))

    identity = teacher.identity()
    assert identity["kind"] == "internvideo2" and identity["name"] == internvideo2_dir.name


# ------------------------------------------------------------------------------------- vidkd
@pytest.fixture(scope="module")
def student_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    student = build_student(StudentConfig(model="vidkd-vit-micro", temporal_layers=1), num_frames=4)
    return save_student(student, tmp_path_factory.mktemp("vidkd") / "teacher.pt"), student.eval()


def test_vidkd_teacher_is_the_student(student_checkpoint):
    path, student = student_checkpoint
    teacher = build_teacher(TeacherConfig(kind="vidkd", path=str(path)))
    assert (teacher.num_frames, teacher.image_size, teacher.embed_dim) == (4, 32, 64)
    frames = random_frames(2, 4, 32, seed=5)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    video_emb, frame_emb = check_protocol(teacher, frames, mask)
    with torch.no_grad():
        expected = student.encode_video(frames, mask)
        expected_text = student.encode_text(CAPTIONS)
    torch.testing.assert_close(video_emb, expected.video_emb)
    torch.testing.assert_close(frame_emb[mask], expected.frame_emb[mask])
    torch.testing.assert_close(teacher.encode_text(CAPTIONS), expected_text)
    assert teacher.identity() == build_teacher(TeacherConfig(kind="vidkd", path=str(path))).identity()


def test_vidkd_teacher_takes_more_frames_and_other_resolutions(student_checkpoint):
    path, _ = student_checkpoint
    teacher = build_teacher(TeacherConfig(kind="vidkd", path=str(path)))
    frames = random_frames(1, 6, 32, seed=6)
    video_emb, frame_emb = check_protocol(teacher, frames, torch.ones(1, 6, dtype=torch.bool))
    torch.testing.assert_close(video_emb, teacher.encode_video(frames[:, [0, 2, 3, 5]], torch.ones(1, 4))[0])
    torch.testing.assert_close(frame_emb[:, :4], teacher.encode_video(frames[:, :4], torch.ones(1, 4))[1])
    torch.testing.assert_close(frame_emb[:, 4:], teacher.encode_video(frames[:, 4:], torch.ones(1, 2))[1])
    check_protocol(teacher, random_frames(2, 3, 48), torch.ones(2, 3, dtype=torch.bool))


def test_half_precision_runs_and_returns_fp32(micro_checkpoint, student_checkpoint):
    frames, mask = random_frames(2, 4, 32, seed=8), torch.ones(2, 4, dtype=torch.bool)
    for cfg in (dict(kind="open_clip", name="vidkd-vit-micro", pretrained=str(micro_checkpoint)),
                dict(kind="vidkd", path=str(student_checkpoint[0]))):
        full = build_teacher(TeacherConfig(**cfg))
        half = build_teacher(TeacherConfig(**cfg, dtype="bfloat16"))
        video_emb, frame_emb = check_protocol(half, frames, mask)
        assert (video_emb * full.encode_video(frames, mask)[0]).sum(-1).min() > 0.99
        assert half.identity()["dtype"] == "bfloat16" and half.identity() != full.identity()
