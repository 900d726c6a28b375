"""Stage 1 — extract: manifest rows -> decoded frames (CPU tasks) -> teacher embeddings (actor
pool, one GPU per actor where GPUs exist) -> the feature table.

    vidkd extract --config configs/demo.yaml

The table is written to Parquet under `<cache_dir>/<cache key>/` with a commit marker written
last; a re-run with the same key reuses it. Videos that cannot be decoded and rows without
captions become rows of the failures table; the job finishes with the rest.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from ray.data import Datasink
from ray.data.block import BlockAccessor

from core import features
from core.config import ExtractConfig, RayConfig, TeacherConfig, VidkdConfig
from core.datasets import SPLITS, VideoRecord, read_manifest
from core.features import SCHEMA, TableMeta, to_bytes
from core.locks import exclusive
from core.teachers import build_teacher, teacher_identity
from core.video import VideoDecodeError, decode_video, set_decoder_logging
from jobs.runtime import cluster_cpus, cluster_gpus, init_ray, verbose, want_gpu
from jobs.tables import read_table_dataset

if TYPE_CHECKING:  # the workers that run this module's UDFs never import MLflow
    from jobs.tracking import RunLogger

log = logging.getLogger("vidkd.extract")
CODE_VERSION = "vidkd-extract/1"


class TableSink(Datasink):
    """Writes the extract stage's rows as the table's Parquet files, in one pass that also
    splits off the failures: a row whose `error` column is set is not written but returned,
    with the video counts per split and the embedding width, to `on_write_complete` on the
    driver (as `failures`, `counts`, `embed_dim`). One file per write task, named by the task's
    index, so a retried task overwrites its own file. The commit marker is the caller's."""

    ERROR = "error"

    def __init__(self, table_dir: str | Path):
        self.table_dir = str(table_dir)
        self.failures: list[dict[str, str]] = []
        self.counts: dict[str, int] = {}
        self.embed_dim: int | None = None

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        Path(self.table_dir).mkdir(parents=True, exist_ok=True)

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        failures, counts, embed_dim, parts = [], {}, None, []
        for block in blocks:
            good, failed = split_failures(BlockAccessor.for_block(block).to_arrow())
            failures += failed
            if not good.num_rows:
                continue
            for split in good["split"].to_pylist():
                counts[split] = counts.get(split, 0) + 1
            if good["teacher_video_emb"].null_count < good.num_rows:
                embed_dim = len(pc.drop_null(good["teacher_video_emb"])[0].as_py()) // 2  # float16
            parts.append(good)
        if parts:
            pq.write_table(pa.concat_tables(parts), Path(self.table_dir) / f"part-{ctx.task_idx:06d}.parquet")
        return {"failures": failures, "counts": counts, "embed_dim": embed_dim}

    def on_write_complete(self, write_result: Any) -> None:
        for result in write_result.write_returns:
            self.failures.extend(result["failures"])
            for split, n in result["counts"].items():
                self.counts[split] = self.counts.get(split, 0) + n
            self.embed_dim = self.embed_dim or result["embed_dim"]


def split_failures(table: pa.Table) -> tuple[pa.Table, list[dict[str, str]]]:
    """The rows whose `error` is unset (without that column), and the others as failures: video
    id, reason and detail (the error reads "reason: detail")."""
    failed = pc.is_valid(table[TableSink.ERROR])
    bad = table.filter(failed)
    failures = []
    for video_id, error in zip(bad["video_id"].to_pylist(), bad[TableSink.ERROR].to_pylist()):
        reason, _, detail = error.partition(": ")
        failures.append({"video_id": video_id, "reason": reason, "detail": detail})
    return table.filter(pc.invert(failed)).drop_columns([TableSink.ERROR]), failures


_DECODED = pa.schema(list(SCHEMA) + [pa.field(TableSink.ERROR, pa.string())])
_WORK_LIST = pa.schema([("video_id", pa.string()), ("path", pa.string()), ("captions", pa.list_(pa.string())),
                        ("split", pa.string())])


