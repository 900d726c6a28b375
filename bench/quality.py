"""Does distillation help, by how much, and which term carries it? A protocol fixed in advance.

    python bench/quality.py --config configs/quality.yaml [--seeds 0 1 2] [--variants none teachclip ...]

1. The data and the teacher come from the config's own stages (cached under its output_dir):
   a synthetic set with a `pool` split only the teacher trains on, and the teacher trained on
   pool + train with no teacher of its own.
2. Every student is the config's `distill` section on the same target set (the train split),
   changed only in its objective and its seed:
     none          InfoNCE alone, no teacher (the baseline)
     teachclip     InfoNCE + CgT + FgT, TeachCLIP's published weights and temperatures
     infonce+cgt   TeachCLIP without FgT
     infonce+fgt   TeachCLIP without CgT
     dldkd         DLDKD from the same cached teacher
   Each keeps the checkpoint of its best val epoch; nothing is chosen on test.
   One setting is chosen, on val, before the grid runs: the teacher's video-level temperature
   `tau_video`, among the pre-declared `--tau-video` candidates (TeachCLIP's constant 0.01 first,
   which assumes a teacher at CLIP's logit scale of 100; a teacher trained here has its own), by
   the best val R@1 of a TeachCLIP student with the first seed. Ties keep the earlier candidate.
3. Test: t2v R@1/5/10 and v2t R@1 of every run, mean +- std over seeds, and the paired
   difference to the baseline of the same seed. The teacher's R@1 and CPU ms/video beside them.

Every training is a stage of its own in the StageCache: a run that stops part-way continues
where it stopped. Results: a Markdown report on stdout and `<output_dir>/quality.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from core.config import DistillConfig, VidkdConfig, load_config
from protocol import Protocol, fmt

VARIANTS = ("none", "teachclip", "infonce+cgt", "infonce+fgt", "dldkd")


def variant_config(base: DistillConfig, variant: str, seed: int) -> DistillConfig:
    """The base student settings with one objective and one seed; nothing else moves."""
    loss = base.loss
    mode = "cached"
    if variant == "none":
        loss, mode = loss.model_copy(update={"objective": "none"}), "none"
    elif variant == "teachclip":
        loss = loss.model_copy(update={"objective": "teachclip"})
    elif variant == "infonce+cgt":
        loss = loss.model_copy(update={"objective": "teachclip", "w_fgt": 0.0})
    elif variant == "infonce+fgt":
        loss = loss.model_copy(update={"objective": "teachclip", "w_cgt": 0.0})
    elif variant == "dldkd":
        loss = loss.model_copy(update={"objective": "dldkd"})
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return base.model_copy(update={"loss": loss, "teacher_mode": mode, "seed": seed})


def run_protocol(cfg: VidkdConfig, seeds: list[int], variants: list[str],
                 tau_video_candidates: list[float]) -> dict[str, Any]:
    from jobs.report import caption_queries, latency_ms
    from jobs.runtime import init_ray
    from jobs.tracking import RunLogger

    init_ray(cfg.ray)
    parent = RunLogger.create("bench-quality", cfg.tracking, tags={"vidkd.stage": "bench"}, output_dir=cfg.output_dir)
    with parent.running():
        protocol = Protocol(cfg, parent)
        setup = protocol.teacher()

        def train(variant: str, seed: int, distill: DistillConfig, test: bool = True) -> dict[str, Any]:
            dcfg = variant_config(distill, variant, seed)
            name = f"{variant.replace('+', '-')}-seed{seed}-tau{dcfg.loss.tau_video:g}"
            row = protocol.student(setup, dcfg, name, {"vidkd.variant": variant}, test=test)
            return {"variant": variant, **row}

        # the one choice made before the grid, on val only
        selection = [train("teachclip", seeds[0], cfg.distill.model_copy(
            update={"loss": cfg.distill.loss.model_copy(update={"tau_video": tau})}), test=False)
            for tau in tau_video_candidates]
        chosen = max(selection, key=lambda r: r["val_R1"])["tau_video"]  # max keeps the first of equals
        for row in selection:
            print(f"selection: tau_video {row['tau_video']:g}: val R@1 {row['val_R1']:.1f}", flush=True)
        distill = cfg.distill.model_copy(update={"loss": cfg.distill.loss.model_copy(update={"tau_video": chosen})})

        runs: list[dict[str, Any]] = []
        for seed in seeds:
            for variant in variants:
                row = train(variant, seed, distill)
                runs.append(row)
                print(f"{variant} seed {seed}: test t2v R@1 {row['t2v_R1']:.1f}  "
                      f"(val {row['val_R1']:.1f}, epoch {row['best_epoch']})", flush=True)

        # CPU ms/video at batch 1, teacher and student side by side: alternating rounds, medians
        from core.student import load_student
        from core.teachers import build_teacher

        teacher_model, student = build_teacher(setup.teacher), load_student(runs[0]["checkpoint"]).eval()
        encoders = {"teacher": lambda f, m: teacher_model.encode_video(f, m)[0],
                    "student": lambda f, m: student.encode_video(f, m).video_emb}
        rounds = {name: [] for name in encoders}
        for _ in range(5):
            for name, encode in encoders.items():
                rounds[name].append(latency_ms(encode, setup.test))
        teacher_row = {**setup.row, "latency_ms": statistics.median(rounds["teacher"])}
        summary = {"config": cfg.model_dump(mode="json"), "seeds": seeds, "variants": variants,
                   "test_videos": setup.meta.counts.get("test", 0), "test_queries": caption_queries(setup.test),
                   "teacher": teacher_row, "student_latency_ms": statistics.median(rounds["student"]), "runs": runs,
                   "selection": [{k: r[k] for k in ("tau_video", "val_R1", "best_epoch")} for r in selection],
                   "tau_video": chosen}
        report = format_report(summary)
        parent.log_text(report, "quality.md")
        parent.log_dict(summary, "quality.json")
    (Path(cfg.output_dir) / "quality.json").write_text(json.dumps(summary, indent=1, default=str))
    return {**summary, "report": report}


def format_report(summary: dict[str, Any]) -> str:
    runs, variants = summary["runs"], summary["variants"]
    teacher = summary["teacher"]
    by = {(r["variant"], r["seed"]): r for r in runs}
    lines = [
        f"Test split: {summary['test_videos']} videos, {summary['test_queries']} caption queries "
        f"(one query = {100 / summary['test_queries']:.2f} R@1 points); seeds {summary['seeds']}",
        "",
        "| model | t2v R@1 | t2v R@5 | t2v R@10 | v2t R@1 | R@1 − no teacher (paired) | ms/video (CPU, batch 1) |",
        "|---|---|---|---|---|---|---|",
        f"| teacher | {teacher['t2v_R1']:.1f} | {teacher['t2v_R5']:.1f} | {teacher['t2v_R10']:.1f} | "
        f"{teacher['v2t_R1']:.1f} | | {teacher['latency_ms']:.2f} |",
    ]
    for variant in variants:
        rows = [r for r in runs if r["variant"] == variant]
        if not rows:
            continue
        diffs = [r["t2v_R1"] - by[("none", r["seed"])]["t2v_R1"] for r in rows if ("none", r["seed"]) in by]
        diff = fmt(diffs) if diffs and variant != "none" else ""
        latency = f"{summary['student_latency_ms']:.2f}" if variant == "none" else ""
        lines.append(f"| student: {variant} | {fmt([r['t2v_R1'] for r in rows])} | {fmt([r['t2v_R5'] for r in rows])} | "
                     f"{fmt([r['t2v_R10'] for r in rows])} | {fmt([r['v2t_R1'] for r in rows])} | {diff} | {latency} |")
    lines.append("")
    if "logit_scale" in teacher:
        lines += [f"The teacher's own logit scale: {teacher['logit_scale']:.1f} (its logits are cos / "
                      f"{1 / teacher['logit_scale']:.3f}; TeachCLIP's teachers sit at 100, tau_video 0.01)."]
    if teacher.get("weights_sha256"):
        lines.append(f"The teacher's weights: sha256 {teacher['weights_sha256'][:16]} (of its state dict).")
    if teacher.get("val_curve"):
        curve = teacher["val_curve"]
        lines.append(f"The teacher's val R@1 per epoch ({len(curve)} epochs): " + ", ".join(f"{v:.1f}" for v in curve)
                     + f"; over its last 5 epochs {curve[-1] - curve[max(0, len(curve) - 6)]:+.1f}.")
    lines += ["Chosen on val before the grid (TeachCLIP student, seed " + str(summary["seeds"][0]) + "): tau_video "
              + ", ".join(f"{r['tau_video']:g} -> val R@1 {r['val_R1']:.1f}" for r in summary["selection"])
              + f"; chosen {summary['tau_video']:g}."]
    entropies = [r for r in runs if "teacher_video_entropy" in r]
    if entropies:
        lines.append("Teacher targets at these temperatures, entropy as a fraction of uniform (1.0 says nothing): "
                     f"video-level {statistics.fmean(r['teacher_video_entropy'] for r in entropies):.2f}, "
                     f"frame-level {statistics.fmean(r['teacher_frame_entropy'] for r in entropies):.2f}.")
    lines += ["", "Every run (test t2v R@1 / R@5, val R@1 of the kept epoch, that epoch):", "",
              "| variant | " + " | ".join(f"seed {s}" for s in summary["seeds"]) + " |",
              "|---|" + "---|" * len(summary["seeds"])]
    for variant in variants:
        cells = []
        for seed in summary["seeds"]:
            r = by.get((variant, seed))
            cells.append(f"{r['t2v_R1']:.1f} / {r['t2v_R5']:.1f} (val {r['val_R1']:.1f}, ep {r['best_epoch']})"
                         if r else "")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quality.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--tau-video", type=float, nargs="+", default=[0.01, 0.05],
                        help="candidates for the teacher's video-level temperature, chosen on val (first: the default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, as vidkd --set")
    args = parser.parse_args()
    if "none" not in args.variants:
        parser.error("the no-teacher baseline (variant none) is what every difference is measured against")
    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    result = run_protocol(cfg, args.seeds, args.variants, args.tau_video)
    print(result["report"])
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
