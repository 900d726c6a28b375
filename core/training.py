"""The pieces of one distillation step, shared by the Ray Train loop (jobs/distill.py) and the
benchmarks: pure torch, no Ray."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from core.config import DistillConfig
from core.features import FeatureBatch
from core.losses import TeacherBatch, dldkd_loss, gather_with_grad, teachclip_loss
from core.student import VideoTextStudent


def pick_captions(batch: FeatureBatch, rng: random.Random) -> tuple[list[str], list[int]]:
    """One caption per video per step, drawn at random: every caption gets seen over epochs."""
    picks = [rng.randrange(len(caps)) for caps in batch.captions]
    return [caps[i] for caps, i in zip(batch.captions, picks)], picks


def cached_teacher(batch: FeatureBatch, picks: list[int], device: torch.device) -> TeacherBatch:
    text = np.stack([emb[i] for emb, i in zip(batch.teacher_text_emb, picks)])
    return TeacherBatch(
        video_emb=torch.from_numpy(batch.teacher_video_emb.astype(np.float32)).to(device),
        frame_emb=torch.from_numpy(batch.teacher_frame_emb.astype(np.float32)).to(device),
        text_emb=torch.from_numpy(text.astype(np.float32)).to(device),
        frame_mask=torch.from_numpy(batch.frame_mask).to(device),
    )


def online_teacher(teacher: Any, frames: torch.Tensor, mask: torch.Tensor, captions: list[str]) -> TeacherBatch:
    with torch.no_grad():
        video_emb, frame_emb = teacher.encode_video(frames, mask)
        text_emb = teacher.encode_text(captions)
    return TeacherBatch(video_emb=video_emb.float(), frame_emb=frame_emb.float(), text_emb=text_emb.float(),
                        frame_mask=mask)


class TrainStep(torch.nn.Module):
    """The student's training forward, logit scale included, as one module call: DDP must see
    every parameter that the loss touches inside `forward`, or its gradient hooks misfire."""

    def __init__(self, student: VideoTextStudent):
        super().__init__()
        self.student = student

    def forward(self, frames: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> tuple[Any, torch.Tensor]:
        return self.student(frames, mask, tokens), self.student.logit_scale


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))



def distill_loss(cfg: DistillConfig, logit_scale: torch.Tensor, out: Any, batch: FeatureBatch, picks: list[int],
                 teacher: Any, frames: torch.Tensor, mask: torch.Tensor, captions: list[str],
                 device: torch.device, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured objective over the global batch: embeddings are gathered across workers
    with gradients, so every worker's negatives span the whole batch."""
    video, text_emb, projected = out.video, out.text_emb, out.projected_video_emb
    teacher_batch = None
    if cfg.teacher_mode == "cached":
        teacher_batch = cached_teacher(batch, picks, device)
    elif cfg.teacher_mode == "online":
        teacher_batch = online_teacher(teacher, frames, mask, captions)

    video = type(video)(*(gather_with_grad(t) for t in video))
    text_emb = gather_with_grad(text_emb)
    if teacher_batch is not None:
        teacher_batch = TeacherBatch(*(gather_with_grad(t) for t in
                                       (teacher_batch.video_emb, teacher_batch.frame_emb, teacher_batch.text_emb,
                                        teacher_batch.frame_mask)))
    if cfg.loss.objective == "dldkd":
        return dldkd_loss(video, text_emb, logit_scale, gather_with_grad(projected), teacher_batch, cfg.loss, progress)
    return teachclip_loss(video, text_emb, logit_scale, teacher_batch, cfg.loss)
