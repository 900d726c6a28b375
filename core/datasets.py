"""Manifests: which videos there are, where their files are, their captions and split.

A manifest is the one input every stage reads. Two formats, picked by suffix:

- JSONL (`.jsonl`): one object per line,
  `{"video_id": "v1", "path": "videos/v1.mp4", "captions": ["a car turns left"], "split": "train"}`.
- CSV (`.csv`): header `video_id,path,caption,split`, one row per caption; rows with the same
  `video_id` are one video (their path and split must agree). One row per caption rather than
  captions joined by a separator, because captions may contain any character and spreadsheets
  and pandas write this shape without escaping rules of our own.

Relative paths resolve against the manifest's folder, so a dataset folder can be moved or
mounted elsewhere as a whole. Blank captions are dropped. A video may have no captions (an
empty list, or one CSV row with an empty `caption`): the manifest stays readable and the extract
stage records it as a failure. A JSONL manifest lists each video once: a repeated `video_id` is
an error, not a merge, since it is usually the same line pasted twice or two manifests joined.
Files are read as UTF-8 (a spreadsheet's leading byte-order mark is dropped). A missing file is a
`FileNotFoundError`; every other error is a `ValueError`; each is one line naming the file, and
the line number where there is one.

`read_msrvtt` turns the MSRVTT release (MSRVTT_data.json and the 9k / JSFusion-1k split files
that CLIP4Clip and its successors use) into the same records.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# pool: videos only a teacher trains on (its extra data, as real teachers are trained on far more
# than the target set); students never read them (distill.train_splits).
SPLITS = ("train", "val", "test", "pool")
CSV_COLUMNS = ("video_id", "path", "caption", "split")
JSONL_KEYS = ("video_id", "path", "captions", "split")
MANIFEST_SUFFIXES = (".jsonl", ".csv")


@dataclass
class VideoRecord:
    video_id: str
    path: str
    captions: list[str]
    split: str


def read_manifest(path: str | Path) -> list[VideoRecord]:
    """The videos of a JSONL or CSV manifest, in file order, paths made absolute."""
    path = Path(path)
    _check_file(path, "manifest", MANIFEST_SUFFIXES)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"{path}: unknown manifest format {path.suffix!r} (expected .jsonl or .csv)")
    builder = _RecordBuilder(path, merge_rows=suffix == ".csv")
    file = _open_text(path)
    if suffix == ".jsonl":
        _read_jsonl(file, builder)
    else:
        _read_csv(file, builder)
    if not builder.records:
        raise ValueError(f"{path}: the manifest lists no videos")
    return list(builder.records.values())


def missing_videos(records: list[VideoRecord], source: str | Path) -> list[VideoRecord]:
    """The records whose video file does not exist, which the extract stage records as failures.
    A `ValueError` instead when no stage could use `records` at all: not one video has a caption,
    or not one of the files exists (a manifest moved without its videos, a wrong video folder).
    `source` names the manifest or folder in the message."""
    if not any(record.captions for record in records):
        raise ValueError(f"{source}: no video has a caption (each needs at least one to be trained on)")
    missing = [record for record in records if not Path(record.path).is_file()]
    if len(missing) == len(records):
        raise ValueError(f"{source}: none of its {len(records)} video files exists as a file "
                         f"(the first: {records[0].path})")
    return missing


def write_manifest(records: Iterable[VideoRecord], path: str | Path) -> Path:
    """Write a JSONL manifest (or CSV, by suffix). Paths under the manifest's folder are written
    relative to it, so the folder stays relocatable; others stay absolute."""
    path = Path(path)
    folder = Path(os.path.abspath(path.parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(r.video_id, _relative_to(r.path, folder), list(r.captions), r.split) for r in records]
    tmp = path.with_name(path.name + ".tmp")  # readers never see a half-written manifest
    with tmp.open("w", newline="", encoding="utf-8") as file:
        if path.suffix.lower() == ".csv":
            writer = csv.writer(file)
            writer.writerow(CSV_COLUMNS)
            for video_id, video_path, captions, split in rows:
                for caption in captions or [""]:
                    writer.writerow([video_id, video_path, caption, split])
        else:
            for video_id, video_path, captions, split in rows:
                record = {"video_id": video_id, "path": video_path, "captions": captions, "split": split}
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_msrvtt(
    data_json: str | Path,
    train_csv: str | Path,
    test_csv: str | Path,
    video_dir: str | Path,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> list[VideoRecord]:
    """MSRVTT with the 9k train / 1k-A test protocol (CLIP4Clip, TeachCLIP, DLDKD).

    - `MSRVTT_data.json`: `sentences` holds the 20 captions of every video (`video_id`,
      `caption`, `sen_id`); training videos get all of theirs.
    - `MSRVTT_train.9k.csv` (column `video_id`): the training videos. A deterministic
      `val_fraction` of them (seeded shuffle) becomes the validation split.
    - `MSRVTT_JSFUSION_test.csv` (columns `key,vid_key,video_id,sentence`): the 1k test videos,
      each with the single sentence the 1k-A benchmark queries with.

    Files are `video_dir/<video_id>.mp4`; whether they exist is checked when they are decoded.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    data = _load_json(Path(data_json))
    train_rows = _csv_rows(Path(train_csv), ("video_id",))
    test_rows = _csv_rows(Path(test_csv), ("video_id", "sentence"))
    video_dir = Path(os.path.abspath(video_dir))

    captions: dict[str, list[tuple[int, str]]] = {}
    for sentence in data["sentences"]:
        captions.setdefault(sentence["video_id"], []).append((sentence.get("sen_id", 0), sentence["caption"]))

    train_ids: dict[str, int] = {}  # video_id -> line number, in file order
    for line_number, row in train_rows:
        if row["video_id"] in train_ids:
            raise ValueError(f"{train_csv}:{line_number}: video {row['video_id']} is listed twice")
        train_ids[row["video_id"]] = line_number
    for line_number, row in test_rows:
        if row["video_id"] in train_ids:
            raise ValueError(f"{test_csv}:{line_number}: video {row['video_id']} is also a training video")

    shuffled = sorted(train_ids)
    random.Random(seed).shuffle(shuffled)
    val_ids = set(shuffled[: round(len(shuffled) * val_fraction)])

    records = []
    for video_id in train_ids:
        video_captions = [caption for _, caption in sorted(captions.get(video_id, []))]
        split = "val" if video_id in val_ids else "train"
        records.append(VideoRecord(video_id, str(video_dir / f"{video_id}.mp4"), video_captions, split))
    test_records: dict[str, VideoRecord] = {}
    for _, row in test_rows:
        record = test_records.setdefault(
            row["video_id"], VideoRecord(row["video_id"], str(video_dir / f"{row['video_id']}.mp4"), [], "test")
        )
        record.captions.append(row["sentence"])
    return records + list(test_records.values())


