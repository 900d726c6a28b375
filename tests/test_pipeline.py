"""The whole workflow on a tiny config: as one command, and through the MLflow server and UI. (As a
Ray job submitted to a local head: tests/test_cluster_local.py.)"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request
from pathlib import Path

import pytest

from jobs.pipeline import run_pipeline
from tests.conftest import page_text, tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipeline_raw(tmp: Path) -> dict:
    data_root = tmp / "data"
    cfg = tiny_config(tmp, data_root / "manifest.jsonl")
    raw = cfg.model_dump(mode="json")
    raw["data"]["synth"] = {"videos": 30, "seed": 1, "fps": 6, "width": 64, "height": 48, "min_seconds": 1.0,
                            "max_seconds": 2.0, "val_fraction": 0.2, "test_fraction": 0.2,
                            "pool_fraction": 0.2}
    raw["teacher_training"] = {"distill": {**raw["distill"], "epochs": 1, "num_workers": 1, "teacher_mode": "none",
                                           "train_splits": ["train", "pool"],
                                           "loss": {**raw["distill"]["loss"], "objective": "none"}}}
    raw["distill"].update(epochs=1, num_workers=1)
    raw["quantize"]["calib_samples"] = 16
    raw["index"] = {"enabled": True, "queries": ["a red car turning left at night"]}
    return raw


@pytest.fixture(scope="module")
def pipeline_run(ray_local, tmp_path_factory):
    from core.config import config_from_dict

    tmp = tmp_path_factory.mktemp("pipeline")
    cwd = os.getcwd()
    os.chdir(tmp)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        cfg = config_from_dict(pipeline_raw(tmp))
        summary = run_pipeline(cfg)
        again = run_pipeline(cfg)  # every stage's output exists now
    finally:
        os.chdir(cwd)
    return tmp, cfg, summary, again


def test_pipeline_summary_and_skips(pipeline_run):
    tmp, cfg, summary, again = pipeline_run
    assert set(summary["rows"]) == {"teacher", "student", "student (no distillation)", "student INT4"}
    for row in summary["rows"].values():
        assert 0 <= row["t2v_R1"] <= 100
    assert summary["rows"]["student INT4"]["size_mb"] < summary["rows"]["student"]["size_mb"]
    assert "R@1" in summary["text"] and "ms/video" in summary["text"]
    lines = summary["text"].splitlines()
    assert lines[0].startswith("Test split: 6 videos, 18 caption queries")
    assert lines[-1].startswith("Expected run-to-run spread of R@1")
    assert again["rows"]["student"]["t2v_R1"] == summary["rows"]["student"]["t2v_R1"]
    stages = sorted(p.name.split("-")[0] for p in (tmp / "runs" / "stages").glob("*.json"))
    assert stages == ["data", "distill", "distill", "index", "quantize", "teacher"]
    index = json.loads(next((tmp / "runs" / "stages").glob("index-*.json")).read_text())
    assert index["videos"] == 6 and index["model"] == "models:/vidkd-student-int4/1"


def test_mlflow_server_shows_the_run_tree(pipeline_run):
    """`vidkd ui`'s server over the pipeline's SQLite store, checked through MLflow's REST API,
    then the experiment page in headless Chromium."""
    tmp, cfg, _, _ = pipeline_run
    port = free_port()
    from cluster.local import start_mlflow_server, stop_process_group

    server = start_mlflow_server(str(tmp / "runs"), port=port)
    try:
        base = f"http://127.0.0.1:{port}"
        experiment = api(base, "experiments/get-by-name?experiment_name=vidkd")["experiment"]
        runs = api(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        by_id = {r["info"]["run_id"]: r for r in runs}
        names = {r["info"]["run_id"]: tag(r, "mlflow.runName") for r in runs}
        parents = [r for r in runs if tag(r, "mlflow.runName") == "pipeline"]
        assert len(parents) == 2  # the run and the re-run
        children = {names[i] for i, r in by_id.items() if tag(r, "mlflow.parentRunId") == parents[-1]["info"]["run_id"]}
        assert {"teacher", "extract", "distill", "distill-no-teacher", "quantize"} <= children

        text = page_text(f"{base}/#/experiments/{experiment['experiment_id']}/runs", tmp / "chromium")
        if text is None:
            pytest.skip("chromium is not installed (make test installs it)")
        # The runs table lists the parent runs (children fold under them) and counts every run.
        assert "Training runs" in text and "pipeline" in text, text[:2000]
        assert f"{len(runs)} matching runs" in text, text[:2000]
    finally:
        stop_process_group(server)


def api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), None)


# ------------------------------------------------------------------ the registry, index and search
def test_registry_holds_both_students_with_lineage_and_aliases(pipeline_run, monkeypatch):
    """The quantize stage registered the distilled student and its INT4 version as pyfunc models
    aliased `candidate`, each version tagged with its pipeline run, teacher and table; the pyfunc
    embeds text and the table's frames as the student does; `vidkd promote` moves `champion`."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from core.features import read_table
    from jobs.registry import promote

    tmp, cfg, summary, _ = pipeline_run
    uri = f"sqlite:///{tmp / 'runs' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    pipelines = client.search_runs([client.get_experiment_by_name("vidkd").experiment_id],
                                   "tags.`mlflow.runName` = 'pipeline'", order_by=["attributes.start_time ASC"])
    for name, precision in (("vidkd-student", "fp32"), ("vidkd-student-int4", "int4")):
        version = client.get_model_version_by_alias(name, "candidate")
        assert str(version.version) == "1"  # the re-run reused its stages and registered nothing new
        assert version.tags["vidkd.precision"] == precision
        assert version.tags["vidkd.pipeline_run"] == pipelines[0].info.run_id
        assert json.loads(version.tags["vidkd.teacher"])["kind"] == "vidkd"
        assert Path(version.tags["vidkd.feature_table"]).is_dir()
        assert client.get_run(version.run_id).data.tags["mlflow.runName"] == "quantize"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve in this store (the registry's default)
    fp32 = mlflow.pyfunc.load_model("models:/vidkd-student@candidate")
    assert [c.name for c in fp32.metadata.get_input_schema().inputs] == ["text", "frames", "frame_mask"]
    text = fp32.predict(pd.DataFrame({"text": ["a red car turning left at night", "a bus"]}))
    assert text.shape[0] == 2 and np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-4)
    rows = read_table(Path(version.tags["vidkd.feature_table"]), split="test", columns=["frames", "frame_mask"]).slice(0, 2)
    video = fp32.predict(pd.DataFrame({"frames": rows["frames"].to_pylist(), "frame_mask": rows["frame_mask"].to_pylist()}),
                         params={"frames_codec": "jpeg"})
    assert video.shape == (2, text.shape[1]) and np.allclose(np.linalg.norm(video, axis=1), 1, atol=1e-4)
    int4 = mlflow.pyfunc.load_model("models:/vidkd-student-int4@candidate")
    video_int4 = int4.predict(pd.DataFrame({"frames": rows["frames"].to_pylist(),
                                            "frame_mask": rows["frame_mask"].to_pylist()}), params={"frames_codec": "jpeg"})
    assert (video_int4 * video).sum(axis=1).min() > 0.9  # INT4 stays close to its fp32 student

    promoted = promote(uri, "vidkd-student-int4")
    assert promoted.version == "1"
    assert str(client.get_model_version_by_alias("vidkd-student-int4", "champion").version) == "1"
    with pytest.raises(ValueError, match="has no version 7"):
        promote(uri, "vidkd-student-int4", "7")


