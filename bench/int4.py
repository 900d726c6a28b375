"""Video encoding on CPU: fp32, bf16 and INT4 (fused kernel, TorchLinear) side by side.

    python bench/int4.py [--quick] [--towers mini,vitb32] [--batches 1,32] [--frames 8] [--reps 7] [--threads N]
                         [--act-order]

Two vision towers with random weights (nothing is downloaded): the demo student's
(`vidkd-vit-mini-32px`, configs/demo.yaml) and a ViT-B/32 (open_clip's `ViT-B-32` config, 224 px).
A video is `--frames` frames through the tower, so a batch of B videos is one forward of
B x frames images. All variants hold the same weights: fp32; bf16 (the dense student of
`core.student.to_precision`); INT4 at 4 bits, group 128, symmetric, run on the fused int4 kernel
and on gptqmodel's TorchLinear (core/quant/kernels.py). The INT4 codes come from round-to-nearest,
or with `--act-order` from GPTQ with act-order on random frames, as configs/demo.yaml quantizes:
its columns are then out of group order, which the fused kernel pays for with a gather of its
input per layer (TorchLinear's cost does not depend on it).

Timing: after the warm-up rounds, every round runs each variant once, in an order that rotates
from round to round, so load on the machine falls on all of them alike. ms/video is the median
over rounds; "x fp32" is the median of each round's time over that round's fp32 time. Weight MB
counts every tensor the tower holds (the fused layers after their one-time repacking); bits per
weight are those of the quantized linears (their tensors but the bias, over their weights), and
the checkpoint's bits per weight are core.quant's size report. The op breakdown is torch.profiler's
self CPU time over one batch-1 forward of each variant.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn as nn

from core.config import QuantizeConfig
from core.modelzoo import create_clip
from core.quant import describe_kernels, quantize_visual, set_kernel, size_report
from core.quant.packing import _is_quant_linear

TOWERS = {"mini": "vidkd-vit-mini-32px", "vitb32": "ViT-B-32"}
VARIANTS = ("fp32", "bf16", "int4-fused", "int4-torch")
QUANT = QuantizeConfig(bits=4, group_size=128, sym=True)
BITS_GOAL = 4.2  # bits per weight at ViT-B widths
TOP_OPS = 5
CALIB_IMAGES = 16  # GPTQ's calibration frames with --act-order: the codes' quality is not measured here


def build_variants(model_name: str, seed: int = 0, act_order: bool = False) -> tuple[dict[str, nn.Module], int]:
    """The tower of `model_name` in every variant, and its image size."""
    torch.manual_seed(seed)
    visual = create_clip(model_name)[0].visual.eval()
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    int4 = copy.deepcopy(visual)
    if act_order:
        calib = torch.randn(CALIB_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(seed))
        quantize_visual(int4, calib, QUANT.model_copy(update={"act_order": True}), progress=False)
    else:
        quantize_visual(int4, None, QUANT, method="rtn", progress=False)
    fused = copy.deepcopy(int4)
    set_kernel(fused, "fused")
    set_kernel(int4, "torch")
    assert describe_kernels(fused) == "fused" and describe_kernels(int4) == "torch"
    return {"fp32": visual, "bf16": copy.deepcopy(visual).to(torch.bfloat16), "int4-fused": fused,
            "int4-torch": int4}, size


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor a module and its children hold: parameters, buffers, plain tensor attributes."""
    found = []
    for child in module.modules():
        found += [t for t in (*child._parameters.values(), *child._buffers.values()) if t is not None]
        found += [t for t in vars(child).values() if isinstance(t, torch.Tensor)]
    return found


