"""Index a video collection with a student, and search it by text.

    vidkd index --model models:/vidkd-student-int4@champion --manifest videos.jsonl --out runs/index
    vidkd search runs/index "a red car turning left at night" -k 5 [--sheet hits.png]

Indexing is a Ray Data job on extract's decode path (the same decode tasks, the student's frame
sampling and resolution) feeding an actor pool that holds the student. It is incremental: a video
already in the index with the same path, size and mtime, embedded by the same model version, is
kept; new and changed videos are embedded; videos gone from the manifest are dropped. A model
other than the index's rebuilds it. Search (`core.index.search_index`) needs no Ray and no MLflow:
the index carries a copy of its student.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from core import features
from core.config import VidkdConfig, digest
from core.datasets import VideoRecord, read_manifest
from core.index import MODEL_DIR, SCHEMA, IndexMeta, file_stamp, normalise, plan_update, read_rows
from core.index import read_meta as read_index_meta
from core.index import write_index
from core.student import load_student_model
from jobs.extract import TableSink, decode_rows, read_work_list, split_failures, write_work_list
from jobs.registry import ResolvedModel, resolve_model
from jobs.runtime import cluster_cpus, import_quant_backend, init_ray
from jobs.tracking import tracking_uri

log = logging.getLogger("vidkd.index")
FRAMES_CODEC = "raw"  # frames go straight from the decode task to the student: nothing is stored


class StudentEncoder:
    """Actor: holds the student and embeds decoded clips; a failed decode passes through."""

    def __init__(self, model_path: str, kernel: str):
        torch.set_num_threads(1)
        if Path(model_path).is_dir():  # an INT4 student: gptqmodel's import banner only at --verbose
            import_quant_backend()
        self.student = load_student_model(model_path, kernel=kernel)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = pc.is_null(batch[TableSink.ERROR]).to_numpy(zero_copy_only=False)
        embeddings: list[Any] = [None] * batch.num_rows
        if ok.any():
            good = batch.filter(pa.array(ok))
            f, s = self.student.num_frames, self.student.image_size
            frames = features.decode_frames(good["frames"].to_pylist(), FRAMES_CODEC, (f, s, s, 3))
            mask = features.stack_bytes(good["frame_mask"].to_pylist(), "uint8", (f,))
            with torch.no_grad():
                video = self.student.encode_video(torch.from_numpy(frames), torch.from_numpy(mask.copy())).video_emb
            for j, i in enumerate(np.flatnonzero(ok)):
                embeddings[i] = normalise(video[j].float().numpy()).tolist()
        return pa.table({"video_id": batch["video_id"], "embedding": pa.array(embeddings, pa.list_(pa.float32())),
                         TableSink.ERROR: batch[TableSink.ERROR]})


@dataclass
class IndexResult:
    index_dir: Path
    meta: IndexMeta
    embedded: int  # videos embedded by this run (the rest were kept)
    kept: int
    seconds: float


def run_index(cfg: VidkdConfig, model: str, manifest: str | Path | None, out: str | Path, kernel: str = "auto",
              batch_size: int = 16, records: list[VideoRecord] | None = None) -> IndexResult:
    """Build or update the index at `out` for the videos of `manifest` (or `records`) with the
    student `model`."""
    start = time.perf_counter()
    out = Path(out).resolve()
    records = read_manifest(manifest) if records is None else records
    resolved = resolve_model(model, tracking_uri(cfg.tracking, cfg.output_dir), out / ".incoming")
    student = load_student_model(resolved.path, kernel=kernel)
    meta = IndexMeta(model, resolved.version, "", student.embed_dim, student.num_frames, student.image_size)
    previous = _previous(out, meta)
    existing = read_rows(out) if previous else SCHEMA.empty_table()
    meta.model_path = _keep_model(out, resolved)
    wanted = [{"video_id": r.video_id, "path": r.path, "captions": r.captions, "split": r.split,
               **dict(zip(("size", "mtime"), file_stamp(r.path) if Path(r.path).is_file() else (-1, -1)))}
              for r in records]
    todo, keep = plan_update(existing, wanted)
    embedded, failures = _embed(cfg, todo, out, meta.model_path, kernel, batch_size, student) if todo else (None, [])
    added = SCHEMA.empty_table()
    if embedded is not None and embedded.num_rows:
        stamps = {row["video_id"]: row for row in todo}
        ids = embedded.column("video_id").to_pylist()
        added = pa.table({"video_id": ids, "path": [stamps[i]["path"] for i in ids],
                          "size": [stamps[i]["size"] for i in ids], "mtime": [stamps[i]["mtime"] for i in ids],
                          "embedding": embedded.column("embedding")}, schema=SCHEMA)
    meta.failures = failures
    write_index(out, pa.concat_tables([keep.cast(SCHEMA), added]), meta, cfg.index.exact_below)
    _drop_other_models(out, meta.model_path)
    seconds = time.perf_counter() - start
    log.warning("index: %d videos in %s (%d embedded, %d kept, %d failed) in %.1fs", meta.videos, out, added.num_rows,
                keep.num_rows, len(failures), seconds)
    return IndexResult(out, meta, added.num_rows, keep.num_rows, seconds)


def _previous(out: Path, meta: IndexMeta) -> IndexMeta | None:
    """The index already at `out`, when it was built by the same model (else it is rebuilt)."""
    try:
        previous = read_index_meta(out)
    except FileNotFoundError:
        return None
    if previous.same_model(meta):
        return previous
    log.warning("index: %s was built by %s; rebuilding it with %s", out, previous.model, meta.model)
    return None


def _keep_model(out: Path, resolved: ResolvedModel) -> str:
    """The index's own copy of its student (relative to `out`), in a folder named by the model's
    identity: a rebuild by another model writes beside the old copy, which the old index still
    names until the new one is written whole (`_drop_other_models`)."""
    identity = IndexMeta(resolved.source, resolved.version, "", 0, 0, 0).model_identity()
    target = out / MODEL_DIR / digest(list(identity), 12) / resolved.path.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if resolved.path.is_dir() else shutil.copy2
        copy(resolved.path, target)
    shutil.rmtree(out / ".incoming", ignore_errors=True)
    return str(target.relative_to(out))


def _drop_other_models(out: Path, model_path: str) -> None:
    keep = (out / model_path).parent
    for folder in (out / MODEL_DIR).iterdir():
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)


def _embed(cfg: VidkdConfig, todo: list[dict], out: Path, model_path: str, kernel: str, batch_size: int,
           student: Any) -> tuple[pa.Table | None, list[dict[str, str]]]:
    """The student's embeddings of the `todo` videos, through Ray Data, and the decode failures."""
    init_ray(cfg.ray)
    work_list = write_work_list([{k: row[k] for k in ("video_id", "path", "captions", "split")} for row in todo],
                                out / ".work-list")
    try:
        ds = read_work_list(work_list, max(1, -(-len(todo) // batch_size))).map_batches(
            decode_rows, fn_kwargs={"num_frames": student.num_frames, "image_size": student.image_size,
                                    "frames_codec": FRAMES_CODEC},
            batch_format="pyarrow", batch_size=batch_size,
        ).map_batches(
            StudentEncoder, fn_constructor_kwargs={"model_path": str(out / model_path), "kernel": kernel},
            compute=ray.data.ActorPoolStrategy(size=max(1, min(cluster_cpus(), -(-len(todo) // batch_size)))),
            batch_format="pyarrow", batch_size=batch_size, num_cpus=1,
        )
        parts, failures = [], []
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            good, failed = split_failures(batch)
            parts.append(good)
            failures += failed
    finally:
        shutil.rmtree(work_list, ignore_errors=True)
    return (pa.concat_tables(parts) if parts else None), failures
