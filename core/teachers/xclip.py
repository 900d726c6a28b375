"""X-CLIP teacher: transformers' `XCLIPModel` from a local directory (microsoft/xclip-* layout:
config.json, weights, tokenizer files, preprocessor_config.json).

X-CLIP sees a clip of exactly `vision_config.num_frames` frames: its frames exchange message
tokens inside the vision encoder, and its multi-frame integration transformer (MIT) has one
position embedding per frame. It has no padding mask, so:

- video_emb: the clip from `sample_clip` (segment-centre sampling over the real frames; a short
  video's last real frame repeated in the padded positions), through the vision encoder, the
  visual projection and the MIT; this equals `XCLIPModel.get_video_features`.
- frame_emb: the vision encoder's pooled output of each frame through `visual_projection`, the
  MIT's per-frame inputs. Computed over `tile_windows`, so every real frame is embedded once in a
  clip of its neighbours; with at most `num_frames` real frames that is the same clip as above.
- text_emb: `get_text_features` (text encoder + projection). `XCLIPModel.forward` instead adds a
  video-conditioned prompt to every text embedding, which makes a text's embedding depend on the
  video it is compared with; a cache of per-caption embeddings needs the unconditioned ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor
from transformers import AutoTokenizer, XCLIPModel

from core.config import TeacherConfig
from core.teachers.base import (
    DTYPES, Teacher, check_texts, check_video_batch, l2_normalize, same_windows, sample_clip, tile_windows,
)


class XClipTeacher(Teacher):
    kind = "xclip"

    def __init__(self, path: str | Path, dtype: str = "float32", device: str = "cpu"):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"xclip teacher: {path} is not a model directory (no config.json)")
        model = XCLIPModel.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.context_length = model.config.text_config.max_position_embeddings
        vision = model.config.vision_config
        mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        if (path / "preprocessor_config.json").is_file():
            processor = json.loads((path / "preprocessor_config.json").read_text())
            mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
        super().__init__(
            model, path.name,
            num_frames=vision.num_frames, image_size=vision.image_size, mean=mean, std=std,
            embed_dim=model.config.projection_dim, dtype=DTYPES[dtype], weights_path=path,
        )

    @classmethod
    def from_config(cls, cfg: TeacherConfig, device: str = "cpu") -> "XClipTeacher":
        return cls(cfg.path, cfg.dtype, device)

    def _encode_clips(self, clips: Tensor) -> tuple[Tensor, Tensor]:
        """clips [W,T,3,S,S] -> (per-frame [W,T,D], per-clip [W,D]), both normalised."""
        windows, length = clips.shape[:2]
        pooled = self.model.vision_model(pixel_values=clips.flatten(0, 1)).pooler_output
        frame_emb = self.model.visual_projection(pooled).view(windows, length, -1)
        video_emb = self.model.mit(frame_emb).pooler_output
        return l2_normalize(frame_emb), l2_normalize(video_emb)

    @torch.no_grad()
    def encode_video(self, frames: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        frames, mask = check_video_batch(frames, mask)
        pixels = self.preprocess(frames)  # [B,F,3,S,S]
        clip = sample_clip(mask, self.num_frames)
        clip_frame_emb, video_emb = self._encode_clips(clip.gather(pixels))
        windows = tile_windows(mask, self.num_frames)
        if same_windows(windows, clip):  # no video has more real frames than the clip holds
            window_frame_emb = clip_frame_emb
        else:
            window_frame_emb, _ = self._encode_clips(windows.gather(pixels))
        return video_emb, windows.scatter(window_frame_emb, *mask.shape)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        texts = check_texts(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context_length,
                                return_tensors="pt").to(self.device)
        text = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        pooled = text.pooler_output
        return l2_normalize(self.model.text_projection(pooled))
