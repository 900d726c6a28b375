"""InternVideo2 stage-2 retrieval towers, built in: the published checkpoints load without the
research code.

A stage-2 checkpoint holds the whole training model. Retrieval needs three parts of it:

- the InternVideo2 vision transformer (space-time patches, a class token, separate video and
  image position embeddings, pre-norm blocks with RMSNorm, QK-normalised attention and layer
  scale), its attention pooling (one query, the tokens' mean, cross-attends to all tokens) and
  `vision_proj`;
- the BERT text encoder up to `fusion_layer`, the first layer with cross-attention to the video
  (text-only encoding stops there), its [CLS] output and `text_proj`;
- `temp`, the contrastive temperature.

The rest (the stage-2 distillation decoders and their position embeddings, the fusion layers,
the masked-language-model and matching heads; for the 6B, the audio side of
`core.teachers.internvideo2_audio`) is declared with `full=True` or as shapes, only to know the
checkpoint's exact keys and shapes; it is never built on a real device nor run.

Names of modules and parameters follow the checkpoint's, so its tensors load by name.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.teachers.internvideo2_audio import BEATS_ITER3_PLUS, BeatsSpec, audiovisual_shapes
from core.teachers.internvideo2_text import TextEncoder


@dataclass(frozen=True)
class InternVideo2Spec:
    """One published stage-2 model's architecture: what its checkpoint's shapes need."""

    # vision transformer
    num_frames: int  # clip length of the video position embedding (f4: 4)
    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_width: int
    pool_heads: int  # attention pooling
    pool_width: int  # its output, `vision_proj`'s input
    sep_image_pos_embed: bool  # True: an image position embedding of its own; False: the video's averaged over time
    # checkpoint-only stage-2 distillation heads (shapes only)
    clip_teacher_width: int
    clip_teacher_final_width: int
    clip_return_layers: int
    # BERT text encoder
    text_width: int
    text_layers: int  # all of them; the checkpoint holds the fusion layers too
    text_heads: int
    text_mlp_width: int
    fusion_layer: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    max_text_len: int  # the published evaluation's caption length (max_txt_l)
    # shared space
    embed_dim: int
    # the audio-visual checkpoint layout (the 6B's): its BEATs audio encoder, and the width the
    # fusion layers cross-attend to (vision and audio tokens are projected to it); None: vision-text
    audio: BeatsSpec | None = None
    av_concat_width: int = 0

    @property
    def cross_attention_width(self) -> int:
        """The width of the tokens BERT's fusion layers attend to (checkpoint-only layers)."""
        return self.av_concat_width if self.audio is not None else self.width


VARIANTS: dict[str, InternVideo2Spec] = {
    # InternVideo2-stage2_1b-224p-f4.pt: InternVideo2-1B (ViT-g/14 widths) + BERT-large.
    "stage2-1b": InternVideo2Spec(
        num_frames=4, image_size=224, patch_size=14, width=1408, depth=40, heads=16, mlp_width=6144,
        pool_heads=16, pool_width=768, sep_image_pos_embed=True,
        clip_teacher_width=3200, clip_teacher_final_width=768, clip_return_layers=6,
        text_width=1024, text_layers=24, text_heads=16, text_mlp_width=4096, fusion_layer=19,
        vocab_size=30522, max_positions=512, type_vocab_size=2, max_text_len=40, embed_dim=512,
    ),
}
# internvideo2-s2_6b-224p-f4_with_audio_encoder.pt: InternVideo2-6B + the same BERT-large + BEATs,
# saved from InternVideo2_Stage2_audiovisual. One position embedding: image mode averages it over time.
VARIANTS["stage2-6b"] = replace(
    VARIANTS["stage2-1b"], width=3200, depth=48, heads=25, mlp_width=12800, sep_image_pos_embed=False,
    embed_dim=768, audio=BEATS_ITER3_PLUS, av_concat_width=768,
)
# The stage-2 architecture at micro width, random weights only: for tests and the demo pipeline.
VARIANTS["stage2-micro"] = replace(
    VARIANTS["stage2-1b"], image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_width=64, pool_heads=2,
    pool_width=24, clip_teacher_width=16, clip_teacher_final_width=8, clip_return_layers=2,
    text_width=32, text_layers=3, text_heads=2, text_mlp_width=64, fusion_layer=2, vocab_size=128,
    max_positions=64, max_text_len=16, embed_dim=16,
)
# The 6B's layout (audio-visual, averaged image position embedding) at micro width: for tests.
VARIANTS["stage2-6b-micro"] = replace(
    VARIANTS["stage2-micro"], sep_image_pos_embed=False, embed_dim=12, av_concat_width=20,
    audio=BeatsSpec(layers=2, width=16, mlp_width=32, heads=2, patch_width=8, patch_size=4, conv_pos=4,
                    conv_pos_groups=2, num_buckets=8),
)


