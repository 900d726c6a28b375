"""vidkd teacher: a student checkpoint written by our own distill job (`core.student`).

The demo trains its teacher here (a larger student, distilled from nobody) and extracts its
embeddings like any other teacher's. The student masks padded frames itself, so:

- at most `num_frames` frames per video (the length of its frame position embedding): one call
  with the mask, exactly what the student computes in training;
- more: video_emb over the clip from `sample_clip`, frame_emb over `tile_windows`, with repeated
  frames masked out, so each real frame is embedded once among its neighbours.

The student takes uint8 frames at its own resolution, so other resolutions are resized here.
Weights stay fp32 (the student normalises pixels in fp32); a half `dtype` runs under autocast.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from core.config import TeacherConfig
from core.student import load_student
from core.teachers.base import (
    DTYPES, FrameWindows, Teacher, check_texts, check_video_batch, l2_normalize, resize_square, sample_clip,
    tile_windows,
)


class VidkdTeacher(Teacher):
    kind = "vidkd"

    def __init__(self, path: str | Path, dtype: str = "float32", device: str = "cpu"):
        path = Path(path)
        student = load_student(path, map_location=device)
        super().__init__(
            student, path.stem,
            num_frames=student.num_frames, image_size=student.image_size, mean=student.mean, std=student.std,
            embed_dim=student.embed_dim, dtype=DTYPES[dtype], weights_path=path,
        )

    @classmethod
    def from_config(cls, cfg: TeacherConfig, device: str = "cpu") -> "VidkdTeacher":
        return cls(cfg.path, cfg.dtype, device)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _resize(self, frames: Tensor) -> Tensor:
        """uint8 [B,F,H,W,3] -> uint8 [B,F,S,S,3] at the student's resolution."""
        if frames.shape[2:4] == (self.image_size, self.image_size):
            return frames
        batch, length = frames.shape[:2]
        x = resize_square(frames.flatten(0, 1).permute(0, 3, 1, 2).float(), self.image_size)
        x = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return x.reshape(batch, length, *x.shape[1:])

    def _encode(self, frames: Tensor, windows: FrameWindows) -> tuple[Tensor, Tensor]:
        out = self.model.encode_video(windows.gather(frames), windows.fresh.to(self.device))
        return l2_normalize(out.frame_emb), l2_normalize(out.video_emb)

    @torch.no_grad()
    def encode_video(self, frames: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        frames, mask = check_video_batch(frames, mask)
        frames, mask = self._resize(frames.to(self.device)), mask.to(self.device)
        with self._autocast():
            if frames.shape[1] <= self.num_frames:
                out = self.model.encode_video(frames, mask)
                return l2_normalize(out.video_emb), l2_normalize(out.frame_emb) * mask[..., None]
            _, video_emb = self._encode(frames, sample_clip(mask, self.num_frames))
            windows = tile_windows(mask, self.num_frames)
            window_frame_emb, _ = self._encode(frames, windows)
        return video_emb, windows.scatter(window_frame_emb, *mask.shape)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        texts = check_texts(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        with self._autocast():
            return l2_normalize(self.model.encode_text(texts))
