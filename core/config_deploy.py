"""The settings of the stages that put a trained student to use: quantize, the model registry, the index."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from core.config_base import Strict

EXACT_BELOW = 50_000  # videos: an index this large searches an HNSW graph (bench/ann.py, docs/benchmarks.md)


# Which packed linear runs an INT4 layer: `fused`, gptqmodel's TorchFusedLinear (torch's int4 CPU
# matmul, bfloat16 activations), `torch` its TorchLinear (dequantizes every forward; any device and
# bits); `auto`: fused where it can (CPU, 4 bits, groups 32-128, outputs a multiple of 16). One checkpoint.
QuantKernel = Literal["auto", "fused", "torch"]


class QuantizeConfig(Strict):
    bits: Literal[3, 4, 8] = 4
    group_size: int = Field(128, ge=-1)  # -1: one group per row
    sym: bool = True
    damp: float = Field(0.01, gt=0, lt=1)
    act_order: bool = False
    calib_samples: int = Field(200, ge=1)
    compare_rtn: bool = True  # also evaluate round-to-nearest at the same bits
    kernel: QuantKernel = "auto"  # how the quantized students are run when evaluated (not saved)

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int) -> int:
        if value == 0 or (value > 0 and value & (value - 1)):
            raise ValueError("group_size must be -1 or a power of two")
        return value


class RegistryConfig(Strict):  # quantize registers both students under these names (alias candidate)
    enabled: bool = True
    student_name: str = Field("vidkd-student", min_length=1)
    int4_name: str = Field("vidkd-student-int4", min_length=1)


class IndexConfig(Strict):  # the pipeline's last stage: a split indexed with the INT4 student, queries searched
    enabled: bool = False
    split: Literal["train", "val", "test"] = "test"
    out: str | None = None  # default: <output_dir>/index
    queries: list[str] = Field(default_factory=list)
    top_k: int = Field(3, ge=1)
    exact_below: int = Field(EXACT_BELOW, ge=1)  # smaller collections are searched exactly (core/index.py)