# ------------------------------------------------------------------------------ vision tower
class RMSNorm(nn.Module):
    """Normalised in fp32 whatever the weights' dtype, then scaled in theirs."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class LayerScale(nn.Module):
    """Scales in fp32: gammas start near 1e-5 and lose their digits in half precision."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() * self.gamma.float()).to(x.dtype)


class Attention(nn.Module):
    """Self-attention whose queries and keys are RMS-normalised over all heads at once."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(dim), RMSNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_width: int):
        super().__init__()
        self.norm1, self.attn, self.ls1 = RMSNorm(dim), Attention(dim, heads), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = RMSNorm(dim), Mlp(dim, mlp_width), LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(3, dim, (1, patch_size, patch_size), stride=(1, patch_size, patch_size))

    def forward(self, x: Tensor) -> Tensor:
        """[B,3,T,H,W] -> [B, T*h*w, D], time-major."""
        return self.proj(x).flatten(2).transpose(1, 2)


class PoolingAttention(nn.Module):
    """Single-query cross-attention; the query has its own bias, keys and values theirs."""

    def __init__(self, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(torch.zeros(dim)) for _ in range(3))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        batch, dim = key.shape[0], key.shape[-1]
        q = F.linear(query, self.q.weight, self.q_bias)
        k = F.linear(key, self.k.weight, self.k_bias)
        v = F.linear(value, self.v.weight, self.v_bias)
        q, k, v = (t.view(batch, -1, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, -1, dim))


class AttentionPooling(nn.Module):
    def __init__(self, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.norm1_q, self.norm1_k, self.norm1_v = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))
        self.cross_attn = PoolingAttention(dim, heads, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B,N,D] -> [B,out_dim]: the tokens' mean as the one query."""
        query = self.norm1_q(x.mean(1, keepdim=True))
        return self.cross_attn(query, self.norm1_k(x), self.norm1_v(x)).squeeze(1)


class LinearDecoder(nn.Module):
    """Checkpoint-only: a stage-2 distillation head (shapes only, never run)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.head, self.norm = nn.Linear(dim, out_dim), nn.LayerNorm(out_dim)


class VisionTransformer(nn.Module):
    def __init__(self, spec: InternVideo2Spec, full: bool = False):
        super().__init__()
        self.num_frames, self.sep_image_pos_embed = spec.num_frames, spec.sep_image_pos_embed
        patches = (spec.image_size // spec.patch_size) ** 2
        self.patch_embed = PatchEmbed(spec.patch_size, spec.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.num_frames * patches + 1, spec.width))
        if spec.sep_image_pos_embed:
            self.img_pos_embed = nn.Parameter(torch.zeros(1, patches + 1, spec.width))
        self.blocks = nn.ModuleList(Block(spec.width, spec.heads, spec.mlp_width) for _ in range(spec.depth))
        self.clip_projector = AttentionPooling(spec.width, spec.pool_heads, spec.pool_width)
        if full:
            self.clip_pos_embed = nn.Parameter(torch.zeros_like(self.pos_embed))
            if spec.sep_image_pos_embed:
                self.clip_img_pos_embed = nn.Parameter(torch.zeros_like(self.img_pos_embed))
            self.clip_decoder = nn.ModuleList(
                LinearDecoder(spec.width, spec.clip_teacher_width) for _ in range(spec.clip_return_layers))
            self.final_clip_decoder = LinearDecoder(spec.pool_width, spec.clip_teacher_final_width)

    def position_embedding(self, frames: int) -> Tensor:
        """The video embedding for a full clip; for one frame (image mode) the image embedding, or
        where the model has none, the video embedding's patch positions averaged over time."""
        if frames == self.num_frames:
            return self.pos_embed
        if frames != 1:
            raise ValueError(f"InternVideo2 takes clips of {self.num_frames} frames or single frames, got {frames}")
        if self.sep_image_pos_embed:
            return self.img_pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        return torch.cat([cls, patches.view(1, self.num_frames, -1, patches.shape[-1]).mean(1)], dim=1)

    def forward(self, frames: Tensor) -> Tensor:
        """[B,T,3,H,W] -> pooled [B, pool_width]."""
        x = self.patch_embed(frames.transpose(1, 2).to(self.cls_token.dtype))
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self.position_embedding(frames.shape[1])
        for block in self.blocks:
            x = block(x)
        return self.clip_projector(x)



