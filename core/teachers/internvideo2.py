"""InternVideo2 teacher: a retrieval-capable InternVideo2 model, loaded one of two ways.

- Built in (`variant`, `checkpoint`, `tokenizer`): a published stage-2 checkpoint file read with
  `weights_only=True` into `core.teachers.internvideo2_model`, which implements the retrieval
  towers; the file must hold exactly the variant's keys and shapes.
- Remote code (`path`, `trust_remote_code`): a local Hugging Face directory whose own code
  (`auto_map` in config.json) defines the model. Running that code is an explicit opt-in:
  without it the adapter refuses before importing anything from the directory.

Either model exposes the retrieval methods of InternVideo2's `InternVideo2_Stage2` (the
official demo, `InternVideo2/multi_modality/demo/utils.py`):

    get_vid_feat(frames float [B,T,3,H,W]) -> [B,D]    (InternVideo2 permutes to [B,3,T,H,W] itself)
    get_txt_feat(texts list[str])          -> [N,D]    (tokenises with `model.tokenizer`)

A remote-code model's config names `num_frames` (the clip length its temporal position
embedding was trained for) and `size_t` (or `image_size`/`img_size`), as the demo config does.
A model with no `tokenizer` gets the directory's tokenizer (`AutoTokenizer`), as the demo
passes one in.

- video_emb: `get_vid_feat` on the clip from `sample_clip` (no mask: a short video's last real
  frame repeats in the padded positions).
- frame_emb: `get_vid_feat` on every real frame as a one-frame clip, InternVideo2's image mode
  (T = 1 selects its image position embedding).
Frames are normalised with ImageNet's mean/std, as every InternVideo2 pipeline does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from core.config import TeacherConfig
from core.teachers.base import (DTYPES, Teacher, check_texts, check_video_batch, hash_weights_and_tokenizer,
                                l2_normalize, sample_clip, scatter_real_frames)
from core.teachers.internvideo2_model import load_stage2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RETRIEVAL_METHODS = ("get_vid_feat", "get_txt_feat")


class InternVideo2Teacher(Teacher):
    kind = "internvideo2"

    def __init__(self, model: torch.nn.Module, name: str, *, num_frames: int, image_size: int, embed_dim: int,
                 dtype: str, weights_path: str | Path, tokenizer_path: str | Path | None = None):
        super().__init__(model, name, num_frames=num_frames, image_size=image_size, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, embed_dim=embed_dim, dtype=DTYPES[dtype], weights_path=weights_path)
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None

    @classmethod
    def from_checkpoint(cls, variant: str, checkpoint: str | Path, tokenizer: str | Path, dtype: str = "float32",
                        device: str = "cpu") -> "InternVideo2Teacher":
        """A published stage-2 checkpoint file in the built-in implementation (no remote code)."""
        if not Path(tokenizer).is_dir():
            raise FileNotFoundError(f"internvideo2 teacher: tokenizer {tokenizer} is not a local tokenizer directory")
        model = load_stage2(variant, checkpoint, DTYPES[dtype], device)
        model.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if len(model.tokenizer) > model.spec.vocab_size:
            raise ValueError(f"internvideo2 teacher: tokenizer {tokenizer} has {len(model.tokenizer)} tokens, "
                             f"{variant} embeds {model.spec.vocab_size} (bert-large-uncased's tokenizer is the one)")
        spec = model.spec
        return cls(model, variant, num_frames=spec.num_frames, image_size=spec.image_size, embed_dim=spec.embed_dim,
                   dtype=dtype, weights_path=checkpoint, tokenizer_path=tokenizer)

    @classmethod
    def from_remote_code(cls, path: str | Path, trust_remote_code: bool = False, dtype: str = "float32",
                         device: str = "cpu") -> "InternVideo2Teacher":
        """A local Hugging Face directory whose own code defines the model."""
        path = Path(path)
        if not trust_remote_code:
            raise ValueError(f"internvideo2 teacher {path} runs the checkpoint's own Python code: "
                             "opt in with trust_remote_code (teacher.trust_remote_code: true)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"internvideo2 teacher: {path} is not a model directory (no config.json)")
        model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=DTYPES[dtype]).to(device)
        missing = [m for m in RETRIEVAL_METHODS if not callable(getattr(model, m, None))]
        if missing:
            raise ValueError(f"{path}: {type(model).__name__} has no {'/'.join(missing)}; only retrieval "
                             "checkpoints (InternVideo2 stage-2, InternVideo2-CLIP) give text-video embeddings")
        if getattr(model, "tokenizer", None) is None:
            model.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        config = model.config
        sizes = [getattr(config, key, None) for key in ("size_t", "image_size", "img_size")]
        image_size = next((size for size in sizes if size), None)
        if not getattr(config, "num_frames", None) or not image_size:
            raise ValueError(f"{path}: config.json needs num_frames and size_t (or image_size)")
        teacher = cls(model, path.name, num_frames=config.num_frames, image_size=image_size, embed_dim=0,
                      dtype=dtype, weights_path=path)  # the directory includes the code
        teacher.embed_dim = int(teacher.encode_text(["a video"]).shape[-1])  # configs name it differently
        return teacher

    @classmethod
    def from_config(cls, cfg: TeacherConfig, device: str = "cpu") -> "InternVideo2Teacher":
        if cfg.variant is not None:
            return cls.from_checkpoint(cfg.variant, cfg.checkpoint, cfg.tokenizer, cfg.dtype, device)
        return cls.from_remote_code(cfg.path, cfg.trust_remote_code, cfg.dtype, device)

    @property
    def temperature(self) -> float | None:
        """The contrastive temperature the checkpoint was trained with (built-in variants)."""
        temp = getattr(self.model, "temp", None)
        return float(temp) if temp is not None else None

    def identity(self) -> dict[str, Any]:
        # The tokenizer decides the text embeddings as much as the weights do.
        if self._weights_sha256 is None and self.tokenizer_path is not None:
            self._weights_sha256 = hash_weights_and_tokenizer(self.weights_path, self.tokenizer_path)
        return super().identity()

    @torch.no_grad()
    def encode_video(self, frames: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        frames, mask = check_video_batch(frames, mask)
        pixels = self.preprocess(frames)  # [B,F,3,S,S]
        clip = sample_clip(mask, self.num_frames)
        video_emb = l2_normalize(self.model.get_vid_feat(clip.gather(pixels)).flatten(1))
        real = pixels[mask.to(pixels.device)]  # [N,3,S,S]
        frame_emb = l2_normalize(self.model.get_vid_feat(real[:, None]).flatten(1))
        return video_emb, scatter_real_frames(frame_emb, mask)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        texts = check_texts(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return l2_normalize(self.model.get_txt_feat(texts).flatten(1))
