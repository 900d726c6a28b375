"""Training step time: online teacher against cached teacher features, side by side.

    python bench/train_step.py [--student vidkd-vit-tiny --teacher vidkd-vit-small --batch 32 --frames 8 --steps 10]

Both modes run the training loop's own pieces (`jobs.distill`: the student's DDP-style forward,
`distill_loss`, AdamW) on the same student and the same batch; they differ only in where the
teacher's embeddings come from: the adapter every step (online) or the feature table (cached).
The teacher's forward cost relative to the student's is measured and printed too.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch

from core.config import DistillConfig, StudentConfig, TeacherConfig
from core.features import FeatureBatch
from core.student import build_student
from core.teachers import build_teacher
from core.training import TrainStep, distill_loss


def make_batch(teacher, batch: int, frames: int, size: int, seed: int = 0) -> FeatureBatch:
    """A real-looking batch, with the teacher's embeddings computed once as extraction would."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (batch, frames, size, size, 3), dtype=np.uint8)
    mask = np.ones((batch, frames), np.uint8)
    mask[0, frames // 2:] = 0
    captions = [[f"a {c} car overtakes at dusk", f"video {i}"] for i, c in enumerate(rng.choice(["red", "blue"], batch))]
    with torch.no_grad():
        video_emb, frame_emb = teacher.encode_video(torch.from_numpy(pixels), torch.from_numpy(mask))
        text = [teacher.encode_text(c).cpu().numpy().astype(np.float16) for c in captions]
    return FeatureBatch([str(i) for i in range(batch)], pixels, mask, captions,
                        frame_emb.cpu().numpy().astype(np.float16), video_emb.cpu().numpy().astype(np.float16), text)


def time_steps(mode: str, cfg: DistillConfig, student, teacher, batch: FeatureBatch, steps: int, device) -> list[float]:
    model = TrainStep(student)
    optimizer = torch.optim.AdamW(student.param_groups(cfg.lr, cfg.lr_new, cfg.weight_decay))
    rng = random.Random(0)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        frames = torch.from_numpy(batch.frames).to(device)
        mask = torch.from_numpy(batch.frame_mask).to(device)
        picks = [rng.randrange(len(c)) for c in batch.captions]
        captions = [c[i] for c, i in zip(batch.captions, picks)]
        out, logit_scale = model(frames, mask, student.tokenize(captions).to(device))
        step_cfg = cfg.model_copy(update={"teacher_mode": mode})
        loss, _ = distill_loss(step_cfg, logit_scale, out, batch, picks, teacher, frames, mask, captions, device, 0.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        student.clamp_logit_scale()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return times


def forward_ms(fn, repeats: int = 5) -> float:
    with torch.no_grad():
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="vidkd-vit-tiny")
    parser.add_argument("--teacher", default="vidkd-vit-small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="alternate the two modes this many times")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    teacher = build_teacher(TeacherConfig(kind="open_clip", name=args.teacher), device=str(device))
    student = build_student(StudentConfig(model=args.student), args.frames).to(device)
    batch = make_batch(teacher, args.batch, args.frames, student.image_size)
    cfg = DistillConfig(student=StudentConfig(model=args.student))

    frames = torch.from_numpy(batch.frames).to(device)
    mask = torch.from_numpy(batch.frame_mask).to(device)
    cost = forward_ms(lambda: teacher.encode_video(frames, mask)) / forward_ms(lambda: student.encode_video(frames, mask))

    online, cached = [], []
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both alike
        online += time_steps("online", cfg, student, teacher, batch, args.steps, device)
        cached += time_steps("cached", cfg, student, teacher, batch, args.steps, device)
    on, ca = statistics.median(online), statistics.median(cached)
    print(f"device: {device}; student {args.student}, teacher {args.teacher} "
          f"(teacher video forward = {cost:.1f}x the student's); batch {args.batch} x {args.frames} frames")
    print(f"| mode | median step (ms) |\n|---|---|\n| online teacher | {on * 1000:.1f} |\n| cached features | {ca * 1000:.1f} |")
    print(f"speed-up from caching: {on / ca:.2f}x")


if __name__ == "__main__":
    main()