# ------------------------------------------------------------------------------------ model
class InternVideo2Stage2(nn.Module):
    """The retrieval towers of an InternVideo2 stage-2 model (`full=True`: the checkpoint's layout).

    `get_vid_feat` / `get_txt_feat` are the official demo's retrieval methods: unit-norm
    embeddings in the shared space, in the weights' dtype. `tokenizer` is set by the loader.
    """

    def __init__(self, spec: InternVideo2Spec, full: bool = False):
        super().__init__()
        self.spec = spec
        self.tokenizer: Any = None
        self.vision_encoder = VisionTransformer(spec, full)
        self.text_encoder = TextEncoder(spec, full)
        self.vision_proj = nn.Linear(spec.pool_width, spec.embed_dim)
        self.text_proj = nn.Linear(spec.text_width, spec.embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        if full:
            self.itm_head = nn.Linear(spec.text_width, 2)

    def encode_vision(self, frames: Tensor) -> Tensor:
        """float [B,T,3,H,W], T = num_frames or 1 (image mode) -> [B, embed_dim], not normalised."""
        return self.vision_proj(self.vision_encoder(frames))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids [B,L] -> [B, embed_dim] from the [CLS] token, not normalised."""
        return self.text_proj(self.text_encoder.bert(input_ids, attention_mask)[:, 0])

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        # Padding to the longest caption rather than to max_text_len: padded tokens are masked
        # out of every attention, so [CLS] is the same either way.
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.max_text_len,
                                return_tensors="pt")
        device = self.text_proj.weight.device
        return {"input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device)}

    @torch.no_grad()
    def get_vid_feat(self, frames: Tensor) -> Tensor:
        return F.normalize(self.encode_vision(frames), dim=-1)

    @torch.no_grad()
    def get_txt_feat(self, texts: list[str]) -> Tensor:
        return F.normalize(self.encode_text(**self.tokenize(texts)), dim=-1)


# ---------------------------------------------------------------------------------- loading
def checkpoint_shapes(spec: InternVideo2Spec) -> dict[str, tuple[int, ...]]:
    """Every key of a stage-2 checkpoint of this architecture, with its shape."""
    with torch.device("meta"):
        full = InternVideo2Stage2(spec, full=True)
    return {key: tuple(tensor.shape) for key, tensor in full.state_dict().items()} | audiovisual_shapes(spec)


class TrainingConfig:
    """Reads the training code's `utils.easydict.EasyDict` (a dict subclass holding the training
    config, saved beside the 6B's weights) as a plain `OrderedDict`: its items and attributes are
    data, and nothing of the training code is imported or run. The config itself is not used."""

    def __new__(cls, *args: Any) -> OrderedDict:
        return OrderedDict()


SAVED_ALONGSIDE = [(TrainingConfig, "utils.easydict.EasyDict")]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, read with `weights_only=True` (no code runs).

    Stage-2 checkpoints come as a bare state dict or wrapped by their trainer under `model`
    (PyTorch, possibly with its `config`: `TrainingConfig`) or `module` (DeepSpeed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"InternVideo2 checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAVED_ALONGSIDE):
            try:  # mapped, not read: a 1B checkpoint is 4-6 GB and most of it is cast or moved anyway
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:  # files in the pre-zip format cannot be mapped
                if "mmap" not in str(error):
                    raise
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an unpickling refusal names what it would have had to run
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: cannot be read as tensors with torch.load(weights_only=True): {first_line}") from None
    for wrapper in ("model", "module"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return checkpoint


def check_keys(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """One error naming the first few missing, unexpected and misshapen keys; nothing if all match."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshapen = [f"{key} {tuple(state[key].shape)} (expected {expected[key]})"
                 for key in expected if key in state and tuple(state[key].shape) != expected[key]]
    problems = [f"{len(keys)} {what}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("keys of another shape", misshapen)) if keys]
    if problems:
        raise ValueError(f"{source}: {'; '.join(problems)}")


def load_stage2(variant: str, checkpoint: str | Path, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> InternVideo2Stage2:
    """The retrieval towers of `variant` with the weights of a stage-2 checkpoint file."""
    return stage2_from_state_dict(variant, read_state_dict(checkpoint), dtype, device, source=str(checkpoint))


def stage2_from_state_dict(variant: str, state: dict[str, Tensor], dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "cpu", source: str = "state dict") -> InternVideo2Stage2:
    """The retrieval towers of `variant` with the tensors of `state`, which must hold exactly the
    variant's keys at their shapes (`checkpoint_shapes`); the checkpoint-only parts are checked,
    then dropped. The model takes the tensors themselves where dtype and device already match."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown InternVideo2 variant {variant!r}; known: {', '.join(VARIANTS)}")
    spec = VARIANTS[variant]
    check_keys(state, checkpoint_shapes(spec), f"{source} is not an InternVideo2 {variant} checkpoint")
    with torch.device("meta"):
        model = InternVideo2Stage2(spec)
    model.load_state_dict({key: state[key].to(device, dtype) for key in model.state_dict()}, strict=True, assign=True)
    return model.eval()
