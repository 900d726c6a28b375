"""Training objectives: plain InfoNCE, TeachCLIP (InfoNCE + CgT + FgT) and DLDKD.

Every loss takes a *global* batch: under data parallelism the caller gathers embeddings from all
workers with `gather_with_grad` first, so the contrastive negatives and the teacher's batch-level
similarity distributions span the whole batch. Batches hold one caption per video, matched on
the diagonal: row i of `text_emb` describes video i.

Teacher knowledge arrives as cached embeddings (`TeacherBatch`); the teacher's video-text and
frame-text similarities are computed here for whatever batch arrives, in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from core.config import LossConfig

if TYPE_CHECKING:  # annotations only: the losses need no open_clip import
    from core.student import VideoOutput


@dataclass
class TeacherBatch:
    """The teacher's cached embeddings for a batch (any float dtype; used in float32)."""

    video_emb: Tensor  # [B, Dt]
    frame_emb: Tensor  # [B, F, Dt]
    text_emb: Tensor  # [B, Dt], the caption matched with each video
    frame_mask: Tensor  # [B, F], 1 = real frame; padded frames carry no teacher knowledge

    def to(self, device: torch.device | str) -> "TeacherBatch":
        return TeacherBatch(*(t.to(device, non_blocking=True) for t in
                              (self.video_emb, self.frame_emb, self.text_emb, self.frame_mask)))


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every worker along dim 0, keeping gradients to every worker's slice.

    The autograd all-gather reduce-scatters (sums) the incoming gradients across workers in backward;
    with every worker computing the same global loss and DDP averaging parameter gradients, the
    result is exactly the gradient of the global loss. Identity outside a multi-worker group.
    Every worker must pass the same shape: drop the last partial batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    # torch.distributed.nn.functional.all_gather is deprecated and names this one as its successor
    from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

    return wait_tensor(all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD))


