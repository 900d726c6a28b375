"""Stage 4 — quantize: GPTQ INT4 of the student's vision encoder, evaluated against full precision.

    vidkd quantize --checkpoint runs/models/distill-<run>.pt --config configs/demo.yaml

Calibration frames come from the feature table's train split; the fp32, bf16, GPTQ and
round-to-nearest students are evaluated on its test split, side by side, the INT4 ones on
`quantize.kernel` (`auto`: the fused int4 kernel on CPU; the kernel used is logged).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import VidkdConfig, digest
from core.evaluation import evaluate_student
from core.features import TableMeta, decode_frames, read_meta, read_table, stack_bytes, table_batches
from core.quant import describe_kernels, quantize_visual, save_quantized, set_kernel, size_report
from core.student import VideoTextStudent, load_quantized_student, load_student, student_meta, to_precision
from core.video import normalize_frames
from jobs.runtime import import_quant_backend
from jobs.tracking import RunLogger

log = logging.getLogger("vidkd.quantize")


@dataclass
class QuantizeResult:
    output_dir: Path
    report: dict[str, Any]
    report_text: str
    embed_dim: int


def calibration_images(table_dir: str | Path, meta: TableMeta, student: VideoTextStudent, count: int,
                       seed: int = 0) -> torch.Tensor:
    """`count` real (unpadded) frames drawn at random from the train videos, normalised as the
    visual takes them: [N, 3, H, W]. Reads the frame masks of the split, then the frames of the
    chosen videos only: a large train split never has to fit in memory."""
    masks = read_table(table_dir, split="train", columns=["video_id", "frame_mask"])
    ids = masks.column("video_id").to_pylist()
    real = stack_bytes(masks.column("frame_mask").to_pylist(), "uint8", (meta.num_frames,)).astype(bool)
    rows, slots = np.nonzero(real)
    pick = np.sort(np.random.default_rng(seed).permutation(len(rows))[:count])
    chosen = read_table(table_dir, split="train", columns=["video_id", "frames"],
                        video_ids=sorted({ids[r] for r in rows[pick]}))
    clip_shape = (meta.num_frames, meta.image_size, meta.image_size, 3)
    clips = dict(zip(chosen.column("video_id").to_pylist(),
                     decode_frames(chosen.column("frames").to_pylist(), meta.frames_codec, clip_shape)))
    images = torch.from_numpy(np.stack([clips[ids[r]][slot] for r, slot in zip(rows[pick], slots[pick])]))
    if images.shape[1] != student.image_size:
        images = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float(), size=student.image_size,
                                                 mode="bilinear", antialias=True).clamp(0, 255).to(torch.uint8)
        images = images.permute(0, 2, 3, 1)
    return normalize_frames(images, student.mean, student.std)


def run_quantize(cfg: VidkdConfig, checkpoint: str | Path, table_dir: str | Path,
                 run: RunLogger | None = None) -> QuantizeResult:
    qcfg = cfg.quantize
    import_quant_backend()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = read_meta(table_dir)
    student = load_student(checkpoint).eval()
    calib = calibration_images(table_dir, meta, student, qcfg.calib_samples)
    test = table_batches(table_dir, meta, "test")
    if run:
        run.log_params({"quantize": qcfg.model_dump(mode="json"), "checkpoint": str(checkpoint),
                           "calib_images": len(calib)})

    results: dict[str, dict[str, float]] = {"fp32": evaluate_student(student.to(device), test, device)}
    sizes = {"fp32": size_report(student)}
    bf16 = to_precision(copy.deepcopy(student), "bf16")
    results["bf16"], sizes["bf16"] = evaluate_student(bf16, test, device), size_report(bf16)
    del bf16
    methods = ["gptq"] + (["rtn"] if qcfg.compare_rtn else [])
    # One folder per student and settings: a re-run with other settings does not overwrite this
    # one. The kernel only changes how the checkpoint is run, not what is written.
    settings = qcfg.model_dump(mode="json", exclude={"kernel"})
    name = f"{Path(checkpoint).stem}-int{qcfg.bits}-{digest(settings, 8)}"
    out_dir = Path(cfg.output_dir).resolve() / "models" / name
    layer_reports = {}
    for method in methods:
        model = copy.deepcopy(student).to(device)
        quant = quantize_visual(model.clip.visual, calib, qcfg, method=method)
        layer_reports[method] = quant.to_dict()
        if method == "gptq":
            save_quantized(model, out_dir, qcfg, student_meta(student), method=method)
            # evaluate what was written, not what is in memory
            model = load_quantized_student(out_dir, device, kernel=qcfg.kernel)
            sizes[method], kernel = size_report(model, out_dir), describe_kernels(model)
        else:
            set_kernel(model, qcfg.kernel)
            sizes[method] = size_report(model)
        results[method] = evaluate_student(model, test, device)

    report = {"metrics": results, "sizes": sizes, "bits": qcfg.bits, "group_size": qcfg.group_size,
              "calib_images": len(calib), "checkpoint_bytes": Path(checkpoint).stat().st_size,
              "gptq_seconds": layer_reports["gptq"]["seconds"], "kernel": kernel}
    text = format_report(report)
    log.warning("quantize:\n%s", text)
    if run:
        run.log_params({"quantize_kernel_used": kernel})
        for method, metrics in results.items():
            run.log_metrics({f"{method}_{k}": v for k, v in metrics.items()})
        for method, size in sizes.items():
            run.log_metrics({f"{method}_{k}": v for k, v in size.items() if isinstance(v, (int, float))})
        run.log_metrics({"r1_drop_gptq": results["fp32"]["t2v_R1"] - results["gptq"]["t2v_R1"]})
        run.log_text(text, "quantization_report.txt")
        run.log_dict({"report": report, "layers": layer_reports}, "quantization_report.json")
        run.log_artifact(out_dir, "quantized_model")
    return QuantizeResult(out_dir, report, text, student.embed_dim)


def format_report(report: dict[str, Any]) -> str:
    """Sizes per component and retrieval side by side, like the seed reports' Tables VII-VIII."""
    sizes, metrics = report["sizes"], report["metrics"]
    fp, q = sizes["fp32"], sizes["gptq"]
    mb = 1 / 2**20
    lines = [
        f"INT{report['bits']} g{report['group_size']}, {report['calib_images']} calibration frames, "
        f"{report['kernel']} kernel",
        "",
        "component        params      fp32 MB   int MB",
    ]
    for part in ("vision", "text", "rest"):
        lines.append(f"{part:<14} {fp[f'{part}_params']:>10,.0f} {fp[f'{part}_bytes'] * mb:>10.2f} "
                     f"{q[f'{part}_bytes'] * mb:>8.2f}")
    lines += [
        f"bits per weight (quantized blocks): {q['quantized_bits_per_weight']:.3f}",
        f"vision encoder compression vs fp16: {q['vision_compression']:.2f}x",
        f"files: fp32 checkpoint {report['checkpoint_bytes'] * mb:.2f} MB, int checkpoint {q.get('file_bytes', 0) * mb:.2f} MB",
        "",
        "model      t2v R@1  R@5   R@10  mean   v2t R@1",
    ]
    for name, m in metrics.items():
        lines.append(f"{name:<10} {m['t2v_R1']:>6.1f} {m['t2v_R5']:>5.1f} {m['t2v_R10']:>6.1f} {m['R_mean']:>5.1f} "
                     f"{m['v2t_R1']:>8.1f}")
    lines.append(f"R@1 drop with GPTQ: {metrics['fp32']['t2v_R1'] - metrics['gptq']['t2v_R1']:+.1f} points")
    return "\n".join(lines)
