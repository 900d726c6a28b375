"""gptqmodel's fused int4 CPU linear (`TorchFusedLinear`), with asymmetric zero points kept.

`TorchFusedLinear` loads the same gptq_v2 tensors as `TorchLinear`. On its first inference
forward it repacks them, once, for torch's `_weight_int4pack_mm_for_cpu`, which dequantizes
inside the matmul instead of materialising the weight each call. That kernel computes
`x @ ((q - 8) * scale + offset)`, in bfloat16: an fp32 input is cast to bfloat16 and the
output cast back (in torch 2.14 the op's float32 and float16 paths are tens of times slower
than a dense fp32 matmul), so the layer agrees with `TorchLinear` to bfloat16 precision.
gptqmodel's forward also sets torch._inductor's `freezing` and `max_autotune` for the process
when it first repacks; vidkd compiles nothing, so nothing here depends on it.

Many rows at once (a batch of clips: frames x tokens rows per linear) take another path: the
int4 kernel's cost grows with the rows like a dense fp32 matmul's, while dequantizing the weight
once to bfloat16 (the codes read straight from the kernel's packed buffer) and running a dense
bf16 matmul costs one dequantization plus bf16's speed, 2-3x fp32's on CPUs with AVX-512 BF16.
From `DENSE_FROM_ROWS` rows on the layer does that (measured: docs/benchmarks.md, bench/int4.py),
where the packed layout is the one `dense_layout_ok` checks; the weight is not kept.

This module imports gptqmodel at the top: `core.quant.packing` imports it only when a fused
layer is built, or when a caller imports the whole backend up front (`import_backend`).
"""

from __future__ import annotations

import torch
from gptqmodel.looper.linear_mode import LinearMode
from gptqmodel.models._const import DEVICE
from gptqmodel.nn_modules.qlinear.torch_fused import TorchFusedLinear, pack_scales_and_zeros
from gptqmodel.utils.torch import TORCH_HAS_FUSED_OPS

# What `_weight_int4pack_mm_for_cpu` accepts, intersected with what `TorchFusedLinear` declares:
# group sizes of 32, 64 or 128 input columns, and outputs in multiples of 16.
FUSED_GROUP_SIZES = (32, 64, 128)
FUSED_OUT_MULTIPLE = 16
DENSE_FROM_ROWS = 128  # from here a dequantized bf16 matmul beats the kernel (768x3072, 200 rows: 6 ms against 13)
PACK_BLOCK = 64  # output rows per block of the CPU int4 packing: [N / 64, K, 32] bytes, low nibble row j, high j + 32


def unpack_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The 4-bit codes [out, in] (uint8, 0..15) of `_convert_weight_to_int4pack_for_cpu`'s
    output, for `out_features` a multiple of PACK_BLOCK."""
    blocks = packed.view(out_features // PACK_BLOCK, in_features, PACK_BLOCK // 2)
    codes = torch.cat([blocks & 15, blocks >> 4], dim=2)  # [N / 64, K, 64]
    return codes.permute(0, 2, 1).reshape(out_features, in_features)


_LAYOUT_OK: dict[int, bool] = {}


def dense_layout_ok(in_features: int) -> bool:
    """Whether this torch packs int4 weights as `unpack_codes` reads them (checked once per input
    width on a block of random codes): a torch that packs otherwise keeps the kernel for all rows."""
    if in_features not in _LAYOUT_OK:
        generator = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (PACK_BLOCK, in_features), dtype=torch.int32, generator=generator)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        _LAYOUT_OK[in_features] = bool(packed.numel() * 2 == codes.numel() and torch.equal(
            unpack_codes(packed, PACK_BLOCK, in_features).int(), codes))
    return _LAYOUT_OK[in_features]


def fused_op_available() -> bool:
    return TORCH_HAS_FUSED_OPS and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class FusedInt4Linear(TorchFusedLinear):
    """`TorchFusedLinear` whose repacking keeps the zero points of asymmetric codes.

    gptqmodel 7.6.0's `transform_cpu` writes offsets of zero, which is right only for symmetric
    codes (every zero point 8, the kernel's own); this computes `offset = (8 - zero) * scale`.
    Its forward also skips the per-call input gather when the columns are already in group order.
    After repacking, `scales` and `qzeros` are views of the kernel's scale/offset table rather
    than copies of it, and the module no longer holds the checkpoint layout (`repacked`).
    """

    # What the CPU op runs (TorchFusedLinear also declares group 16, which the op rejects, and XPU).
    SUPPORTS_GROUP_SIZE = [-1, *FUSED_GROUP_SIZES]
    SUPPORTS_OUT_FEATURES_DIVISIBLE_BY = [FUSED_OUT_MULTIPLE]
    SUPPORTS_AUTO_PADDING = False
    SUPPORTS_DEVICES = [DEVICE.CPU]

    @property
    def repacked(self) -> bool:
        return self.linear_mode == LinearMode.INFERENCE

    def transform_cpu(self, dtype, do_scales_and_zeros: bool = True):
        self._init_wf_unsqueeze_buffers()
        shifted = self.qzeros.unsqueeze(2).expand(-1, -1, self.pack_factor)
        packed = torch.bitwise_right_shift(shifted, self.wf_unsqueeze_zero)
        zeros = torch.bitwise_and(packed, self.maxq).reshape(self.qzeros.shape[0], -1)[:, : self.out_features]
        offsets = (2 ** (self.bits - 1) - zeros.float()) * self.scales.float()
        super().transform_cpu(dtype, do_scales_and_zeros=False)
        table = pack_scales_and_zeros(self.scales, offsets.to(dtype))
        self.scales_and_zeros = table
        self.scales, self.qzeros = table[..., 0], table[..., 1]
        self.in_order = torch.equal(self.ret_idx, torch.arange(self.in_features, dtype=self.ret_idx.dtype))
        self.group_order = None if self.in_order else self.ret_idx.long()
        self.dense_ok = self.out_features % PACK_BLOCK == 0 and dense_layout_ok(self.in_features)

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in], its columns in group order, in bfloat16: (code - 8) * scale + offset
        per group of columns, as the kernel computes it."""
        table = self.scales_and_zeros  # [groups, out, 2]: scale, offset
        groups = table.shape[0]
        codes = unpack_codes(self.qweight, self.out_features, self.in_features)
        weight = (codes.to(table.dtype) - 2 ** (self.bits - 1)).view(self.out_features, groups, -1)
        weight = weight * table[..., 0].t().unsqueeze(-1) + table[..., 1].t().unsqueeze(-1)
        return weight.view(self.out_features, self.in_features)

    @torch.no_grad()
    def _fused_op_forward(self, x):
        # The kernel's groups are runs of adjacent columns: with act-order the inputs are gathered
        # into group order (torch.gather: about three times faster on CPU than the upstream
        # x[:, idx] on bfloat16 rows); without act-order they already are, and no copy is made.
        if not self.in_order:
            x = torch.gather(x, 1, self.group_order.expand(x.shape[0], -1))
        if x.shape[0] >= DENSE_FROM_ROWS and self.dense_ok:
            return torch.nn.functional.linear(x, self.dequantized())
        return self.torch_fused_op(x.contiguous())


# gptqmodel requires a quant linear to declare every SUPPORTS_* itself: the rest are TorchFusedLinear's.
for _name, _value in vars(TorchFusedLinear).items():
    if _name.startswith("SUPPORTS_") and _name not in vars(FusedInt4Linear):
        setattr(FusedInt4Linear, _name, _value)
