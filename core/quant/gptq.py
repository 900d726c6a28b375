"""GPTQ (or round-to-nearest) over a vision tower's transformer blocks, in true-sequential order."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.config import QuantizeConfig
from core.quant.packing import (BLOCK_LAYOUTS, Method, _check_packable, _check_settings, _gptqmodel,
                                _is_quant_linear, _get_submodule, _module_names, _set_submodule, pack_linear)

# ------------------------------------------------------------------------------ attention swap
class QKVAttention(nn.Module):
    """Self-attention computing exactly what `nn.MultiheadAttention` does, with linear projections.

    A drop-in for the `attn` of open_clip's `ResidualAttentionBlock`: same call signature
    (`attn(x, x, x, need_weights=False, attn_mask=mask)[0]`), same `batch_first` layout, same mask
    semantics (float masks are added to the logits, boolean `True` means "may not attend").
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = True, batch_first: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.batch_first = batch_first
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> "QKVAttention":
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only self-attention MultiheadAttention (no kdim/vdim, bias_kv, add_zero_attn) can be swapped")
        attn = cls(mha.embed_dim, mha.num_heads, mha.in_proj_bias is not None, mha.batch_first, mha.dropout)
        attn.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            attn.qkv.weight.copy_(mha.in_proj_weight)
            attn.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                attn.qkv.bias.copy_(mha.in_proj_bias)
                attn.out_proj.bias.copy_(mha.out_proj.bias)
        return attn.train(mha.training)

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("QKVAttention is self-attention: key and value must be the query tensor")
        if need_weights:
            raise ValueError("QKVAttention does not return attention weights")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(attn_mask, float("-inf"))
            if attn_mask.dim() == 3:  # MultiheadAttention's [batch * heads, L, S]
                attn_mask = attn_mask.view(batch, self.num_heads, *attn_mask.shape[-2:])
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


def replace_multihead_attention(visual: nn.Module) -> list[str]:
    """Swap every vision block's `nn.MultiheadAttention` for an identical `QKVAttention`.

    Returns the names (relative to `visual`) of the attentions swapped; a no-op for timm blocks.
    """
    names = _module_names(visual)
    swapped = []
    for block in find_vision_blocks(visual):
        if isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            block.attn = QKVAttention.from_multihead_attention(block.attn)
            swapped.append(f"{names[id(block)]}.attn")
    return swapped


