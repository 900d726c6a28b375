"""The student: a CLIP4Clip-style video-text model on an open_clip CLIP.

Frames are encoded one by one by the CLIP image tower, a small temporal transformer mixes them
(CLIP4Clip's seqTransf: frame position embedding, transformer, residual to the CLIP features),
and TeachCLIP's Attentional Frame-Feature Aggregation (AFA) pools them with learned per-frame
weights. Those weights are what TeachCLIP's fine-grained teaching (FgT) supervises with the
teacher's frame-text relevance, so they are part of the output.

    frames [B,F,H,W,3] -> CLIP image tower -> x [B,F,D]
    h = transformer(x + pos) + x;   frame_emb = normalize(h)
    score = MLP(h)                                    (scored before normalising, as TeachCLIP does)
    afa_weights  = softmax_f(score)                   (what FgT trains against the teacher)
    pool_weights = softmax_f(score / t_pool)          (t_pool = afa_pool_temperature, 0.1 in TeachCLIP)
    video_emb = normalize(sum_f pool_weights_f * frame_emb_f)

Padded frames get score -inf, so weight exactly 0 in both softmaxes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor, nn

from core.config import QuantKernel, StudentConfig
from core.modelzoo import create_clip
from core.video import normalize_frames

CHECKPOINT_FORMAT = "vidkd-student/1"
# Inference precisions of the dense student (`to_precision`); INT4 is core.quant's.
Precision = Literal["fp32", "bf16"]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


class VideoOutput(NamedTuple):
    video_emb: Tensor  # [B, D], L2-normalised
    frame_emb: Tensor  # [B, F, D], L2-normalised, after the temporal transformer
    afa_weights: Tensor  # [B, F] softmax(score): sums to 1 over real frames, exactly 0 on padded ones
    pool_weights: Tensor  # [B, F] softmax(score / afa_pool_temperature): the weights video_emb is pooled with


class StudentOutput(NamedTuple):
    video: VideoOutput
    text_emb: Tensor  # [N, D], L2-normalised
    projected_video_emb: Tensor | None  # [B, D_teacher], L2-normalised; None without teacher_dim


class TemporalTransformer(nn.Module):
    """CLIP4Clip's seqTransf: frame position embedding + transformer, residual to the input.

    The residual keeps the CLIP frame features reachable untouched, so a freshly initialised
    transformer perturbs the pretrained features instead of replacing them.
    """

    def __init__(self, dim: int, num_frames: int, layers: int):
        super().__init__()
        self.frame_position_embedding = nn.Embedding(num_frames, dim)
        layer = nn.TransformerEncoderLayer(
            dim, nhead=max(1, dim // 64), dim_feedforward=4 * dim, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # The nested-tensor fast path is an inference optimisation that norm_first disables anyway.
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        positions = self.frame_position_embedding.weight[: x.shape[1]]
        return self.transformer(x + positions, src_key_padding_mask=~mask) + x


class AttentionalFrameAggregation(nn.Module):
    """TeachCLIP's AFA: one relevance score per frame (an MLP on the frame features before they
    are normalised); returns (softmax(score), softmax(score / pool_temperature)) over real frames."""

    def __init__(self, dim: int, hidden: int, pool_temperature: float = 0.1):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.pool_temperature = pool_temperature

    def forward(self, frame_features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        score = self.score(frame_features).squeeze(-1).float().masked_fill(~mask, float("-inf"))
        return score.softmax(dim=-1), (score / self.pool_temperature).softmax(dim=-1)


class VideoTextStudent(nn.Module):
    """CLIP4Clip + seqTransf + AFA on an open_clip CLIP; see the module docstring.

    `clip` and `tokenizer` come from `core.modelzoo.create_clip`. `teacher_dim` adds `to_teacher`,
    the projection into the teacher's embedding space that DLDKD's feature-level loss needs.
    The CLIP logit scale is re-initialised to 1 / `temperature`.
    """

    def __init__(self, clip: nn.Module, tokenizer: Any, config: StudentConfig, num_frames: int,
                 temperature: float = 0.07, teacher_dim: int | None = None):
        super().__init__()
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.clip = clip
        self.tokenizer = tokenizer
        self.config = config
        self.num_frames = num_frames
        self.teacher_dim = teacher_dim

        preprocess = getattr(clip.visual, "preprocess_cfg", None) or {}
        size = preprocess.get("size", clip.visual.image_size)
        height, width = (size, size) if isinstance(size, int) else size
        if height != width:
            raise ValueError(f"{config.model}: non-square image size {height}x{width} is not supported")
        self.image_size = int(height)
        self.mean = tuple(float(v) for v in preprocess.get("mean", OPENAI_DATASET_MEAN))
        self.std = tuple(float(v) for v in preprocess.get("std", OPENAI_DATASET_STD))

        dim = clip.visual.output_dim
        self.embed_dim = dim
        self.temporal = TemporalTransformer(dim, num_frames, config.temporal_layers) if config.temporal_layers else None
        self.afa = AttentionalFrameAggregation(dim, config.afa_hidden or dim, config.afa_pool_temperature)
        self.to_teacher = nn.Linear(dim, teacher_dim) if teacher_dim else None
        for module in self.new_modules():
            module.apply(_init_new_weights)
        with torch.no_grad():
            self.clip.logit_scale.fill_(math.log(1.0 / temperature))

    # ------------------------------------------------------------------------------ encoders
    def encode_video(self, frames: Tensor, mask: Tensor) -> VideoOutput:
        """frames uint8 [B,F,H,W,3] (H = W = image_size, F <= num_frames), mask [B,F] (1 = real)."""
        if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [B,F,H,W,3], got {frames.dtype} {list(frames.shape)}")
        batch, num_frames, height, width, _ = frames.shape
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"frames are {height}x{width}, the student expects {self.image_size}x{self.image_size}")
        if num_frames > self.num_frames:
            raise ValueError(f"{num_frames} frames per video, the student was built for at most {self.num_frames}")
        if mask.shape != (batch, num_frames):
            raise ValueError(f"mask must be [B,F] = {[batch, num_frames]}, got {list(mask.shape)}")
        mask = mask.to(self.device).bool()
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every video needs at least one real frame (a mask row is all zeros)")

        # Frames travel as uint8 and are normalised on the model's device.
        pixels = normalize_frames(frames.to(self.device, non_blocking=True).flatten(0, 1), self.mean, self.std)
        pixels = pixels.to(self.clip.logit_scale.dtype)  # a bf16 student (to_precision) takes bf16 pixels
        x = self.clip.encode_image(pixels).view(batch, num_frames, -1)
        if self.temporal is not None:
            x = self.temporal(x, mask)
        frame_emb = F.normalize(x, dim=-1)
        afa_weights, pool_weights = self.afa(x, mask)
        video_emb = F.normalize(torch.einsum("bf,bfd->bd", pool_weights.to(frame_emb.dtype), frame_emb), dim=-1)
        return VideoOutput(video_emb, frame_emb, afa_weights, pool_weights)

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids [N, context_length]; cheap enough to run in data-loading workers."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        return self.tokenizer(list(texts))

    def encode_text(self, texts: list[str] | Tensor) -> Tensor:
        """Normalised text embeddings [N,D], pooled at the end-of-text token by open_clip."""
        tokens = texts if isinstance(texts, Tensor) else self.tokenize(texts)
        tokens = tokens.to(self.device)
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def project_to_teacher(self, video_emb: Tensor) -> Tensor:
        """Student video embeddings in the teacher's space (normalised), for DLDKD's feature loss."""
        if self.to_teacher is None:
            raise ValueError("this student has no teacher projection: build it with teacher_dim")
        return F.normalize(self.to_teacher(video_emb), dim=-1)

    def forward(self, frames: Tensor, mask: Tensor, texts: list[str] | Tensor) -> StudentOutput:
        """Everything a training step needs in one call, so DDP sees every parameter used here."""
        video = self.encode_video(frames, mask)
        projected = self.project_to_teacher(video.video_emb) if self.to_teacher is not None else None
        return StudentOutput(video, self.encode_text(texts), projected)

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    @property
    def logit_scale(self) -> Tensor:
        """The similarity multiplier exp(clip.logit_scale). Capped at 100 by `clamp_logit_scale`
        after each optimizer step, as CLIP and TeachCLIP do: a clamp inside the forward pass would
        zero the parameter's gradient for good once it passed the cap."""
        return self.clip.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        self.clip.logit_scale.clamp_(max=math.log(max_scale))

    # ----------------------------------------------------------------------------- training
    def new_modules(self) -> list[nn.Module]:
        """Modules that are not part of the (possibly pretrained) CLIP towers."""
        return [m for m in (self.temporal, self.afa, self.to_teacher) if m is not None]

    def param_groups(self, lr_pretrained: float, lr_new: float, weight_decay: float) -> list[dict]:
        """AdamW groups: CLIP towers at `lr_pretrained`, new modules at `lr_new`.

        Biases, norms, embeddings and the logit scale get no weight decay: decaying them pulls
        scales and offsets towards zero without regularising anything useful.
        """
        new_ids = {id(p) for m in self.new_modules() for p in m.parameters()}
        groups: dict[str, dict] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            kind = "new" if id(param) in new_ids else "pretrained"
            decay = param.ndim >= 2 and "embedding" not in name
            key = f"{kind}_{'decay' if decay else 'no_decay'}"
            group = groups.setdefault(key, {
                "name": key, "params": [],
                "lr": lr_new if kind == "new" else lr_pretrained,
                "weight_decay": weight_decay if decay else 0.0,
            })
            group["params"].append(param)
        return list(groups.values())


