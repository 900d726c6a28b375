"""The `vidkd` command line as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent


def vidkd(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_data_synth_then_inspect(tmp_path):
    out = tmp_path / "synth"
    done = vidkd("data", "synth", "--out", str(out), "--videos", "12", "--seed", "4", "--width", "64",
                 "--height", "48", "--max-seconds", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    mp4s = sorted(out.glob("**/*.mp4"))
    assert len(mp4s) == 12
    reader = decord.VideoReader(str(mp4s[0]))
    assert reader[0].asnumpy().shape == (48, 64, 3)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["captions"] for r in rows)

    sheet = tmp_path / "sheet.png"
    done = vidkd("data", "inspect", str(out / "manifest.jsonl"), "--sheet", str(sheet), "--frames", "6",
                 "--rows", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "videos: 12" in done.stdout and "train:" in done.stdout
    assert "duration (s):" in done.stdout and "examples:" in done.stdout
    image = np.asarray(Image.open(sheet))
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # 3 strips of 6 frames: wider than tall
    assert image[..., :3].std() > 10  # frames, not a blank canvas


def test_bad_settings_stop_with_one_line(tmp_path):
    done = vidkd("extract", "--config", "configs/demo.yaml", "--set", "distill.lr=-1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: distill.lr: Input should be greater than 0"]

    done = vidkd("distill", "--config", "configs/demo.yaml", "--set", "distill.no_such_key=1")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "distill.no_such_key" in done.stderr

    done = vidkd("data", "inspect", str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2 and done.stderr.startswith("error: ")

    done = vidkd("pipeline", "--config", "configs/demo.yaml", "--from", "nowhere")
    assert done.returncode == 2 and "--from nowhere" in done.stderr


# ---------------------------------------------------------------- bad inputs fail fast
def write_jsonl(path: Path, *rows: dict) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def row(video_id: str, path: str, captions=("a car turns left",)) -> dict:
    return {"video_id": video_id, "path": path, "captions": list(captions), "split": "train"}


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Each case: a command line, and what its one line of error says (the file, and the line)."""
    data = tmp / "data"
    (data / "videos").mkdir(parents=True)
    (data / "videos" / "v1.mp4").write_bytes(b"\0" * 64)  # there is a file: the checks never decode it
    (data / "videos" / "folder.mp4").mkdir()
    good = write_jsonl(data / "good.jsonl", row("v1", "videos/v1.mp4"))
    latin1 = data / "latin1.jsonl"
    second = json.dumps(row("v2", "videos/v1.mp4", ["caf\u00e9"]), ensure_ascii=False).encode("latin-1")
    latin1.write_bytes(json.dumps(row("v1", "videos/v1.mp4")).encode() + b"\n" + second)
    twice = write_jsonl(data / "twice.jsonl", row("v1", "videos/v1.mp4"), row("v2", "videos/v1.mp4"),
                        row("v1", "videos/v1.mp4", ["another caption"]))
    folder = write_jsonl(data / "folder.jsonl", row("v1", "videos/folder.mp4"))
    silent = write_jsonl(data / "silent.jsonl", row("v1", "videos/v1.mp4", []))
    # conf/../data/twice.jsonl, wherever vidkd runs from
    relative = write_config(tmp / "conf" / "relative.yaml", "data:\n  manifest: ../data/twice.jsonl\n")
    teacher = write_config(tmp / "conf" / "teacher.yaml", f"data:\n  manifest: {good}\n"
                           f"extract:\n  teacher: {{kind: vidkd, path: {tmp / 'teacher.pt'}}}\n")
    msrvtt = write_config(tmp / "conf" / "msrvtt.yaml", "data:\n  msrvtt:\n" + "".join(
        f"    {key}: {tmp / 'msrvtt' / name}\n" for key, name in
        (("data_json", "MSRVTT_data.json"), ("train_csv", "train.csv"), ("test_csv", "test.csv"), ("video_dir", "v"))))
    with_good = ["--set", f"data.manifest={good}"]
    return {
        "non-UTF-8 bytes": (["extract", "--set", f"data.manifest={latin1}"],
                            f"{latin1}:2: not UTF-8 text (byte 0xe9 at column {second.index(0xe9) + 1}); "
                            "save the file as UTF-8"),
        "a directory as the manifest": (["distill", "--set", f"data.manifest={data}"],
                                        f"{data} is a directory, not the manifest (it holds folder.jsonl, "
                                        "good.jsonl, latin1.jsonl, ...)"),
        "a directory as every video": (["pipeline", "--set", f"data.manifest={folder}"],
                                       f"{folder}: none of its 1 video files exists as a file"),
        "a video listed twice": (["tune", "--set", f"data.manifest={twice}"],
                                 f"{twice}:3: video v1 is listed again (first on line 1)"),
        "no captions": (["extract", "--set", f"data.manifest={silent}"], f"{silent}: no video has a caption"),
        "a relative manifest in a config": (["extract", "--config", str(relative)], f"{twice}:3: video v1 is"),
        "a missing teacher": (["extract", "--config", str(teacher)],
                              f"extract.teacher.path: {tmp / 'teacher.pt'} not found"),
        "missing MSRVTT files": (["pipeline", "--config", str(msrvtt)],
                                 f"MSRVTT annotation file not found: {tmp / 'msrvtt' / 'MSRVTT_data.json'}"),
        "a directory as the checkpoint": (["quantize", "--checkpoint", str(data), *with_good],
                                          f"--checkpoint: {data} is a directory, not a file"),
        "not a feature table": (["distill", "--table", str(data), *with_good],
                                f"--table {data}: not a complete feature table"),
        "a missing checkpoint to start from": (["distill", *with_good, "--set",
                                                f"distill.student.init_from={tmp / 'trained.pt'}"],
                                               f"distill.student.init_from: {tmp / 'trained.pt'} not found"),
        "a bad setting": (["distill", *with_good, "--set", "distill.lr=0"],
                          "distill.lr: Input should be greater than 0"),
        "a bad manifest to index": (["index", "--model", str(tmp / "student.pt"), "--manifest", str(latin1),
                                     "--out", str(tmp / "index")], f"{latin1}:2: not UTF-8 text"),
        "a missing student to index with": (["index", "--model", str(tmp / "student.pt"), "--manifest", str(good),
                                             "--out", str(tmp / "index")], f"--model: {tmp / 'student.pt'} not found"),
        "no index to serve": (["serve", str(data)], f"no video index at {data} (no index.json)"),
    }


