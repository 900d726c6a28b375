"""Tune: ASHA against the full budget, and each trial's start-up as a share of its time.

    python bench/tune.py --config configs/demo.yaml [--samples 8 --epochs 6 --concurrent 2]

Runs the same search twice in one process, on the one feature table the config's stages build
(after `make demo` it is cached, teacher included): once with ASHA stopping weak trials on val
R@1 per epoch, once with FIFO, every trial running every epoch. Both use the same Optuna seed,
and the configured default is each search's first point. Prints trial-epochs spent and the best
val R@1 of each, and the start-up of trials (Tune starting the trial to its first training step)
as a share of trial time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from core.config import load_config
from jobs.pipeline import Context, StageCache, run_stages
from jobs.tracking import RunLogger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from jobs.runtime import init_ray
    from jobs.tune import run_tune

    cfg = load_config(args.config, args.overrides)
    init_ray(cfg.ray)
    run = RunLogger.create("bench-tune", cfg.tracking, tags={"vidkd.stage": "bench"}, output_dir=cfg.output_dir)
    with run.running():
        ctx = run_stages(Context(cfg, StageCache(cfg, None), run), until="extract")
        records, table_dir = ctx.records, ctx.table_dir
        rows = {}
        with tempfile.TemporaryDirectory() as storage:
            for scheduler in ("asha", "fifo"):
                tune_cfg = cfg.tune.model_copy(update={"scheduler": scheduler, "num_samples": args.samples,
                                                   "max_epochs": args.epochs, "max_concurrent": args.concurrent,
                                                   "storage_dir": f"{storage}/{scheduler}"})
                start = time.perf_counter()
                child = run.child(f"tune-{scheduler}", {"vidkd.stage": "tune"})
                with child.running():
                    result = run_tune(cfg.model_copy(update={"tune": tune_cfg}), table_dir, run=child)
                startups = [t["startup_s"] for t in result.trials if "startup_s" in t]
                rows[scheduler] = (result, time.perf_counter() - start, statistics.median(startups))

    print(f"{len(records)} videos; {args.samples} trials, at most {args.epochs} epochs, {args.concurrent} at a time; "
          f"student {cfg.distill.student.model}")
    print("| scheduler | trial-epochs | best val R@1 | search wall (s) | trial start-up share | median start-up (s) |")
    print("|---|---|---|---|---|---|")
    for name, (result, wall, startup) in rows.items():
        print(f"| {name} | {result.trial_epochs} | {result.best_metric:.1f} | {wall:.0f} | "
              f"{result.startup_share:.1%} | {startup:.1f} |")
    asha, fifo = rows["asha"][0], rows["fifo"][0]
    print(f"ASHA spends {asha.trial_epochs / fifo.trial_epochs:.2f}x the trial-epochs of the full budget; "
          f"best val R@1 {asha.best_metric:.1f} vs {fifo.best_metric:.1f}")


if __name__ == "__main__":
    main()
