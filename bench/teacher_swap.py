"""A stronger teacher needs its own temperatures: does the default transfer, does Tune recover it,
and how close does the calibrated default get at no search cost? A protocol fixed in advance.

    python bench/teacher_swap.py --config configs/quality.yaml --swap configs/teacher_swap.yaml [--seeds 0 1 2] [--compare-fifo]
                                 [--teachers A.pt B.pt]     # a teacher pair trained before, pinned by hash

On bench/quality.py's data, target set, students, seeds and test split (`--config`), with what
`--swap` changes, as `--set` overrides:
1. Two teachers trained here on the teacher-only pool: A is quality.yaml's; B is A's training with
   the `teacher_b` overrides, where `{teacher_a}` stands for A's checkpoint. The default B starts
   from A's weights and trains further at another temperature: stronger by construction, with
   another similarity scale and sharpness (how much stronger is measured). Their test R@1, logit
   scales and calibrated temperatures.
2. Students (TeachCLIP, the same settings otherwise, each seed paired with the no-teacher
   student of its seed):
     none            no teacher
     A @ A settings  teacher A with `a_settings` (what bench/quality.py chose on val for A)
     A @ calibrated  teacher A with `calibrated`: the default on the first teacher, whose own
                     strength moves between runs (so A's settings may not fit this run's A)
     B @ A settings  teacher B with A's settings: does the default transfer?
     B @ calibrated  teacher B with `calibrated` (temperatures solved on B's own embeddings)
     B @ tuned       teacher B with the best settings of the ASHA search below
3. The ASHA search on teacher B's table, val only (`tune` overrides), from the calibrated
   default: its trial-epochs and best val R@1. With `--compare-fifo`, also a FIFO search (every
   trial to max_epochs: the full budget) with the same Optuna seed, whose per-epoch curves replay
   ASHA at other grace periods and reduction factors (`replay_asha`, Ray's own rule): that is how
   the configured pair is chosen. It costs about as much as the whole ASHA search twice over, so
   it is left out of the default run, which then fits the 90-minute budget.
4. Seed noise: the std over seeds of the tuned student's val R@1.

Every training and each search is a cached stage: a run that stops part-way continues where
it stopped. The students that need no search train first, and their report is printed and saved
(`<output_dir>/teacher_swap.partial.json`) before the searches start. Results: a Markdown report
on stdout and `<output_dir>/teacher_swap.json`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from core.config import DistillConfig, TeacherConfig, load_config
from protocol import Protocol, TeacherSetup, fmt, mean_std

SWAP_KEYS = ("teacher_b", "a_settings", "calibrated", "tune")
ROWS = ("none", "A @ A settings", "A @ calibrated", "B @ A settings", "B @ calibrated", "B @ tuned")


def load_swap(path: str | Path) -> dict[str, list[str]]:
    """The bench's overrides: each key a list of `--set` strings."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown, missing = set(raw) - set(SWAP_KEYS), set(SWAP_KEYS) - set(raw)
    if unknown or missing:
        raise SystemExit(f"{path}: expected the keys {', '.join(SWAP_KEYS)}"
                         + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else "")
                         + (f"; missing: {', '.join(sorted(missing))}" if missing else ""))
    if not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in raw.values()):
        raise SystemExit(f"{path}: every key holds a list of overrides such as 'distill.loss.tau_video=0.05'")
    return raw


TEACHER_A = "{teacher_a}"


def teacher_b_overrides(swap: dict[str, list[str]], teacher_a: Any) -> list[str]:
    """The `teacher_b` overrides, with `{teacher_a}` standing for teacher A's checkpoint (a B that
    starts from A's weights: trained further, it is stronger by construction)."""
    return [o.replace(TEACHER_A, str(teacher_a.path)) for o in swap["teacher_b"]]


def replay_asha(curves: list[list[float]], max_t: int, grace: int, factor: int, concurrency: int) -> dict[str, float]:
    """Asynchronous successive halving replayed on full per-epoch curves, as Ray's ASHA decides
    (one bracket; at each rung a trial stops when its value is below the (1 - 1/factor)
    percentile of the values recorded there before it). Trials start in order, `concurrency` at
    a time, each epoch taking one unit of time, so results arrive in the order a real search
    sees them. Returns the trial-epochs spent and the best value any trial reached."""
    from jobs.tune import asha_rungs

    recorded: dict[int, dict[int, float]] = {rung: {} for rung in asha_rungs(max_t, grace, factor)}
    events: list[tuple[int, int, int]] = []  # (time, trial, epoch)
    waiting = list(range(len(curves)))[::-1]
    for _ in range(min(concurrency, len(curves))):
        trial = waiting.pop()
        heapq.heappush(events, (1, trial, 1))
    spent, best = 0, float("-inf")
    while events:
        now, trial, epoch = heapq.heappop(events)
        value = curves[trial][epoch - 1]
        spent, best = spent + 1, max(best, value)
        stop = epoch >= min(max_t, len(curves[trial]))
        if not stop and epoch in recorded:
            seen = recorded[epoch]
            stop = bool(seen) and value < np.nanpercentile(list(seen.values()), (1 - 1 / factor) * 100)
            seen[trial] = value
        if stop:
            if waiting:
                heapq.heappush(events, (now + 1, waiting.pop(), 1))
        else:
            heapq.heappush(events, (now + 1, trial, epoch + 1))
    return {"trial_epochs": spent, "best": best}


