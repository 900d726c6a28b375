"""The feature table: one row per video, the student's frames plus the teacher's embeddings.

Columns (see docs/feature_table.md for the measurements behind the encoding):

| column            | arrow type     | content                                         |
|-------------------|----------------|-------------------------------------------------|
| video_id          | string         | unique key                                      |
| split             | string         | train / val / test                              |
| frames            | binary         | raw uint8 [F, S, S, 3] at the student's size S  |
| frame_mask        | binary         | uint8 [F]; 1 = real frame, 0 = padding          |
| captions          | list<string>   | every caption of the video                      |
| teacher_frame_emb | binary or null | float16 [F, D]                                  |
| teacher_video_emb | binary or null | float16 [D]                                     |
| teacher_text_emb  | binary or null | float16 [C, D], one row per caption             |

Fixed-shape arrays are stored as raw little-endian bytes; their shapes (F, S, D) are in
`_vidkd_table.json` beside the Parquet files, with the teacher identity and code version.
Raw bytes decode with one `np.frombuffer` per batch, which is what the training loop wants.

A table directory is complete only when `_COMMITTED` exists; it is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
META_FILE = "_vidkd_table.json"
COMMIT_MARKER = "_COMMITTED"
FAILURES_FILE = "_failures.json"
STAGING_DIR = ".staging"  # under the cache dir: tables being written, one directory per job
STALE_STAGING_S = 24 * 3600

TEACHER_COLUMNS = ("teacher_frame_emb", "teacher_video_emb", "teacher_text_emb")
SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("split", pa.string()),
        ("frames", pa.binary()),
        ("frame_mask", pa.binary()),
        ("captions", pa.list_(pa.string())),
        ("teacher_frame_emb", pa.binary()),
        ("teacher_video_emb", pa.binary()),
        ("teacher_text_emb", pa.binary()),
    ]
)


@dataclass
class TableMeta:
    """What a table was built from; written beside the Parquet files."""

    num_frames: int
    image_size: int
    teacher: dict[str, Any]  # identity: kind, name, weights hash; {"kind": "none"} for frames only
    embed_dim: int | None = None
    cache_key: str = ""
    schema_version: int = SCHEMA_VERSION
    code_version: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    frames_codec: str = "raw"  # how the `frames` column is stored (a table older than the setting: raw)

    @property
    def has_teacher(self) -> bool:
        return self.teacher.get("kind", "none") != "none"


# ------------------------------------------------------------------------------ cache key
def cache_key(
    manifest_rows: Iterable[Mapping[str, Any]],
    teacher_identity: Mapping[str, Any],
    num_frames: int,
    image_size: int,
    frames_codec: str = "raw",
) -> str:
    """Content address of a table: the manifest's rows (ids, files, captions, splits), the
    teacher's identity including its weights hash, the frame sampling and how frames are stored
    (raw tables keep the keys they had before the codec was a setting)."""
    payload = {
        "rows": [dict(row) for row in manifest_rows],
        "teacher": dict(teacher_identity),
        "num_frames": num_frames,
        "image_size": image_size,
        "schema_version": SCHEMA_VERSION,
    }
    if frames_codec != "raw":
        payload["frames_codec"] = frames_codec
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


# ------------------------------------------------------------------------- encode / decode
def to_bytes(array: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def stack_bytes(column: Sequence[bytes], dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A column of equally shaped raw arrays -> one array [N, *shape]."""
    flat = np.frombuffer(bytearray().join(column), dtype=dtype)  # writable, so torch can take it as is
    return flat.reshape(len(column), *shape)


# The frames of a video, as stored (`ExtractConfig.frames_codec`): `raw` uint8 [F, S, S, 3], or
# `jpeg` (each frame a JPEG file at JPEG_QUALITY, after a little-endian uint32 header: the frame
# count, then each file's length).
JPEG_QUALITY = 90


def encode_frames(frames: np.ndarray, codec: str) -> bytes:
    """One video's frames uint8 [F, S, S, 3] -> the `frames` cell."""
    if codec == "raw":
        return to_bytes(frames, "uint8")
    import torch
    from torchvision.io import encode_jpeg

    files = [encode_jpeg(torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).contiguous(),
                         quality=JPEG_QUALITY).numpy().tobytes() for frame in frames]
    return np.array([len(files), *map(len, files)], "<u4").tobytes() + b"".join(files)


