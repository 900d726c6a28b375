"""The pipeline's closing summary: teacher, student, student without distillation, INT4 student."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from core.config import TeacherConfig, VidkdConfig
from core.evaluation import embed, evaluate_student, evaluate_teacher_table
from core.features import FeatureBatch, read_meta, table_batches
from core.metrics import retrieval_metrics
from core.student import load_quantized_student, load_student
from core.teachers import build_teacher
from jobs.plots import similarity_heatmap
from jobs.runtime import import_quant_backend
from jobs.tracking import RunLogger


def latency_ms(encode: Callable[[torch.Tensor, torch.Tensor], Any], batches: Iterable[FeatureBatch],
               videos: int = 16) -> float:
    """Median milliseconds to embed one video (batch of one), on CPU, after a warm-up call, over
    the first `videos` videos (read no further)."""
    every = ((torch.from_numpy(b.frames[i : i + 1].copy()), torch.from_numpy(b.frame_mask[i : i + 1].copy()))
             for b in batches for i in range(len(b)))
    samples = list(itertools.islice(every, videos))
    times = []
    with torch.no_grad():
        encode(*samples[0])
        for frames, mask in samples:
            start = time.perf_counter()
            encode(frames, mask)
            times.append((time.perf_counter() - start) * 1000)
    return float(sorted(times)[len(times) // 2])


def caption_queries(batches: Iterable[FeatureBatch]) -> int:
    """Text-to-video queries of a split: one per caption."""
    return sum(len(caps) for batch in batches for caps in batch.captions)


def spread_line(r1: float, queries: int, seed_std: float | None) -> str:
    """What a difference in R@1 has to beat: the test split's sampling error (binomial, one
    standard error at the baseline's R@1) and, where it was measured for this config, the
    student's seed-to-seed spread."""
    p = min(max(r1 / 100, 0.0), 1.0)
    sampling = 100 * math.sqrt(p * (1 - p) / max(1, queries))
    line = f"Expected run-to-run spread of R@1: ±{sampling:.1f} from sampling {queries} test queries"
    if seed_std is not None:
        line += (f"; ±{seed_std:.1f} seed to seed (std over seeds, measured by bench/quality.py on this config); "
                 f"a difference under {2 * seed_std:.1f} is noise")
    return line


def _size_mb(path: str | Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def final_report(cfg: VidkdConfig, table_dir: Path, teacher: TeacherConfig, student_ckpt: str, baseline_ckpt: str,
                 quant_dir: str, parent: RunLogger) -> dict[str, Any]:
    import_quant_backend()
    meta = read_meta(table_dir)
    test = table_batches(table_dir, meta, "test")
    rows: dict[str, dict[str, float]] = {}

    if meta.has_teacher:
        rows["teacher"] = evaluate_teacher_table(test)
        if teacher.kind != "none":
            model = build_teacher(teacher)
            rows["teacher"]["latency_ms"] = latency_ms(lambda f, m: model.encode_video(f, m)[0], test)
            weights = teacher.path or teacher.pretrained
            rows["teacher"]["size_mb"] = _size_mb(weights) if weights and Path(weights).exists() else float("nan")

    for name, path, loader in (("student", student_ckpt, load_student),
                               ("student (no distillation)", baseline_ckpt, load_student),
                               ("student INT4", quant_dir, load_quantized_student)):
        model = loader(path).eval()
        rows[name] = evaluate_student(model, test, "cpu")
        rows[name]["latency_ms"] = latency_ms(lambda f, m: model.encode_video(f, m).video_emb, test)
        rows[name]["size_mb"] = _size_mb(path)
        if name == "student":
            video_emb, text_emb, caption_video = embed(test, lambda f, m: model.encode_video(f, m).video_emb,
                                                       model.encode_text, "cpu")
            first = [list(caption_video).index(v) for v in range(len(video_emb))]
            sim = (text_emb[first] @ video_emb.T).numpy()
            parent.log_figure(similarity_heatmap(sim, "student: test caption x video"), "plots/student_similarity.png")

    queries = caption_queries(test)
    baseline_r1 = rows["student (no distillation)"]["t2v_R1"]
    header = (f"{'model':<27} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'v2t R@1':>8} {'R@1 vs none':>11} "
              f"{'size MB':>8} {'ms/video':>9}")
    lines = [f"Test split: {meta.counts.get('test', 0)} videos, {queries} caption queries "
             f"(text-to-video R@k; one query = {100 / max(1, queries):.2f} R@1 points; CPU latency)",
             header, "-" * len(header)]
    for name, m in rows.items():
        versus = f"{m['t2v_R1'] - baseline_r1:+.1f}" if name.startswith("student") and "no distillation" not in name else ""
        lines.append(f"{name:<27} {m['t2v_R1']:>6.1f} {m['t2v_R5']:>6.1f} {m['t2v_R10']:>6.1f} {m['v2t_R1']:>8.1f} "
                     f"{versus:>11} {m.get('size_mb', float('nan')):>8.2f} {m.get('latency_ms', float('nan')):>9.1f}")
    lines.append(spread_line(baseline_r1, queries, cfg.report.seed_std_r1))
    text = "\n".join(lines)
    for name, m in rows.items():
        key = name.replace(" ", "_").replace("(", "").replace(")", "")
        parent.log_metrics({f"{key}.{k}": v for k, v in m.items() if v == v})
    parent.log_text(text, "summary.txt")
    parent.log_dict(rows, "summary.json")
    return {"text": text, "rows": rows}


__all__ = ["final_report", "latency_ms", "retrieval_metrics"]
