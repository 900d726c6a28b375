"""Teacher adapters behind one protocol (`Teacher`), created by kind from a `TeacherConfig`.

    teacher = build_teacher(cfg.extract.teacher, device="cuda")
    video_emb, frame_emb = teacher.encode_video(frames, mask)   # uint8 [B,F,H,W,3], [B,F]
    text_emb = teacher.encode_text(captions)
    teacher.identity()                                          # for the feature-table cache key

See docs/teachers.md for what each kind loads and how it pools.
"""

from __future__ import annotations

from core.config import TeacherConfig
from core.teachers.base import Teacher
from core.teachers.internvideo2 import InternVideo2Teacher
from core.teachers.openclip import OpenClipTeacher
from core.teachers.vidkd import VidkdTeacher
from core.teachers.xclip import XClipTeacher

TEACHERS: dict[str, type[Teacher]] = {
    "open_clip": OpenClipTeacher,
    "xclip": XClipTeacher,
    "internvideo2": InternVideo2Teacher,
    "vidkd": VidkdTeacher,
}


def build_teacher(cfg: TeacherConfig, device: str = "cpu") -> Teacher:
    """The teacher `cfg` names, in eval mode on `device`. Kind "none" has no teacher: an error."""
    if cfg.kind == "none":
        raise ValueError("teacher.kind is none: there is no teacher to build (extract frames only)")
    if cfg.kind not in TEACHERS:
        raise ValueError(f"unknown teacher kind {cfg.kind!r}; known: {', '.join(TEACHERS)}")
    return TEACHERS[cfg.kind].from_config(cfg, device)


__all__ = [
    "TEACHERS", "Teacher", "build_teacher", "OpenClipTeacher", "XClipTeacher", "InternVideo2Teacher", "VidkdTeacher",
]
