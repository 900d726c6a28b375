"""`vidkd data inspect`: what a manifest holds, and a contact sheet of sampled frames."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import decord
import numpy as np

from core.datasets import read_manifest
from core.video import VideoDecodeError, decode_video


def inspect_manifest(manifest: Path, sheet: Path, num_frames: int = 8, rows: int = 6) -> str:
    records = read_manifest(manifest)
    splits = Counter(r.split for r in records)
    durations, unreadable = [], []
    for record in records:
        try:
            reader = decord.VideoReader(str(record.path), num_threads=1)
            durations.append(len(reader) / max(reader.get_avg_fps(), 1e-6))
        except Exception:  # decord raises its own error types for every kind of bad file
            unreadable.append(record.video_id)
    captions = [c for r in records for c in r.captions]
    lines = [
        f"manifest: {manifest}",
        f"videos: {len(records)}  ({', '.join(f'{s}: {n}' for s, n in sorted(splits.items()))})",
        f"captions: {len(captions)} ({len(set(captions))} distinct, {len(captions) / max(1, len(records)):.1f} per video)",
    ]
    if durations:
        d = np.asarray(durations)
        lines.append(f"duration (s): min {d.min():.2f}  median {np.median(d):.2f}  max {d.max():.2f}")
    if unreadable:
        lines.append(f"unreadable videos: {len(unreadable)} (e.g. {', '.join(unreadable[:5])})")
    lines.append("examples:")
    for record in records[:rows]:
        lines.append(f"  {record.video_id} [{record.split}]: {record.captions[0] if record.captions else '(no caption)'}")
    written = write_contact_sheet(records[: rows * 2], sheet, num_frames, rows)
    if written:
        lines.append(f"contact sheet: {written}")
    return "\n".join(lines)


def write_contact_sheet(records, sheet: Path, num_frames: int, rows: int, size: int = 96) -> Path | None:
    """One row per video: `num_frames` uniformly sampled frames, with the first caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strips, titles = [], []
    for record in records:
        try:
            frames, _ = decode_video(record.path, num_frames, size, video_id=record.video_id)
        except VideoDecodeError:
            continue
        strips.append(np.concatenate(list(frames), axis=1))
        titles.append(f"{record.video_id}: {record.captions[0] if record.captions else ''}")
        if len(strips) == rows:
            break
    if not strips:
        return None
    fig, axes = plt.subplots(len(strips), 1, figsize=(num_frames * 1.2, len(strips) * 1.5), squeeze=False)
    for ax, strip, title in zip(axes[:, 0], strips, titles):
        ax.imshow(strip)
        ax.set_title(title, fontsize=8, loc="left")
        ax.axis("off")
    fig.tight_layout()
    sheet.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(sheet, dpi=100)
    plt.close(fig)
    return sheet