def _init_new_weights(module: nn.Module) -> None:
    # CLIP4Clip's init for its added modules: small normal weights, zero biases.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.MultiheadAttention):
        nn.init.normal_(module.in_proj_weight, std=0.02)
        nn.init.zeros_(module.in_proj_bias)


# --------------------------------------------------------------------------- build, save, load
def build_student(cfg: StudentConfig, num_frames: int, temperature: float = 0.07,
                  teacher_dim: int | None = None) -> VideoTextStudent:
    """A student on `cfg.model`, with CLIP weights from `cfg.pretrained` when set, and every weight
    but the logit scale from the vidkd checkpoint `cfg.init_from` when set."""
    clip, tokenizer = create_clip(cfg.model, cfg.pretrained)
    model = VideoTextStudent(clip, tokenizer, cfg, num_frames, temperature, teacher_dim)
    if cfg.init_from:
        init_from_checkpoint(model, cfg.init_from)
    return model


LOGIT_SCALE_KEY = "clip.logit_scale"


def init_from_checkpoint(model: VideoTextStudent, path: str | Path) -> None:
    """Load a vidkd checkpoint's weights into `model`, all of them but the logit scale (which the
    new training's temperature set). The checkpoint must hold the same architecture."""
    checkpoint = read_student_checkpoint(path)
    state = {k: v for k, v in checkpoint["state_dict"].items() if k != LOGIT_SCALE_KEY}
    own = {k: v for k, v in model.state_dict().items() if k != LOGIT_SCALE_KEY}
    if set(state) != set(own) or any(state[k].shape != v.shape for k, v in own.items()):
        raise ValueError(f"init_from {path}: holds a {checkpoint['config'].get('model')} student with "
                         f"{checkpoint['num_frames']} frames and other weights than this {model.config.model} one")
    model.load_state_dict(state, strict=False)


