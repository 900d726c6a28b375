"""A video index: a collection's student embeddings, searchable by a text embedding.

An index directory holds
- `embeddings.parquet`: one row per video (video_id, path, the file's size and mtime when it was
  embedded, and its L2-normalised float32 embedding);
- `index.json`: the model that built it (its source, and for a registered model its name,
  version, run and lineage), the embedding width, the frame sampling, the videos that failed;
- `model/`: a copy of that student, so that searching needs neither MLflow nor the registry;
- `hnsw.faiss`, for a collection of at least `exact_below` videos: a faiss HNSW graph over the
  same embeddings (`AnnIndex`).

Search is exact below that size (a matrix product over every embedding and a partial sort) and
approximate above it, where the exact search's time grows with the collection and the graph's
barely does; `bench/ann.py` measured where to switch (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.config_deploy import EXACT_BELOW

EMBEDDINGS_FILE = "embeddings.parquet"
META_FILE = "index.json"
MODEL_DIR = "model"
ANN_FILE = "hnsw.faiss"
SCHEMA = pa.schema([("video_id", pa.string()), ("path", pa.string()), ("size", pa.int64()), ("mtime", pa.int64()),
                    ("embedding", pa.list_(pa.float32()))])


@dataclass
class IndexMeta:
    model: str  # what the user gave: a models:/ URI or a path
    model_version: dict[str, str]  # name, version, run_id, lineage tags; for a path, its size and mtime_ns
    model_path: str  # the student's copy, relative to the index directory
    embed_dim: int
    num_frames: int
    image_size: int
    videos: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    search: str = "exact"  # or "hnsw": the index has an AnnIndex

    def model_identity(self) -> tuple:
        """A registered student by name and version (whatever alias named it), a local one by its
        path and the stamp of its files (a checkpoint written again is another model)."""
        if "name" in self.model_version:
            return self.model_version["name"], self.model_version["version"]
        return self.model, self.model_version.get("size"), self.model_version.get("mtime_ns")

    def same_model(self, other: "IndexMeta") -> bool:
        return self.model_identity() == other.model_identity()


def file_stamp(path: str | Path) -> tuple[int, int]:
    """(size, mtime in ns) of a file, or of a directory's files (total size, latest mtime): a
    changed video gets embedded again, a changed student rebuilds the index."""
    path = Path(path)
    if path.is_dir():
        stats = [p.stat() for p in path.rglob("*") if p.is_file()]
        return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def read_meta(index_dir: str | Path) -> IndexMeta:
    path = Path(index_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no video index at {index_dir} (no {META_FILE}): build one with `vidkd index`")
    return IndexMeta(**json.loads(path.read_text()))


def read_rows(index_dir: str | Path) -> pa.Table:
    path = Path(index_dir) / EMBEDDINGS_FILE
    return pq.read_table(path) if path.is_file() else SCHEMA.empty_table()


def write_index(index_dir: str | Path, rows: pa.Table, meta: IndexMeta, exact_below: int = EXACT_BELOW) -> None:
    """The rows, the HNSW graph when there are at least `exact_below` of them, and the metadata,
    each replaced whole (written beside, then renamed; the metadata last): a reader never sees
    half an index, and a job that dies leaves the previous one."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    meta.videos = rows.num_rows
    staged = index_dir / f".{EMBEDDINGS_FILE}.tmp"
    pq.write_table(rows.cast(SCHEMA), staged)
    os.replace(staged, index_dir / EMBEDDINGS_FILE)
    meta.search = "hnsw" if rows.num_rows >= exact_below else "exact"
    if meta.search == "hnsw":
        AnnIndex.build(embeddings_array(rows, meta.embed_dim)).write(index_dir / ANN_FILE)
    else:
        (index_dir / ANN_FILE).unlink(missing_ok=True)
    staged_meta = index_dir / f".{META_FILE}.tmp"
    staged_meta.write_text(json.dumps(asdict(meta), indent=1))
    os.replace(staged_meta, index_dir / META_FILE)


