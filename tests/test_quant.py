"""GPTQ over vision blocks with the real gptqmodel solver and packer, on tiny random models.

The calibration images are smooth (low-frequency noise): their patch tokens are correlated, as
real frames' are, which is what gives GPTQ's Hessian-aware rounding its edge over RTN.
"""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import ResidualAttentionBlock
from timm.models.vision_transformer import VisionTransformer

from core import quant
from core.config import QuantizeConfig
from core.modelzoo import create_clip

MODEL = "vidkd-vit-micro"  # width 128, 2 blocks, 32x32 images, patch 8 -> 17 tokens


def smooth_images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.randn(n, 3, 4, 4, generator=gen), size=32, mode="bilinear", align_corners=False)
    return low + 0.1 * torch.randn(n, 3, 32, 32, generator=gen)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def build_clip(meta: dict) -> nn.Module:
    return create_clip(meta["model"])[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """GPTQ's column loop on these tiny layers is thousands of small ops; on a 2-core machine the
    intra-op thread pool costs more than it saves (several times the CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return create_clip(MODEL)[0].eval()


@pytest.fixture(scope="module")
def calib():
    return smooth_images(64, seed=1)


@pytest.fixture(scope="module")
def held_out():
    return smooth_images(16, seed=2)


@pytest.fixture(scope="module")
def gptq_model(clip_model, calib):
    model = copy.deepcopy(clip_model)
    result = quant.quantize_visual(model.visual, calib, QuantizeConfig(), progress=False)
    return model, result


@pytest.fixture(scope="module")
def rtn_model(clip_model, calib):
    model = copy.deepcopy(clip_model)
    result = quant.quantize_visual(model.visual, calib, QuantizeConfig(), method="rtn", progress=False)
    return model, result


# ----------------------------------------------------------------------------- attention swap
@pytest.mark.parametrize("batch_first", [True, False])
def test_qkv_attention_matches_multihead_attention(batch_first):
    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 64) if batch_first else torch.randn(7, 3, 64)
    masks = [
        None,
        torch.full((7, 7), float("-inf")).triu(1),  # open_clip's causal float mask
        torch.rand(7, 7).gt(0.7).fill_diagonal_(False),  # boolean: True may not attend
        torch.randn(3 * 4, 7, 7),  # per batch and head
    ]
    with torch.no_grad():
        expected = [block.attn(x, x, x, need_weights=False, attn_mask=m)[0] for m in masks]
        expected_block = block(x, attn_mask=masks[1])
        block.attn = quant.QKVAttention.from_multihead_attention(block.attn)
        got = [block.attn(x, x, x, need_weights=False, attn_mask=m)[0] for m in masks]
        got_block = block(x, attn_mask=masks[1])
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_block, expected_block, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="self-attention"):
        block.attn(x, x.clone(), x)


def test_swapped_visual_is_numerically_identical(clip_model, held_out):
    visual = copy.deepcopy(clip_model.visual)
    with torch.no_grad():
        before = visual(held_out)
        swapped = quant.replace_multihead_attention(visual)
        after = visual(held_out)
    assert swapped == ["transformer.resblocks.0.attn", "transformer.resblocks.1.attn"]
    assert not any(isinstance(m, nn.MultiheadAttention) for m in visual.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- GPTQ
def test_gptq_packs_every_block_linear(gptq_model, calib):
    model, result = gptq_model
    layout = ["attn.qkv", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"]
    assert result.quantized_names == [f"transformer.resblocks.{b}.{n}" for b in range(2) for n in layout]
    assert quant.quantized_module_names(model) == [f"visual.{name}" for name in result.quantized_names]
    assert all(layer.tokens == len(calib) * 17 for layer in result.layers)
    qkv = model.visual.transformer.resblocks[0].attn.qkv
    assert (qkv.in_features, qkv.out_features) == (128, 384)
    assert qkv.qweight.shape == (128 * 4 // 32, 384) and qkv.qweight.dtype == torch.int32
    assert qkv.scales.shape == (1, 384) and qkv.scales.dtype == torch.float16
    c_proj = model.visual.transformer.resblocks[1].mlp.c_proj
    assert c_proj.scales.shape == (512 // 128, 128) and torch.equal(c_proj.g_idx, torch.arange(512, dtype=torch.int32) // 128)
    blocks = model.visual.transformer.resblocks
    assert not any(type(m) is nn.Linear for m in blocks.modules())  # every block linear is packed
    assert all(0 < layer.rel_output_error < 0.1 for layer in result.layers)


def test_save_and_load_give_the_same_model(gptq_model, held_out, tmp_path):
    model, _ = gptq_model
    cfg = QuantizeConfig()
    quant.save_quantized(model, tmp_path, cfg, {"model": MODEL})
    config = json.loads((tmp_path / "quantize_config.json").read_text())
    assert config["bits"] == 4 and config["group_size"] == 128 and config["sym"] and not config["desc_act"]
    assert config["quantized_modules"] == quant.quantized_module_names(model)
    assert config["model_meta"] == {"model": MODEL}

    loaded = quant.load_quantized(tmp_path, build_clip, kernel="torch")  # the kernel that packed them: exact
    assert quant.quantized_module_names(loaded) == config["quantized_modules"]
    tokens = torch.randint(0, 49408, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(held_out), model.encode_image(held_out))
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (3, False), (8, False)])
def test_packed_layer_dequantizes_to_gptq_weight(bits, act_order):
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    cfg = QuantizeConfig(bits=bits, act_order=act_order)
    quantizer = quant.LayerQuantizer(linear, cfg)
    inputs = torch.randn(600, 256) @ torch.randn(256, 256)  # correlated features
    for batch in inputs.split(200):
        quantizer.add_batch(batch)
    layer = quantizer.quantize()

    dequantized = layer.module.dequantize_weight().T.float()
    # Packing keeps the integer codes; only the fp16 scales (and the fp16 product) round.
    torch.testing.assert_close(dequantized, layer.fake_quant_weight, rtol=2**-10, atol=0)
    assert layer.module.qweight.shape == (256 * bits // 32, 64)
    assert torch.equal(layer.module.g_idx.sort().values, torch.arange(256, dtype=torch.int32) // 128)
    assert act_order == (not torch.equal(layer.module.g_idx, torch.arange(256, dtype=torch.int32) // 128))
    with torch.no_grad():
        expected = inputs[:8] @ layer.fake_quant_weight.T + linear.bias
        torch.testing.assert_close(layer.module(inputs[:8]), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_size_report(clip_model, gptq_model, tmp_path):
    model, _ = gptq_model
    quant.save_quantized(model, tmp_path, QuantizeConfig(), {"model": MODEL})
    report = quant.size_report(model, tmp_path)
    full = quant.size_report(clip_model)

    # 4 bits + (fp16 scale + 4-bit zero) / 128 + int32 g_idx / out_features, averaged over layers
    assert 4.16 < report["quantized_bits_per_weight"] < 4.5
    assert report["quantized_modules"] == 8 and report["quantized_weights"] == 2 * 128 * (384 + 128 + 512 + 512)
    for part in ("vision", "text", "rest"):
        assert report[f"{part}_params"] == full[f"{part}_params"]  # a packed linear still counts its weights
    assert report["text_bytes"] == full["text_bytes"]
    assert report["vision_bytes"] < full["vision_bytes"] / 3  # fp32 in, ~4-bit out
    assert report["vision_fp16_bytes"] == 2 * full["vision_params"]
    assert 2.5 < report["vision_compression"] < 4
    assert report["total_bytes"] < report["file_bytes"] < report["total_bytes"] + 100_000


# ------------------------------------------------------------------------------ GPTQ vs RTN
def test_gptq_beats_round_to_nearest(clip_model, gptq_model, rtn_model, held_out):
    (gptq, gptq_result), (rtn, rtn_result) = gptq_model, rtn_model
    assert gptq_result.quantized_names == rtn_result.quantized_names
    for g, r in zip(gptq_result.layers, rtn_result.layers):
        assert g.rel_output_error < r.rel_output_error, g.name
    with torch.no_grad():
        reference = clip_model.encode_image(held_out)
        gptq_error = relative_error(gptq.encode_image(held_out), reference)
        rtn_error = relative_error(rtn.encode_image(held_out), reference)
    assert gptq_error < rtn_error


def test_round_to_nearest_needs_no_calibration(clip_model, rtn_model):
    visual = copy.deepcopy(clip_model.visual)
    result = quant.quantize_visual(visual, None, QuantizeConfig(), method="rtn", progress=False)
    assert all(layer.rel_output_error is None and layer.tokens == 0 for layer in result.layers)
    calibrated = dict(rtn_model[0].visual.named_buffers())
    for name, buffer in visual.named_buffers():
        assert torch.equal(buffer, calibrated[name]), name  # RTN's weights do not depend on the data


# --------------------------------------------------------------------------- bits, act-order
def test_fewer_bits_lose_more(clip_model, gptq_model, calib, held_out):
    errors = {}
    with torch.no_grad():
        reference = clip_model.encode_image(held_out)
        errors[4] = relative_error(gptq_model[0].encode_image(held_out), reference)
        for bits in (3, 8):
            model = copy.deepcopy(clip_model)
            result = quant.quantize_visual(model.visual, calib[:32], QuantizeConfig(bits=bits), progress=False)
            assert model.visual.transformer.resblocks[0].mlp.c_fc.qweight.shape == (128 * bits // 32, 512)
            assert result.bits == bits
            errors[bits] = relative_error(model.encode_image(held_out), reference)
    assert errors[8] < errors[4] < errors[3] < 0.2


def test_act_order_round_trip(clip_model, calib, held_out, tmp_path):
    model = copy.deepcopy(clip_model)
    cfg = QuantizeConfig(act_order=True)
    quant.quantize_visual(model.visual, calib[:32], cfg, batch_size=8, progress=False)
    g_idx = model.visual.transformer.resblocks[0].mlp.c_proj.g_idx
    assert not torch.equal(g_idx, g_idx.sort().values)  # columns quantized by descending activation
    quant.save_quantized(model, tmp_path, cfg, {"model": MODEL})
    assert json.loads((tmp_path / "quantize_config.json").read_text())["desc_act"] is True
    loaded = quant.load_quantized(tmp_path, build_clip, kernel="torch")
    fused = quant.load_quantized(tmp_path, build_clip)  # auto: fused where this torch has the kernel
    assert quant.describe_kernels(fused) == ("torch" if quant.fused_unsupported(cfg, 128, 128) else "fused")
    with torch.no_grad():
        expected = model.encode_image(held_out)
        assert torch.equal(loaded.encode_image(held_out), expected)
        assert relative_error(fused.encode_image(held_out), expected) < 1e-2  # bf16 activations
        assert relative_error(expected, clip_model.encode_image(held_out)) < 0.05


# ----------------------------------------------------------------------------------- kernels
requires_fused = pytest.mark.skipif(quant.fused_unsupported(QuantizeConfig(), 128, 128) is not None,
                                    reason="this torch has no int4 CPU matmul")


def ran_int4_kernel(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = layer(x)
    return out, any(e.key == "aten::_weight_int4pack_mm_for_cpu" for e in prof.key_averages())


@requires_fused
@pytest.mark.parametrize("shape,group_size,act_order,sym", [
    ((128, 64), 128, False, True), ((256, 96), 64, True, True), ((384, 48), 32, True, False),
    ((128, 32), -1, False, False), ((512, 128), 128, True, True),
])
def test_fused_kernel_matches_dequantized_reference(shape, group_size, act_order, sym):
    """The fused layer, loaded from the same packed tensors, against TorchLinear's dequantized weight.

    The kernel runs on bfloat16 activations, scales and outputs, so the two agree to bfloat16
    precision (relative error ~2^-9), not fp16's; a wrong zero point or column order is off by
    tens of percent."""
    torch.manual_seed(0)
    in_features, out_features = shape
    linear = nn.Linear(in_features, out_features)
    quantizer = quant.LayerQuantizer(linear, QuantizeConfig(group_size=group_size, act_order=act_order, sym=sym))
    quantizer.add_batch(torch.randn(400, in_features) @ torch.randn(in_features, in_features) / in_features**0.5)
    reference = quantizer.quantize().module
    model = nn.Sequential(copy.deepcopy(reference))
    assert quant.set_kernel(model, "fused") == {"fused": 1}

    x = torch.randn(2, 7, in_features)
    out, used_kernel = ran_int4_kernel(model[0], x)
    with torch.no_grad():
        expected = reference(x)
    assert used_kernel and model[0].repacked and out.shape == expected.shape and out.dtype == torch.float32
    assert relative_error(out, expected) < 6e-3
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1.6e-2 * expected.abs().max().item())
    with pytest.raises(ValueError, match="no longer holds the checkpoint layout"):
        quant.set_kernel(model, "torch")


@requires_fused
@pytest.mark.parametrize("shape,group_size,act_order,sym", [
    ((128, 64), 128, False, True), ((256, 192), 64, True, False), ((96, 128), 32, False, True),
])
def test_many_rows_run_a_dequantized_bf16_matmul_that_matches_the_kernel(shape, group_size, act_order, sym):
    """From DENSE_FROM_ROWS rows the fused layer dequantizes its packed codes to bfloat16 and runs
    a dense matmul instead of the int4 kernel: the same weight, read from the kernel's own packing
    (whose layout is checked), so the same outputs to bfloat16 precision; fewer rows still run
    the kernel. An output width the layout check does not cover keeps the kernel for all rows."""
    from core.quant.fused import DENSE_FROM_ROWS, dense_layout_ok

    torch.manual_seed(0)
    in_features, out_features = shape
    linear = nn.Linear(in_features, out_features)
    quantizer = quant.LayerQuantizer(linear, QuantizeConfig(group_size=group_size, act_order=act_order, sym=sym))
    quantizer.add_batch(torch.randn(400, in_features))
    reference = quantizer.quantize().module
    model = nn.Sequential(copy.deepcopy(reference))
    quant.set_kernel(model, "fused")
    assert dense_layout_ok(in_features)
    few, kernel_for_few = ran_int4_kernel(model[0], torch.randn(DENSE_FROM_ROWS - 1, in_features))
    x = torch.randn(DENSE_FROM_ROWS + 72, in_features)
    many, kernel_for_many = ran_int4_kernel(model[0], x)
    assert kernel_for_few and not kernel_for_many and model[0].dense_ok
    with torch.no_grad():
        expected = reference(x)
        kernel = model[0].torch_fused_op(torch.gather(x.bfloat16(), 1, model[0].group_order.expand(len(x), -1))
                                         if not model[0].in_order else x.bfloat16()).float() + model[0].bias
    assert relative_error(many, expected) < 6e-3
    assert relative_error(many, kernel) < 6e-3  # the kernel's own answer for the same rows

    odd_quantizer = quant.LayerQuantizer(nn.Linear(128, 48), QuantizeConfig())
    odd_quantizer.add_batch(torch.randn(200, 128))
    odd = nn.Sequential(odd_quantizer.quantize().module)
    quant.set_kernel(odd, "fused")
    _, kernel_for_odd = ran_int4_kernel(odd[0], torch.randn(DENSE_FROM_ROWS + 10, 128))
    assert kernel_for_odd and not odd[0].dense_ok  # 48 outputs: not a whole packing block


@requires_fused
def test_checkpoint_loads_into_either_kernel(gptq_model, held_out, tmp_path):
    model, _ = gptq_model
    quant.save_quantized(model, tmp_path, QuantizeConfig(), {"model": MODEL})
    portable = quant.load_quantized(tmp_path, build_clip, kernel="torch")
    fused = quant.load_quantized(tmp_path, build_clip, kernel="fused")
    assert quant.kernels_used(portable) == {"torch": 8} and quant.describe_kernels(portable) == "torch"
    assert quant.kernels_used(fused) == {"fused": 8}
    assert quant.kernels_used(quant.load_quantized(tmp_path, build_clip)) == {"fused": 8}  # auto, on CPU
    assert quant.size_report(fused, tmp_path) == quant.size_report(portable, tmp_path)  # the same tensors
    with torch.no_grad():
        expected = model.encode_image(held_out)
        assert torch.equal(portable.encode_image(held_out), expected)
        assert relative_error(fused.encode_image(held_out), expected) < 1e-2
    with pytest.raises(ValueError, match="has run the fused kernel"):
        quant.save_quantized(fused, tmp_path / "again", QuantizeConfig(), {"model": MODEL})
    assert quant.set_kernel(portable, "auto") == {"fused": 8}  # in memory, from the packed tensors


def test_kernel_choice_per_layer():
    cfg = QuantizeConfig()
    assert quant.resolve_kernel("torch", cfg, 768, 768) == "torch"
    assert quant.resolve_kernel("auto", cfg, 768, 768, device="cuda") == "torch"  # fused is CPU only
    unsupported = {"8 bits": (QuantizeConfig(bits=8), 768, 768),
                   "group 256": (QuantizeConfig(group_size=256), 768, 768),
                   "one group of 768": (QuantizeConfig(group_size=-1), 768, 768),
                   "100 outputs": (cfg, 768, 100)}
    for why, (settings, in_features, out_features) in unsupported.items():
        assert quant.resolve_kernel("auto", settings, in_features, out_features) == "torch", why
        with pytest.raises(ValueError, match="fused int4 kernel cannot run this layer"):
            quant.resolve_kernel("fused", settings, in_features, out_features, name=why)
    with pytest.raises(ValueError, match="unknown kernel 'marlin'"):
        quant.resolve_kernel("marlin", cfg, 768, 768)
    expected = "torch" if quant.fused_unsupported(cfg, 768, 768) else "fused"
    assert quant.resolve_kernel("auto", cfg, 768, 768) == expected


def test_bf16_student_is_its_own_precision(tmp_path):
    from core.config import StudentConfig
    from core.student import build_student, load_student, save_student

    torch.manual_seed(0)
    path = save_student(build_student(StudentConfig(model=MODEL, temporal_layers=1), num_frames=4), tmp_path / "s.pt")
    fp32, bf16 = load_student(path).eval(), load_student(path, precision="bf16").eval()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    frames = torch.randint(0, 255, (2, 4, 32, 32, 3), dtype=torch.uint8)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.uint8)
    with torch.no_grad():
        a, b = fp32.encode_video(frames, mask).video_emb, bf16.encode_video(frames, mask).video_emb
        text = bf16.encode_text(["a red car", "a bus"])
    assert b.dtype == torch.bfloat16 and text.dtype == torch.bfloat16
    assert F.cosine_similarity(a, b.float()).min() > 0.99
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        load_student(path, precision="fp8")


# -------------------------------------------------------------------------------------- timm
TIMM_VIT = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=0)


def test_timm_blocks_quantize_and_reload(calib, held_out, tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(**TIMM_VIT).eval()
    with torch.no_grad():
        reference = vit(held_out)
    result = quant.quantize_visual(vit, calib[:32], QuantizeConfig(), progress=False)
    layout = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    assert result.quantized_names == [f"blocks.{b}.{n}" for b in range(2) for n in layout]
    assert result.swapped_attention == []
    with torch.no_grad():
        assert relative_error(vit(held_out), reference) < 0.2

    quant.save_quantized(vit, tmp_path, QuantizeConfig(), {"timm": TIMM_VIT})
    loaded = quant.load_quantized(tmp_path, lambda meta: VisionTransformer(**meta["timm"]), kernel="torch")
    with torch.no_grad():
        assert torch.equal(loaded(held_out), vit(held_out))


def test_finds_blocks_of_open_clip_timm_tower():
    tower = TimmModel("vit_tiny_patch16_224", embed_dim=64)
    blocks = quant.find_vision_blocks(tower)
    assert blocks == list(tower.trunk.blocks) and len(blocks) == 12
    assert quant.block_linear_names(blocks[0]) == ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


# -------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_clear_error(clip_model, gptq_model, calib, tmp_path):
    visual = copy.deepcopy(clip_model.visual)
    with pytest.raises(ValueError, match="group_size 8 cannot be packed"):
        quant.quantize_visual(visual, calib, QuantizeConfig(group_size=8), progress=False)
    with pytest.raises(ValueError, match="unknown quantization method 'awq'"):
        quant.quantize_visual(visual, calib, QuantizeConfig(), method="awq", progress=False)
    with pytest.raises(ValueError, match="GPTQ needs calibration images"):
        quant.quantize_visual(visual, None, QuantizeConfig(), progress=False)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        quant.quantize_visual(visual, calib[0], QuantizeConfig(), progress=False)
    with pytest.raises(ValueError, match="no vision transformer blocks"):
        quant.quantize_visual(nn.Linear(4, 4), calib, QuantizeConfig(), progress=False)
    with pytest.raises(ValueError, match="already holds quantized linears"):
        quant.quantize_visual(gptq_model[0].visual, calib, QuantizeConfig(), progress=False)
    with pytest.raises(ValueError, match="3-bit packing needs"):
        quant.LayerQuantizer(nn.Linear(48, 64), QuantizeConfig(bits=3))
    with pytest.raises(ValueError, match="no quantized linears"):
        quant.save_quantized(clip_model, tmp_path, QuantizeConfig(), {"model": MODEL})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        quant.save_quantized(gptq_model[0], tmp_path, QuantizeConfig(), {"model": object()})
    with pytest.raises(FileNotFoundError, match="not a quantized checkpoint"):
        quant.load_quantized(tmp_path / "missing", build_clip)
