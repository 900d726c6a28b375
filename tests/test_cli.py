"""The `vidkd` command line as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def vidkd(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, cwd=cwd,
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