class AnnIndex:
    """An approximate nearest-neighbour index: faiss HNSW, inner product over L2-normalised
    embeddings (so, cosine). M 32 and efSearch 128: recall@10 against exact search in
    docs/benchmarks.md."""

    M, EF_CONSTRUCTION, EF_SEARCH = 32, 80, 128
    MAX_K = EF_SEARCH // 2  # larger k: exact search

    def __init__(self, index: Any):
        self.index = index
        self.index.hnsw.efSearch = self.EF_SEARCH

    @classmethod
    def build(cls, embeddings: np.ndarray) -> "AnnIndex":
        import faiss

        embeddings = np.ascontiguousarray(embeddings, np.float32)
        index = faiss.IndexHNSWFlat(embeddings.shape[1], cls.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cls.EF_CONSTRUCTION
        index.add(embeddings)
        return cls(index)

    @classmethod
    def read(cls, path: str | Path) -> "AnnIndex":
        import faiss

        return cls(faiss.read_index(str(path)))

    def write(self, path: str | Path) -> None:
        import faiss

        staged = Path(path).with_name(f".{Path(path).name}.tmp")
        faiss.write_index(self.index, str(staged))
        os.replace(staged, path)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers and cosines of (about) the `k` nearest rows to the normalised `query`."""
        scores, rows = self.index.search(np.ascontiguousarray(query.reshape(1, -1), np.float32), k)
        found = rows[0] >= 0
        return rows[0][found], scores[0][found]


def embeddings_array(rows: pa.Table, dim: int) -> np.ndarray:
    """The embedding column as float32 [N, dim]."""
    if rows.num_rows == 0:
        return np.zeros((0, dim), np.float32)
    values = rows.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, np.float32).reshape(rows.num_rows, dim)


@dataclass
class Hit:
    rank: int
    video_id: str
    score: float
    path: str


@dataclass
class VideoIndex:
    """An index loaded for search."""

    directory: Path
    meta: IndexMeta
    ids: list[str]
    paths: list[str]
    embeddings: np.ndarray  # float32 [N, D], rows L2-normalised
    ann: AnnIndex | None = None  # searched instead of the matrix product, when the index has one

    @classmethod
    def load(cls, index_dir: str | Path) -> "VideoIndex":
        meta = read_meta(index_dir)
        rows = read_rows(index_dir)
        ann = None
        if meta.search == "hnsw" and (Path(index_dir) / ANN_FILE).is_file():
            ann = AnnIndex.read(Path(index_dir) / ANN_FILE)
            if ann.size != rows.num_rows:  # written by another build than the rows: exact, not wrong
                ann = None
        return cls(Path(index_dir), meta, rows.column("video_id").to_pylist(), rows.column("path").to_pylist(),
                   embeddings_array(rows, meta.embed_dim), ann)

    @property
    def model_path(self) -> Path:
        return self.directory / self.meta.model_path

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        """The `k` videos most similar (cosine) to the text embedding `query` [D], best first."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        query = np.asarray(query, np.float32).reshape(-1)
        if query.shape[0] != self.embeddings.shape[1]:
            raise ValueError(f"the query has {query.shape[0]} dimensions, the index {self.embeddings.shape[1]}")
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        if self.ann is not None and k <= AnnIndex.MAX_K:  # beyond, the graph may miss some: exact
            rows, cosines = self.ann.search(query, min(k, len(self.ids)))
            return [Hit(rank + 1, self.ids[i], float(c), self.paths[i]) for rank, (i, c) in enumerate(zip(rows, cosines))]
        scores = self.embeddings @ query
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(rank + 1, self.ids[i], float(scores[i]), self.paths[i]) for rank, i in enumerate(top)]


def normalise(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, np.float32)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)


def plan_update(existing: pa.Table, wanted: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], pa.Table]:
    """What an incremental build must embed, and what it keeps: `wanted` rows (video_id, path,
    size, mtime) that are new or whose file changed (another path, size or mtime), and the
    existing rows still wanted unchanged. Rows no longer wanted are dropped."""
    old = {vid: (path, size, mtime) for vid, path, size, mtime in zip(
        *(existing.column(name).to_pylist() for name in ("video_id", "path", "size", "mtime")))}
    todo = [row for row in wanted if old.get(row["video_id"]) != (row["path"], row["size"], row["mtime"])]
    unchanged = {row["video_id"] for row in wanted} - {row["video_id"] for row in todo}
    keep = existing.filter(pa.array([vid in unchanged for vid in existing.column("video_id").to_pylist()], pa.bool_()))
    return todo, keep


class Searcher:
    """An index with its own student loaded, for any number of text queries."""

    def __init__(self, index_dir: str | Path, kernel: str = "auto"):
        from core.student import load_student_model

        self.index = VideoIndex.load(index_dir)
        self.student = load_student_model(self.index.model_path, kernel=kernel)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The `k` videos nearest to `query`, by the index's own student's text tower."""
        import torch

        if not query.strip():
            raise ValueError("the query is empty")
        with torch.no_grad():
            text = self.student.encode_text([query]).float().numpy()[0]
        return self.index.search(text, k)


def search_index(index_dir: str | Path, query: str, k: int = 5, kernel: str = "auto") -> list[Hit]:
    """One query: `Searcher(index_dir).search(query, k)`, the query checked before anything loads."""
    if not query.strip():
        raise ValueError("the query is empty")
    return Searcher(index_dir, kernel).search(query, k)
