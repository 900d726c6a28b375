"""Each loss against a direct loop-by-loop computation, its invariants, and its gradients.

The reference implementations below use plain Python loops and `math` on scalars, written
from the formulas in the papers, not from core/losses.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from core.config import PUBLISHED_TAU_FRAME, PUBLISHED_TAU_VIDEO, LossConfig
from core.losses import (TeacherBatch, cgt_loss, dldkd_loss, dldkd_weights, entropy_fraction, fgt_loss, fgt_target,
                         gather_with_grad, infonce, kl_distill, plain_loss, teachclip_loss, teacher_entropies,
                         teacher_similarity)
from core.student import VideoOutput

PUBLISHED = LossConfig(tau_video=PUBLISHED_TAU_VIDEO, tau_frame=PUBLISHED_TAU_FRAME)  # TeachCLIP's, as numbers

B, F_, D, DT = 5, 4, 8, 6


# ------------------------------------------------------------------------ direct references
def ref_log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    log_z = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_z for v in values]


def ref_softmax(values: list[float]) -> list[float]:
    return [math.exp(v) for v in ref_log_softmax(values)]


def ref_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def ref_cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def rows(m: torch.Tensor) -> list[list[float]]:
    return m.double().tolist()


def cols(m: torch.Tensor) -> list[list[float]]:
    return m.double().T.tolist()


def ref_infonce(s: torch.Tensor, match: list[int]) -> float:
    n = len(match)
    by_row = -sum(ref_log_softmax(rows(s)[i])[match[i]] for i in range(n)) / n
    by_col = -sum(ref_log_softmax(cols(s)[match[i]])[i] for i in range(n)) / n
    return (by_row + by_col) / 2


def ref_cgt(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> float:
    def direction(s_lines, t_lines):
        return sum(1 - ref_pearson(ref_softmax(s), ref_softmax([v / tau for v in t]))
                   for s, t in zip(s_lines, t_lines)) / len(s_lines)
    return direction(rows(student), rows(teacher)) + direction(cols(student), cols(teacher))


def ref_fgt(afa: torch.Tensor, t_frames: torch.Tensor, t_text: torch.Tensor, mask: torch.Tensor, tau: float) -> float:
    total = 0.0
    for b in range(afa.shape[0]):
        real = [f for f in range(afa.shape[1]) if mask[b, f]]
        sims = [ref_cosine(t_frames[b, f].tolist(), t_text[b].tolist()) / tau for f in real]
        target = ref_softmax(sims)
        total -= sum(p * math.log(afa[b, f].item()) for p, f in zip(target, real))
    return total / (afa.shape[0] * afa.shape[1])  # TeachCLIP: the mean over pairs and frames


def ref_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> float:
    def direction(s_lines, t_lines):
        total = 0.0
        for s, t in zip(s_lines, t_lines):
            log_q, log_p = ref_log_softmax([v / tau for v in s]), ref_log_softmax([v / tau for v in t])
            total += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
        return total / len(s_lines)
    return tau**2 * (direction(rows(student), rows(teacher)) + direction(cols(student), cols(teacher))) / 2


# ---------------------------------------------------------------------------------- fixtures
def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def student_output(seed: int = 0, mask: torch.Tensor | None = None) -> VideoOutput:
    mask = torch.ones(B, F_) if mask is None else mask
    logits = torch.randn(B, F_, generator=torch.Generator().manual_seed(seed + 1))
    afa = logits.masked_fill(mask == 0, float("-inf")).softmax(dim=1)
    return VideoOutput(unit(B, D, seed=seed), unit(B, F_, D, seed=seed + 2), afa, afa)


def teacher_batch(seed: int = 10, mask: torch.Tensor | None = None) -> TeacherBatch:
    mask = torch.ones(B, F_, dtype=torch.uint8) if mask is None else mask
    # float16, like the feature table
    return TeacherBatch(unit(B, DT, seed=seed).half(), unit(B, F_, DT, seed=seed + 1).half(),
                        unit(B, DT, seed=seed + 2).half(), mask)


PADDED = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.uint8)


# ---------------------------------------------------------------------------------- InfoNCE
def test_infonce_matches_direct_computation():
    s = torch.randn(B, B, generator=torch.Generator().manual_seed(0)) * 5
    assert infonce(s).item() == pytest.approx(ref_infonce(s, list(range(B))), rel=1e-5)
    match = [2, 0, 4, 1, 3]
    assert infonce(s, torch.tensor(match)).item() == pytest.approx(ref_infonce(s, match), rel=1e-5)


def test_infonce_bounds_and_bad_input():
    assert infonce(torch.zeros(B, B)).item() == pytest.approx(math.log(B))  # no information: chance
    assert infonce(torch.eye(B) * 100).item() < 1e-6  # perfect separation
    with pytest.raises(ValueError, match="square"):
        infonce(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="permutation"):
        infonce(torch.zeros(3, 3), torch.tensor([0, 0, 1]))


def test_plain_loss_is_scaled_infonce():
    out, text = student_output(), unit(B, D, seed=5)
    loss, terms = plain_loss(out, text, torch.tensor(20.0))
    assert loss.item() == pytest.approx(ref_infonce(20 * out.video_emb @ text.T, list(range(B))), rel=1e-5)
    assert set(terms) == {"infonce"}
    with pytest.raises(ValueError, match="one caption per video"):
        plain_loss(out, text[:3], 20.0)


# ------------------------------------------------------ TeachCLIP's published values, by hand
def test_default_weights_and_temperatures_are_teachclips():
    cfg = LossConfig()
    assert (cfg.objective, cfg.w_in, cfg.w_cgt, cfg.w_fgt) == ("teachclip", 0.2, 1.0, 2.0)
    # the temperatures are calibrated by default (tests/test_calibration.py); TeachCLIP's own:
    assert (cfg.tau_video, cfg.tau_frame) == ("auto", "auto")
    assert (PUBLISHED_TAU_VIDEO, PUBLISHED_TAU_FRAME) == (0.01, 1.0)  # teacher logits at scale 100; softmax(cos)
    with pytest.raises(ValueError, match="calibrate them first"):
        teacher_entropies(TeacherBatch(torch.eye(2), torch.eye(2)[:, None].expand(-1, 2, -1), torch.eye(2),
                                       torch.ones(2, 2)), cfg)


def test_cgt_sums_its_two_directions_by_hand():
    # 2x2: the Pearson correlation of two 2-point distributions is +1 (same order) or -1.
    teacher = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    assert cgt_loss(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), teacher, 0.01).item() == pytest.approx(0.0, abs=1e-6)
    # every row and every column reversed: 2 per direction, summed to TeachCLIP's maximum of 4
    assert cgt_loss(torch.tensor([[0.0, 2.0], [2.0, 0.0]]), teacher, 0.01).item() == pytest.approx(4.0, rel=1e-6)
    # row 1 and column 0 reversed: (0 + 2) / 2 + (2 + 0) / 2 = 2
    assert cgt_loss(torch.tensor([[2.0, 0.0], [3.0, 1.0]]), teacher, 0.01).item() == pytest.approx(2.0, rel=1e-6)


def test_fgt_is_the_mean_over_pairs_and_frames_by_hand():
    # one pair, two frames the teacher finds equally relevant: T = (1/2, 1/2); AFA says (1/4, 3/4).
    # Cross-entropy over the frames: (ln 4 + ln 4/3) / 2 = 0.836988; TeachCLIP's mean over the 2
    # frames halves it: 0.418494 (a sum over frames would give the 0.836988).
    frames = F.normalize(torch.tensor([[[1.0, 1.0], [1.0, -1.0]]]), dim=-1)
    text = torch.tensor([[1.0, 0.0]])
    loss = fgt_loss(torch.tensor([[0.25, 0.75]]), frames, text, torch.ones(1, 2), 1.0)
    assert loss.item() == pytest.approx(0.418494, abs=1e-6)
    # two pairs, the second with one real frame of two: it adds 0 (its target is one-hot on a
    # weight of 1) but its two grid places still count: 0.836988 / 4
    frames2 = torch.cat([frames, frames]), torch.cat([text, text])
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert fgt_loss(weights, *frames2, mask, 1.0).item() == pytest.approx(0.836988 / 4, abs=1e-6)


def test_fgt_target_at_temperature_one_is_softmax_of_cosines_by_hand():
    # cosines 1 and 0: softmax(1, 0) = (e / (e + 1), 1 / (e + 1)) = (0.731059, 0.268941)
    frames = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    target = fgt_target(frames, torch.tensor([[1.0, 0.0]]), torch.ones(1, 2), 1.0)
    torch.testing.assert_close(target, torch.tensor([[0.731059, 0.268941]]), atol=1e-6, rtol=0)


def test_teacher_entropies_are_fractions_of_uniform():
    flat = TeacherBatch(torch.ones(3, 2), torch.ones(3, 4, 2), torch.ones(3, 2), torch.ones(3, 4))
    terms = teacher_entropies(flat, PUBLISHED)
    assert terms["teacher_video_entropy"].item() == pytest.approx(1.0)  # all cosines equal: uniform
    assert terms["teacher_frame_entropy"].item() == pytest.approx(1.0)
    sharp = TeacherBatch(torch.eye(3), torch.eye(3)[:, None, :].repeat(1, 4, 1), torch.eye(3), torch.ones(3, 4))
    assert teacher_entropies(sharp, PUBLISHED.model_copy(update={'tau_video': 0.001}))["teacher_video_entropy"].item() < 1e-3
    # one real frame leaves nothing to choose: such videos are left out
    half = torch.tensor([0.5, 0.5, 0.0])
    assert entropy_fraction(torch.stack([half, torch.tensor([1.0, 0, 0])]),
                            torch.tensor([[1, 1, 0], [1, 0, 0]])).item() == pytest.approx(1.0)


# -------------------------------------------------------------------------------------- CgT
def test_cgt_matches_direct_computation():
    student = torch.randn(B, B, generator=torch.Generator().manual_seed(1)) * 3
    teacher = teacher_similarity(teacher_batch())
    assert cgt_loss(student, teacher, 0.05).item() == pytest.approx(ref_cgt(student, teacher, 0.05), rel=1e-4)


def test_cgt_is_zero_when_student_matches_teacher():
    teacher = teacher_similarity(teacher_batch())
    tau = 0.1
    assert abs(cgt_loss(teacher / tau, teacher, tau).item()) < 1e-5
    # Pearson is blind to scale and offset of the distribution only, not to a different ranking.
    assert cgt_loss(-teacher / tau, teacher, tau).item() > 0.5


# -------------------------------------------------------------------------------------- FgT
def test_fgt_matches_direct_computation_with_padding():
    out, teacher = student_output(mask=PADDED), teacher_batch(mask=PADDED)
    loss = fgt_loss(out.afa_weights, teacher.frame_emb, teacher.text_emb, PADDED, 0.05)
    expected = ref_fgt(out.afa_weights, teacher.frame_emb.float(), teacher.text_emb.float(), PADDED, 0.05)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_fgt_ignores_padded_teacher_frames():
    out, teacher = student_output(mask=PADDED), teacher_batch(mask=PADDED)
    scrambled = teacher.frame_emb.clone()
    scrambled[PADDED == 0] = torch.randn(int((PADDED == 0).sum()), DT).half()
    a = fgt_loss(out.afa_weights, teacher.frame_emb, teacher.text_emb, PADDED, 0.05)
    b = fgt_loss(out.afa_weights, scrambled, teacher.text_emb, PADDED, 0.05)
    assert a.item() == b.item()
    target = fgt_target(teacher.frame_emb, teacher.text_emb, PADDED, 0.05)
    assert torch.all(target[PADDED == 0] == 0)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(B))


def test_fgt_is_smallest_when_afa_weights_equal_the_target():
    teacher = teacher_batch(mask=PADDED)
    target = fgt_target(teacher.frame_emb, teacher.text_emb, PADDED, 0.1)
    at_target = fgt_loss(target, teacher.frame_emb, teacher.text_emb, PADDED, 0.1)
    entropy = -(target * target.clamp_min(1e-30).log()).sum() / (B * F_)
    assert at_target.item() == pytest.approx(entropy.item(), rel=1e-5)  # cross-entropy == entropy
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = target.clamp_min(1e-30).log() + 0.3 * torch.randn(B, F_, generator=generator)
        perturbed = logits.masked_fill(PADDED == 0, float("-inf")).softmax(dim=1)
        assert fgt_loss(perturbed, teacher.frame_emb, teacher.text_emb, PADDED, 0.1) > at_target


# --------------------------------------------------------------------------------- TeachCLIP
def test_teachclip_loss_is_the_weighted_sum_of_its_terms():
    out, text, teacher = student_output(mask=PADDED), unit(B, D, seed=7), teacher_batch(mask=PADDED)
    cfg = LossConfig(w_in=0.5, w_cgt=2.0, w_fgt=3.0, tau_video=0.05, tau_frame=0.2)
    scale = torch.tensor(14.0)
    loss, terms = teachclip_loss(out, text, scale, teacher, cfg)
    student_sim = scale * out.video_emb @ text.T
    expected = {
        "infonce": ref_infonce(student_sim, list(range(B))),
        "cgt": ref_cgt(student_sim, teacher_similarity(teacher), 0.05),
        "fgt": ref_fgt(out.afa_weights, teacher.frame_emb.float(), teacher.text_emb.float(), PADDED, 0.2),
    }
    assert set(terms) == set(expected) | {"teacher_video_entropy", "teacher_frame_entropy"}
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-4), name
    total = 0.5 * expected["infonce"] + 2.0 * expected["cgt"] + 3.0 * expected["fgt"]
    assert loss.item() == pytest.approx(total, rel=1e-4)


def test_teachclip_without_teacher_or_with_zero_weights_skips_teacher_terms():
    out, text = student_output(), unit(B, D, seed=7)
    loss, terms = teachclip_loss(out, text, 10.0, None, PUBLISHED)
    assert set(terms) == {"infonce"} and loss.item() == pytest.approx(0.2 * terms["infonce"].item())
    _, terms = teachclip_loss(out, text, 10.0, teacher_batch(), PUBLISHED.model_copy(update={"w_fgt": 0.0}))
    assert set(terms) == {"infonce", "cgt", "teacher_video_entropy", "teacher_frame_entropy"}
    with pytest.raises(ValueError, match="teacher batch sizes"):
        short = teacher_batch()
        teachclip_loss(out, text, 10.0, TeacherBatch(short.video_emb[:3], short.frame_emb, short.text_emb,
                                                      short.frame_mask), PUBLISHED)


# ------------------------------------------------------------------------------------- DLDKD
def test_kl_matches_direct_computation_and_vanishes_for_identical_sims():
    student = torch.randn(B, B, generator=torch.Generator().manual_seed(4)) * 5
    teacher = torch.randn(B, B, generator=torch.Generator().manual_seed(5)) * 5
    assert kl_distill(student, teacher, 4.0).item() == pytest.approx(ref_kl(student, teacher, 4.0), rel=1e-4)
    assert abs(kl_distill(teacher, teacher, 4.0).item()) < 1e-6
    assert kl_distill(student, teacher, 4.0).item() > 0


def test_dldkd_dynamic_weights():
    cfg = LossConfig(lambda_i0=2.0, gamma_i=0.5, lambda_e0=0.5, gamma_e=1.0)
    assert dldkd_weights(0.0, cfg) == (2.0, 0.5)
    lambda_i, lambda_e = dldkd_weights(1.0, cfg)
    assert lambda_i == pytest.approx(2.0 * math.exp(-0.5)) and lambda_e == pytest.approx(1.0)
    with pytest.raises(ValueError, match="progress"):
        dldkd_weights(1.5, cfg)


def test_dldkd_loss_matches_direct_computation():
    out, text, teacher = student_output(), unit(B, D, seed=7), teacher_batch()
    projected = torch.randn(B, DT, generator=torch.Generator().manual_seed(8))  # normalised by the loss
    cfg = LossConfig(objective="dldkd", w_feat=0.7, tau_kl=2.0, tau_explore=0.1,
                     lambda_i0=1.5, gamma_i=0.5, lambda_e0=0.5, gamma_e=2.0)
    scale, progress = torch.tensor(12.0), 0.25
    loss, terms = dldkd_loss(out, text, scale, projected, teacher, cfg, progress)

    feat = 0.0
    for b in range(B):
        p, t = projected[b].tolist(), teacher.video_emb[b].float().tolist()
        p_norm, t_norm = math.sqrt(sum(v * v for v in p)), math.sqrt(sum(v * v for v in t))
        feat += sum((x / p_norm - y / t_norm) ** 2 for x, y in zip(p, t)) / B
    cos = out.video_emb @ text.T
    kl = ref_kl(12.0 * cos, 12.0 * teacher_similarity(teacher), 2.0)
    explore = ref_infonce(cos / 0.1, list(range(B)))
    lambda_i, lambda_e = 1.5 * math.exp(-0.5 * progress), 0.5 * (1 + 2.0 * progress)
    for name, value in {"feat": feat, "kl": kl, "explore": explore, "lambda_i": lambda_i, "lambda_e": lambda_e}.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-4), name
    assert loss.item() == pytest.approx(lambda_i * (0.7 * feat + kl) + lambda_e * explore, rel=1e-4)


def test_dldkd_needs_a_matching_projection():
    out, text, teacher = student_output(), unit(B, D, seed=7), teacher_batch()
    with pytest.raises(ValueError, match="teacher_dim"):
        dldkd_loss(out, text, 10.0, None, teacher, PUBLISHED, 0.0)
    with pytest.raises(ValueError, match="embedding width"):
        dldkd_loss(out, text, 10.0, torch.randn(B, DT + 1), teacher, PUBLISHED, 0.0)


# --------------------------------------------------------------------------------- gradients
def test_gradients_are_finite_with_padded_frames():
    video = unit(B, D, seed=0).requires_grad_()
    text = unit(B, D, seed=1).requires_grad_()
    afa_logits = torch.randn(B, F_, requires_grad=True)
    projected = torch.randn(B, DT, requires_grad=True)
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    teacher = teacher_batch(mask=PADDED)
    afa = afa_logits.masked_fill(PADDED == 0, float("-inf")).softmax(dim=1)
    out = VideoOutput(video, unit(B, F_, D, seed=2), afa, afa)
    loss_tc, _ = teachclip_loss(out, text, scale.exp(), teacher, PUBLISHED)
    loss_dl, _ = dldkd_loss(out, text, scale.exp(), projected, teacher, PUBLISHED, 0.5)
    (loss_tc + loss_dl).backward()
    for tensor in (video, text, afa_logits, projected, scale):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    assert torch.all(afa_logits.grad[PADDED == 0] == 0)
    assert afa_logits.grad[PADDED == 1].abs().sum() > 0


# ------------------------------------------------------------------------------- distributed
def test_gather_with_grad_is_identity_without_a_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def _gather_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        video, text = torch.randn(2 * world_size, D), torch.randn(2 * world_size, D)
        local_video = video[2 * rank: 2 * rank + 2].clone().requires_grad_()
        local_text = text[2 * rank: 2 * rank + 2].clone().requires_grad_()
        sim = 10 * F.normalize(gather_with_grad(local_video), dim=-1) @ F.normalize(gather_with_grad(local_text), dim=-1).T
        infonce(sim).backward()
        torch.save({"video": local_video.grad, "text": local_text.grad, "rows": sim.shape[0]}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_across_two_gloo_workers(tmp_path):
    """Each worker gets the gradient of the global loss w.r.t. its own slice, times world size
    (DDP's gradient averaging divides it back)."""
    world_size = 2
    mp.spawn(_gather_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path / "grad")), nprocs=world_size)
    torch.manual_seed(0)
    video = torch.randn(2 * world_size, D).requires_grad_()
    text = torch.randn(2 * world_size, D).requires_grad_()
    infonce(10 * F.normalize(video, dim=-1) @ F.normalize(text, dim=-1).T).backward()
    for rank in range(world_size):
        result = torch.load(tmp_path / f"grad.{rank}", weights_only=True)
        assert result["rows"] == 2 * world_size
        torch.testing.assert_close(result["video"], world_size * video.grad[2 * rank: 2 * rank + 2])
        torch.testing.assert_close(result["text"], world_size * text.grad[2 * rank: 2 * rank + 2])