CASES = ["non-UTF-8 bytes", "a directory as the manifest", "a directory as every video", "a video listed twice",
         "no captions", "a relative manifest in a config", "a missing teacher", "missing MSRVTT files",
         "a directory as the checkpoint", "not a feature table", "a missing checkpoint to start from", "a bad setting",
         "a bad manifest to index", "a missing student to index with", "no index to serve"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2_before_anything_starts(case, tmp_path, monkeypatch):
    """Checked before Ray or MLflow: no stage runs, and the command leaves nothing behind."""
    from cluster import cli
    from jobs import index, pipeline
    from jobs import serve as server

    args, message = bad_inputs(tmp_path)[case]
    assert sorted(bad_inputs(tmp_path / "all")) == sorted(CASES)

    def started(*args, **kwargs):
        raise AssertionError("a stage started")

    monkeypatch.setattr(pipeline, "run_single_stage", started)
    monkeypatch.setattr(pipeline, "run_pipeline", started)
    monkeypatch.setattr(index, "run_index", started)
    monkeypatch.setattr(server, "start", started)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    done = CliRunner().invoke(cli.app, args)
    assert done.exit_code == 2, (done.output, done.exception)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), done.stderr
    assert list(elsewhere.iterdir()) == [], "no runs/ directory, no mlflow.db"


def test_serve_on_a_port_in_use_is_one_line_before_ray_starts(tmp_path, monkeypatch):
    import socket

    from cluster import cli
    from core.index import SCHEMA, IndexMeta, write_index
    from jobs import runtime

    write_index(tmp_path / "index", SCHEMA.empty_table(), IndexMeta("student.pt", {}, "model", 8, 4, 32))
    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray started")))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = CliRunner().invoke(cli.app, ["serve", str(tmp_path / "index"), "--port", str(port)])
    assert done.exit_code == 2 and done.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use): choose another --port"], done.stderr


