"""Which packed linear runs a quantized layer: the fused int4 CPU kernel or gptqmodel's TorchLinear.

- `torch`: gptqmodel's `TorchLinear`. It dequantizes the whole weight to fp16 on every forward
  and runs a dense matmul in the input's dtype: any device (the GPU path), any bits and group
  size, fp32 accuracy of the activations. On CPU it is slower than the fp32 model it replaces.
- `fused`: `FusedInt4Linear` (gptqmodel's `TorchFusedLinear`, core/quant/fused.py): torch's int4
  CPU matmul, which dequantizes inside the kernel, with bfloat16 activations. CPU only; 4 bits,
  groups of 32, 64 or 128 columns, outputs a multiple of 16.
- `auto`: fused for every layer it can run on the target device, torch for the others.

Both load the same checkpoint tensors (gptq_v2), so a checkpoint saved once loads into either;
quantization itself always packs `TorchLinear`s, which calibrate the next block in fp32.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn as nn

from core.config import QuantizeConfig
from core.quant.packing import _empty_quant_linear, _finish_quant_linear, _is_quant_linear, _set_submodule

KERNELS = ("auto", "fused", "torch")


def fused_unsupported(cfg: QuantizeConfig, in_features: int, out_features: int,
                      device: str | torch.device = "cpu") -> str | None:
    """Why the fused kernel cannot run a layer with these settings and shape, or None if it can."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"it runs on CPU only, the layer is on {device}"
    from core.quant.fused import FUSED_GROUP_SIZES, FUSED_OUT_MULTIPLE, fused_op_available

    if not fused_op_available():
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    if cfg.bits != 4:
        return f"it packs 4-bit codes only, not {cfg.bits}-bit"
    group = in_features if cfg.group_size == -1 else cfg.group_size
    if group not in FUSED_GROUP_SIZES or in_features % group:
        return f"it needs groups of {FUSED_GROUP_SIZES} columns dividing the {in_features} inputs, got {group}"
    if out_features % FUSED_OUT_MULTIPLE:
        return f"it needs a multiple of {FUSED_OUT_MULTIPLE} outputs, got {out_features}"
    return None


def resolve_kernel(kernel: str, cfg: QuantizeConfig, in_features: int, out_features: int,
                   device: str | torch.device = "cpu", name: str = "linear") -> str:
    """`fused` or `torch` for one layer; an explicit `fused` the layer cannot run is an error."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r} (expected one of {', '.join(KERNELS)})")
    if kernel == "torch":
        return "torch"
    reason = fused_unsupported(cfg, in_features, out_features, device)
    if reason is not None and kernel == "fused":
        raise ValueError(f"{name}: the fused int4 kernel cannot run this layer: {reason}")
    return "torch" if reason else "fused"


def kernel_of(module: nn.Module) -> str:
    from core.quant.fused import FusedInt4Linear

    return "fused" if isinstance(module, FusedInt4Linear) else "torch"


def kernels_used(model: nn.Module) -> dict[str, int]:
    """How many quantized linears of `model` run on each kernel, e.g. {"fused": 8}."""
    return dict(Counter(kernel_of(module) for module in model.modules() if _is_quant_linear(module)))


def describe_kernels(model: nn.Module) -> str:
    """`fused`, `torch`, `fused 46 + torch 2` when a model mixes them, `none` without quantized linears."""
    used = kernels_used(model)
    if len(used) <= 1:
        return next(iter(used), "none")
    return " + ".join(f"{kind} {n}" for kind, n in sorted(used.items()))


def _settings(module: nn.Module) -> QuantizeConfig:
    return QuantizeConfig(bits=module.bits, group_size=module.requested_group_size, sym=module.sym,
                          act_order=module.desc_act)


@torch.no_grad()
def set_kernel(model: nn.Module, kernel: str) -> dict[str, int]:
    """Move every quantized linear of `model` to `kernel` (`auto`, `fused` or `torch`) in place.

    Each layer's packed tensors are copied as they are; a fused layer that has already run holds
    the kernel's repacked tensors and cannot move back. Returns `kernels_used(model)`.
    """
    for name, module in [(n, m) for n, m in model.named_modules() if _is_quant_linear(m)]:
        device = module.qweight.device
        target = resolve_kernel(kernel, _settings(module), module.in_features, module.out_features, device, name)
        if target == kernel_of(module):
            continue
        if getattr(module, "repacked", False):
            raise ValueError(f"{name} has run the fused kernel and no longer holds the checkpoint layout: "
                             "load the checkpoint again to change its kernel")
        replacement = _empty_quant_linear(module.in_features, module.out_features, module.bias is not None,
                                          _settings(module), target)
        replacement.load_state_dict(module.state_dict(), strict=True)
        _finish_quant_linear(replacement)
        _set_submodule(model, name, replacement.to(device))
    return kernels_used(model)