# ------------------------------------------------------------------------------------- blocks
def find_vision_blocks(visual: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a vision tower, input to output.

    Understands open_clip's `VisionTransformer` (`transformer.resblocks`), open_clip's `TimmModel`
    (`trunk.blocks`) and a bare timm vision transformer (`blocks`).
    """
    for path in ("transformer.resblocks", "trunk.blocks", "blocks"):
        try:
            blocks = visual.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
            return list(blocks)
    raise ValueError(
        f"{type(visual).__name__} has no vision transformer blocks "
        "(expected transformer.resblocks, trunk.blocks or blocks)"
    )


def block_linear_names(block: nn.Module) -> tuple[str, ...]:
    """The names of a block's linears in true-sequential order (qkv, attn out, MLP in, MLP out)."""
    for layout in BLOCK_LAYOUTS:
        if all(isinstance(_get_submodule(block, name), nn.Linear) for name in layout):
            return layout
    if isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
        raise ValueError("block still holds nn.MultiheadAttention: call replace_multihead_attention first")
    raise ValueError(
        f"unsupported vision block {type(block).__name__}: expected open_clip's ResidualAttentionBlock "
        "or timm's attn.qkv/attn.proj/mlp.fc1/mlp.fc2 linears"
    )



# ------------------------------------------------------------------------------- one linear
@dataclass
class LayerReport:
    """How one linear was quantized.

    `rel_output_error` is ||X (W_q - W)^T|| / ||X W^T|| over the calibration inputs X the layer saw:
    the quantity GPTQ minimizes, comparable between GPTQ and RTN. `gptq_loss` is GPTQ's own average
    loss and `damp` the Hessian damping it ended up using (both None for RTN).
    """

    name: str
    out_features: int
    in_features: int
    method: str
    tokens: int
    seconds: float
    rel_output_error: float | None
    gptq_loss: float | None = None
    damp: float | None = None


@dataclass
class QuantizedLayer:
    module: nn.Module  # the packed gptqmodel TorchLinear
    fake_quant_weight: torch.Tensor  # [out, in] the solver's quantized weight, before packing
    report: LayerReport


class LayerQuantizer:
    """Quantizes one `nn.Linear`: feed it the layer's inputs, then get a packed `TorchLinear`.

    GPTQ accumulates its Hessian from the inputs through `GPTQ.add_batch`; RTN ignores them for
    the solve. Both keep X^T X to report the output error each method leaves on those inputs.
    """

    def __init__(self, linear: nn.Linear, cfg: QuantizeConfig, method: Method = "gptq", name: str = ""):
        _check_settings(cfg, method)
        _check_packable(linear, cfg, name or "linear")
        quantization, _, RTN = _gptqmodel()
        self.linear, self.cfg, self.method, self.name = linear, cfg, method, name
        self.xtx = torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device)
        self.tokens = 0
        if method == "gptq":
            # act_group_aware (gptqmodel's default reordering) stays off: act_order maps onto
            # classic desc_act, and natural order otherwise, so the config means what it says.
            qcfg = quantization.QuantizeConfig(
                bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, desc_act=cfg.act_order,
                act_group_aware=False, damp_percent=cfg.damp, fallback=None, offload_to_disk=False,
            )
            self.solver = quantization.GPTQ(linear, qcfg)
            self.solver.quantizer.configure(perchannel=True)
        else:
            qcfg = quantization.RTNConfig(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, offload_to_disk=False)
            self.solver = RTN(linear, qcfg)

    @torch.no_grad()
    def add_batch(self, inputs: torch.Tensor) -> None:
        inputs = inputs.reshape(-1, inputs.shape[-1])
        if self.method == "gptq":
            self.solver.add_batch(inputs, None)  # the output is unused for linears
        x = inputs.float()
        self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]

    @torch.no_grad()
    def quantize(self) -> QuantizedLayer:
        if self.method == "gptq" and not self.tokens:
            raise ValueError(f"{self.name or 'linear'}: GPTQ needs calibration inputs, none were seen")
        start = time.perf_counter()
        weight = self.linear.weight.detach().float()
        fake_weight, scales, zeros, g_idx, _, loss, damp, _ = self.solver.quantize()
        if self.method == "gptq":
            self.solver.free()
        module = pack_linear(self.linear, fake_weight, scales, zeros, g_idx, self.cfg)
        error = None
        if self.tokens:
            delta = fake_weight.float() - weight
            error = math.sqrt(((delta @ self.xtx) * delta).sum().item() / max(((weight @ self.xtx) * weight).sum().item(), 1e-30))
        report = LayerReport(
            name=self.name, out_features=self.linear.out_features, in_features=self.linear.in_features,
            method=self.method, tokens=self.tokens, seconds=time.perf_counter() - start, rel_output_error=error,
            gptq_loss=float(loss) if self.method == "gptq" else None, damp=float(damp) if self.method == "gptq" else None,
        )
        return QuantizedLayer(module, fake_weight, report)



# ------------------------------------------------------------------------------ vision tower
@dataclass
class QuantResult:
    method: str
    bits: int
    group_size: int
    calib_samples: int
    seconds: float
    swapped_attention: list[str] = field(default_factory=list)  # relative to the visual
    layers: list[LayerReport] = field(default_factory=list)  # names relative to the visual

    @property
    def quantized_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def mean_rel_output_error(self) -> float | None:
        errors = [layer.rel_output_error for layer in self.layers if layer.rel_output_error is not None]
        return sum(errors) / len(errors) if errors else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StopForward(Exception):
    """Raised from a hook once the inputs it needs are captured: the rest of the forward is waste."""


