"""core.datasets: JSONL / CSV manifests and the MSRVTT annotation files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.datasets import VideoRecord, missing_videos, read_manifest, read_msrvtt, write_manifest


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jsonl(*rows: dict) -> list[str]:
    return [json.dumps(row) for row in rows]


def test_jsonl_relative_paths_resolve_against_manifest_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_lines(
        tmp_path / "data" / "manifest.jsonl",
        jsonl(
            {"video_id": "v1", "path": "videos/v1.mp4", "captions": ["a car turns left", "a turn"], "split": "train"},
            {"video_id": "v2", "path": "/elsewhere/v2.mp4", "captions": [], "split": "test"},
        )
        + [""],  # blank lines are fine
    )
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    records = read_manifest(Path("data/manifest.jsonl"))
    assert records == [
        VideoRecord("v1", str(tmp_path / "data" / "videos" / "v1.mp4"), ["a car turns left", "a turn"], "train"),
        VideoRecord("v2", "/elsewhere/v2.mp4", [], "test"),
    ]


def test_csv_rows_group_by_video(tmp_path):
    manifest = write_lines(
        tmp_path / "manifest.csv",
        [
            "video_id,path,caption,split",
            'v1,v1.mp4,"a truck, then a bus",train',
            "v2,v2.mp4,a pedestrian crosses,val",
            "v1,v1.mp4,rain at night,train",
            "v3,v3.mp4,,test",  # a video without captions is kept
        ],
    )
    records = read_manifest(manifest)
    assert [(r.video_id, r.captions, r.split) for r in records] == [
        ("v1", ["a truck, then a bus", "rain at night"], "train"),
        ("v2", ["a pedestrian crosses"], "val"),
        ("v3", [], "test"),
    ]
    assert records[0].path == str(tmp_path / "v1.mp4")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_write_then_read_round_trips(tmp_path, suffix):
    outside = tmp_path / "outside" / "x.mp4"
    records = [
        VideoRecord("v1", str(tmp_path / "set" / "videos" / "v1.mp4"), ["caption, with comma", 'quote "q"'], "train"),
        VideoRecord("v2", str(outside), [], "val"),
        VideoRecord("v3", str(tmp_path / "set" / "v3.mp4"), ["ünïcode"], "test"),
    ]
    path = write_manifest(records, tmp_path / "set" / f"manifest{suffix}")
    assert read_manifest(path) == records
    text = path.read_text(encoding="utf-8")
    assert "videos/v1.mp4" in text and str(tmp_path / "set") not in text  # relative under the folder
    assert str(outside) in text  # absolute outside it
    assert not path.with_name(path.name + ".tmp").exists()


def test_written_manifest_survives_moving_the_folder(tmp_path):
    write_manifest([VideoRecord("v1", str(tmp_path / "a" / "v1.mp4"), ["c"], "train")], tmp_path / "a" / "m.jsonl")
    (tmp_path / "a").rename(tmp_path / "b")
    assert read_manifest(tmp_path / "b" / "m.jsonl")[0].path == str(tmp_path / "b" / "v1.mp4")


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"video_id": "v1", "path": "v1.mp4", "captions": []}'], r":1: missing key\(s\): split"),
        (jsonl({"video_id": "v1", "path": "a.mp4", "captions": [], "split": "dev"}), r":1: split must be one of"),
        (
            jsonl(
                {"video_id": "v1", "path": "a.mp4", "captions": [], "split": "train"},
                {"video_id": "v2", "path": "b.mp4", "captions": [], "split": "train"},
                {"video_id": "v1", "path": "c.mp4", "captions": [], "split": "train"},
            ),
            r":3: video v1 has two paths",
        ),
        (
            jsonl(
                {"video_id": "v1", "path": "a.mp4", "captions": [], "split": "train"},
                {"video_id": "v1", "path": "a.mp4", "captions": [], "split": "test"},
            ),
            r":2: video v1 is in two splits",
        ),
        (['{"video_id": "v1", "path": "a.mp4",'], r":1: not valid JSON"),
        (jsonl({"video_id": "v1", "path": "a.mp4", "captions": "one", "split": "train"}), r":1: captions must be a list"),
        (jsonl({"video_id": "", "path": "a.mp4", "captions": [], "split": "train"}), r":1: video_id must be"),
        ([""], r"lists no videos"),
    ],
)
def test_bad_jsonl_is_one_line_error(tmp_path, lines, match):
    path = write_lines(tmp_path / "m.jsonl", lines)
    with pytest.raises(ValueError, match=match) as caught:
        read_manifest(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize(
    "lines, match",
    [
        (["video_id,path,split", "v1,a.mp4,train"], r":1: missing column\(s\): caption"),
        (["video_id,path,caption,split", "v1,a.mp4,c,train", "v1,b.mp4,d,train"], r":3: video v1 has two paths"),
        (["video_id,path,caption,split", "v1,a.mp4,c,Train"], r":2: split must be one of"),
        (["video_id,path,caption,split", "v1,a.mp4,c"], r":2: expected 4 cells"),
    ],
)
def test_bad_csv_is_one_line_error(tmp_path, lines, match):
    with pytest.raises(ValueError, match=match):
        read_manifest(write_lines(tmp_path / "m.csv", lines))


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown manifest format"):
        read_manifest(write_lines(tmp_path / "m.txt", ["x"]))


def test_a_directory_is_not_called_missing(tmp_path):
    (tmp_path / "set").mkdir()
    with pytest.raises(ValueError) as caught:
        read_manifest(tmp_path / "set")
    assert str(caught.value) == f"{tmp_path / 'set'} is a directory, not the manifest"
    write_lines(tmp_path / "set" / "manifest.jsonl", jsonl({"video_id": "v1", "path": "a.mp4", "captions": [],
                                                          "split": "train"}))
    with pytest.raises(ValueError, match=r"is a directory, not the manifest \(it holds manifest.jsonl\)$"):
        read_manifest(tmp_path / "set")


@pytest.mark.parametrize("suffix, header", [(".jsonl", b""), (".csv", b"video_id,path,caption,split\n")])
def test_bytes_that_are_not_utf8_are_named_by_line_and_column(tmp_path, suffix, header):
    good = (b'{"video_id": "v1", "path": "a.mp4", "captions": ["fine"], "split": "train"}\n' if suffix == ".jsonl"
            else b"v1,a.mp4,fine,train\n")
    bad = good.replace(b"v1", b"v2").replace(b"fine", b"caf\xe9")  # latin-1, as a spreadsheet may save it
    path = tmp_path / f"m{suffix}"
    path.write_bytes(header + good + bad)
    line = 3 if header else 2
    with pytest.raises(ValueError) as caught:
        read_manifest(path)
    assert str(caught.value) == (f"{path}:{line}: not UTF-8 text (byte 0xe9 at column {bad.index(0xe9) + 1}); "
                                 "save the file as UTF-8")


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"\xef\xbb\xbfvideo_id,path,caption,split\r\nv1,a.mp4,\"two\r\nlines\",train\r\n")
    assert read_manifest(path) == [VideoRecord("v1", str(tmp_path / "a.mp4"), ["two\r\nlines"], "train")]


def test_jsonl_video_listed_twice_is_an_error_csv_rows_merge(tmp_path):
    rows = [{"video_id": "v1", "path": "a.mp4", "captions": ["one"], "split": "train"},
            {"video_id": "v2", "path": "b.mp4", "captions": ["two"], "split": "train"},
            {"video_id": "v1", "path": "a.mp4", "captions": ["three"], "split": "train"}]
    path = write_lines(tmp_path / "m.jsonl", jsonl(*rows))
    with pytest.raises(ValueError) as caught:
        read_manifest(path)
    assert str(caught.value) == (f"{path}:3: video v1 is listed again (first on line 1): "
                                 "give each video one line, with all its captions")
    csv_path = write_manifest([VideoRecord("v1", str(tmp_path / "a.mp4"), ["one", "three"], "train")],
                              tmp_path / "m.csv")
    assert read_manifest(csv_path)[0].captions == ["one", "three"]  # one row per caption


def test_missing_videos_and_records_no_stage_could_use(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "dir.mp4").mkdir()
    here = VideoRecord("a", str(tmp_path / "a.mp4"), ["c"], "train")
    gone = VideoRecord("b", str(tmp_path / "b.mp4"), ["c"], "train")
    folder = VideoRecord("d", str(tmp_path / "dir.mp4"), ["c"], "train")
    assert missing_videos([here, gone, folder], "m.jsonl") == [gone, folder]
    with pytest.raises(ValueError) as caught:
        missing_videos([gone, folder], "m.jsonl")
    assert str(caught.value) == f"m.jsonl: none of its 2 video files exists as a file (the first: {gone.path})"
    with pytest.raises(ValueError, match=r"^m.jsonl: no video has a caption"):
        missing_videos([VideoRecord("a", here.path, [], "train")], "m.jsonl")


# ------------------------------------------------------------------------------------ MSRVTT
@pytest.fixture
def msrvtt(tmp_path) -> dict[str, Path]:
    """The three MSRVTT annotation files, in the formats of the official / CLIP4Clip release."""
    train_ids = [f"video{i}" for i in range(40)]
    test_ids = ["video7010", "video7020", "video7030"]
    sentences = []
    for vid in train_ids + test_ids:
        for k in range(3):  # 20 per video in the real file
            sentences.append({"caption": f"{vid} caption {k}", "video_id": vid, "sen_id": len(sentences)})
    sentences.reverse()  # captions are ordered by sen_id, not by file order
    data = {
        "info": {"year": 2016},
        "videos": [{"category": 9, "url": "https://youtube.com/x", "video_id": vid, "split": "train", "id": i}
                   for i, vid in enumerate(train_ids + test_ids)],
        "sentences": sentences,
    }
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    write_lines(tmp_path / "MSRVTT_train.9k.csv", ["video_id"] + train_ids)
    write_lines(
        tmp_path / "MSRVTT_JSFUSION_test.csv",
        ["key,vid_key,video_id,sentence"]
        + [f"ret{i},msr{vid[5:]},{vid},a test query about {vid}" for i, vid in enumerate(test_ids)],
    )
    return {
        "data_json": tmp_path / "MSRVTT_data.json",
        "train_csv": tmp_path / "MSRVTT_train.9k.csv",
        "test_csv": tmp_path / "MSRVTT_JSFUSION_test.csv",
        "video_dir": tmp_path / "videos",
    }


def test_msrvtt_splits_and_captions(msrvtt):
    records = read_msrvtt(**msrvtt, val_fraction=0.1, seed=0)
    by_id = {r.video_id: r for r in records}
    assert len(records) == 43
    assert [r.split for r in records].count("val") == 4 and [r.split for r in records].count("train") == 36
    assert by_id["video3"].captions == ["video3 caption 0", "video3 caption 1", "video3 caption 2"]
    assert by_id["video3"].path == str(msrvtt["video_dir"] / "video3.mp4")
    test = [r for r in records if r.split == "test"]
    assert [r.video_id for r in test] == ["video7010", "video7020", "video7030"]
    assert test[0].captions == ["a test query about video7010"]  # the 1k-A query only


def test_msrvtt_val_split_is_deterministic(msrvtt):
    def val_ids(**kw):
        return {r.video_id for r in read_msrvtt(**msrvtt, **kw) if r.split == "val"}

    assert val_ids(val_fraction=0.1, seed=0) == val_ids(val_fraction=0.1, seed=0)
    assert val_ids(val_fraction=0.1, seed=0) != val_ids(val_fraction=0.1, seed=1)
    assert val_ids(val_fraction=0.0) == set()


def test_msrvtt_bad_inputs(msrvtt, tmp_path):
    write_lines(msrvtt["train_csv"], ["video_id", "video1", "video7020"])
    with pytest.raises(ValueError, match=r"JSFUSION_test.csv:3: video video7020 is also a training video"):
        read_msrvtt(**msrvtt)
    write_lines(msrvtt["train_csv"], ["vid", "video1"])
    with pytest.raises(ValueError, match=r"train.9k.csv:1: missing column\(s\): video_id"):
        read_msrvtt(**msrvtt)
    with pytest.raises(FileNotFoundError, match="MSRVTT annotation file not found"):
        read_msrvtt(**{**msrvtt, "data_json": tmp_path / "nope.json"})
    with pytest.raises(ValueError, match="is a directory, not the MSRVTT annotation file"):
        read_msrvtt(**{**msrvtt, "data_json": tmp_path})
    write_lines(msrvtt["train_csv"], ["video_id", "video1"])
    msrvtt["test_csv"].write_bytes(b"key,vid_key,video_id,sentence\nret0,msr1,video7010,a caf\xe9\n")
    with pytest.raises(ValueError, match=r"JSFUSION_test.csv:2: not UTF-8 text \(byte 0xe9 at column 26\)"):
        read_msrvtt(**msrvtt)
    with pytest.raises(ValueError, match="val_fraction"):
        read_msrvtt(**msrvtt, val_fraction=1.0)