def held_bytes(module: nn.Module, skip: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages behind `module`'s tensors (views and shared tensors count once)."""
    storages = {}
    for tensor in _tensors(module):
        if id(tensor) not in skip:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def quantized_bits(model: nn.Module) -> float:
    """Bits per weight the quantized linears hold in memory: all their tensors but the bias."""
    bits = weights = 0
    for module in model.modules():
        if _is_quant_linear(module):
            bias = {id(module.bias)} if module.bias is not None else set()
            bits += 8 * held_bytes(module, skip=bias)
            weights += module.in_features * module.out_features
    return bits / weights


def weight_bits(name: str, model: nn.Module) -> float:
    return {"fp32": 32.0, "bf16": 16.0}.get(name) or quantized_bits(model)


@torch.no_grad()
def forward_ms(model: nn.Module, images: torch.Tensor) -> float:
    start = time.perf_counter()
    model(images)
    return (time.perf_counter() - start) * 1000


INT4_OP = "aten::_weight_int4pack_mm_for_cpu"


@torch.no_grad()
def profile_ops(model: nn.Module, images: torch.Tensor) -> list[tuple[str, float, float]]:
    """(op, self CPU ms, share of the forward's self CPU time) of every op of one forward, costliest first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(images)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [(e.key, e.self_cpu_time_total / 1000, e.self_cpu_time_total / total) for e in events]


def _inputs(variant: str, images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.bfloat16) if variant == "bf16" else images


def measure(model_name: str, batches: tuple[int, ...] = (1, 32), frames: int = 8, reps: int = 7, warmup: int = 2,
            seed: int = 0, act_order: bool = False) -> dict[str, Any]:
    """Every variant of one tower at each batch size (videos of `frames` frames), interleaved."""
    variants, size = build_variants(model_name, seed, act_order)
    generator = torch.Generator().manual_seed(seed)
    one = torch.randn(frames, 3, size, size, generator=generator)
    with torch.no_grad():  # also runs the fused layers' one-time repacking before anything is counted
        outputs = {name: model(_inputs(name, one)).float() for name, model in variants.items()}

    def rel(name: str, against: str = "fp32") -> float:
        return ((outputs[name] - outputs[against]).norm() / outputs[against].norm()).item()

    rows = []
    for batch in batches:
        images = torch.randn(batch * frames, 3, size, size, generator=generator)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rnd in range(warmup + reps):
            order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[: rnd % len(VARIANTS)]
            timed = {name: forward_ms(variants[name], _inputs(name, images)) for name in order}
            if rnd >= warmup:
                for name, ms in timed.items():
                    times[name].append(ms)
        for name, model in variants.items():
            ratios = [t / base for t, base in zip(times[name], times["fp32"])]
            rows.append({"batch": batch, "variant": name, "ms_per_video": statistics.median(times[name]) / batch,
                         "ratio_to_fp32": statistics.median(ratios), "weight_bytes": held_bytes(model),
                         "bits_per_weight": weight_bits(name, model), "rel_error": rel(name),
                         "rounds": len(times[name])})
    ops = {name: profile_ops(model, _inputs(name, one)) for name, model in variants.items()}
    return {"model": model_name, "image_size": size, "frames": frames, "act_order": act_order, "rows": rows,
            "ops": ops, "int4_op_share": {name: sum(s for op, _, s in found if op == INT4_OP)
                                          for name, found in ops.items()},
            "checkpoint_bits": size_report(variants["int4-torch"])["quantized_bits_per_weight"],
            "fused_vs_torch": rel("int4-fused", "int4-torch")}


def machine() -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads of {os.cpu_count()} CPUs ({platform.machine()}), load average {load}")


def format_report(results: list[dict[str, Any]]) -> str:
    lines = ["| tower | batch | variant | ms/video | × fp32 | weight MB | bits/weight | rel. error vs fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results:
        for row in result["rows"]:
            lines.append(f"| {result['model']} | {row['batch']} | {row['variant']} | {row['ms_per_video']:.2f} | "
                         f"{row['ratio_to_fp32']:.2f} | {row['weight_bytes'] / 2**20:.2f} | "
                         f"{row['bits_per_weight']:.2f} | {row['rel_error']:.4f} |")
    lines += ["", "Goals (INT4 on the fused kernel):"]
    for result in results:
        for row in (r for r in result["rows"] if r["variant"] == "int4-fused"):
            verdict = "met" if row["ratio_to_fp32"] <= 1.0 else "not met"
            lines.append(f"- {result['model']}, batch {row['batch']}: no slower than fp32: "
                         f"{row['ratio_to_fp32']:.2f}x fp32, {verdict}")
        bits = result["checkpoint_bits"]
        fused_bits = next(r["bits_per_weight"] for r in result["rows"] if r["variant"] == "int4-fused")
        verdict = "met" if bits <= BITS_GOAL else "not met"
        lines.append(f"- {result['model']}: at most {BITS_GOAL} bits/weight: checkpoint {bits:.3f} ({verdict}); "
                     f"the fused kernel holds {fused_bits:.3f} in memory")
        lines.append(f"- {result['model']}: INT4 fused against INT4 TorchLinear outputs: relative difference "
                     f"{result['fused_vs_torch']:.4f} (bf16 activations)")
    lines += ["", "Where the time goes (one batch-1 forward per variant, self CPU time, top ops):"]
    for result in results:
        for name, ops in result["ops"].items():
            top = ", ".join(f"{op} {share:.0%} ({ms:.1f} ms)" for op, ms, share in ops[:TOP_OPS])
            lines.append(f"- {result['model']} {name}: {top}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--towers", default=",".join(TOWERS), help=f"comma-separated, of {', '.join(TOWERS)}")
    parser.add_argument("--batches", default="1,32", help="videos per forward, comma-separated")
    parser.add_argument("--frames", type=int, default=8, help="frames per video (the demo's num_frames)")
    parser.add_argument("--reps", type=int, default=7, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--act-order", action="store_true", help="INT4 by GPTQ with act-order, as the demo")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 timed rounds after 1 warm-up")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, warmup = (2, 1) if args.quick else (args.reps, args.warmup)
    batches = tuple(int(b) for b in args.batches.split(","))
    start = time.perf_counter()
    print(f"Machine: {machine()}", flush=True)
    results = []
    for tower in args.towers.split(","):
        results.append(measure(TOWERS[tower], batches, args.frames, reps, warmup, act_order=args.act_order))
        print(f"{tower}: done after {time.perf_counter() - start:.0f} s", flush=True)
    codes = "GPTQ with act-order" if args.act_order else "round-to-nearest"
    print(f"\n{args.frames} frames per video, INT4 codes by {codes}, {reps} timed rounds after {warmup} warm-up; "
          f"load average at the end {', '.join(f'{v:.1f}' for v in os.getloadavg())}\n")
    print(format_report(results))


if __name__ == "__main__":
    main()