@torch.no_grad()
def quantize_visual(
    visual: nn.Module,
    calib_images: torch.Tensor | None,
    cfg: QuantizeConfig,
    method: Method = "gptq",
    batch_size: int = 32,
    progress: bool = True,
) -> QuantResult:
    """Quantize the linears of every transformer block of `visual`, in place.

    `calib_images` are normalised images [N, 3, H, W] as the visual takes them; at most
    `cfg.calib_samples` of them are used. GPTQ needs them; RTN does not, but with them it reports
    its output error on the same inputs. open_clip blocks get their `nn.MultiheadAttention`
    swapped for `QKVAttention` first. Each quantized `nn.Linear` is replaced by a packed
    `TorchLinear`.
    """
    _check_settings(cfg, method)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if calib_images is None and method == "gptq":
        raise ValueError("GPTQ needs calibration images")
    if calib_images is not None and (calib_images.dim() != 4 or len(calib_images) == 0):
        raise ValueError(f"calibration images must be a non-empty [N, 3, H, W] tensor, got shape {tuple(calib_images.shape)}")
    if any(_is_quant_linear(module) for module in visual.modules()):
        raise ValueError("the visual already holds quantized linears")

    start = time.perf_counter()
    was_training = visual.training
    visual.eval()
    try:
        result = _quantize_blocks(visual, calib_images, cfg, method, batch_size, progress)
    finally:
        visual.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def _quantize_blocks(visual, calib_images, cfg, method, batch_size, progress) -> QuantResult:
    """Block by block, each block's linears in true-sequential order; after a block is done, the
    calibration activations are pushed through it (now quantized) to become the next one's inputs."""
    swapped = replace_multihead_attention(visual)
    blocks = find_vision_blocks(visual)
    names = _module_names(visual)
    layouts = [block_linear_names(block) for block in blocks]  # fail on an unsupported block early

    batches = None
    if calib_images is not None:
        calib_images = calib_images[: cfg.calib_samples]
        param = next(visual.parameters())
        batches = _capture_block_inputs(visual, blocks[0], calib_images.to(param.device, param.dtype), batch_size)

    result = QuantResult(method, cfg.bits, cfg.group_size, 0 if calib_images is None else len(calib_images), 0.0, swapped)
    for block, layout in zip(tqdm(blocks, desc=f"{method} blocks", disable=not progress), layouts):
        for layer_name in layout:
            linear = block.get_submodule(layer_name)
            quantizer = LayerQuantizer(linear, cfg, method, name=f"{names[id(block)]}.{layer_name}")
            if batches is not None:
                _feed_layer_inputs(block, linear, batches, quantizer.add_batch)
            quantized = quantizer.quantize()
            _set_submodule(block, layer_name, quantized.module)
            result.layers.append(quantized.report)
        if batches is not None and block is not blocks[-1]:
            batches = [((block(*args, **kwargs),) + tuple(args[1:]), kwargs) for args, kwargs in batches]
    return result


def _capture_block_inputs(visual, first_block, images, batch_size) -> list[tuple[tuple, dict]]:
    """Run the calibration images up to the first block; keep that block's (args, kwargs) per batch."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in images.split(batch_size):
            try:
                visual(batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != math.ceil(len(images) / batch_size):
        raise ValueError(f"{type(visual).__name__}'s forward never reached its first transformer block")
    return captured


def _feed_layer_inputs(block, layer, batches, consume) -> None:
    """Run each batch through `block` until `layer` has seen it, and hand the layer's input on."""

    def grab(module, args, output):
        consume(args[0])
        raise _StopForward

    handle = layer.register_forward_hook(grab)
    try:
        for args, kwargs in batches:
            try:
                block(*args, **kwargs)
            except _StopForward:
                pass
    finally:
        handle.remove()