def save_student(model: VideoTextStudent, path: str | Path, extra: dict | None = None) -> Path:
    """Write a checkpoint that `load_student` rebuilds with `weights_only=True`.

    `extra` (metrics, epoch, ...) must hold only plain types and tensors for the same reason.
    """
    model = getattr(model, "module", model)  # unwrap DDP
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({
        "format": CHECKPOINT_FORMAT,
        "config": model.config.model_dump(mode="json"),
        "num_frames": model.num_frames,
        "teacher_dim": model.teacher_dim,
        "state_dict": state_dict,
        "extra": dict(extra or {}),
    }, path)
    return path


def load_student(path: str | Path, map_location: str | torch.device = "cpu",
                 precision: Precision = "fp32") -> VideoTextStudent:
    """Rebuild a student saved by `save_student`, in `precision`; no pretrained weights are fetched."""
    checkpoint = read_student_checkpoint(path, map_location)
    cfg = StudentConfig.model_validate(checkpoint["config"])
    # The state dict holds every CLIP weight, so the towers are built without `pretrained`.
    clip, tokenizer = create_clip(cfg.model, None)
    model = VideoTextStudent(clip, tokenizer, cfg, checkpoint["num_frames"], teacher_dim=checkpoint["teacher_dim"])
    model.load_state_dict(checkpoint["state_dict"])
    return to_precision(model.to(map_location), precision)


def read_student_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The dict `save_student` wrote; one line naming the file when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"student checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a vidkd student checkpoint (expected format {CHECKPOINT_FORMAT})")
    return checkpoint


def to_precision(model: VideoTextStudent, precision: Precision) -> VideoTextStudent:
    """The dense student in `precision`, in place, for inference: `bf16` halves its weights and runs
    its matmuls on the CPU's bf16 units where it has them (AVX-512 BF16, AMX). Training stays fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (expected one of {', '.join(PRECISIONS)})")
    return model.to(PRECISIONS[precision])


def read_checkpoint_extra(path: str | Path) -> dict:
    """The `extra` dict of a student checkpoint, without building the model."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)["extra"]


# ------------------------------------------------------------------------------ quantized
def student_meta(student: VideoTextStudent) -> dict[str, Any]:
    """What a quantized checkpoint records to rebuild the student's unquantized skeleton."""
    return {"student": student.config.model_dump(mode="json"), "num_frames": student.num_frames,
            "teacher_dim": student.teacher_dim}


def build_student_skeleton(meta: dict[str, Any]) -> VideoTextStudent:
    cfg = StudentConfig.model_validate({**meta["student"], "pretrained": None, "init_from": None})
    return build_student(cfg, meta["num_frames"], teacher_dim=meta["teacher_dim"])


def load_quantized_student(out_dir: str | Path, device: str = "cpu", kernel: QuantKernel = "auto") -> VideoTextStudent:
    """A student saved by the quantize stage (core.quant's checkpoint directory), its INT4 linears
    on `kernel` (`auto`: the fused int4 kernel on CPU where it can run them; core.quant.kernels)."""
    from core.quant import load_quantized  # gptqmodel's import is slow: only loading pays it

    return load_quantized(out_dir, build_student_skeleton, device=device, kernel=kernel)


def load_student_model(path: str | Path, device: str = "cpu", kernel: QuantKernel = "auto") -> VideoTextStudent:
    """A student for inference from either form the pipeline writes: a checkpoint file (fp32) or a
    quantized checkpoint directory (INT4 on `kernel`)."""
    path = Path(path)
    if path.is_dir():
        return load_quantized_student(path, device, kernel=kernel).eval()
    return load_student(path, device).eval()