class ExtractError(RuntimeError):
    """The stage cannot produce a table (for example: every input failed)."""


@dataclass
class ExtractResult:
    table_dir: Path
    meta: TableMeta
    failures: list[dict[str, str]]
    cache_hit: bool
    seconds: float = 0.0

    @property
    def num_videos(self) -> int:
        return sum(self.meta.counts.values())


# ------------------------------------------------------------------------- the two UDFs
def decode_rows(batch: pa.Table, num_frames: int, image_size: int, frames_codec: str) -> pa.Table:
    """CPU task: decode each video of the batch, its frames as the table stores them
    (`frames_codec`); a failure becomes the row's `error`."""
    torch.set_num_threads(1)
    set_decoder_logging(verbose())
    rows = []
    for row in batch.to_pylist():
        out = {
            "video_id": row["video_id"],
            "split": row["split"],
            "captions": row["captions"],
            "frames": None,
            "frame_mask": None,
            "teacher_frame_emb": None,
            "teacher_video_emb": None,
            "teacher_text_emb": None,
            TableSink.ERROR: None,
        }
        try:
            frames, mask = decode_video(row["path"], num_frames, image_size, video_id=row["video_id"])
            out["frames"] = features.encode_frames(frames, frames_codec)
            out["frame_mask"] = to_bytes(mask, "uint8")
        except VideoDecodeError as error:
            out[TableSink.ERROR] = f"{error.reason}: {error.detail or error}"  # the row names the video
        rows.append(out)
    return pa.Table.from_pylist(rows, schema=_DECODED)


class TeacherEncoder:
    """Actor: holds one teacher and fills the teacher columns of decoded rows. The teacher sees the
    frames as stored (`frames_codec`, decoded back): the frames the student and an online teacher
    will read from the table, so the cached teacher is the online one."""

    def __init__(self, teacher_cfg: dict, num_frames: int, image_size: int, use_gpu: bool, frames_codec: str):
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)  # a teacher without weights is initialised the same in every actor
        self.teacher = build_teacher(TeacherConfig(**teacher_cfg), device=self.device)
        self.num_frames, self.image_size, self.frames_codec = num_frames, image_size, frames_codec

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = pc.is_null(batch[TableSink.ERROR]).to_numpy(zero_copy_only=False)
        if not ok.any():
            return batch
        good = batch.filter(pa.array(ok))
        f, s = self.num_frames, self.image_size
        frames = torch.from_numpy(features.decode_frames(good["frames"].to_pylist(), self.frames_codec, (f, s, s, 3)))
        mask = torch.from_numpy(features.stack_bytes(good["frame_mask"].to_pylist(), "uint8", (f,)).copy())
        video_emb, frame_emb = self.teacher.encode_video(frames.to(self.device), mask.to(self.device))
        captions = good["captions"].to_pylist()
        text_emb = self.teacher.encode_text([c for caps in captions for c in caps]).float().cpu().numpy()
        bounds = np.cumsum([0] + [len(caps) for caps in captions])

        columns = {name: batch[name].to_pylist() for name in features.TEACHER_COLUMNS}
        video_np, frame_np = video_emb.float().cpu().numpy(), frame_emb.float().cpu().numpy()
        for j, i in enumerate(np.flatnonzero(ok)):
            columns["teacher_video_emb"][i] = to_bytes(video_np[j], "float16")
            columns["teacher_frame_emb"][i] = to_bytes(frame_np[j], "float16")
            columns["teacher_text_emb"][i] = to_bytes(text_emb[bounds[j] : bounds[j + 1]], "float16")
        for name, values in columns.items():
            batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, pa.binary()))
        return batch