def run_swap(cfg_path: str, swap: dict[str, list[str]], seeds: list[int], overrides: list[str],
             compare_fifo: bool = False, pinned: list[str] | None = None) -> dict[str, Any]:
    from jobs.runtime import init_ray
    from jobs.tracking import RunLogger
    from jobs.tune import run_tune

    base = load_config(cfg_path, overrides)
    a_settings = load_config(cfg_path, overrides + swap["a_settings"]).distill
    calibrated = load_config(cfg_path, overrides + swap["calibrated"]).distill
    search_cfg = load_config(cfg_path, overrides + swap["calibrated"] + swap["tune"])
    # B's settings are read once A exists; a mistake in them is found here, before Ray starts
    load_config(cfg_path, overrides + teacher_b_overrides(swap, TeacherConfig(kind="vidkd", path="teacher-a.pt")))
    init_ray(base.ray)
    parent = RunLogger.create("bench-teacher-swap", base.tracking, tags={"vidkd.stage": "bench"},
                              output_dir=base.output_dir)
    with parent.running():
        protocol = Protocol(base, parent)
        given = dict(zip("AB", pinned or [None, None]))
        teachers = {"A": protocol.teacher(pinned=given["A"])}
        b_cfg = load_config(cfg_path, overrides + teacher_b_overrides(swap, teachers["A"].teacher))
        teachers["B"] = protocol.teacher(b_cfg.teacher_training, "teacher-b", pinned=given["B"])
        calibration = {name: _calibration(calibrated, setup) for name, setup in teachers.items()}

        # the baseline is A's settings without a teacher: the same config (so the same cached
        # training) as bench/quality.py's no-teacher student of each seed
        plans = {"none": (teachers["A"], _no_teacher(a_settings)), "A @ A settings": (teachers["A"], a_settings),
                 "B @ A settings": (teachers["B"], a_settings), "B @ calibrated": (teachers["B"], calibrated),
                 "A @ calibrated": (teachers["A"], calibrated)}
        # the students that need no search first: a run stopped during the searches has them
        runs = _students(protocol, plans, seeds)
        partial = _summary(base, swap, seeds, teachers, calibration, runs, {}, {}, search_cfg, [])
        print("Before the searches:\n" + format_report(partial), flush=True)
        (Path(base.output_dir) / "teacher_swap.partial.json").write_text(json.dumps(partial, indent=1, default=str))

        searches, wall = {}, {}
        for scheduler in ("asha", "fifo") if compare_fifo else ("asha",):
            tune_cfg = search_cfg.tune.model_copy(update={"scheduler": scheduler,
                                                      "storage_dir": f"{search_cfg.tune.storage_dir}/{scheduler}"})
            run = parent.child(f"tune-{scheduler}", {"vidkd.stage": "tune"})
            start = time.perf_counter()
            with run.running():
                searches[scheduler] = run_tune(search_cfg.model_copy(update={"tune": tune_cfg}), teachers["B"].table_dir,
                                               teachers["B"].splits, run=run, teacher=teachers["B"].teacher)
            wall[scheduler] = time.perf_counter() - start
        runs += _students(protocol, {"B @ tuned": (teachers["B"], searches["asha"].best_config.distill)}, seeds)

        replays = _replays(searches["fifo"], search_cfg.tune.max_epochs) if compare_fifo else []
        summary = _summary(base, swap, seeds, teachers, calibration, runs, searches, wall, search_cfg, replays)
        report = format_report(summary)
        parent.log_text(report, "teacher_swap.md")
        parent.log_dict(summary, "teacher_swap.json")
    (Path(base.output_dir) / "teacher_swap.json").write_text(json.dumps(summary, indent=1, default=str))
    return {**summary, "report": report}


def _replays(fifo, max_epochs: int) -> list[dict[str, Any]]:
    """ASHA at other grace periods and reduction factors, replayed on the FIFO search's curves."""
    curves = [t["curve"] for t in fifo.trials if t.get("curve")]
    return [{"grace_period": g, "reduction_factor": f, **replay_asha(curves, max_epochs, g, f, fifo.max_concurrent)}
            for g in (1, 2, 3, 4, 6) for f in (2, 3, 4) if g < max_epochs]


