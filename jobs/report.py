"""The pipeline's closing summary: teacher, student, student without distillation, INT4 student."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from core.config import TeacherConfig, VidkdConfig
from core.evaluation import embed, evaluate_teacher_table
from core.features import FeatureBatch, read_meta
from core.metrics import retrieval_metrics
from core.student import load_student
from core.teachers import build_teacher
from jobs.plots import similarity_heatmap
from jobs.quantize import evaluate_student, load_quantized_student, table_batches
from jobs.tracking import RunLogger


def latency_ms(encode: Callable[[torch.Tensor, torch.Tensor], Any], batches: list[FeatureBatch], videos: int = 16) -> float:
    """Median milliseconds to embed one video (batch of one), on CPU, after a warm-up call."""
    samples = [(torch.from_numpy(b.frames[i : i + 1]), torch.from_numpy(b.frame_mask[i : i + 1]))
               for b in batches for i in range(len(b))][:videos]
    times = []
    with torch.no_grad():
        encode(*samples[0])
        for frames, mask in samples:
            start = time.perf_counter()
            encode(frames, mask)
            times.append((time.perf_counter() - start) * 1000)
    return float(sorted(times)[len(times) // 2])


def _size_mb(path: str | Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def final_report(cfg: VidkdConfig, table_dir: Path, teacher: TeacherConfig, student_ckpt: str, baseline_ckpt: str,
                 quant_dir: str, parent: RunLogger) -> dict[str, Any]:
    meta = read_meta(table_dir)
    test = table_batches(table_dir, meta, "test")
    torch.set_num_threads(max(1, torch.get_num_threads()))
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

    header = f"{'model':<27} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'size MB':>8} {'ms/video':>9}"
    lines = [f"Test split: {meta.counts.get('test', 0)} videos (text-to-video retrieval, CPU latency)", header,
             "-" * len(header)]
    for name, m in rows.items():
        lines.append(f"{name:<27} {m['t2v_R1']:>6.1f} {m['t2v_R5']:>6.1f} {m['t2v_R10']:>6.1f} "
                     f"{m.get('size_mb', float('nan')):>8.2f} {m.get('latency_ms', float('nan')):>9.1f}")
    text = "\n".join(lines)
    for name, m in rows.items():
        key = name.replace(" ", "_").replace("(", "").replace(")", "")
        parent.log_metrics({f"{key}.{k}": v for k, v in m.items() if v == v})
    parent.log_text(text, "summary.txt")
    parent.log_dict(rows, "summary.json")
    return {"text": text, "rows": rows}


__all__ = ["final_report", "latency_ms", "retrieval_metrics"]
