"""The audio-visual side of an InternVideo2 stage-2 checkpoint: key shapes only, never built.

The 6B stage-2 model was trained as the official `InternVideo2_Stage2_audiovisual`: besides the
vision and text towers it holds a BEATs audio encoder (`audio_encoder`, frozen during stage 2 and
saved with the rest) and the heads that fuse audio with vision: `audio_proj` into the shared
space, `av_concat_audio_proj` / `av_concat_vision_proj` (Linear + LayerNorm to the width the
text tower's fusion layers cross-attend to), `av_fusion` (audio and video embeddings into one)
and `avtm_head` (audio-video-text matching). Video-text retrieval uses none of them: a
checkpoint's tensors for them are checked against these shapes, then dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.teachers.internvideo2_model import InternVideo2Spec

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class BeatsSpec:
    """A BEATs audio encoder with relative position buckets and gated relative positions (the
    iter3+ family's configuration): what its state dict's shapes need."""

    layers: int
    width: int
    mlp_width: int
    heads: int
    patch_width: int  # the spectrogram patch embedding (`embed_dim`), projected to `width`
    patch_size: int
    conv_pos: int  # the convolutional position embedding's kernel and groups
    conv_pos_groups: int
    num_buckets: int  # relative position buckets


# BEATs_iter3_plus_AS2M (the pre-trained, not the AudioSet-fine-tuned, model: no predictor head).
BEATS_ITER3_PLUS = BeatsSpec(layers=12, width=768, mlp_width=3072, heads=12, patch_width=512, patch_size=16,
                             conv_pos=128, conv_pos_groups=16, num_buckets=320)


def linear(prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> Shapes:
    return {f"{prefix}.weight": (out_dim, in_dim), **({f"{prefix}.bias": (out_dim,)} if bias else {})}


def layer_norm(prefix: str, dim: int) -> Shapes:
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def beats_shapes(beats: BeatsSpec, prefix: str = "audio_encoder") -> Shapes:
    """Every key of a BEATs state dict. The position convolution is weight-normalised over its
    kernel axis (`weight_g`, `weight_v`); layer 0's relative position bias is shared by every
    layer, and a state dict lists it under each."""
    shapes: Shapes = {}
    if beats.patch_width != beats.width:
        shapes |= linear(f"{prefix}.post_extract_proj", beats.width, beats.patch_width)
    shapes[f"{prefix}.patch_embedding.weight"] = (beats.patch_width, 1, beats.patch_size, beats.patch_size)
    conv = f"{prefix}.encoder.pos_conv.0"
    shapes |= {f"{conv}.bias": (beats.width,), f"{conv}.weight_g": (1, 1, beats.conv_pos),
               f"{conv}.weight_v": (beats.width, beats.width // beats.conv_pos_groups, beats.conv_pos)}
    for i in range(beats.layers):
        layer = f"{prefix}.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes |= linear(f"{layer}.self_attn.{proj}", beats.width, beats.width)
        shapes[f"{layer}.self_attn.relative_attention_bias.weight"] = (beats.num_buckets, beats.heads)
        shapes |= linear(f"{layer}.self_attn.grep_linear", 8, beats.width // beats.heads)
        shapes[f"{layer}.self_attn.grep_a"] = (1, beats.heads, 1, 1)
        shapes |= layer_norm(f"{layer}.self_attn_layer_norm", beats.width)
        shapes |= linear(f"{layer}.fc1", beats.mlp_width, beats.width)
        shapes |= linear(f"{layer}.fc2", beats.width, beats.mlp_width)
        shapes |= layer_norm(f"{layer}.final_layer_norm", beats.width)
    shapes |= layer_norm(f"{prefix}.encoder.layer_norm", beats.width)
    shapes |= layer_norm(f"{prefix}.layer_norm", beats.patch_width)
    return shapes


def audiovisual_shapes(spec: InternVideo2Spec) -> Shapes:
    """The checkpoint-only keys an audio-visual stage-2 model adds to the vision-text layout."""
    if spec.audio is None:
        return {}
    audio, fused = spec.audio.width, spec.av_concat_width
    return {
        **linear("av_concat_vision_proj.0", fused, spec.width), **layer_norm("av_concat_vision_proj.1", fused),
        **beats_shapes(spec.audio),
        **linear("audio_proj", spec.embed_dim, audio),
        **linear("av_concat_audio_proj.0", fused, audio), **layer_norm("av_concat_audio_proj.1", fused),
        **linear("av_fusion", spec.embed_dim, 2 * spec.embed_dim),
        **linear("avtm_head", 2, spec.text_width),
    }