def _summary(base, swap, seeds, teachers, calibration, runs, searches, wall, search_cfg, replays) -> dict[str, Any]:
    return {
        "config": base.model_dump(mode="json"), "swap": swap, "seeds": seeds,
        "test_videos": teachers["A"].meta.counts.get("test", 0),
        "teachers": {name: {**setup.row, "calibration": calibration[name]} for name, setup in teachers.items()},
        "runs": runs,
        "search": {name: {"trials": len(r.trials), "trial_epochs": r.trial_epochs, "best_val_R1": r.best_metric,
                          "best_params": r.best_params, "default_params": r.default_params, "wall_s": wall[name],
                          "config_path": str(r.config_path)} for name, r in searches.items()},
        "tune": search_cfg.tune.model_dump(mode="json"), "replays": replays,
    }


def _students(protocol: Protocol, plans: dict[str, tuple[TeacherSetup, DistillConfig]], seeds: list[int]) -> list[dict]:
    """Each plan's student at each seed (cached stages), printed as it is known."""
    runs = []
    for seed in seeds:
        for label, (setup, distill) in plans.items():
            name = label.replace(" @ ", "-").replace(" ", "-") + f"-seed{seed}"
            row = protocol.student(setup, distill.model_copy(update={"seed": seed}), name, {"vidkd.variant": label})
            runs.append({"row": label, **row})
            print(f"{label} seed {seed}: test t2v R@1 {row['t2v_R1']:.1f} (val {row['val_R1']:.1f})", flush=True)
    return runs


def _no_teacher(distill: DistillConfig) -> DistillConfig:
    return distill.model_copy(update={"teacher_mode": "none",
                                      "loss": distill.loss.model_copy(update={"objective": "none"})})


def _calibration(calibrated: DistillConfig, setup: TeacherSetup) -> dict[str, float]:
    from dataclasses import asdict

    from core.calibration import resolve_temperatures

    _, result = resolve_temperatures(calibrated, setup.table_dir, setup.teacher)
    return asdict(result) if result else {}


