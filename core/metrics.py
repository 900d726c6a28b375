"""Text-video retrieval metrics: recall at 1/5/10, median and mean rank, both directions.

Ranks are 1-based and tie-pessimistic: a target's rank is 1 + the number of non-targets that
score at least as high as it, as if every tie were broken against the target. The usual
CLIP4Clip code ranks with `argsort`, which breaks ties by index order, so a collapsed model
(every similarity equal) can score R@1 = 100 when targets sit on the diagonal; here it scores
the worst rank, and the numbers do not depend on how the gallery happens to be ordered.

- text -> video: each caption is a query; its target is its video.
- video -> text, CLIP4Clip's multi-sentence convention (also TeachCLIP's): the similarities are
  max-pooled over each video's captions into a [videos x videos] matrix,
      M[u, v] = max_{c in captions(u)} sim(c, v),
  and video v is ranked among the caption-owning videos u by M[u, v]; its target is u = v.
  With one caption per video this is plain video->text ranking. Videos without captions are
  neither queries nor candidates.
"""

from __future__ import annotations

import numpy as np
import torch

RECALL_AT = (1, 5, 10)
_CHUNK = 4096  # caption rows compared at once: bounds the [chunk, num_videos] boolean buffer


def retrieval_metrics(sim_t2v, caption_video) -> dict[str, float]:
    """`sim_t2v` [num_captions, num_videos] (numpy or torch), `caption_video[i]` the video index
    of caption i. Returns `t2v_R1, t2v_R5, t2v_R10, t2v_MdR, t2v_MnR` and the same for `v2t_`,
    recalls in percent."""
    sim = _as_numpy(sim_t2v)
    owner = np.asarray(_as_numpy(caption_video)).astype(np.int64).reshape(-1)
    if sim.ndim != 2:
        raise ValueError(f"sim_t2v must be [num_captions, num_videos], got shape {sim.shape}")
    num_captions, num_videos = sim.shape
    if owner.shape[0] != num_captions:
        raise ValueError(f"caption_video has {owner.shape[0]} entries for {num_captions} captions")
    if num_captions == 0 or num_videos == 0:
        raise ValueError(f"sim_t2v is empty (shape {sim.shape})")
    if owner.min() < 0 or owner.max() >= num_videos:
        raise ValueError(f"caption_video must index videos 0..{num_videos - 1}")
    if np.isnan(sim).any():
        raise ValueError("sim_t2v contains NaN")

    rows = np.arange(num_captions)
    target_score = sim[rows, owner]  # each caption's similarity to its own video
    t2v_beaten_by = np.empty(num_captions, dtype=np.int64)
    for start in range(0, num_captions, _CHUNK):
        chunk = slice(start, start + _CHUNK)
        # videos scoring >= the caption's own video, minus the video itself
        at_least = sim[chunk] >= target_score[chunk, None]
        at_least[rows[chunk] - start, owner[chunk]] = False
        t2v_beaten_by[chunk] = at_least.sum(1)

    # video -> text: max-pool each video's captions (rows grouped by owner, in video order)
    order = np.argsort(owner, kind="stable")
    owners = np.unique(owner)  # the caption-owning videos: queries and candidates
    starts = np.searchsorted(owner[order], owners)
    by_owner = sim[order]
    v2t_beaten_by = np.empty(len(owners), dtype=np.int64)
    for start in range(0, len(owners), _CHUNK):
        queries = owners[start : start + _CHUNK]
        pooled = np.maximum.reduceat(by_owner[:, queries], starts, axis=0)  # [owners, queries]
        own = pooled[start + np.arange(len(queries)), np.arange(len(queries))]
        v2t_beaten_by[start : start + len(queries)] = (pooled >= own[None, :]).sum(0) - 1

    return {
        **_summarise("t2v", 1 + t2v_beaten_by),
        **_summarise("v2t", 1 + v2t_beaten_by),
    }


def _summarise(prefix: str, ranks: np.ndarray) -> dict[str, float]:
    metrics = {f"{prefix}_R{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_AT}
    metrics[f"{prefix}_MdR"] = float(np.median(ranks))
    metrics[f"{prefix}_MnR"] = float(np.mean(ranks))
    return metrics


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        # float32 holds float16 / bfloat16 exactly, so ties stay ties
        return (array.float() if array.is_floating_point() else array).numpy()
    return np.asarray(array)