def decode_frames(column: Sequence[bytes], codec: str, shape: tuple[int, int, int, int]) -> np.ndarray:
    """A column of `frames` cells -> uint8 [N, F, S, S, 3]."""
    if codec == "raw":
        return stack_bytes(column, "uint8", shape)
    import torch
    from torchvision.io import decode_jpeg

    out = np.empty((len(column), *shape), np.uint8)
    for i, cell in enumerate(column):
        count = int(np.frombuffer(cell, "<u4", count=1)[0])
        lengths = np.frombuffer(cell, "<u4", count=count, offset=4)
        ends = 4 * (count + 1) + np.cumsum(lengths)
        files = [torch.frombuffer(bytearray(cell[end - n:end]), dtype=torch.uint8) for n, end in zip(lengths, ends)]
        out[i] = torch.stack(decode_jpeg(files)).permute(0, 2, 3, 1).numpy()
    return out


def text_emb_rows(column: Sequence[bytes], embed_dim: int) -> list[np.ndarray]:
    """teacher_text_emb: one [C_i, D] float16 array per video (videos differ in C_i)."""
    return [np.frombuffer(blob, dtype=np.float16).reshape(-1, embed_dim) for blob in column]


# --------------------------------------------------------------------------- directories
def is_committed(table_dir: str | Path) -> bool:
    return (Path(table_dir) / COMMIT_MARKER).exists()


def prepare_table_dir(table_dir: str | Path) -> bool:
    """True when a complete table is already there. Tables are written in a staging directory
    and moved into place whole, so a table directory without the commit marker can only be
    left by hand or by an older vidkd: it is removed so the caller rebuilds it. Staging
    directories of this key untouched for a day (killed jobs) are removed too."""
    table_dir = Path(table_dir)
    if is_committed(table_dir):
        return True
    if table_dir.exists():
        shutil.rmtree(table_dir)
    for stale in (table_dir.parent / STAGING_DIR).glob(f"{table_dir.name}-*"):
        newest = max([stale.stat().st_mtime] + [p.stat().st_mtime for p in stale.iterdir()])
        if time.time() - newest > STALE_STAGING_S:
            shutil.rmtree(stale, ignore_errors=True)
    return False


def staging_dir(table_dir: str | Path) -> Path:
    """Where this job writes the table before `commit_table` moves it to `table_dir`: its own
    directory on the same filesystem, so two jobs building the same table never share files."""
    table_dir = Path(table_dir)
    return table_dir.parent / STAGING_DIR / f"{table_dir.name}-{uuid.uuid4().hex[:12]}"


def commit_table(staging: str | Path, table_dir: str | Path, meta: TableMeta, failures: list[dict[str, str]]) -> bool:
    """Complete the table in `staging` (failures, metadata, commit marker) and move it to
    `table_dir` in one rename. False when another job committed the same key first: that
    table is the same, so this job's copy is dropped and the committed one is used."""
    staging, table_dir = Path(staging), Path(table_dir)
    (staging / FAILURES_FILE).write_text(json.dumps(failures, indent=1))
    (staging / META_FILE).write_text(json.dumps(asdict(meta), indent=1, sort_keys=True))
    (staging / COMMIT_MARKER).write_text(meta.cache_key + "\n")
    try:
        os.rename(staging, table_dir)
    except OSError:
        if not is_committed(table_dir):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False
    return True


def read_meta(table_dir: str | Path) -> TableMeta:
    table_dir = Path(table_dir)
    if not is_committed(table_dir):
        raise FileNotFoundError(f"no complete feature table at {table_dir} (no {COMMIT_MARKER})")
    return TableMeta(**json.loads((table_dir / META_FILE).read_text()))


def read_failures(table_dir: str | Path) -> list[dict[str, str]]:
    return json.loads((Path(table_dir) / FAILURES_FILE).read_text())


