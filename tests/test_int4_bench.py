"""bench/int4.py's measurement on a tiny tower: every variant, sane sizes, the kernels it claims."""

import sys
from pathlib import Path

import pytest
import torch

from core import quant
from core.config import QuantizeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from int4 import VARIANTS, format_report, measure  # noqa: E402


@pytest.mark.skipif(quant.fused_unsupported(QuantizeConfig(), 128, 128) is not None,
                    reason="this torch has no int4 CPU matmul")
@pytest.mark.parametrize("act_order", [False, True])
def test_measure_runs_every_variant_on_a_tiny_tower(act_order):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = measure("vidkd-vit-micro", batches=(1, 2), frames=2, reps=2, warmup=0, act_order=act_order)
    finally:
        torch.set_num_threads(threads)
    assert result["act_order"] is act_order

    rows = {(row["batch"], row["variant"]): row for row in result["rows"]}
    assert set(rows) == {(batch, variant) for batch in (1, 2) for variant in VARIANTS}
    assert all(row["ms_per_video"] > 0 and row["rounds"] == 2 for row in rows.values())
    assert all(rows[(b, "fp32")]["ratio_to_fp32"] == 1.0 for b in (1, 2))
    fp32, bf16 = rows[(1, "fp32")], rows[(1, "bf16")]
    assert bf16["weight_bytes"] == fp32["weight_bytes"] // 2
    assert (fp32["bits_per_weight"], bf16["bits_per_weight"]) == (32.0, 16.0)
    for variant in ("int4-fused", "int4-torch"):
        row = rows[(1, variant)]
        # vidkd-vit-micro's vision linears are 128 to 512 wide: g_idx and the fused kernel's bf16
        # scale/offset table cost more per weight there than at ViT-B widths
        assert 4.1 < row["bits_per_weight"] < 5.0, variant
        assert row["weight_bytes"] < fp32["weight_bytes"] / 2
        assert 0 < row["rel_error"] < 0.2  # RTN's 4-bit error on a random tower, not a broken kernel
    assert 4.16 < result["checkpoint_bits"] < 4.5
    assert 0 < result["fused_vs_torch"] < 1e-2
    assert bf16["rel_error"] < 2e-2
    # the fused variant spends time in the int4 matmul, and no other variant runs it
    assert result["int4_op_share"]["int4-fused"] > 0
    assert all(result["int4_op_share"][v] == 0 for v in ("fp32", "bf16", "int4-torch"))
    for ops in result["ops"].values():
        assert ops and all(ms >= 0 and 0 <= share <= 1 for _, ms, share in ops)
        assert [share for _, _, share in ops] == sorted((share for _, _, share in ops), reverse=True)
        assert abs(sum(share for _, _, share in ops) - 1) < 1e-6
    # with act-order the fused layers gather their inputs into group order; without, no copy is made
    assert ("aten::gather" in {op for op, _, _ in result["ops"]["int4-fused"]}) is act_order

    report = format_report([result])
    assert report.count("| vidkd-vit-micro |") == 8
    assert "Where the time goes" in report and "bits/weight: checkpoint" in report
