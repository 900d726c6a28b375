"""open_clip teacher: any open_clip image-text model, applied to videos frame by frame.

The module is `openclip`, not `open_clip`, so it cannot shadow the open_clip package.

    frame_emb = normalize(encode_image(frame))                        per real frame
    video_emb = normalize(mean of frame_emb over the real frames)     (CLIP4Clip's meanP)

Padded frames are never encoded, so they cannot change the video embedding.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
import torch
from torch import Tensor

from core.config import TeacherConfig
from core.modelzoo import create_clip
from core.teachers.base import (DTYPES, Teacher, check_texts, check_video_batch, l2_normalize,
                                scatter_real_frames)


class OpenClipTeacher(Teacher):
    kind = "open_clip"

    def __init__(self, name: str, pretrained: str | None = None, dtype: str = "float32", device: str = "cpu"):
        """`pretrained`: an open_clip tag (weights from open_clip's cache or hub) or a local file.
        Without it the weights are random, which only tests want."""
        model, self.tokenizer = create_clip(name, pretrained, device=device)
        preprocess = getattr(model.visual, "preprocess_cfg", None) or {}
        size = preprocess.get("size", model.visual.image_size)
        height, width = (size, size) if isinstance(size, int) else size
        if height != width:
            raise ValueError(f"open_clip model {name!r}: non-square image size {height}x{width} is not supported")
        local_file = Path(pretrained) if pretrained and Path(pretrained).is_file() else None
        super().__init__(
            model.to(DTYPES[dtype]), name,
            num_frames=None, image_size=height,
            mean=preprocess.get("mean", OPENAI_DATASET_MEAN),
            std=preprocess.get("std", OPENAI_DATASET_STD),
            embed_dim=open_clip.get_model_config(name)["embed_dim"],
            dtype=DTYPES[dtype],
            weights_path=local_file,  # a tag's weights are hashed from the state dict
        )

    @classmethod
    def from_config(cls, cfg: TeacherConfig, device: str = "cpu") -> "OpenClipTeacher":
        return cls(cfg.name, cfg.pretrained, cfg.dtype, device)

    @torch.no_grad()
    def encode_video(self, frames: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        frames, mask = check_video_batch(frames, mask)
        mask = mask.to(self.device)
        real = self.preprocess(frames.to(self.device)[mask])  # [N,3,S,S], real frames only
        per_frame = scatter_real_frames(l2_normalize(self.model.encode_image(real)), mask)
        video_emb = l2_normalize(per_frame.sum(dim=1) / mask.sum(dim=1, keepdim=True))
        return video_emb, per_frame

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        texts = check_texts(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        tokens = self.tokenizer(texts).to(self.device)
        return l2_normalize(self.model.encode_text(tokens))
