"""bench/quality.py's protocol: each student differs from the others only in objective and seed."""

import sys
from pathlib import Path

import pytest

from core.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from quality import VARIANTS, format_report, variant_config  # noqa: E402


def test_variants_change_only_the_objective_and_the_seed():
    base = load_config("configs/quality.yaml").distill
    configs = {v: variant_config(base, v, seed=2) for v in VARIANTS}
    assert configs["none"].teacher_mode == "none" and configs["none"].loss.objective == "none"
    assert configs["teachclip"].loss == base.loss.model_copy(update={"objective": "teachclip"})
    assert configs["infonce+cgt"].loss.w_fgt == 0 and configs["infonce+cgt"].loss.w_cgt == base.loss.w_cgt
    assert configs["infonce+fgt"].loss.w_cgt == 0 and configs["infonce+fgt"].loss.w_fgt == base.loss.w_fgt
    assert configs["dldkd"].loss.objective == "dldkd"
    for config in configs.values():
        assert config.seed == 2
        same = config.model_dump(exclude={"loss", "teacher_mode", "seed"})
        assert same == base.model_dump(exclude={"loss", "teacher_mode", "seed"})
    with pytest.raises(ValueError, match="unknown variant"):
        variant_config(base, "kd", 0)


def test_report_pairs_each_run_with_the_baseline_of_its_seed():
    runs = [{"variant": v, "seed": s, "t2v_R1": r1, "t2v_R5": 0, "t2v_R10": 0, "v2t_R1": 0, "val_R1": 0,
             "best_epoch": 1} for v, s, r1 in [("none", 0, 10), ("none", 1, 20), ("teachclip", 0, 13),
                                               ("teachclip", 1, 21)]]
    summary = {"runs": runs, "variants": ["none", "teachclip"], "seeds": [0, 1], "test_videos": 300,
               "test_queries": 900, "teacher": {"t2v_R1": 40, "t2v_R5": 0, "t2v_R10": 0, "v2t_R1": 0,
                                                "latency_ms": 9.0},
               "student_latency_ms": 3.0, "selection": [{"tau_video": 0.01, "val_R1": 1.0, "best_epoch": 1}],
               "tau_video": 0.01}
    text = format_report(summary)
    row = next(line for line in text.splitlines() if line.startswith("| student: teachclip"))
    # R@1 13 and 21: 17.0 ± 5.7; paired differences 3 and 1: 2.0 ± 1.4
    assert "| 17.0 ± 5.7 |" in row and "| 2.0 ± 1.4 |" in row
    assert "one query = 0.11 R@1 points" in text
