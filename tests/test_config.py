from pathlib import Path

import pytest

from core.config import ConfigError, VidkdConfig, load_config


def test_demo_preset_loads():
    cfg = load_config("configs/demo.yaml")
    assert isinstance(cfg, VidkdConfig)
    assert cfg.data.synth is not None and cfg.teacher_training is not None
    # the demo's teacher knows more than the students' labels: it also trains on the pool
    assert cfg.data.synth.pool_fraction > 0 and cfg.teacher_training.distill.train_splits == ["train", "pool"]
    assert round(cfg.data.synth.videos * cfg.data.synth.test_fraction) * cfg.data.synth.captions_per_video >= 200


def test_msrvtt_preset_loads():
    cfg = load_config("configs/msrvtt.yaml")
    assert cfg.data.msrvtt is not None and cfg.extract.teacher.name == "ViT-L-14"
    assert cfg.distill.student.model == "ViT-B-32" and cfg.distill.use_gpu is True


def test_overrides_are_typed():
    cfg = load_config("configs/demo.yaml", ["distill.lr=3e-4", "distill.epochs=2", "tune.enabled=true"])
    assert cfg.distill.lr == pytest.approx(3e-4) and cfg.distill.epochs == 2 and cfg.tune.enabled is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.lrr=1", "distill.lrr: unknown key"),
        ("distill.lr=-1", "distill.lr: Input should be greater than 0"),
        ("extract.num_frames=zero", "extract.num_frames: Input should be a valid integer"),
        ("quantize.bits=5", "quantize.bits: Input should be 3, 4 or 8"),
        ("quantize.group_size=100", "quantize.group_size: group_size must be -1 or a power of two"),
        ("tune.space.loss.nope={low: 1, high: 2}", "`loss.nope` is not a distill setting"),
        ("extract.teacher={kind: internvideo2, path: models/iv2}", "extract.teacher: internvideo2 runs the checkpoint's own code"),
        ("distill.train_splits=[train, test]", "distill.train_splits.1: Input should be 'train' or 'pool'"),
        ("distill.train_splits=[]", "distill.train_splits: List should have at least 1 item"),
    ],
)
def test_bad_values_are_one_line_naming_the_field(override, message):
    with pytest.raises(ConfigError) as error:
        load_config("configs/demo.yaml", [override])
    text = str(error.value)
    assert message in text and "\n" not in text


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["distill.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_quality_preset_loads_with_a_teacher_that_trains_on_the_pool():
    cfg = load_config("configs/quality.yaml")
    assert cfg.data.synth.pool_fraction > 0.5 and cfg.teacher_training.distill.train_splits == ["train", "pool"]
    assert cfg.distill.train_splits == ["train"] and cfg.distill.loss.w_fgt == 2.0


def test_teacher_mode_none_needs_objective_none():
    with pytest.raises(ConfigError, match="teacher_mode none"):
        load_config(None, ["distill.teacher_mode=none"])


def test_data_paths_in_a_config_resolve_against_its_folder_and_set_ones_against_the_working_dir(tmp_path, monkeypatch):
    """The manifest and MSRVTT's files travel with the config that names them; `--set` is typed
    in a shell. Both come out absolute, so a written-out config names the same files anywhere."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "run.yaml").write_text("data:\n  manifest: ../data/m.jsonl\n  msrvtt:\n    data_json: ../msrvtt/d.json\n"
                                   "    train_csv: train.csv\n    test_csv: /abs/test.csv\n    video_dir: ~/videos\n")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(conf / "run.yaml")
    assert cfg.data.manifest == str(tmp_path / "data" / "m.jsonl")
    msrvtt = cfg.data.msrvtt
    assert msrvtt.data_json == str(tmp_path / "msrvtt" / "d.json") and msrvtt.train_csv == str(conf / "train.csv")
    assert msrvtt.test_csv == "/abs/test.csv" and msrvtt.video_dir == str(Path.home() / "videos")
    cfg = load_config(conf / "run.yaml", ["data.msrvtt.video_dir=clips", "data.manifest=m2.jsonl"])
    assert cfg.data.msrvtt.video_dir == str(elsewhere / "clips") and cfg.data.manifest == str(elsewhere / "m2.jsonl")
