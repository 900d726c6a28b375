"""A quantized model as a directory: `model.safetensors` and `quantize_config.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from core.config import QuantizeConfig, QuantKernel
from core.quant.gptq import QKVAttention
from core.quant.kernels import resolve_kernel
from core.quant.packing import (CONFIG_FILE, WEIGHTS_FILE, Method, _empty_quant_linear, _finish_quant_linear,
                                _is_quant_linear, _set_submodule)

# ------------------------------------------------------------------------------ save and load
def quantized_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if _is_quant_linear(module)]


def save_quantized(
    model: nn.Module,
    out_dir: str | Path,
    cfg: QuantizeConfig,
    model_meta: dict[str, Any],
    method: Method = "gptq",
) -> Path:
    """Write `model` (with its packed linears) to `out_dir`; returns the directory.

    `model_meta` is whatever `load_quantized`'s `build_model` needs to rebuild the unquantized
    skeleton (a model name, a student config, ...); it must be JSON-serialisable. The packed
    modules and swapped attentions are found in the model itself, named from its root.
    """
    quantized = quantized_module_names(model)
    if not quantized:
        raise ValueError("the model holds no quantized linears: run quantize_visual first")
    repacked = [name for name in quantized if getattr(model.get_submodule(name), "repacked", False)]
    if repacked:
        raise ValueError(f"{repacked[0]} has run the fused kernel, whose repacked tensors are not the checkpoint "
                         "layout: save the model quantize_visual packed, or one loaded with kernel='torch'")
    try:
        json.dumps(model_meta)
    except TypeError as error:
        raise ValueError(f"model_meta must be JSON-serialisable: {error}") from None
    from gptqmodel import __version__ as gptqmodel_version
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "quant_method": method,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "sym": cfg.sym,
        "desc_act": cfg.act_order,
        "damp_percent": cfg.damp,
        "true_sequential": True,
        "checkpoint_format": "gptq_v2",  # qzeros hold the zero points, not zero - 1
        "pack_dtype": "int32",
        "quant_linear": "gptqmodel.nn_modules.qlinear.torch.TorchLinear",
        "gptqmodel_version": gptqmodel_version,
        "quantized_modules": quantized,
        "swapped_attention": [name for name, module in model.named_modules() if isinstance(module, QKVAttention)],
        "model_meta": model_meta,
    }
    save_model(model, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def read_quantize_config(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file() or not (Path(out_dir) / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{out_dir} is not a quantized checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return json.loads(path.read_text())


def load_quantized(
    out_dir: str | Path,
    build_model: Callable[[dict[str, Any]], nn.Module],
    device: str | torch.device = "cpu",
    kernel: QuantKernel = "auto",
) -> nn.Module:
    """Rebuild a model written by `save_quantized`, in eval mode on `device`.

    `build_model(model_meta)` returns the unquantized skeleton; its attentions are swapped and
    its quantized linears replaced by empty packed linears of `kernel` (core.quant.kernels:
    `auto` runs the fused int4 kernel on CPU where it can, `torch` is gptqmodel's TorchLinear)
    before the weights are loaded.
    """
    from safetensors.torch import load_model

    config = read_quantize_config(out_dir)
    cfg = QuantizeConfig(bits=config["bits"], group_size=config["group_size"], sym=config["sym"], act_order=config["desc_act"])
    model = build_model(config["model_meta"])
    for name in config["swapped_attention"]:
        mha = model.get_submodule(name)
        if not isinstance(mha, nn.MultiheadAttention):
            raise ValueError(f"{name}: expected nn.MultiheadAttention in the rebuilt model, found {type(mha).__name__}")
        _set_submodule(model, name, QKVAttention.from_multihead_attention(mha))
    for name in config["quantized_modules"]:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name}: expected nn.Linear in the rebuilt model, found {type(linear).__name__}")
        chosen = resolve_kernel(kernel, cfg, linear.in_features, linear.out_features, device, name)
        empty = _empty_quant_linear(linear.in_features, linear.out_features, linear.bias is not None, cfg, chosen)
        _set_submodule(model, name, empty)
    model.to("cpu")
    load_model(model, str(Path(out_dir) / WEIGHTS_FILE), strict=True)
    for name in config["quantized_modules"]:
        _finish_quant_linear(model.get_submodule(name))
    return model.to(device).eval()