# --------------------------------------------------------------------------- the stage
def manifest_rows(records: list[VideoRecord]) -> list[dict[str, Any]]:
    """The rows that define a table: ids, files (with size and mtime), captions, splits."""
    rows = []
    for r in records:
        path = Path(r.path)
        stat = path.stat() if path.exists() else None
        rows.append(
            {
                "video_id": r.video_id,
                "path": str(path),
                "file": [stat.st_size, int(stat.st_mtime)] if stat else None,
                "captions": list(r.captions),
                "split": r.split,
            }
        )
    return rows


def run_extract(
    cfg: VidkdConfig,
    records: list[VideoRecord] | None = None,
    teacher: TeacherConfig | None = None,
    run: RunLogger | None = None,
) -> ExtractResult:
    """Build (or reuse) the feature table for `records` (default: the config's manifest)."""
    ecfg: ExtractConfig = cfg.extract
    teacher = teacher or ecfg.teacher
    if records is None:
        records = read_manifest(cfg.data.manifest_path())
    rows = manifest_rows(records)
    identity = teacher_identity(teacher)
    key = features.cache_key(rows, identity, ecfg.num_frames, ecfg.image_size, ecfg.frames_codec)
    table_dir = Path(ecfg.cache_dir).resolve() / key
    if run:
        run.log_params(
            {
                "teacher": identity,
                "num_frames": ecfg.num_frames,
                "image_size": ecfg.image_size,
                "frames_codec": ecfg.frames_codec,
                "cache_key": key,
                "num_actors": ecfg.num_actors,
            }
        )

    # one job builds a table at a time: a second one asking for it waits, then reuses it
    with exclusive(table_dir.with_name(f".{key}.lock"), "extract"):
        if features.prepare_table_dir(table_dir):
            meta, failures = features.read_meta(table_dir), features.read_failures(table_dir)
            log.warning("extract: reusing the complete feature table %s (cache key %s)", table_dir, key)
            result = ExtractResult(table_dir, meta, failures, cache_hit=True)
        else:
            result = _build_table(ecfg, teacher, identity, rows, key, table_dir, cfg.ray)
    if run:
        _log_result(run, result)
    return result


WRITE_CONCURRENCY = 2
WORK_LIST_ROWS = 4096  # manifest rows per work-list file


def write_work_list(inputs: list[dict[str, Any]], directory: Path) -> Path:
    """The videos to extract as Parquet files beside the staging table (on the cache's shared
    filesystem, so every node reads them); removed with the staging table when a job dies."""
    directory.mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, len(inputs), WORK_LIST_ROWS)):
        pq.write_table(pa.Table.from_pylist(inputs[start : start + WORK_LIST_ROWS], schema=_WORK_LIST),
                       directory / f"inputs-{n:06d}.parquet")
    return directory


def read_work_list(directory: Path, num_blocks: int) -> Any:
    """The work list as a dataset of `num_blocks` blocks, read (and split) as the stream asks. The
    reads ask for no CPU, as the writes: on CPU the teacher's actors hold every CPU, and a read
    waiting for one would never start."""
    return read_table_dataset(directory, override_num_blocks=num_blocks, num_cpus=0)