def similarity(video_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Video-text logits [B_video, B_text] = logit_scale * video_emb @ text_emb.T."""
    return logit_scale * video_emb.float() @ text_emb.float().T


# --------------------------------------------------------------------------------- InfoNCE
def infonce(sim_logits: Tensor, labels: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over a square logit matrix S [N, N] (already scaled by 1/temperature).

        L = 1/2 * ( CE(S, y) + CE(S.T, y^-1) ),  CE(S, y) = -1/N sum_i log softmax(S_i)[y_i]

    The two directions are averaged, as in CLIP4Clip and TeachCLIP (their `gt_loss`).

    y[i] is the column matched with row i (default: the diagonal, y = arange(N)); y^-1 is its
    inverse permutation, so both directions (video->text and text->video) are scored.
    """
    if sim_logits.ndim != 2 or sim_logits.shape[0] != sim_logits.shape[1]:
        raise ValueError(f"infonce needs a square [N,N] similarity matrix, got {list(sim_logits.shape)}")
    n = sim_logits.shape[0]
    sim_logits = sim_logits.float()
    if labels is None:
        labels = torch.arange(n, device=sim_logits.device)
        inverse = labels
    else:
        labels = labels.to(sim_logits.device).long()
        if labels.shape != (n,) or not torch.equal(labels.sort().values, torch.arange(n, device=labels.device)):
            raise ValueError("infonce labels must be a permutation of 0..N-1 (one match per row and column)")
        inverse = torch.argsort(labels)
    return 0.5 * (F.cross_entropy(sim_logits, labels) + F.cross_entropy(sim_logits.T, inverse))


def plain_loss(out: VideoOutput, text_emb: Tensor, logit_scale: Tensor | float) -> tuple[Tensor, dict[str, Tensor]]:
    """Objective `none`: InfoNCE on the student's own similarities, no teacher."""
    _check_batch(out, text_emb, None)
    loss = infonce(similarity(out.video_emb, text_emb, logit_scale))
    return loss, {"infonce": loss.detach()}


# -------------------------------------------------------------------------------- TeachCLIP
def _pearson_distance(p: Tensor, q: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """1 - Pearson correlation between p and q along `dim`, averaged over the other dim."""
    p = p - p.mean(dim=dim, keepdim=True)
    q = q - q.mean(dim=dim, keepdim=True)
    r = (p * q).sum(dim) / (p.norm(dim=dim) * q.norm(dim=dim) + eps)
    return (1.0 - r).mean()


def teacher_similarity(teacher: TeacherBatch) -> Tensor:
    """Teacher cosine similarities [B_video, B_text] in float32."""
    return F.normalize(teacher.video_emb.float(), dim=-1) @ F.normalize(teacher.text_emb.float(), dim=-1).T


def cgt_loss(student_sim: Tensor, teacher_sim: Tensor, tau_video: float) -> Tensor:
    """TeachCLIP's coarse-grained teaching (its `distill_method: pear`): the student's batch
    distributions match the shape of the teacher's.

        P_s = softmax(S_s),  P_t = softmax(S_t / tau_video)    (S_s: student logits, already scaled)
        CgT = mean_i [1 - pearson(P_s[i,:], P_t[i,:])] + mean_j [1 - pearson(P_s[:,j], P_t[:,j])]

    The two directions are summed, not averaged, as TeachCLIP does (so CgT lies in [0, 4]).
    TeachCLIP's teacher distribution is the softmax of the teacher's own logits, its logit scale
    times the cosines: `tau_video` is that scale's inverse (0.01 for CLIP-family teachers, whose
    scale trains to CLIP's cap of 100). Pearson correlation ignores the offset and scale of the
    distributions, so the student keeps its own temperature while learning the teacher's ranking
    of the batch (the DIST relation loss). Rows are video->text, columns text->video.
    """
    if student_sim.shape != teacher_sim.shape:
        raise ValueError(f"student sim {list(student_sim.shape)} and teacher sim {list(teacher_sim.shape)} differ")
    student_sim, teacher_logits = student_sim.float(), teacher_sim.float() / tau_video
    rows = _pearson_distance(student_sim.softmax(dim=1), teacher_logits.softmax(dim=1), dim=1)
    cols = _pearson_distance(student_sim.softmax(dim=0), teacher_logits.softmax(dim=0), dim=0)
    return rows + cols


def fgt_target(teacher_frame_emb: Tensor, teacher_text_emb: Tensor, mask: Tensor, tau_frame: float) -> Tensor:
    """The teacher's frame relevance [B,F]: softmax over real frames of cos(frame_f, text) / tau_frame.

    TeachCLIP's X-CLIP teacher gives softmax(cos) at temperature 1 (tau_frame = 1.0)."""
    frames = F.normalize(teacher_frame_emb.float(), dim=-1)
    texts = F.normalize(teacher_text_emb.float(), dim=-1)
    sim = torch.einsum("bfd,bd->bf", frames, texts) / tau_frame
    return sim.masked_fill(~mask.bool(), float("-inf")).softmax(dim=-1)


def fgt_loss(afa_weights: Tensor, teacher_frame_emb: Tensor, teacher_text_emb: Tensor, mask: Tensor,
             tau_frame: float) -> Tensor:
    """TeachCLIP's fine-grained teaching (its `fine_method: ce`): the student's frame scores learn
    the teacher's frame relevance.

        T[b,f] = softmax_{f real}( cos(teacher_frame_emb[b,f], teacher_text_emb[b]) / tau_frame )
        FgT    = -1/(B*F) sum_b sum_{f real} T[b,f] * log afa_weights[b,f]

    `afa_weights` is AFA's temperature-1 softmax of its frame scores (not the sharper pooling
    weights). The mean runs over pairs and frames together, as TeachCLIP's `.mean()` over the
    [B,F] grid does, so the user's w_fgt is the weight the term gets; padded frames have zero
    target and weight and add nothing but their place in the grid. Cross-entropy, so for each
    pair it is smallest (the entropy of T) when afa_weights == T.
    """
    if afa_weights.shape != mask.shape or teacher_frame_emb.shape[:2] != mask.shape:
        raise ValueError(f"afa_weights {list(afa_weights.shape)}, teacher frames {list(teacher_frame_emb.shape[:2])} "
                         f"and mask {list(mask.shape)} must all be [B,F]")
    return _fgt_from_target(afa_weights, fgt_target(teacher_frame_emb, teacher_text_emb, mask, tau_frame), mask)


def _fgt_from_target(afa_weights: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    mask = mask.bool()
    # Clamp only keeps log finite; real frames never reach it unless AFA saturates.
    log_weights = afa_weights.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    return -(target * log_weights).masked_fill(~mask, 0.0).sum() / mask.numel()


def entropy_fraction(probs: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean entropy of the distributions along the last dim, each as a fraction of the uniform
    entropy over its `valid` entries: 1.0 means the distribution says nothing, 0.0 one-hot.
    Rows with fewer than two valid entries have no choice to make and are left out."""
    valid = torch.ones_like(probs, dtype=torch.bool) if valid is None else valid.bool()
    count = valid.sum(dim=-1)
    entropy = -(probs.float() * probs.float().clamp_min(torch.finfo(torch.float32).tiny).log()).masked_fill(
        ~valid, 0.0).sum(dim=-1)
    keep = count >= 2
    if not bool(keep.any()):
        return torch.tensor(0.0, device=probs.device)
    return (entropy[keep] / count[keep].float().log()).mean()


def teacher_entropies(teacher: TeacherBatch, cfg: LossConfig) -> dict[str, Tensor]:
    """How much the teacher's targets say at the configured temperatures: the entropy of its
    video-level (video->text rows of the batch) and frame-level distributions as a fraction of
    uniform. Near 1.0 the temperature has erased the teacher's knowledge."""
    _check_temperatures(cfg)
    frame_target = fgt_target(teacher.frame_emb, teacher.text_emb, teacher.frame_mask, cfg.tau_frame)
    return _target_entropies(teacher_similarity(teacher), frame_target, teacher.frame_mask, cfg.tau_video)


def _check_temperatures(cfg: LossConfig) -> None:
    if "auto" in (cfg.tau_video, cfg.tau_frame):
        raise ValueError("tau_video/tau_frame are 'auto': calibrate them first (core.calibration.resolve_temperatures)")


@torch.no_grad()
def _target_entropies(teacher_sim: Tensor, frame_target: Tensor, mask: Tensor, tau_video: float) -> dict[str, Tensor]:
    return {"teacher_video_entropy": entropy_fraction((teacher_sim / tau_video).softmax(dim=1)),
            "teacher_frame_entropy": entropy_fraction(frame_target, mask)}


def teachclip_loss(out: VideoOutput, text_emb: Tensor, logit_scale: Tensor | float, teacher: TeacherBatch | None,
                   cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """TeachCLIP: L = w_in * InfoNCE(S_s) + w_cgt * CgT(S_s, S_t) + w_fgt * FgT(afa, T).

    S_s = logit_scale * video_emb @ text_emb.T; S_t = teacher cosine similarities. TeachCLIP's
    weights are w_in 0.2, w_cgt 1.0, w_fgt 2.0 (the defaults). Without a teacher (or with a zero
    weight) the teacher terms are skipped, not computed. With a teacher the entropies of its
    targets (`teacher_entropies`) come back with the terms, for the logs.
    """
    _check_batch(out, text_emb, teacher)
    student_sim = similarity(out.video_emb, text_emb, logit_scale)
    terms = {"infonce": infonce(student_sim)}
    loss = cfg.w_in * terms["infonce"]
    if teacher is None:
        return loss, {k: v.detach() for k, v in terms.items()}
    _check_temperatures(cfg)
    # the teacher's targets, computed once for its terms and for the logged entropies
    teacher_sim = teacher_similarity(teacher)
    frame_target = fgt_target(teacher.frame_emb, teacher.text_emb, teacher.frame_mask, cfg.tau_frame)
    if cfg.w_cgt > 0:
        terms["cgt"] = cgt_loss(student_sim, teacher_sim, cfg.tau_video)
        loss = loss + cfg.w_cgt * terms["cgt"]
    if cfg.w_fgt > 0:
        terms["fgt"] = _fgt_from_target(out.afa_weights, frame_target, teacher.frame_mask)
        loss = loss + cfg.w_fgt * terms["fgt"]
    terms = {k: v.detach() for k, v in terms.items()}
    terms.update(_target_entropies(teacher_sim, frame_target, teacher.frame_mask, cfg.tau_video))
    return loss, terms


# ------------------------------------------------------------------------------------ DLDKD
def kl_distill(student_logits: Tensor, teacher_logits: Tensor, tau_kl: float) -> Tensor:
    """Hinton's logit distillation over rows and columns of a batch similarity matrix.

        KL = tau_kl^2 / 2 * ( mean_i KL(softmax(T_i / tau_kl) || softmax(S_i / tau_kl)) + same over columns )

    The tau_kl^2 factor keeps gradient magnitudes independent of the softening temperature.
    """
    s, t = student_logits.float() / tau_kl, teacher_logits.float() / tau_kl
    rows = F.kl_div(s.log_softmax(dim=1), t.log_softmax(dim=1), reduction="batchmean", log_target=True)
    cols = F.kl_div(s.T.log_softmax(dim=1), t.T.log_softmax(dim=1), reduction="batchmean", log_target=True)
    return 0.5 * (rows + cols) * tau_kl**2


def dldkd_weights(progress: float, cfg: LossConfig) -> tuple[float, float]:
    """DLDKD's dynamic weights at training progress t in [0, 1]:

        lambda_I(t) = lambda_i0 * exp(-gamma_i * t)     (inheritance: learn from the teacher)
        lambda_E(t) = lambda_e0 * (1 + gamma_e * t)     (exploration: learn from the data)

    The student leans on the teacher early and on the ground truth late, when it has absorbed
    what the teacher can give and the teacher's own errors would hold it back.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    return cfg.lambda_i0 * math.exp(-cfg.gamma_i * progress), cfg.lambda_e0 * (1.0 + cfg.gamma_e * progress)


def dldkd_loss(out: VideoOutput, text_emb: Tensor, logit_scale: Tensor | float, projected_video_emb: Tensor,
               teacher: TeacherBatch, cfg: LossConfig, progress: float) -> tuple[Tensor, dict[str, Tensor]]:
    """DLDKD (Dual Learning with Dynamic Knowledge Distillation), from cached teacher embeddings.

        feat    = 1/B sum_b || normalize(projected_video_emb_b) - normalize(teacher_video_emb_b) ||^2
        kl      = kl_distill(S_s, logit_scale.detach() * S_t, tau_kl)
        explore = InfoNCE(video_emb @ text_emb.T / tau_explore)
        L       = lambda_I(t) * (w_feat * feat + kl) + lambda_E(t) * explore

    S_s = logit_scale * video_emb @ text_emb.T; S_t = teacher cosine similarities. The cache holds
    no teacher logit scale, so the teacher's cosines are put on the student's (detached) scale
    before softening: KL then compares rankings at equal sharpness instead of pushing the
    student towards whatever scale the cosines happen to have. The feature error is summed over
    dimensions (2 - 2 cos for unit vectors) so its size does not shrink with the teacher width.

    DLDKD's attention-level term is not implemented: it matches the teacher's attention maps,
    and the feature table caches embeddings only. It would need an online teacher adapter that
    exposes its attention maps, and a student whose attention is comparable to them.
    """
    if teacher is None or projected_video_emb is None:
        raise ValueError("dldkd needs teacher embeddings and a student built with teacher_dim")
    _check_batch(out, text_emb, teacher)
    if projected_video_emb.shape != teacher.video_emb.shape:
        raise ValueError(f"projected video embeddings {list(projected_video_emb.shape)} do not match the teacher's "
                         f"{list(teacher.video_emb.shape)}: build the student with the teacher's embedding width")
    lambda_i, lambda_e = dldkd_weights(progress, cfg)
    student_sim = similarity(out.video_emb, text_emb, logit_scale)
    scale = logit_scale.detach() if isinstance(logit_scale, Tensor) else logit_scale
    terms = {
        "feat": (F.normalize(projected_video_emb.float(), dim=-1)
                 - F.normalize(teacher.video_emb.float(), dim=-1)).pow(2).sum(dim=-1).mean(),
        "kl": kl_distill(student_sim, scale * teacher_similarity(teacher), cfg.tau_kl),
        "explore": infonce(similarity(out.video_emb, text_emb, 1.0 / cfg.tau_explore)),
    }
    loss = lambda_i * (cfg.w_feat * terms["feat"] + terms["kl"]) + lambda_e * terms["explore"]
    terms = {k: v.detach() for k, v in terms.items()}
    terms["lambda_i"] = torch.tensor(lambda_i, device=loss.device)
    terms["lambda_e"] = torch.tensor(lambda_e, device=loss.device)
    return loss, terms


def _check_batch(out: VideoOutput, text_emb: Tensor, teacher: TeacherBatch | None) -> None:
    batch = out.video_emb.shape[0]
    if text_emb.shape[0] != batch:
        raise ValueError(f"{batch} videos but {text_emb.shape[0]} captions: the loss needs one caption per video")
    if teacher is None:
        return
    sizes = {"video_emb": teacher.video_emb.shape[0], "frame_emb": teacher.frame_emb.shape[0],
             "text_emb": teacher.text_emb.shape[0], "frame_mask": teacher.frame_mask.shape[0]}
    wrong = {k: v for k, v in sizes.items() if v != batch}
    if wrong:
        raise ValueError(f"teacher batch sizes {wrong} do not match the student's {batch} videos")
