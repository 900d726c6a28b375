"""gptqmodel's packed linears (`TorchLinear`, and the fused CPU one), the settings they pack, module helpers.

gptqmodel is imported lazily: importing it takes several seconds and sets process-wide
environment variables, a cost only quantizing and loading should pay.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from core.config import QuantizeConfig

Method = Literal["gptq", "rtn"]
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quantize_config.json"


# Linears of one block in true-sequential order, per supported block layout.
BLOCK_LAYOUTS: tuple[tuple[str, ...], ...] = (
    ("attn.qkv", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"),  # open_clip, after the MHA swap
    ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),  # timm
)
# Group sizes gptqmodel's TorchLinear packs (-1: one group per output row).
SUPPORTED_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)


def import_backend() -> None:
    """Import every part of gptqmodel that quantizing and loading use, now: the first import of
    gptqmodel prints a banner, a version table and environment notices, and a caller that would
    rather not show them (the stages, unless `--verbose`) wraps this call. Later imports are free."""
    _gptqmodel()
    import core.quant.fused  # noqa: F401  (imports gptqmodel's fused linear)


def _gptqmodel():
    import gptqmodel.quantization as quantization
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization.rtn import RTN

    return quantization, TorchLinear, RTN


def _is_quant_linear(module: nn.Module) -> bool:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return isinstance(module, BaseQuantLinear)



def pack_linear(linear: nn.Linear, fake_weight, scales, zeros, g_idx, cfg: QuantizeConfig) -> nn.Module:
    """Pack a solver's output (`[out, G]` scales and zeros, `[in]` g_idx) into a `TorchLinear`.

    Packing recomputes the integer codes from the fake-quantized weight, so the packed layer
    dequantizes to that weight up to the fp16 rounding of its scales. The packed zero points are
    the zero points themselves (gptqmodel's runtime "v2" layout), not auto-gptq's zero - 1.
    """
    qlinear = _empty_quant_linear(linear.in_features, linear.out_features, linear.bias is not None, cfg)
    carrier = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    carrier.weight.data = fake_weight.detach().float().cpu()
    if linear.bias is not None:
        carrier.bias.data = linear.bias.detach().float().cpu()
    qlinear.pack_original(carrier, scales.float().cpu(), zeros.float().cpu(), g_idx.int().cpu())
    _finish_quant_linear(qlinear)
    return qlinear.to(linear.weight.device)


def _quant_linear_class(kernel: str) -> type[nn.Module]:
    """The packed linear of a resolved kernel (`fused` or `torch`); both load the same tensors."""
    if kernel == "fused":
        from core.quant.fused import FusedInt4Linear

        return FusedInt4Linear
    if kernel != "torch":
        raise ValueError(f"unresolved kernel {kernel!r} (expected fused or torch)")
    return _gptqmodel()[1]


def _empty_quant_linear(in_features: int, out_features: int, bias: bool, cfg: QuantizeConfig,
                        kernel: str = "torch") -> nn.Module:
    return _quant_linear_class(kernel)(
        bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, desc_act=cfg.act_order,
        in_features=in_features, out_features=out_features, bias=bias, pack_dtype=torch.int32, register_buffers=True,
    )


def _finish_quant_linear(qlinear: nn.Module) -> None:
    # Marking it optimized skips TorchLinear's torch.compile of its dequantizer: on CPU that
    # compiles a C++ kernel per layer shape (seconds each), and on CUDA the Triton dequantizer
    # is used anyway. The fused linear compiles nothing either way.
    qlinear.optimized = True
    qlinear.post_init()
    qlinear.eval()



# ------------------------------------------------------------------------------------ helpers
def _check_settings(cfg: QuantizeConfig, method: str) -> None:
    if method not in ("gptq", "rtn"):
        raise ValueError(f"unknown quantization method {method!r} (expected gptq or rtn)")
    if cfg.group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size {cfg.group_size} cannot be packed (supported: {SUPPORTED_GROUP_SIZES})")


def _check_packable(linear: nn.Module, cfg: QuantizeConfig, name: str) -> None:
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{name}: expected nn.Linear, found {type(linear).__name__}")
    # 3-bit codes are packed 32 at a time into three int32 words, along both dimensions.
    if cfg.bits == 3 and (linear.in_features % 32 or linear.out_features % 32):
        raise ValueError(f"{name}: 3-bit packing needs in and out features divisible by 32, got {linear.out_features}x{linear.in_features}")


def _module_names(root: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in root.named_modules()}


def _get_submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)

