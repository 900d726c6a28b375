"""InternVideo2 teacher: a retrieval-capable InternVideo2 model (stage-2 or CLIP) from a local
Hugging Face directory whose own code (`auto_map` in config.json) defines the model.

Running that code is an explicit opt-in (`trust_remote_code`): without it the adapter refuses
before importing anything from the directory.

The model must expose the retrieval methods of InternVideo2's `InternVideo2_Stage2` (the
official demo, `InternVideo2/multi_modality/demo/utils.py`):

    get_vid_feat(frames float [B,T,3,H,W]) -> [B,D]    (InternVideo2 permutes to [B,3,T,H,W] itself)
    get_txt_feat(texts list[str])          -> [N,D]    (tokenises with `model.tokenizer`)

and in its config `num_frames` (the clip length its temporal position embedding was trained
for) and `size_t` (or `image_size`/`img_size`), as the demo config names them. A model with no
`tokenizer` gets the directory's tokenizer (`AutoTokenizer`), as the demo passes one in.

- video_emb: `get_vid_feat` on the clip from `sample_clip` (no mask: a short video's last real
  frame repeats in the padded positions).
- frame_emb: `get_vid_feat` on every real frame as a one-frame clip, InternVideo2's image mode
  (T = 1 selects its image position embedding).
Frames are normalised with ImageNet's mean/std, as every InternVideo2 pipeline does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from core.config import TeacherConfig
from core.teachers.base import (DTYPES, Teacher, check_texts, check_video_batch, l2_normalize, sample_clip,
                                scatter_real_frames)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RETRIEVAL_METHODS = ("get_vid_feat", "get_txt_feat")


class InternVideo2Teacher(Teacher):
    kind = "internvideo2"

    def __init__(self, path: str | Path, trust_remote_code: bool = False, dtype: str = "float32", device: str = "cpu"):
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
        super().__init__(
            model, path.name,
            num_frames=config.num_frames, image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            embed_dim=0, dtype=DTYPES[dtype], weights_path=path,  # the directory includes the code
        )
        self.embed_dim = int(self.encode_text(["a video"]).shape[-1])  # configs name it differently

    @classmethod
    def from_config(cls, cfg: TeacherConfig, device: str = "cpu") -> "InternVideo2Teacher":
        return cls(cfg.path, cfg.trust_remote_code, cfg.dtype, device)

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