def read_table(table_dir: str | Path, split: str | None = None, columns: list[str] | None = None,
               video_ids: Sequence[str] | None = None) -> pa.Table:
    """The table (or one split, or some videos of it) as a pyarrow Table, read directly without
    Ray; rows are filtered while the files are scanned, so only the selected rows are held."""
    read_meta(table_dir)  # refuses partial tables
    keep = pc.field("split") == split if split else None
    if video_ids is not None:
        wanted = pc.field("video_id").isin(pa.array(list(video_ids), pa.string()))
        keep = wanted if keep is None else keep & wanted
    return pq.read_table(table_dir, columns=columns, filters=keep)


# --------------------------------------------------------------------------- batches
@dataclass
class FeatureBatch:
    """A decoded batch of table rows: what the training and evaluation loops consume."""

    video_ids: list[str]
    frames: np.ndarray  # uint8 [B, F, S, S, 3]
    frame_mask: np.ndarray  # uint8 [B, F]
    captions: list[list[str]]
    teacher_frame_emb: np.ndarray | None = None  # float16 [B, F, D]
    teacher_video_emb: np.ndarray | None = None  # float16 [B, D]
    teacher_text_emb: list[np.ndarray] | None = None  # B arrays of float16 [C_i, D]

    def __len__(self) -> int:
        return len(self.video_ids)


def decode_batch(columns: Mapping[str, Sequence[Any]], meta: TableMeta) -> FeatureBatch:
    """Turn a batch of table rows (a dict of columns, as Ray Data or pyarrow give them) into
    arrays. Teacher columns are decoded only when the table has a teacher; without a `frames`
    column (a read of the teacher's columns only) `frames` is an empty [B, 0] array."""
    f, s = meta.num_frames, meta.image_size
    n = len(columns["video_id"])
    batch = FeatureBatch(
        video_ids=[str(v) for v in columns["video_id"]],
        frames=decode_frames(columns["frames"], meta.frames_codec, (f, s, s, 3)) if "frames" in columns
        else np.zeros((n, 0), np.uint8),
        frame_mask=stack_bytes(columns["frame_mask"], "uint8", (f,)),
        captions=[list(c) for c in columns["captions"]],
    )
    if meta.has_teacher and meta.embed_dim:
        d = meta.embed_dim
        batch.teacher_frame_emb = stack_bytes(columns["teacher_frame_emb"], "float16", (f, d))
        batch.teacher_video_emb = stack_bytes(columns["teacher_video_emb"], "float16", (d,))
        batch.teacher_text_emb = text_emb_rows(columns["teacher_text_emb"], d)
    return batch


def arrow_to_columns(table: pa.Table) -> dict[str, list[Any]]:
    return {name: table.column(name).to_pylist() for name in table.column_names}


def table_batches(table_dir: str | Path, meta: TableMeta, split: str, batch_size: int = 64) -> "SplitBatches":
    """One split of a table, read without Ray, as decoded batches (evaluation reads test this way)."""
    return SplitBatches(str(table_dir), meta, split, batch_size)


@dataclass(frozen=True)
class SplitBatches:
    """One split of a table as decoded batches of `batch_size` rows, in the table's order,
    streamed: each pass scans the Parquet parts again and holds one batch at a time (decoded
    frames take several times their JPEG bytes: a 10k-video test split would not fit)."""

    table_dir: str
    meta: TableMeta
    split: str
    batch_size: int = 64

    def __iter__(self) -> Iterator[FeatureBatch]:
        import pyarrow.dataset as pads

        read_meta(self.table_dir)  # refuses partial tables
        scanner = pads.dataset(self.table_dir, format="parquet").scanner(
            filter=pc.field("split") == self.split, batch_size=self.batch_size)
        pending: list[pa.RecordBatch] = []
        rows = 0
        for record_batch in scanner.to_batches():
            pending.append(record_batch)
            rows += record_batch.num_rows
            while rows >= self.batch_size:
                table = pa.Table.from_batches(pending)
                yield decode_batch(arrow_to_columns(table.slice(0, self.batch_size)), self.meta)
                rest = table.slice(self.batch_size)
                pending, rows = rest.to_batches(), rest.num_rows
        if rows:
            yield decode_batch(arrow_to_columns(pa.Table.from_batches(pending)), self.meta)
