"""bench/teacher_swap.py: its overrides load as configs, ASHA replays as Ray decides, the report answers."""

import random
import sys
from pathlib import Path

import pytest

from core.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from teacher_swap import format_report, load_swap, replay_asha, teacher_b_overrides  # noqa: E402


def test_the_swap_overrides_are_valid_configs():
    from core.config import TeacherConfig

    swap = load_swap("configs/teacher_swap.yaml")
    base = load_config("configs/quality.yaml")
    teacher_a = TeacherConfig(kind="vidkd", path="runs/quality/models/teacher-0123.pt")
    b = load_config("configs/quality.yaml", teacher_b_overrides(swap, teacher_a))
    assert b.teacher_training.distill.loss.temperature != base.teacher_training.distill.loss.temperature
    # B starts from A's weights, at the same architecture
    assert b.teacher_training.distill.student.init_from == teacher_a.path
    assert b.teacher_training.distill.student.model == base.teacher_training.distill.student.model
    a = load_config("configs/quality.yaml", swap["a_settings"]).distill.loss
    assert (a.tau_video, a.tau_frame) == (0.05, 1.0)
    calibrated = load_config("configs/quality.yaml", swap["calibrated"]).distill.loss
    assert (calibrated.tau_video, calibrated.tau_frame) == ("auto", "auto")
    search = load_config("configs/quality.yaml", swap["calibrated"] + swap["tune"]).tune
    assert search.num_samples >= 16
    # besides what each names, nothing differs from the protocol's students
    assert b.distill == base.distill


def test_swap_file_errors_name_the_keys(tmp_path):
    path = tmp_path / "swap.yaml"
    path.write_text("teacher_b: []\na_settings: []\ncalibrated: []\ntunes: []\n")
    with pytest.raises(SystemExit, match="unknown: tunes; missing: tune"):
        load_swap(path)
    path.write_text("teacher_b: x\na_settings: []\ncalibrated: []\ntune: []\n")
    with pytest.raises(SystemExit, match="list of overrides"):
        load_swap(path)


def test_replay_by_hand():
    # grace 1, factor 2, max 2, one at a time: A runs both epochs; B (3 < median 5 of {A}) stops
    # after one; C (7 >= median 4 of {5, 3}) runs both. 5 trial-epochs; B's 9 is never seen.
    curves = [[5, 6], [3, 9], [7, 1]]
    assert replay_asha(curves, max_t=2, grace=1, factor=2, concurrency=1) == {"trial_epochs": 5, "best": 7}
    assert replay_asha(curves, max_t=2, grace=1, factor=2, concurrency=2) == {"trial_epochs": 5, "best": 7}
    # FIFO-equivalent: a grace period at max_t stops nothing early
    assert replay_asha(curves, max_t=2, grace=2, factor=2, concurrency=1) == {"trial_epochs": 6, "best": 9}


def test_replay_decides_as_rays_asha_bracket():
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    class Trial:
        def __init__(self, trial_id: str):
            self.trial_id = trial_id

    rng = random.Random(0)
    for case in range(20):
        max_t, grace, factor = rng.choice([(8, 1, 2), (12, 2, 3), (20, 4, 3), (9, 1, 3)])
        curves = [[rng.uniform(0, 50) for _ in range(max_t)] for _ in range(rng.randint(3, 12))]
        bracket, spent, best = _Bracket(grace, max_t, factor, 0), 0, float("-inf")
        for i, curve in enumerate(curves):  # one trial at a time: results arrive trial by trial
            for epoch, value in enumerate(curve, start=1):
                spent, best = spent + 1, max(best, value)
                if epoch == max_t or bracket.on_result(Trial(str(i)), epoch, value) == TrialScheduler.STOP:
                    break
        assert replay_asha(curves, max_t, grace, factor, concurrency=1) == {"trial_epochs": spent, "best": best}, case


def test_report_answers_each_question():
    runs = []
    for seed in (0, 1, 2):
        for row, r1 in (("none", 10), ("A @ A settings", 14), ("A @ calibrated", 15), ("B @ A settings", 12),
                        ("B @ calibrated", 17), ("B @ tuned", 18)):
            runs.append({"row": row, "seed": seed, "t2v_R1": r1 + seed, "v2t_R1": 0.0, "val_R1": 20.0 + seed,
                         "tau_video": 0.05, "tau_frame": 1.0})
    search = {name: {"trials": 16, "trial_epochs": epochs, "best_val_R1": best, "wall_s": 1.0}
              for name, epochs, best in (("asha", 100, 30.0), ("fifo", 320, 30.5))}
    summary = {"test_videos": 300, "seeds": [0, 1, 2], "runs": runs, "search": search, "replays": [],
               "tune": {"num_samples": 16, "max_epochs": 20, "grace_period": 4, "reduction_factor": 3},
               "teachers": {"A": {"t2v_R1": 37.0, "logit_scale": 18.0, "calibration": {}},
                            "B": {"t2v_R1": 40.0, "logit_scale": 50.0, "calibration": {"tau_video": 0.02}}}}
    text = format_report(summary)
    assert "| B @ tuned | 0.05 | 1 | 19.0 ± 1.0 |" in text
    assert "| 8.0 ± 0.0 |" in text  # B @ tuned - none, paired per seed
    assert "tuned − default = +6.0 (more than twice the seed std, 2.0); B @ tuned beats A @ A settings" in text
    assert "(88% of it; goal 90%)" in text  # calibrated gain 7 of the tuned 8
    assert "3.2x fewer trial-epochs" in text
    assert "- Calibrated on A: A @ calibrated 16.0 against A @ A settings 15.0 (gain over no teacher +5.0 against +4.0)." in text


def test_the_report_before_the_searches_answers_what_it_can():
    """The students that need no search come first, and their report is printed and saved then:
    a run stopped during the searches still has the transfer question answered."""
    runs = [{"row": row, "seed": seed, "t2v_R1": r1 + seed, "v2t_R1": 0.0, "val_R1": 20.0, "tau_video": 0.05,
             "tau_frame": 1.0}
            for seed in (0, 1, 2) for row, r1 in (("none", 10), ("A @ A settings", 14), ("B @ A settings", 12),
                                                  ("B @ calibrated", 17))]
    summary = {"test_videos": 300, "seeds": [0, 1, 2], "runs": runs, "search": {}, "replays": [],
               "tune": {"num_samples": 16, "max_epochs": 20, "grace_period": 4, "reduction_factor": 3},
               "teachers": {"A": {"t2v_R1": 37.0, "calibration": {}}, "B": {"t2v_R1": 40.0, "calibration": {}}}}
    text = format_report(summary)
    assert "| B @ calibrated | 0.05 | 1 | 18.0 ± 1.0 |" in text and "| 7.0 ± 0.0 |" in text
    assert "| B @ tuned |  |  |  |" in text  # its cells wait for the search
    assert "Tune recovers" not in text and "ASHA:" not in text and "replayed" not in text
    # the default run's one search: ASHA alone, no replay table (that needs --compare-fifo's FIFO)
    summary["search"] = {"asha": {"trials": 16, "trial_epochs": 100, "best_val_R1": 30.0, "wall_s": 1.0}}
    text = format_report(summary)
    assert "- ASHA: 100 trial-epochs, best val R@1 30.0 (the full-budget comparison is `--compare-fifo`'s)." in text
    assert "replayed" not in text
