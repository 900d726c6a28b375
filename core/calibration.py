"""Calibrated teacher temperatures: a new teacher starts near its optimum without a search.

TeachCLIP's CgT and FgT soften the teacher's cosine similarities with `tau_video` and
`tau_frame`. The right values depend on the teacher: one trained at another temperature, size
or number of frames spreads its cosines differently, and the same tau then gives a target that
is nearly one-hot or nearly uniform. So, before training, the temperatures are solved for on the
teacher's own embeddings, batched as training batches them (`calibration` in the loss config):

    tau_video, method nll (the default): temperature scaling (Guo et al., 2017) on a split the
        teacher did not train on (`split`, val):
            argmin_tau  mean_batches  -log softmax(S_t / tau)[i, i]     (row i: video i, its caption i)
        The target then says as much as the teacher knows: a teacher that ranks the true caption
        first 60 % of the time gets a softer target than one that does 95 % of the time.
    tau_video, method entropy: on the train videos,
            mean_batches entropy_fraction( softmax(S_t / tau_video) over each row )  = video_entropy
    tau_frame (frames carry no labels):
            mean_pairs   entropy_fraction( fgt_target(..., tau_frame) over real frames ) = frame_entropy

`entropy_fraction` is the entropy as a share of the uniform one (1.0 says nothing), the same
measure the training loop logs as `train_teacher_video_entropy` / `train_teacher_frame_entropy`.
Entropy grows monotonically with the temperature, so each entropy equation has one root, found by
bisection on log(tau). The NLL is convex in 1/tau, so it has one minimum, found by golden-section
search on log(tau). Why nll is the default: docs/benchmarks.md, the teacher-swap bench's run 5
(matched to a fixed entropy, a weaker teacher's targets were sharp where softer ones distilled
better).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow.dataset as pads
import torch

from core.config import PUBLISHED_TAU_FRAME, PUBLISHED_TAU_VIDEO, DistillConfig, TeacherConfig
from core.features import TableMeta, decode_batch, read_meta
from core.losses import TeacherBatch, entropy_fraction, fgt_target, teacher_similarity

TAU_RANGE = (1e-4, 100.0)  # the bracket searched; cosines lie in [-1, 1]
NLL_TAU_MAX = 10.0  # the highest tau a config takes: a teacher no better than chance on held-out videos gets it


@dataclass
class Calibration:
    """What calibration chose and why: the temperatures, the entropies they reach, and the
    entropies the teacher's targets would have had at the uncalibrated (published) values."""

    tau_video: float
    tau_frame: float
    video_entropy: float
    frame_entropy: float
    published_video_entropy: float
    published_frame_entropy: float
    videos: int
    batch_size: int
    method: str = "entropy"  # how tau_video was chosen
    video_nll: float | None = None  # nll: the held-out NLL at tau_video, at the published tau, and on how many videos
    published_video_nll: float | None = None
    nll_videos: int = 0

    def params(self) -> dict[str, float]:
        return {f"calibration.{k}": v for k, v in asdict(self).items()}


def solve_temperature(entropy_at: Callable[[float], float], target: float, iters: int = 60) -> float | None:
    """The tau in TAU_RANGE at which the (increasing) `entropy_at(tau)` equals `target`, by
    bisection on log(tau); None when the target lies outside what the bracket reaches (a teacher
    whose similarities are all equal has entropy 1 at every temperature)."""
    low, high = math.log(TAU_RANGE[0]), math.log(TAU_RANGE[1])
    if not entropy_at(math.exp(low)) <= target <= entropy_at(math.exp(high)):
        return None
    for _ in range(iters):
        mid = 0.5 * (low + high)
        if entropy_at(math.exp(mid)) < target:
            low = mid
        else:
            high = mid
    return math.exp(0.5 * (low + high))