def actor_pool_size(ecfg: ExtractConfig, use_gpu: bool, num_videos: int) -> int:
    """The configured number of teacher actors, else every GPU (or every CPU) the cluster has, and
    never more actors than there are batches to encode. On CPU each actor takes one CPU and Ray
    Data fuses decoding into it: every core decodes and encodes its own batches, no hand-off."""
    if ecfg.num_actors:
        return ecfg.num_actors
    if use_gpu:
        available = cluster_gpus()
    else:  # decode tasks asking for other than the actors' one CPU are not fused: leave them room
        available = cluster_cpus() - (0 if ecfg.decode_cpus == 1 else ecfg.decode_cpus)
    return max(1, min(int(available), -(-num_videos // ecfg.encode_batch_size)))


def _build_table(
    ecfg: ExtractConfig, teacher: TeacherConfig, identity: dict, rows: list[dict], key: str, table_dir: Path,
    ray_cfg: RayConfig,
) -> ExtractResult:
    start = time.perf_counter()
    failures = [{"video_id": r["video_id"], "reason": "no_captions", "detail": "the manifest gives it no caption"}
                for r in rows if not r["captions"]]
    inputs = [
        {"video_id": r["video_id"], "path": r["path"], "captions": r["captions"], "split": r["split"]}
        for r in rows
        if r["captions"]
    ]
    if not inputs:
        raise ExtractError("no video in the manifest has a caption")

    staging = features.staging_dir(table_dir)
    work_list = write_work_list(inputs, staging.with_name(staging.name + "-inputs"))
    init_ray(ray_cfg)
    use_gpu = want_gpu(ecfg.use_gpu)
    num_blocks = max(1, -(-len(inputs) // ecfg.decode_batch_size))
    # the manifest is read as a stream of work-list files (one decode batch a block), not put into
    # the object store whole, as `from_items` would: at millions of clips that is gigabytes
    ds = read_work_list(work_list, num_blocks).map_batches(
        decode_rows,
        fn_kwargs={"num_frames": ecfg.num_frames, "image_size": ecfg.image_size, "frames_codec": ecfg.frames_codec},
        batch_format="pyarrow",
        batch_size=ecfg.decode_batch_size,
        num_cpus=ecfg.decode_cpus,
    )
    if teacher.kind != "none":
        ds = ds.map_batches(
            TeacherEncoder,
            fn_constructor_kwargs={
                "teacher_cfg": teacher.model_dump(),
                "num_frames": ecfg.num_frames,
                "image_size": ecfg.image_size,
                "use_gpu": use_gpu,
                "frames_codec": ecfg.frames_codec,
            },
            compute=ray.data.ActorPoolStrategy(size=actor_pool_size(ecfg, use_gpu, len(inputs))),
            batch_format="pyarrow",
            batch_size=ecfg.encode_batch_size,
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1,
        )
    # One streaming pass: decoded, encoded, written, the failures split off; the object store holds
    # only the blocks in flight. The writes take no CPU of their own: on CPU the teacher's actors
    # hold every CPU, and a write waiting for one would let encoded blocks pile up. Two at a time:
    # a write is quick, and CPU-less tasks would otherwise each start a worker process of their own.
    sink = TableSink(staging)
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0}, concurrency=WRITE_CONCURRENCY)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work_list, ignore_errors=True)
    failures += sink.failures
    if not sink.counts:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExtractError(f"every video failed to decode ({len(failures)} failures; first: {failures[0]})")
    # train, val and test always (a consumer may look them up); pool where the manifest has one
    counts = {split: sink.counts.get(split, 0) for split in SPLITS if split != "pool" or sink.counts.get(split)}
    meta = TableMeta(
        num_frames=ecfg.num_frames,
        image_size=ecfg.image_size,
        teacher=identity,
        embed_dim=sink.embed_dim,
        cache_key=key,
        code_version=CODE_VERSION,
        counts=counts,
        frames_codec=ecfg.frames_codec,
    )
    if not features.commit_table(staging, table_dir, meta, failures):
        log.warning("extract: another job committed %s first; using that table", table_dir)
    seconds = time.perf_counter() - start
    log.warning(
        "extract: wrote %d videos (%d failures) to %s in %.1fs", sum(counts.values()), len(failures), table_dir, seconds
    )
    return ExtractResult(table_dir, meta, failures, cache_hit=False, seconds=seconds)


def _log_result(run: RunLogger, result: ExtractResult) -> None:
    metrics = {"videos": result.num_videos, "failures": len(result.failures), "cache_hit": int(result.cache_hit)}
    for split, count in result.meta.counts.items():
        metrics[f"videos_{split}"] = count
    if not result.cache_hit and result.seconds:
        metrics.update(wall_time_s=result.seconds, videos_per_s=result.num_videos / result.seconds)
    run.log_metrics(metrics)
    run.set_tags({"feature_table": str(result.table_dir)})
    run.log_dict({"failures": result.failures}, "failures.json")
    run.log_dict(asdict(result.meta), "feature_table.json")