def format_report(summary: dict[str, Any]) -> str:
    runs, seeds = summary["runs"], summary["seeds"]
    none = {r["seed"]: r["t2v_R1"] for r in runs if r["row"] == "none"}
    lines = [f"Test split: {summary['test_videos']} videos; seeds {seeds}", "",
             "| teacher | t2v R@1 | logit scale | calibrated tau_video | calibrated tau_frame | "
             "entropy at tau_video 0.01 / calibrated | weights sha256 |", "|---|---|---|---|---|---|---|"]
    for name, t in summary["teachers"].items():
        cal = t["calibration"]
        lines.append(f"| {name} | {t['t2v_R1']:.1f} | {t.get('logit_scale', float('nan')):.1f} | "
                     f"{cal.get('tau_video', float('nan')):.4g} | {cal.get('tau_frame', float('nan')):.4g} | "
                     f"{cal.get('published_video_entropy', float('nan')):.2f} / {cal.get('video_entropy', float('nan')):.2f} | "
                     f"{t.get('weights_sha256', '')[:12]} |")
    lines += ["", "| student | tau_video | tau_frame | t2v R@1 | v2t R@1 | R@1 − no teacher (paired) | val R@1 |",
              "|---|---|---|---|---|---|---|"]
    stats = {}
    for label in ROWS:
        rows = [r for r in runs if r["row"] == label]
        if not rows:
            continue
        gains = [r["t2v_R1"] - none[r["seed"]] for r in rows if r["seed"] in none]
        stats[label] = {"r1": mean_std([r["t2v_R1"] for r in rows]), "gain": mean_std(gains) if gains else (0.0, 0.0),
                        "val": mean_std([r["val_R1"] for r in rows])}
        taus = "" if label == "none" else f"{rows[0]['tau_video']:.4g} | {rows[0]['tau_frame']:.4g}"
        lines.append(f"| {label} | {taus or ' | '} | {fmt([r['t2v_R1'] for r in rows])} | "
                     f"{fmt([r['v2t_R1'] for r in rows])} | {fmt(gains) if label != 'none' else ''} | "
                     f"{fmt([r['val_R1'] for r in rows])} |")
    lines += ["", "Every run (test t2v R@1; val R@1 of the kept epoch):", "",
              "| student | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for label in ROWS:
        cells = [next((f"{r['t2v_R1']:.1f} (val {r['val_R1']:.1f})" for r in runs
                       if r["row"] == label and r["seed"] == s), "") for s in seeds]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    search, tune_cfg = summary["search"], summary["tune"]
    lines += ["", f"Searches on teacher B (val only; {tune_cfg['num_samples']} trials, at most {tune_cfg['max_epochs']} epochs, "
              f"ASHA grace {tune_cfg['grace_period']}, reduction factor {tune_cfg['reduction_factor']}):", "",
              "| scheduler | trial-epochs | best val R@1 | wall (s) |", "|---|---|---|---|"]
    for name, s in search.items():
        lines.append(f"| {name} | {s['trial_epochs']} | {s['best_val_R1']:.1f} | {s['wall_s']:.0f} |")
    if summary["replays"]:
        lines += ["", "ASHA replayed on the FIFO search's curves (trial-epochs, best val R@1):", "",
                  "| grace | factor | trial-epochs | saving | best val R@1 |", "|---|---|---|---|---|"]
        for r in summary["replays"]:  # replays are made only from a FIFO search
            lines.append(f"| {r['grace_period']} | {r['reduction_factor']} | {r['trial_epochs']} | "
                         f"{search['fifo']['trial_epochs'] / r['trial_epochs']:.1f}x | {r['best']:.1f} |")
    lines += ["", *goal_lines(stats, search)]
    return "\n".join(lines)


def goal_lines(stats: dict[str, dict], search: dict[str, dict]) -> list[str]:
    """The protocol's questions, each answered by the numbers above."""
    out = []
    if {"B @ A settings", "B @ tuned", "A @ A settings"} <= set(stats):
        default, tuned = stats["B @ A settings"]["r1"], stats["B @ tuned"]["r1"]
        out.append(f"- Default transfer: B @ A settings {default[0]:.1f} against A @ A settings "
                   f"{stats['A @ A settings']['r1'][0]:.1f} and B @ tuned {tuned[0]:.1f}.")
        margin = 2 * max(default[1], tuned[1])
        out.append(f"- Tune recovers it: tuned − default = {tuned[0] - default[0]:+.1f} "
                   f"({'more' if tuned[0] - default[0] > margin else 'not more'} than twice the seed std, {margin:.1f}); "
                   f"B @ tuned {'beats' if tuned[0] > stats['A @ A settings']['r1'][0] else 'does not beat'} A @ A settings.")
    if {"A @ calibrated", "A @ A settings"} <= set(stats):
        out.append(f"- Calibrated on A: A @ calibrated {stats['A @ calibrated']['r1'][0]:.1f} against A @ A settings "
                   f"{stats['A @ A settings']['r1'][0]:.1f} (gain over no teacher {stats['A @ calibrated']['gain'][0]:+.1f} "
                   f"against {stats['A @ A settings']['gain'][0]:+.1f}).")
    if {"B @ calibrated", "B @ tuned"} <= set(stats):
        tuned_gain, cal_gain = stats["B @ tuned"]["gain"][0], stats["B @ calibrated"]["gain"][0]
        share = cal_gain / tuned_gain if tuned_gain > 0 else float("nan")
        out.append(f"- Calibrated default: gain over no teacher {cal_gain:+.1f} against the tuned {tuned_gain:+.1f} "
                   f"({share:.0%} of it; goal 90%).")
    if {"asha", "fifo"} <= set(search):
        noise = stats.get("B @ tuned", {}).get("val", (0.0, 0.0))[1]
        asha, fifo = search["asha"], search["fifo"]
        out.append(f"- ASHA: {fifo['trial_epochs'] / asha['trial_epochs']:.1f}x fewer trial-epochs than FIFO (goal 3x); "
                   f"best val R@1 {asha['best_val_R1']:.1f} against {fifo['best_val_R1']:.1f} "
                   f"(seed std of val R@1: {noise:.1f}).")
    elif "asha" in search:
        out.append(f"- ASHA: {search['asha']['trial_epochs']} trial-epochs, best val R@1 "
                   f"{search['asha']['best_val_R1']:.1f} (the full-budget comparison is `--compare-fifo`'s).")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quality.yaml")
    parser.add_argument("--swap", default="configs/teacher_swap.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, as vidkd --set")
    parser.add_argument("--teachers", nargs=2, metavar=("A.pt", "B.pt"),
                        help="teacher checkpoints trained before (an earlier run's): no teacher training, the same "
                             "teacher pair on any machine (their weights' hashes are in the report)")
    parser.add_argument("--compare-fifo", action="store_true",
                        help="also run the full-budget FIFO search and replay ASHA on its curves (goal 5)")
    args = parser.parse_args()
    swap = load_swap(args.swap)
    for path in args.teachers or []:
        if not Path(path).is_file():
            raise SystemExit(f"--teachers: {path} is not a file")
    start = time.perf_counter()
    result = run_swap(args.config, swap, args.seeds, args.overrides, args.compare_fifo, args.teachers)
    print(result["report"])
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
