"""The teacher protocol, and the plumbing every adapter shares.

A teacher turns decoded videos and captions into L2-normalised fp32 embeddings in one space:

    encode_video(frames uint8 [B,F,H,W,3], mask [B,F]) -> (video_emb [B,D], frame_emb [B,F,D])
    encode_text(list[str])                             -> text_emb [N,D]

Frames arrive at the extraction resolution; each adapter resizes them to its own `image_size` and
normalises them with its own `mean`/`std`. Rows of `frame_emb` at padded positions (mask 0) are
zeros, so a consumer that forgets the mask gets similarity 0 there instead of a made-up frame.
Encoding runs under `torch.no_grad`, not `inference_mode`: an online teacher's outputs meet the
student's in the loss, and autograd refuses to save inference tensors for backward.

Models with a fixed clip length (`num_frames` not None) see a clip fitted to that length by
`sample_clip`; models whose frames attend to each other compute per-frame embeddings over
`tile_windows`, so every real frame is embedded exactly once whatever F is.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.video import normalize_frames, sample_indices

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Teacher:
    """Base class of the adapters; see the module docstring for the contract.

    Attributes: `kind` (registry key), `name`, `num_frames` (clip length the video embedding is
    computed over; None = any), `image_size`, `mean`, `std`, `embed_dim`, `dtype`, `device`.
    `model` is the wrapped module, kept in eval mode with gradients off.
    """

    kind = ""

    def __init__(self, model: nn.Module, name: str, *, num_frames: int | None, image_size: int,
                 mean: Sequence[float], std: Sequence[float], embed_dim: int, dtype: torch.dtype,
                 weights_path: str | Path | None = None):
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.num_frames = num_frames
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.embed_dim = int(embed_dim)
        self.dtype = dtype
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self.device = _module_device(model)
        self._weights_sha256: str | None = None

    @classmethod
    def from_config(cls, cfg: Any, device: str = "cpu") -> "Teacher":
        """Build from a `core.config.TeacherConfig` (the registry's factory)."""
        raise NotImplementedError

    def encode_video(self, frames: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> Tensor:
        raise NotImplementedError

    def to(self, device: str | torch.device) -> "Teacher":
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def identity(self) -> dict[str, Any]:
        """What the feature-table cache key needs: kind, name, dtype and a sha256 of the weights.

        Files on disk are hashed where the weights came from files (cheap next to loading them);
        otherwise the state dict. Computed once per teacher.
        """
        if self._weights_sha256 is None:
            if self.weights_path is not None:
                self._weights_sha256 = hash_files(self.weights_path)
            else:
                self._weights_sha256 = hash_state_dict(self.model.state_dict())
        return {"kind": self.kind, "name": self.name, "dtype": str(self.dtype).removeprefix("torch."),
                "weights_sha256": self._weights_sha256}

    def preprocess(self, frames: Tensor) -> Tensor:
        """uint8 [...,H,W,3] -> float [...,3,S,S] on the teacher's device, in the model's dtype."""
        lead = frames.shape[:-3]
        x = normalize_frames(frames.to(self.device), self.mean, self.std)
        x = resize_square(x.reshape(-1, *x.shape[-3:]), self.image_size)
        return x.reshape(*lead, *x.shape[-3:]).to(self.dtype)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, num_frames={self.num_frames}, "
                f"image_size={self.image_size}, embed_dim={self.embed_dim}, dtype={self.dtype}, device={self.device})")


# ------------------------------------------------------------------------------- input checks
def check_video_batch(frames: Any, mask: Any) -> tuple[Tensor, Tensor]:
    """frames uint8 [B,F,H,W,3] and mask [B,F] as tensors (mask bool); one-line errors otherwise."""
    frames, mask = torch.as_tensor(frames), torch.as_tensor(mask)
    if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [B,F,H,W,3], got {frames.dtype} {list(frames.shape)}")
    if mask.shape != frames.shape[:2]:
        raise ValueError(f"mask must be [B,F] = {list(frames.shape[:2])}, got {list(mask.shape)}")
    mask = mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every video needs at least one real frame (a mask row is all zeros)")
    return frames, mask


def check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")
    return list(texts)


# ------------------------------------------------------------------------------ preprocessing
def resize_square(x: Tensor, size: int) -> Tensor:
    """[N,C,H,W] -> [N,C,size,size]: shorter side to `size` (bicubic, antialiased), centre crop.

    Normalisation is affine per channel and interpolation is linear, so resizing normalised
    frames equals normalising resized ones.
    """
    height, width = x.shape[-2:]
    if (height, width) == (size, size):
        return x
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    x = F.interpolate(x.float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top:top + size, left:left + size]


# ------------------------------------------------------------------------ clips and windows
class FrameWindows(NamedTuple):
    """Fixed-length windows over the frames of a batch of videos.

    `video[w]` is the video window w comes from, `index[w]` the frame positions it holds, and
    `fresh[w]` marks positions holding a frame for the first time (False on repeats).
    """

    video: Tensor  # long [W]
    index: Tensor  # long [W, T]
    fresh: Tensor  # bool [W, T]

    def gather(self, x: Tensor) -> Tensor:
        """x [B,F,...] -> [W,T,...]."""
        return x[self.video.to(x.device)[:, None], self.index.to(x.device)]

    def scatter(self, values: Tensor, batch: int, num_frames: int) -> Tensor:
        """values [W,T,D] -> [B,F,D]: each fresh value at its frame; zeros where no frame is."""
        out = values.new_zeros(batch, num_frames, values.shape[-1])
        video, index, fresh = (t.to(values.device) for t in self)
        out[video[:, None].expand_as(index)[fresh], index[fresh]] = values[fresh]
        return out


def scatter_real_frames(frame_emb: Tensor, mask: Tensor) -> Tensor:
    """frame_emb [N,D] of the real frames, in order -> [B,F,D] with zeros at padding frames."""
    mask = mask.to(frame_emb.device).bool()
    per_frame = frame_emb.new_zeros(*mask.shape, frame_emb.shape[-1])
    per_frame[mask] = frame_emb
    return per_frame


def sample_clip(mask: Tensor, num_frames: int) -> FrameWindows:
    """One clip of `num_frames` per video, for models with a fixed clip length and no mask.

    A video with at least `num_frames` real frames gets them at segment centres, as decoding
    samples (`core.video.sample_indices`); a shorter one gets all its real frames in order, then
    its last real frame repeated.
    """
    rows = []
    for real in mask.cpu():
        positions = real.nonzero().flatten().numpy()
        picks = sample_indices(len(positions), num_frames)
        picks = np.concatenate([picks, np.repeat(picks[-1:], num_frames - len(picks))])
        rows.append(positions[picks])
    index = torch.from_numpy(np.stack(rows))
    fresh = torch.ones_like(index, dtype=torch.bool)
    fresh[:, 1:] = index[:, 1:] != index[:, :-1]
    return FrameWindows(torch.arange(len(rows)), index, fresh)


def tile_windows(mask: Tensor, num_frames: int) -> FrameWindows:
    """Consecutive windows of `num_frames` real frames covering every real frame once.

    For per-frame embeddings of models whose frames attend to each other within a clip: each
    frame is embedded in the context of its neighbours. The last window of a video is padded by
    repeating its last frame. With at most `num_frames` real frames this equals `sample_clip`.
    """
    videos, rows = [], []
    for b, real in enumerate(mask.cpu()):
        positions = real.nonzero().flatten().numpy()
        for start in range(0, len(positions), num_frames):
            chunk = positions[start:start + num_frames]
            rows.append(np.concatenate([chunk, np.repeat(chunk[-1:], num_frames - len(chunk))]))
            videos.append(b)
    index = torch.from_numpy(np.stack(rows))
    fresh = torch.ones_like(index, dtype=torch.bool)
    fresh[:, 1:] = index[:, 1:] != index[:, :-1]
    return FrameWindows(torch.tensor(videos), index, fresh)


def same_windows(a: FrameWindows, b: FrameWindows) -> bool:
    return a.index.shape == b.index.shape and torch.equal(a.video, b.video) and torch.equal(a.index, b.index)


# ------------------------------------------------------------------------------------ hashing
def hash_weights_and_tokenizer(weights: str | Path, tokenizer: str | Path) -> str:
    """One sha256 of a checkpoint and the tokenizer directory it is used with: the tokenizer
    decides the text embeddings as much as the weights do."""
    return hashlib.sha256(f"{hash_files(weights)}\0{hash_files(tokenizer)}".encode()).hexdigest()


def hash_files(path: str | Path) -> str:
    """sha256 of a checkpoint file, or of a directory's files (relative names and file hashes).

    Hidden entries (`.git`, the `.cache` that `huggingface-cli download` leaves with timestamps)
    and `__pycache__` are skipped: they change without the model changing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.is_file():  # a single checkpoint: its name and place do not matter, its bytes do
        return _hash_file(path)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if file.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            digest.update(f"{relative.as_posix()}\0{_hash_file(file)}\n".encode())
    return digest.hexdigest()


def _hash_file(file: Path, chunk: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_state_dict(state_dict: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def l2_normalize(x: Tensor) -> Tensor:
    """fp32, unit L2 norm along the last dimension."""
    return F.normalize(x.float(), dim=-1)