def fit_temperature(loss_at: Callable[[float], float], iters: int = 60,
                    bracket: tuple[float, float] = (TAU_RANGE[0], NLL_TAU_MAX)) -> float:
    """The tau in `bracket` minimising the unimodal `loss_at(tau)`, by golden-section search on
    log(tau) (at the bracket's edge when the minimum lies beyond it)."""
    low, high = math.log(bracket[0]), math.log(bracket[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss_at(math.exp(a)), loss_at(math.exp(b))
    for _ in range(iters):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss_at(math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss_at(math.exp(b))
    return math.exp(0.5 * (low + high))


def video_nll(batches: Sequence[TeacherBatch], tau_video: float) -> float:
    """Mean negative log-likelihood of each video's own caption under the teacher's in-batch
    video->text softmax at `tau_video` (the CgT target's rows), in float64: the minimum is flat."""
    return float(torch.stack([-(teacher_similarity(b).double() / tau_video).log_softmax(dim=1).diagonal().mean()
                              for b in batches]).mean())


def video_entropy(batches: Sequence[TeacherBatch], tau_video: float) -> float:
    """Mean entropy fraction of the teacher's video->text batch distributions at `tau_video`."""
    return float(torch.stack([entropy_fraction((teacher_similarity(b) / tau_video).softmax(dim=1))
                              for b in batches]).mean())


def frame_entropy(batches: Sequence[TeacherBatch], tau_frame: float) -> float:
    """Mean entropy fraction of the teacher's frame targets (FgT) at `tau_frame`."""
    return float(torch.stack([entropy_fraction(fgt_target(b.frame_emb, b.text_emb, b.frame_mask, tau_frame),
                                               b.frame_mask) for b in batches]).mean())


def calibrate(batches: Sequence[TeacherBatch], video_target: float | None, frame_target: float | None,
              tau_video: float = PUBLISHED_TAU_VIDEO, tau_frame: float = PUBLISHED_TAU_FRAME,
              nll_batches: Sequence[TeacherBatch] | None = None) -> Calibration:
    """Solve the temperatures asked for on `batches` (train videos): tau_video by NLL on
    `nll_batches` (held-out videos) when they are given, else to `video_target`'s entropy;
    tau_frame to `frame_target`'s. A None target keeps the given tau, and so does an entropy out
    of reach. Also reports the entropies (and NLL) at the published values."""
    if not batches or (nll_batches is not None and not nll_batches):
        raise ValueError("calibration needs at least one batch of teacher embeddings")
    with torch.no_grad():
        if nll_batches is not None:
            tau_video = fit_temperature(lambda t: video_nll(nll_batches, t))
        elif video_target is not None:
            tau_video = solve_temperature(lambda t: video_entropy(batches, t), video_target) or tau_video
        if frame_target is not None:
            tau_frame = solve_temperature(lambda t: frame_entropy(batches, t), frame_target) or tau_frame
        nll = {} if nll_batches is None else {
            "method": "nll", "video_nll": video_nll(nll_batches, tau_video),
            "published_video_nll": video_nll(nll_batches, PUBLISHED_TAU_VIDEO),
            "nll_videos": sum(len(b.video_emb) for b in nll_batches)}
        return Calibration(
            tau_video=tau_video, tau_frame=tau_frame,
            video_entropy=video_entropy(batches, tau_video), frame_entropy=frame_entropy(batches, tau_frame),
            published_video_entropy=video_entropy(batches, PUBLISHED_TAU_VIDEO),
            published_frame_entropy=frame_entropy(batches, PUBLISHED_TAU_FRAME),
            videos=sum(len(b.video_emb) for b in batches), batch_size=len(batches[0].video_emb), **nll)


def teacher_batches(video_emb: Sequence, frame_emb: Sequence, text_emb: Sequence, frame_mask: Sequence,
                    batch_size: int, seed: int = 0) -> list[TeacherBatch]:
    """Training-shaped batches of the teacher's embeddings: videos in a seeded shuffle, `batch_size`
    at a time (the last partial batch dropped, as training drops it, unless it is the only one),
    one caption per video drawn at random as training draws them. Inputs are per video: video
    [D], frames [F, D], captions [C, D], mask [F]."""
    rng = random.Random(seed)
    order = list(range(len(video_emb)))
    rng.shuffle(order)
    size = min(batch_size, len(order))
    batches = []
    for start in range(0, len(order) - size + 1, size):
        rows = order[start:start + size]
        picks = [rng.randrange(len(text_emb[i])) for i in rows]
        batches.append(TeacherBatch(
            video_emb=_float32([video_emb[i] for i in rows]),
            frame_emb=_float32([frame_emb[i] for i in rows]),
            text_emb=_float32([text_emb[i][p] for i, p in zip(rows, picks)]),
            frame_mask=torch.from_numpy(np.stack([np.asarray(frame_mask[i]) for i in rows])).bool()))
    return batches


def _float32(arrays: list) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in arrays]))


