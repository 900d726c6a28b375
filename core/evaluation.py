"""Retrieval evaluation of any video-text model over feature-table batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch

from core.features import FeatureBatch
from core.metrics import retrieval_metrics

if TYPE_CHECKING:
    from core.student import VideoTextStudent

# (frames uint8 [B,F,H,W,3], mask [B,F]) -> video_emb [B,D]  and  list[str] -> text_emb [N,D]
VideoEncoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], torch.Tensor]


@torch.no_grad()
def embed(
    batches: Iterable[FeatureBatch], encode_video: VideoEncoder, encode_text: TextEncoder, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Video embeddings [V,D], caption embeddings [C,D] and each caption's video index."""
    videos, texts, caption_video = [], [], []
    for batch in batches:
        frames = torch.from_numpy(batch.frames).to(device)
        mask = torch.from_numpy(batch.frame_mask).to(device)
        first = sum(v.shape[0] for v in videos)
        videos.append(encode_video(frames, mask).float().cpu())
        captions = [c for caps in batch.captions for c in caps]
        texts.append(encode_text(captions).float().cpu())
        caption_video.extend(first + i for i, caps in enumerate(batch.captions) for _ in caps)
    return torch.cat(videos), torch.cat(texts), np.asarray(caption_video)


def evaluate_retrieval(
    batches: Iterable[FeatureBatch], encode_video: VideoEncoder, encode_text: TextEncoder, device: str | torch.device
) -> dict[str, float]:
    """R@1/5/10, MdR, MnR in both directions; every caption of a video is a query."""
    video_emb, text_emb, caption_video = embed(batches, encode_video, encode_text, device)
    sim = (text_emb @ video_emb.T).numpy()
    return retrieval_metrics(sim, caption_video)


def evaluate_teacher_table(batches: Iterable[FeatureBatch]) -> dict[str, float]:
    """Retrieval of the teacher itself, from the embeddings cached in the table."""
    videos, texts, caption_video = [], [], []
    for batch in batches:
        first = sum(v.shape[0] for v in videos)
        videos.append(batch.teacher_video_emb.astype(np.float32))
        texts.extend(t.astype(np.float32) for t in batch.teacher_text_emb)
        caption_video.extend(first + i for i, t in enumerate(batch.teacher_text_emb) for _ in range(t.shape[0]))
    video_emb, text_emb = np.concatenate(videos), np.concatenate(texts)
    return retrieval_metrics(text_emb @ video_emb.T, np.asarray(caption_video))


def evaluate_student(model: VideoTextStudent, batches: list[FeatureBatch], device: str) -> dict[str, float]:
    """A student's retrieval on `batches`, plus R_mean (the mean of t2v R@1/5/10)."""
    model.eval()
    metrics = evaluate_retrieval(batches, lambda f, m: model.encode_video(f, m).video_emb, model.encode_text, device)
    metrics["R_mean"] = (metrics["t2v_R1"] + metrics["t2v_R5"] + metrics["t2v_R10"]) / 3
    return metrics
