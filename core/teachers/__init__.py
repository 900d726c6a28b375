"""Teacher adapters behind one protocol (`Teacher`), created by kind from a `TeacherConfig`.

    teacher = build_teacher(cfg.extract.teacher, device="cuda")
    video_emb, frame_emb = teacher.encode_video(frames, mask)   # uint8 [B,F,H,W,3], [B,F]
    text_emb = teacher.encode_text(captions)
    teacher.identity()                                          # what its weights are, by hash
    teacher_identity(cfg)                                       # the same, from the config, unloaded

See docs/teachers.md for what each kind loads and how it pools.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

from core.config import TeacherConfig
from core.teachers.base import Teacher, hash_files, hash_weights_and_tokenizer

# kind -> "module:class". An adapter's module is imported when that kind is built, so a worker
# that runs one open_clip teacher does not pay for importing transformers (seconds per actor).
TEACHERS: dict[str, str] = {
    "open_clip": "core.teachers.openclip:OpenClipTeacher",
    "xclip": "core.teachers.xclip:XClipTeacher",
    "internvideo2": "core.teachers.internvideo2:InternVideo2Teacher",
    "vidkd": "core.teachers.vidkd:VidkdTeacher",
}


def teacher_class(kind: str) -> type[Teacher]:
    if kind not in TEACHERS:
        raise ValueError(f"unknown teacher kind {kind!r}; known: {', '.join(TEACHERS)}")
    module, name = TEACHERS[kind].split(":")
    return getattr(import_module(module), name)


def build_teacher(cfg: TeacherConfig, device: str = "cpu") -> Teacher:
    """The teacher `cfg` names, in eval mode on `device`. Kind "none" has no teacher: an error."""
    if cfg.kind == "none":
        raise ValueError("teacher.kind is none: there is no teacher to build (extract frames only)")
    return teacher_class(cfg.kind).from_config(cfg, device)


__all__ = ["TEACHERS", "Teacher", "build_teacher", "teacher_class"]


def teacher_identity(cfg: TeacherConfig) -> dict[str, Any]:
    """What a feature table's cache key knows of the teacher `cfg` names, computed without
    loading it: its kind, name and dtype, and a sha256 of its weight files, the digest
    `Teacher.identity()` takes of the same files. A pretrained tag, or none (random weights
    from seed 0), names fixed weights itself."""
    identity: dict[str, Any] = {"kind": cfg.kind}
    if cfg.kind == "none":
        return identity
    if cfg.variant is not None:  # a built-in architecture: its checkpoint and tokenizer decide it
        return {**identity, "name": cfg.variant, "dtype": cfg.dtype,
                "weights_sha256": hash_weights_and_tokenizer(cfg.checkpoint, cfg.tokenizer)}
    identity.update(name=cfg.name, dtype=cfg.dtype)
    weights = cfg.path or cfg.pretrained
    if weights and Path(weights).exists():
        identity["weights_sha256"] = hash_files(weights)
    else:
        identity["weights"] = weights or "random-init(seed=0)"
    return identity