# ------------------------------------------------------------------------------ from a table
def resolve_temperatures(distill: DistillConfig, table_dir: str | Path,
                         teacher: TeacherConfig | None = None) -> tuple[DistillConfig, Calibration | None]:
    """`distill` with every `auto` temperature replaced by a number, and the calibration that chose
    them (None when nothing was calibrated). TeachCLIP with a teacher calibrates on the table's
    cached teacher embeddings, or, in the online mode, on `teacher`'s embeddings of the table's
    frames; an objective that does not read the temperatures gets the published values."""
    loss = distill.loss
    auto = [name for name in ("tau_video", "tau_frame") if getattr(loss, name) == "auto"]
    if not auto:
        return distill, None
    published = {"tau_video": PUBLISHED_TAU_VIDEO, "tau_frame": PUBLISHED_TAU_FRAME}
    if loss.objective != "teachclip" or distill.teacher_mode == "none":
        return _with_loss(distill, {name: published[name] for name in auto}), None
    meta = read_meta(table_dir)
    targets = loss.calibration
    batches = _calibration_batches(distill, table_dir, meta, teacher, list(distill.train_splits))
    by_nll = "tau_video" in auto and targets.method == "nll"
    held_out = _calibration_batches(distill, table_dir, meta, teacher, [targets.split]) if by_nll else None
    given = {name: published[name] if name in auto else getattr(loss, name) for name in published}
    result = calibrate(batches, targets.video_entropy if "tau_video" in auto else None,
                       targets.frame_entropy if "tau_frame" in auto else None, **given, nll_batches=held_out)
    return _with_loss(distill, {name: getattr(result, name) for name in auto}), result


def _with_loss(distill: DistillConfig, values: dict[str, float]) -> DistillConfig:
    return distill.model_copy(update={"loss": distill.loss.model_copy(update=values)})


def _calibration_batches(distill: DistillConfig, table_dir: str | Path, meta: TableMeta,
                         teacher: TeacherConfig | None, splits: list[str]) -> list[TeacherBatch]:
    """The first `calibration.videos` videos of `splits`, read straight from Parquet (only the
    columns needed, only as many rows as used), batched as training batches them."""
    online = distill.teacher_mode == "online"
    columns = ["video_id", "frame_mask", "captions"] + (["frames"] if online else
                                                        ["teacher_frame_emb", "teacher_video_emb", "teacher_text_emb"])
    dataset = pads.dataset(str(table_dir), format="parquet")
    rows = dataset.head(distill.loss.calibration.videos, columns=columns,
                        filter=pads.field("split").isin(splits))
    if rows.num_rows < 2:
        raise ValueError(f"{table_dir}: calibrating the teacher temperatures needs at least 2 videos in "
                         f"{'+'.join(splits)}; set loss.tau_video and loss.tau_frame to numbers instead")
    columns_of = {name: rows.column(name).to_pylist() for name in rows.column_names}
    if online:
        if teacher is None or teacher.kind == "none":
            raise ValueError("online calibration needs the teacher's config")
        video, frames, texts, mask = _encode_online(columns_of, meta, teacher, distill.eval_batch_size)
    else:
        if not meta.has_teacher:
            raise ValueError(f"{table_dir} holds no teacher embeddings to calibrate on (teacher_mode cached)")
        decoded = decode_batch(columns_of, meta)
        video, frames, texts = decoded.teacher_video_emb, decoded.teacher_frame_emb, decoded.teacher_text_emb
        mask = decoded.frame_mask
    return teacher_batches(video, frames, texts, mask, distill.batch_size, distill.loss.calibration.seed)


def _encode_online(columns: dict, meta: TableMeta, teacher_cfg: TeacherConfig, batch_size: int):
    from core.teachers import build_teacher

    torch.manual_seed(0)  # as training does: a teacher without weights initialises the same everywhere
    teacher = build_teacher(teacher_cfg)
    frames_only = replace(meta, teacher={"kind": "none"})  # only the frames were read
    video, frames, texts, masks = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(columns["video_id"]), batch_size):
            part = {k: v[start:start + batch_size] for k, v in columns.items()}
            batch = decode_batch(part, frames_only)
            pixels, mask = torch.from_numpy(batch.frames), torch.from_numpy(batch.frame_mask)
            video_emb, frame_emb = teacher.encode_video(pixels, mask)
            video += list(video_emb.float().cpu())
            frames += list(frame_emb.float().cpu())
            masks += list(mask)
            texts += [teacher.encode_text(captions).float().cpu() for captions in batch.captions]
    return video, frames, texts, masks
