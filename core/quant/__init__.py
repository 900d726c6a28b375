"""GPTQ post-training quantization of a vision tower's transformer blocks.

The vision encoder dominates a CLIP-style student's size and latency, and nearly all of its
weights sit in the linears of its transformer blocks. This module quantizes those linears with
gptqmodel's `GPTQ` solver (or round-to-nearest, the baseline GPTQ has to beat) and packs them into
gptqmodel's `TorchLinear`, which runs on CPU and GPU alike. A loaded model runs them on a kernel
of choice (`kernels`): on CPU the fused int4 matmul of gptqmodel's `TorchFusedLinear` by default.

Calibration follows the GPTQ paper's recipe: blocks are quantized one after another, and inside a
block the linears in true-sequential order (qkv -> attention out -> MLP in -> MLP out), each one
calibrated on inputs that already flow through every layer quantized before it. Errors made early
are therefore seen, and partly compensated, by the layers after them.

Two block layouts are understood:
- open_clip's `ResidualAttentionBlock`: `attn` is an `nn.MultiheadAttention` whose input
  projection is a bare `in_proj_weight`, which neither GPTQ nor a packed linear can replace. It is
  swapped first for `QKVAttention`, the same attention with `qkv` and `out_proj` as linears.
- timm's `Block` (open_clip `TimmModel` trunks): `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`.

A checkpoint is a directory: `model.safetensors` (packed linears and the unquantized rest of the
model) and `quantize_config.json` (quantization settings, which modules are packed, and the
caller's `model_meta` needed to rebuild the unquantized skeleton).

gptqmodel is imported lazily: importing it takes several seconds and sets process-wide
environment variables, a cost only quantizing and loading should pay (`import_backend` pays it
at a moment of the caller's choosing, which can hide what that first import prints).

Modules: `packing` (gptqmodel's packed linears, the settings they pack, module helpers), `gptq`
(the attention swap, the blocks, GPTQ/RTN on one linear and over the tower), `kernels` (which
packed linear runs a layer), `fused` (the fused CPU linear; imports gptqmodel when first used),
`checkpoint` (save and load) and `size` (the size report).
"""

from core.quant.checkpoint import load_quantized, quantized_module_names, read_quantize_config, save_quantized
from core.quant.gptq import (LayerQuantizer, QKVAttention, QuantResult, block_linear_names, find_vision_blocks,
                             quantize_visual, replace_multihead_attention)
from core.quant.kernels import (KERNELS, describe_kernels, fused_unsupported, kernels_used, resolve_kernel,
                                set_kernel)
from core.quant.packing import CONFIG_FILE, WEIGHTS_FILE, Method, import_backend
from core.quant.size import size_report

__all__ = ["CONFIG_FILE", "KERNELS", "WEIGHTS_FILE", "LayerQuantizer", "Method", "QKVAttention", "QuantResult",
           "block_linear_names", "describe_kernels", "find_vision_blocks", "fused_unsupported", "import_backend",
           "kernels_used", "load_quantized", "quantize_visual", "quantized_module_names", "read_quantize_config",
           "replace_multihead_attention", "resolve_kernel", "save_quantized", "set_kernel", "size_report"]
