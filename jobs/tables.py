"""A feature table as the trainings read it: its splits held in the object store when the table
fits there, else streamed from its Parquet parts every epoch.

Held, a split is read once and kept (Tune's trials and the pipeline's distill share it), and its
blocks come in a new order each epoch. Streamed, nothing of the table stays in the object store
but a bounded read-ahead (`distill.stream_buffer_mib`): its files come in a new order each epoch
(extract writes one part per write task, a few batches of videos each, so a large table has
many). Either way a local buffer mixes the rows further (`jobs.trainer.iter_feature_batches`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray

from core.config import DistillConfig

log = logging.getLogger("vidkd.tables")

# A table is held when it takes at most this share of the object store: the rest is for the
# blocks in flight, the checkpoints and whatever else the job puts there, below the level (80 %
# by default) at which Ray starts spilling to disk.
HOLD_FRACTION = 0.5
Placement = Literal["auto", "object_store", "stream"]


def read_table_dataset(table_dir: str | Path, **read_args: Any) -> Any:
    """A directory of Parquet parts (a feature table, extract's work list) as one Ray Dataset.
    Through Ray Data's first Parquet reader unless $RAY_DATA_USE_DATASOURCE_V2 says otherwise:
    Ray 2.60's DataSourceV2 lists the files in a task of its own that waits about 3 s for its
    thread pool whatever the table's size (0.6 s against 3.3 s for a 40-video table here), and a
    training reads its table once per split. The reader's sampling of a few files shows no bar:
    it takes a moment."""
    from ray.data import DataContext

    context = DataContext.get_current()
    previous = context.use_datasource_v2, context.enable_progress_bars
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        context.use_datasource_v2 = False
    context.enable_progress_bars = False
    try:
        return ray.data.read_parquet(str(table_dir), file_extensions=["parquet"], **read_args)
    finally:
        context.use_datasource_v2, context.enable_progress_bars = previous


def shuffled_blocks(train: Any, seed: int) -> Any:
    """A held split with its blocks in a new order every epoch, reproducible from the seed.
    A table is in manifest order (for driving data: consecutive clips of one drive) and the local
    shuffle buffer mixes only a few batches, so without this a batch's negatives would come from
    one stretch of the manifest, the same stretch every epoch. (On a dataset that is not
    materialized this is an all-to-all step that holds the whole split: streamed splits shuffle
    their files instead.)"""
    return train.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))


def table_bytes(table_dir: str | Path) -> int:
    """The table's Parquet parts on disk. Its frames (JPEG or raw) and float16 embeddings barely
    compress, so this is close to what its rows take in the object store."""
    return sum(entry.stat().st_size for entry in os.scandir(table_dir) if entry.name.endswith(".parquet"))


@dataclass(frozen=True)
class TablePlacement:
    """Where a training keeps a table, and why."""

    held: bool
    table_bytes: int
    store_bytes: int
    setting: str

    @classmethod
    def decide(cls, table_bytes: int, store_bytes: int, setting: str) -> "TablePlacement":
        held = setting == "object_store" or (setting == "auto" and table_bytes <= HOLD_FRACTION * store_bytes)
        return cls(held, table_bytes, store_bytes, setting)

    def params(self) -> dict[str, Any]:
        return {"table_placement": "object_store" if self.held else "stream", "table_bytes": self.table_bytes,
                "object_store_bytes": self.store_bytes}

    def describe(self) -> str:
        where = "held in the object store" if self.held else "streamed from Parquet every epoch"
        why = (f"{self.table_bytes / 2**20:.1f} MiB against an object store of {self.store_bytes / 2**20:.0f} MiB"
               if self.setting == "auto" else f"table_placement: {self.setting}")
        return f"feature table {where} ({why})"


def place_table(table_dir: str | Path, setting: Placement) -> TablePlacement:
    """Hold the table when the setting says so, or (`auto`) when it fits the object store of the
    cluster this driver is connected to."""
    store = int(ray.cluster_resources().get("object_store_memory", 0))
    return TablePlacement.decide(table_bytes(table_dir), store, setting)


@dataclass
class TableSplits:
    """A table's train, val and test splits for the trainings of one job. `train(seed)` is the
    train split ("train" holds the rows of `train_splits`) in a new order every epoch. Streamed,
    a split reads ahead at most `buffer_bytes` of the table."""

    table_dir: str
    train_splits: list[str]
    placement: TablePlacement
    buffer_bytes: int
    held: dict[str, Any] = field(default_factory=dict)  # name -> materialized split, when held

    def execution_options(self) -> Any:
        """Ray Data's options for reading these splits (Ray Train applies them to its shards): rows
        in the order of the plan, not in the order its tasks finish, so that a training is the same
        again from its seed; streamed, also the read-ahead bound."""
        from ray.data import ExecutionResources
        from ray.train import DataConfig

        options = DataConfig.default_ingest_options()
        options.preserve_order = True
        if not self.placement.held:
            options.resource_limits = ExecutionResources(object_store_memory=self.buffer_bytes)
        return options

    def train(self, seed: int) -> Any:
        if self.placement.held:
            return shuffled_blocks(self.held["train"], seed)
        shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True)
        return self._read(self.train_splits, shuffle=shuffle)

    def split(self, name: Literal["val", "test"]) -> Any:
        return self.held[name] if self.placement.held else self._read([name])

    def _read(self, splits: list[str], **read_args: Any) -> Any:
        from ray.data.expressions import col

        table = read_table_dataset(self.table_dir, **read_args)
        # bookkeeping, read every epoch: no bar (and, where stdout is not a terminal, no block of
        # progress lines) for each split; the epoch's log line says enough
        table.context.enable_progress_bars = False
        if self.placement.held:  # materialized in the table's order: every epoch's seeded shuffle permutes one list
            table.context.execution_options.preserve_order = True
        else:  # a Tune trial reads it with its own context: the same options there
            table.context.execution_options = self.execution_options()
        return table.filter(expr=col("split").is_in(splits))


def split_datasets(table_dir: str | Path, distill: DistillConfig) -> TableSplits:
    """The splits of the table at `table_dir` for trainings with `distill`'s train splits, held or
    streamed as its `table_placement` decides (logged)."""
    where = place_table(table_dir, distill.table_placement)
    log.info("%s", where.describe())
    splits = TableSplits(str(table_dir), list(distill.train_splits), where, distill.stream_buffer_mib * 2**20)
    if where.held:
        splits.held = {"train": splits._read(splits.train_splits).materialize(),
                       **{name: splits._read([name]).materialize() for name in ("val", "test")}}
    return splits