def test_index_is_incremental_and_search_ranks_by_the_students_text_tower(pipeline_run, monkeypatch):
    """The pipeline's index stage embedded the test videos with the INT4 student. `vidkd index`
    run again on it embeds only what is new or changed, keeps the rest, drops what left the
    manifest and records a bad file as a failure; another model rebuilds it. `vidkd search` ranks
    by cosine with the index's own student, through the CLI, with one-line errors."""
    import subprocess
    import sys

    import mlflow
    import pandas as pd

    from core.datasets import VideoRecord, read_manifest, write_manifest
    from core.index import VideoIndex, read_meta, search_index
    from jobs.index import run_index

    tmp, cfg, _, _ = pipeline_run
    monkeypatch.chdir(tmp)
    uri = f"sqlite:///{tmp / 'runs' / 'mlflow.db'}"
    out = Path(json.loads(next((tmp / "runs" / "stages").glob("index-*.json")).read_text())["index_dir"])
    built = read_meta(out)
    assert built.model == "models:/vidkd-student-int4/1" and built.model_version["version"] == "1"
    assert built.model_version["vidkd.precision"] == "int4" and built.videos == 6

    records = read_manifest(tmp / "data" / "manifest.jsonl")
    test = [r for r in records if r.split == "test"]
    query = test[0].captions[0]
    hits = search_index(out, query, k=3)
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].score >= hits[1].score >= hits[2].score
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    text = mlflow.pyfunc.load_model("models:/vidkd-student-int4/1").predict(pd.DataFrame({"text": [query]}))[0]
    index = VideoIndex.load(out)
    by_id = dict(zip(index.ids, index.embeddings))
    assert all(abs(h.score - float(by_id[h.video_id] @ text)) < 1e-4 for h in hits)  # cosine, the pyfunc's text
    assert {h.video_id for h in hits} <= {r.video_id for r in test}

    # again, with one file moved (a copy: the pipeline's own files stay as they are), one video
    # gone, one new, and one that cannot be decoded
    moved = tmp / "moved.mp4"
    moved.write_bytes(Path(test[0].path).read_bytes())
    broken = tmp / "broken.mp4"
    broken.write_bytes(b"not a video")
    new = next(r for r in records if r.split == "train")
    manifest = tmp / "to-index.jsonl"
    write_manifest([VideoRecord(test[0].video_id, str(moved), test[0].captions, "test")] + test[1:5]
                   + [new, VideoRecord("broken", str(broken), ["nothing"], "test")], manifest)
    second = run_index(cfg, "models:/vidkd-student-int4/1", manifest, out)
    assert (second.embedded, second.kept, second.meta.videos) == (2, 4, 6)
    assert [f["video_id"] for f in second.meta.failures] == ["broken"]
    assert set(VideoIndex.load(out).ids) == {r.video_id for r in test[:5] + [new]}

    rebuilt = run_index(cfg, "models:/vidkd-student@candidate", manifest, out)  # another model: all again
    assert (rebuilt.embedded, rebuilt.kept) == (6, 0) and rebuilt.meta.model_version["vidkd.precision"] == "fp32"

    root = Path(__file__).resolve().parent.parent
    cli = [sys.executable, "-m", "cluster.cli", "search", str(out)]
    done = subprocess.run(cli + [query, "-k", "3", "--sheet", str(tmp / "sheet.png")], capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["rank", "video_id", "score", "path"]
    assert [line.split()[0] for line in lines[1:4]] == ["1", "2", "3"]
    assert (tmp / "sheet.png").read_bytes()[:4] == b"\x89PNG"
    for args, message in (([" "], "the query is empty"), ([query, "-k", "0"], "-k 0"),
                          (["x"], "no video index at")):
        where = str(tmp / "nowhere") if message == "no video index at" else str(out)
        bad = subprocess.run([sys.executable, "-m", "cluster.cli", "search", where] + args, capture_output=True,
                             text=True, timeout=300, cwd=root)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_serve_searches_over_http_refuses_bad_requests_in_one_line_and_its_page_shows_thumbnails(pipeline_run):
    """`vidkd serve`'s application on the session's Ray: /healthz, /search (the same hits as
    `vidkd search`, also under concurrent requests that the text encoder batches), thumbnails,
    a 4xx with a one-line reason for each bad request, and the search page in headless Chromium
    showing a thumbnail for every hit."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.error import HTTPError
    from urllib.parse import urlencode

    from ray import serve

    from core.index import Searcher, VideoIndex
    from jobs import serve as server
    from tests.conftest import page_dom

    tmp = pipeline_run[0]
    out = Path(json.loads(next((tmp / "runs" / "stages").glob("index-*.json")).read_text())["index_dir"])
    index = VideoIndex.load(out)
    name = out.resolve().name
    url = server.start(server.ServedIndex.from_dirs([out]), port=free_port())

    def get(path: str, **params) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"{url}{path}" + (f"?{urlencode(params)}" if params else ""), timeout=60) as r:
                return r.status, r.read()
        except HTTPError as error:
            return error.code, error.read()

    try:
        assert json.loads(get("healthz")[1]) == {"status": "ok", "indexes": {name: len(index.ids)}}
        query = "a red car turning left at night"
        expected = Searcher(out).search(query, 3)
        status, body = get("search", q=query, k=3)
        answer = json.loads(body)
        assert status == 200 and answer["index"] == name and answer["k"] == 3
        assert [h["video_id"] for h in answer["hits"]] == [h.video_id for h in expected]
        assert all(abs(h["score"] - e.score) < 1e-4 and h["path"] == e.path for h, e in zip(answer["hits"], expected))
        with ThreadPoolExecutor(16) as pool:  # arrive together: the encoder answers them in shared batches
            answers = list(pool.map(lambda i: get("search", q=f"{query} {i % 4}", k=2), range(32)))
        assert all(s == 200 for s, _ in answers)
        assert len({b for s, b in answers}) == 4  # each query the same answer however it was batched

        for params, code, reason in (({"q": " ", "k": 3}, 400, "the query is empty"),
                                     ({"q": query, "k": 0}, 400, "k must be between 1 and"),
                                     ({"q": query, "k": "many"}, 400, "k must be a whole number"),
                                     ({"q": query, "index": "nope"}, 404, "unknown index 'nope'")):
            status, body = get("search", **params)
            assert status == code and reason in json.loads(body)["error"], body
            assert b"Traceback" not in body and len(json.loads(body)["error"].splitlines()) == 1
        status, body = get(f"thumbnail/{name}/no-such-video")
        assert status == 404 and "no video 'no-such-video'" in json.loads(body)["error"]
        status, jpeg = get(f"thumbnail/{name}/{expected[0].video_id}")
        assert status == 200 and jpeg[:2] == b"\xff\xd8"

        dom = page_dom(f"{url}?{urlencode({'q': query, 'k': 3})}", tmp / "chromium-serve")  # as the form submits it
        if dom is None:
            pytest.skip("chromium is not installed (make test installs it)")
        figures = re.findall(r'<figure class="hit"><img alt="([^"]+)" src="([^"]+)" data-loaded="(\d+)x(\d+)"', dom)
        assert [f[0] for f in figures] == [h.video_id for h in expected], dom[-2000:]
        assert all(int(w) > 0 and int(h) > 0 for _, _, w, h in figures)  # every thumbnail decoded in the browser
    finally:
        serve.delete(server.APP_NAME)