# ----------------------------------------------------------------------------------- helpers
class _RecordBuilder:
    """Collects rows into records, checking that rows of one video agree; `merge_rows`: a video
    may take several rows (CSV, one per caption), else each video is one row (JSONL)."""

    def __init__(self, manifest: Path, merge_rows: bool):
        self.manifest = manifest
        self.folder = Path(os.path.abspath(manifest.parent))
        self.merge_rows = merge_rows
        self.records: dict[str, VideoRecord] = {}
        self.first_line: dict[str, int] = {}

    def error(self, line: int, message: str) -> ValueError:
        return ValueError(f"{self.manifest}:{line}: {message}")

    def add(self, line: int, video_id, video_path, captions: list, split) -> None:
        if not isinstance(video_id, str) or not video_id.strip():
            raise self.error(line, f"video_id must be a non-empty string, got {video_id!r}")
        if not isinstance(video_path, str) or not video_path.strip():
            raise self.error(line, f"path must be a non-empty string, got {video_path!r}")
        if split not in SPLITS:
            raise self.error(line, f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not all(isinstance(c, str) for c in captions):
            raise self.error(line, "captions must be strings")
        resolved = os.path.normpath(self.folder / Path(video_path).expanduser())
        captions = [c for c in captions if c.strip()]
        record = self.records.get(video_id)
        if record is None:
            self.records[video_id] = VideoRecord(video_id, resolved, captions, split)
            self.first_line[video_id] = line
            return
        if record.path != resolved:
            raise self.error(line, f"video {video_id} has two paths: {record.path} and {resolved}")
        if record.split != split:
            raise self.error(line, f"video {video_id} is in two splits: {record.split} and {split}")
        if not self.merge_rows:
            raise self.error(line, f"video {video_id} is listed again (first on line {self.first_line[video_id]}): "
                                   "give each video one line, with all its captions")
        record.captions.extend(captions)


def _read_jsonl(file, builder: _RecordBuilder) -> None:
    for line_number, line in enumerate(file, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise builder.error(line_number, f"not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise builder.error(line_number, "expected a JSON object")
        missing = [key for key in JSONL_KEYS if key not in row]
        if missing:
            raise builder.error(line_number, f"missing key(s): {', '.join(missing)}")
        if not isinstance(row["captions"], list):
            raise builder.error(line_number, "captions must be a list of strings")
        builder.add(line_number, row["video_id"], row["path"], row["captions"], row["split"])


def _read_csv(file, builder: _RecordBuilder) -> None:
    reader = csv.DictReader(file)
    missing = [column for column in CSV_COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise builder.error(1, f"missing column(s): {', '.join(missing)} (expected {','.join(CSV_COLUMNS)})")
    for row in reader:
        if None in row.values() or None in row:  # a row with fewer or more cells than the header
            raise builder.error(reader.line_num, f"expected {len(reader.fieldnames)} cells")
        caption = row["caption"]
        builder.add(reader.line_num, row["video_id"], row["path"], [caption] if caption else [], row["split"])


def _check_file(path: Path, what: str, suffixes: tuple[str, ...]) -> None:
    """One line saying what is wrong when `path` is not a file; `what` names it. A directory's
    files of the expected `suffixes` are named: the one meant is likely among them."""
    if path.is_dir():
        inside = sorted(child.name for child in path.iterdir() if child.suffix.lower() in suffixes)
        holds = f" (it holds {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''})" if inside else ""
        raise ValueError(f"{path} is a directory, not the {what}{holds}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def _open_text(path: Path) -> io.StringIO:
    """The file as UTF-8 text, lines split as `open(newline="")` splits them. A byte that is not
    UTF-8 is reported by line and column (the decoder itself gives only an offset into the file)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return io.StringIO(data.decode("utf-8"), newline="")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line, column = data.count(b"\n", 0, error.start) + 1, error.start - line_start + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}); "
                         "save the file as UTF-8") from None


def _relative_to(video_path: str, folder: Path) -> str:
    absolute = Path(os.path.abspath(video_path))  # abspath, not resolve: keep symlinked folders
    return absolute.relative_to(folder).as_posix() if absolute.is_relative_to(folder) else str(absolute)


def _load_json(path: Path) -> dict:
    _check_file(path, "MSRVTT annotation file", (".json",))
    try:
        data = json.load(_open_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise ValueError(f"{path}: expected an object with a `sentences` list (MSRVTT_data.json)")
    for index, sentence in enumerate(data["sentences"]):
        if not isinstance(sentence, dict) or "video_id" not in sentence or "caption" not in sentence:
            raise ValueError(f"{path}: sentences[{index}] needs `video_id` and `caption`")
    return data


def _csv_rows(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for each row, checking `columns` exist and are filled."""
    _check_file(path, "MSRVTT split file", (".csv",))
    reader = csv.DictReader(_open_text(path))
    missing = [column for column in columns if column not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}:1: missing column(s): {', '.join(missing)}")
    rows = []
    for row in reader:
        if any(not row.get(column) for column in columns):
            raise ValueError(f"{path}:{reader.line_num}: empty {' or '.join(columns)}")
        rows.append((reader.line_num, row))
    return rows