def test_submit_checks_the_inputs_here_before_any_job_starts(tmp_path, monkeypatch):
    """`vidkd submit` reads the config and the job's files on this machine first: a bad manifest
    is the local run's one line (with how to skip the check) and no job is submitted;
    `--no-check-inputs` leaves the check to the job, for files only the cluster's nodes have."""
    from cluster import cli
    from cluster import submit as jobsub

    args, message = bad_inputs(tmp_path)["a video listed twice"]
    submitted = []
    monkeypatch.setattr(jobsub, "submit", lambda address, stage, config, overrides, tracking_uri=None:
                        submitted.append((stage, overrides)) or "raysubmit_1")
    monkeypatch.setattr(jobsub, "job_local_outputs", lambda *a: [])
    job = ["submit", "tune", "--address", "http://127.0.0.1:1", *args[1:]]
    done = CliRunner().invoke(cli.app, job)
    assert done.exit_code == 2 and submitted == []
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: {message}") and line.endswith(
        "(checked on this machine; --no-check-inputs submits anyway, where only the cluster's nodes have the file)")
    for bad, line in ((["submit", "distil"], "error: unknown stage 'distil'"),
                      (["submit", "distill", "--set", "distill.lr=0"], "error: distill.lr: Input should be")):
        done = CliRunner().invoke(cli.app, bad)
        assert done.exit_code == 2 and done.stderr.startswith(line) and submitted == [], done.stderr
    done = CliRunner().invoke(cli.app, [*job, "--no-check-inputs"])
    assert done.exit_code == 0 and done.stdout.strip() == "submitted raysubmit_1"
    assert submitted == [("tune", args[1:][1::2])]


def test_a_bad_manifest_ends_the_real_command_before_ray_starts(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    line = b'{"video_id": "v1", "path": "v1.mp4", "captions": ["\xff"], "split": "train"}\n'
    manifest.write_bytes(line)
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "pipeline", "--config", str(ROOT / "configs/demo.yaml"),
                           "--set", "data.synth=null", "--set", f"data.manifest={manifest}"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {manifest}:1: not UTF-8 text (byte 0xff at column "
                                        f"{line.index(0xff) + 1}); save the file as UTF-8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl", "ray"]  # no runs/, no mlflow.db
    assert list(ray_tmp.iterdir()) == [], "Ray never started"


def test_videos_missing_among_others_are_one_warning_and_the_stage_runs(tmp_path, monkeypatch):
    """The stage runs with the checked config; `--verbose` reaches the workers through the environment."""
    from cluster import cli
    from jobs import pipeline
    from jobs.runtime import VERBOSE_ENV

    (tmp_path / "v1.mp4").write_bytes(b"\0" * 64)
    manifest = write_jsonl(tmp_path / "m.jsonl", row("v1", "v1.mp4"), row("v2", "v2.mp4"))
    calls = []
    monkeypatch.setattr(pipeline, "run_single_stage", lambda stage, cfg, **kwargs: calls.append(
        (stage, cfg.data.manifest, os.environ.get(VERBOSE_ENV))))
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    for extra in ([], ["--verbose"]):
        done = CliRunner().invoke(cli.app, ["extract", "--set", f"data.manifest={manifest}", *extra])
        assert done.exit_code == 0, (done.output, done.exception)
        assert done.stderr.splitlines() == [f"warning: {manifest}: 1 of 2 video files do not exist (the first: "
                                            f"{tmp_path / 'v2.mp4'}); extract records them as failures"]
    assert calls == [("extract", str(manifest), None), ("extract", str(manifest), "1")]

    (tmp_path / "v2.mp4").mkdir()  # a folder where a video should be is named as one
    done = CliRunner().invoke(cli.app, ["extract", "--set", f"data.manifest={manifest}"])
    assert done.exit_code == 0 and done.stderr.splitlines() == [
        f"warning: {manifest}: 1 of 2 video paths are not files (1 of them folders, the first: {tmp_path / 'v2.mp4'}); "
        "extract records them as failures"]
