"""core.metrics.retrieval_metrics on hand-computed cases, ties and multi-caption videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import core.metrics
from core.metrics import retrieval_metrics


def brute_force_ranks(sim: np.ndarray, owner: np.ndarray) -> tuple[list[int], list[int]]:
    """The documented definition, one query at a time."""
    t2v = []
    for i in range(len(sim)):
        t2v.append(1 + sum(sim[i, j] >= sim[i, owner[i]] for j in range(sim.shape[1]) if j != owner[i]))
    # video -> text as CLIP4Clip: each video's captions max-pooled, videos ranked among videos
    owners = sorted(set(owner))
    pooled = {(u, v): max(sim[i, v] for i in range(len(sim)) if owner[i] == u) for u in owners for v in owners}
    v2t = [1 + sum(pooled[u, v] >= pooled[v, v] for u in owners if u != v) for v in owners]
    return t2v, v2t


def test_hand_computed_single_caption():
    sim = np.array([[0.9, 0.1, 0.5], [0.8, 0.3, 0.2], [0.7, 0.6, 0.4]])
    m = retrieval_metrics(sim, [0, 1, 2])
    # text -> video ranks 1, 2, 3; video -> text ranks 1, 2, 2
    assert m["t2v_R1"] == pytest.approx(100 / 3) and m["t2v_R5"] == 100 and m["t2v_R10"] == 100
    assert (m["t2v_MdR"], m["t2v_MnR"]) == (2, 2)
    assert m["v2t_R1"] == pytest.approx(100 / 3)
    assert m["v2t_MdR"] == 2 and m["v2t_MnR"] == pytest.approx(5 / 3)
    assert set(m) == {f"{d}_{k}" for d in ("t2v", "v2t") for k in ("R1", "R5", "R10", "MdR", "MnR")}


def test_hand_computed_multi_caption():
    sim = np.array([[0.9, 0.2], [0.1, 0.55], [0.4, 0.25], [0.6, 0.5]])
    m = retrieval_metrics(sim, [0, 0, 1, 1])
    # text -> video ranks 1, 2, 2, 2; video 0 is found by caption 0 (rank 1), video 1 by
    # caption 3 (0.5), beaten only by caption 1 (0.55) of video 0: rank 2
    assert (m["t2v_R1"], m["t2v_MdR"], m["t2v_MnR"]) == (25, 2, 1.75)
    assert (m["v2t_R1"], m["v2t_MdR"], m["v2t_MnR"]) == (50, 1.5, 1.5)


def test_v2t_max_pools_each_videos_captions_as_clip4clip():
    # video 1's best own caption (0.5) is beaten by both captions of video 0 (0.6, 0.7). Ranked
    # among captions that would be rank 3; CLIP4Clip max-pools video 0's captions to one
    # candidate (0.7), so video 1 is rank 2 among the 2 videos.
    sim = np.array([[0.9, 0.6], [0.1, 0.7], [0.4, 0.5], [0.3, 0.2]])
    m = retrieval_metrics(sim, [0, 0, 1, 1])
    assert (m["v2t_R1"], m["v2t_MdR"], m["v2t_MnR"]) == (50, 1.5, 1.5)


def test_v2t_equals_clip4clip_argsort_on_the_pooled_matrix_without_ties():
    rng = np.random.default_rng(1)
    owner = np.repeat(np.arange(12), 4)
    sim = rng.normal(size=(48, 12))
    pooled = np.stack([sim[owner == u].max(axis=0) for u in range(12)])  # [text-owner video, video]
    queries = pooled.T  # row v: video v against every video's pooled captions
    ranks = np.where(np.sort(-queries, axis=1) - np.diag(-queries)[:, None] == 0)[1] + 1
    m = retrieval_metrics(sim, owner)
    assert m["v2t_MnR"] == pytest.approx(ranks.mean())
    assert m["v2t_R1"] == pytest.approx(100 * np.mean(ranks == 1))
    assert m["v2t_R5"] == pytest.approx(100 * np.mean(ranks <= 5))


def test_constant_similarity_is_worst_rank_not_perfect():
    m = retrieval_metrics(np.zeros((4, 4)), [0, 1, 2, 3])
    assert m["t2v_R1"] == 0 and m["v2t_R1"] == 0
    assert m["t2v_MdR"] == 4 and m["v2t_MnR"] == 4
    assert m["t2v_R5"] == 100  # rank 4 is still within 5


def test_ties_count_against_the_target_but_own_captions_do_not():
    # caption 0 ties with video 1: rank 2, not 1
    m = retrieval_metrics(np.array([[0.5, 0.5, 0.2]]), [0])
    assert m["t2v_MdR"] == 2
    # video 0's two captions tie with each other: its rank is 1 (they are both targets)
    sim = np.array([[0.7, 0.1], [0.7, 0.2], [0.3, 0.9]])
    m = retrieval_metrics(sim, [0, 0, 1])
    assert m["v2t_R1"] == 100


def test_videos_without_captions_are_distractors_only():
    sim = np.array([[0.9, 0.1, 0.95], [0.2, 0.8, 0.1]])
    m = retrieval_metrics(sim, [0, 1])  # video 2 has no caption
    assert m["t2v_MnR"] == 1.5  # caption 0 loses to video 2
    assert m["v2t_R1"] == 100  # only videos 0 and 1 are queries


def test_matches_brute_force_and_clip4clip_without_ties(monkeypatch):
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(30), 3)
    rng.shuffle(owner)
    sim = rng.normal(size=(90, 30)).astype(np.float32)
    sim[np.arange(90), owner] += 1.0
    t2v, v2t = brute_force_ranks(sim, owner)
    m = retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(owner))
    assert m["t2v_R1"] == pytest.approx(100 * np.mean(np.array(t2v) <= 1))
    assert m["t2v_R5"] == pytest.approx(100 * np.mean(np.array(t2v) <= 5))
    assert m["t2v_MnR"] == pytest.approx(np.mean(t2v)) and m["t2v_MdR"] == np.median(t2v)
    assert m["v2t_R10"] == pytest.approx(100 * np.mean(np.array(v2t) <= 10))
    assert m["v2t_MnR"] == pytest.approx(np.mean(v2t)) and m["v2t_MdR"] == np.median(v2t)
    # CLIP4Clip's argsort ranking agrees when there are no ties (one caption per video)
    square = sim[:30, :30] + 2 * np.eye(30, dtype=np.float32) * rng.random(30, dtype=np.float32)
    clip4clip_ranks = np.where(np.sort(-square, axis=1) - np.diag(-square)[:, None] == 0)[1] + 1
    assert retrieval_metrics(square, np.arange(30))["t2v_MnR"] == pytest.approx(clip4clip_ranks.mean())
    # chunking over captions changes nothing
    monkeypatch.setattr(core.metrics, "_CHUNK", 7)
    assert retrieval_metrics(sim, owner) == m


def test_half_precision_ties_survive_conversion():
    sim = torch.tensor([[0.3, 0.3], [0.1, 0.2]], dtype=torch.bfloat16)
    assert retrieval_metrics(sim, torch.tensor([0, 1]))["t2v_R1"] == 50


@pytest.mark.parametrize(
    "sim, owner, match",
    [
        (np.zeros((3, 2)), [0, 1], "2 entries for 3 captions"),
        (np.zeros((2, 2)), [0, 2], "must index videos 0..1"),
        (np.zeros(4), [0], "must be \\[num_captions, num_videos\\]"),
        (np.array([[np.nan, 0.0]]), [0], "NaN"),
    ],
)
def test_bad_inputs(sim, owner, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sim, owner)
