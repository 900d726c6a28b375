"""How big a (quantized) student is: parameters and bytes per component, bits per weight."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from core.quant.packing import _is_quant_linear

# -------------------------------------------------------------------------------- size report
_TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection", "text.")


def size_report(model: nn.Module, checkpoint_dir: str | Path | None = None) -> dict[str, float]:
    """Sizes of a (quantized) model, flat and numeric so it can be logged as metrics.

    - `{vision,text,rest}_{params,bytes}`: parameters (a packed linear counts its original
      weights and bias) and bytes as held, per component. The vision encoder is the module named
      `visual` (the whole model if there is none); the text encoder is open_clip's text tower.
    - `quantized_bits_per_weight`: (qweight + scales + qzeros + g_idx bits) / quantized weights.
      With 4 bits, group 128 and fp16 scales this tends to 4 + 20/128 = 4.16 as layers widen.
    - `vision_compression`: the vision encoder in fp16 over the vision encoder with packed linears
      and every other tensor in fp16.
    - `file_bytes`: the files in `checkpoint_dir`, when given.
    """
    visual_name = next((name for name, _ in model.named_modules() if name == "visual" or name.endswith(".visual")), None)
    root = "" if visual_name is None else visual_name[: -len("visual")]
    quant = {name: module for name, module in model.named_modules() if _is_quant_linear(module)}

    def component(tensor_name: str) -> str:
        if visual_name is None or tensor_name.startswith(visual_name + "."):
            return "vision"
        if tensor_name.startswith(root) and tensor_name[len(root):].startswith(_TEXT_PREFIXES):
            return "text"
        return "rest"

    report: dict[str, float] = {f"{c}_{k}": 0 for c in ("vision", "text", "rest") for k in ("params", "bytes")}
    for name, tensor in model.state_dict().items():
        report[f"{component(name)}_bytes"] += tensor.numel() * tensor.element_size()
    for name, param in model.named_parameters():
        report[f"{component(name)}_params"] += param.numel()

    quant_weights = quant_bits = quant_bytes = vision_quant_params = vision_quant_bytes = 0
    for name, module in quant.items():
        weights = module.in_features * module.out_features
        params = weights + (module.out_features if module.bias is not None else 0)
        packed_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        where = component(f"{name}.qweight")
        report[f"{where}_params"] += params
        if where == "vision":
            vision_quant_params += params
            vision_quant_bytes += packed_bytes
        quant_weights += weights
        quant_bytes += packed_bytes
        quant_bits += sum(8 * getattr(module, key).numel() * getattr(module, key).element_size() for key in ("qweight", "qzeros", "scales", "g_idx"))

    report["total_params"] = sum(report[f"{c}_params"] for c in ("vision", "text", "rest"))
    report["total_bytes"] = sum(report[f"{c}_bytes"] for c in ("vision", "text", "rest"))
    report["quantized_modules"] = len(quant)
    report["quantized_weights"] = quant_weights
    report["quantized_bytes"] = quant_bytes
    report["quantized_bits_per_weight"] = quant_bits / quant_weights if quant_weights else 0.0
    report["vision_fp16_bytes"] = 2 * report["vision_params"]
    report["vision_quantized_bytes"] = vision_quant_bytes + 2 * (report["vision_params"] - vision_quant_params)
    report["vision_compression"] = report["vision_fp16_bytes"] / max(report["vision_quantized_bytes"], 1)
    if checkpoint_dir is not None:
        report["file_bytes"] = sum(p.stat().st_size for p in Path(checkpoint_dir).iterdir() if p.is_file())
    return report


