"""The float-format Triton kernels give the torch path's bits (itself proven equal to
compressed-tensors in test_formats_ct / test_formats_real). Without a GPU they run in Triton's
interpreter (conftest sets TRITON_INTERPRET=1), which truncates fp32 -> bf16: the kernels round
with integer operations there, so the comparison is exact. NaNs must land on the same elements;
their payloads are not part of the format."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import DEVICE, FORMATS
from ctformat.formats import format_named
from ctformat.scheme import QuantGroup, QuantizationConfig
from ctformat.spec import EMBEDDING_NAMES

pytest.importorskip("triton")

FP8 = {"num_bits": 8, "type": "float", "symmetric": True}
NVFP4 = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
         "scale_dtype": "torch.float8_e4m3fn"}
MXFP4 = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8"}


def scheme(weights: dict, fmt: str) -> QuantGroup:
    return QuantGroup.from_json("test", {"targets": ["Linear"], "weights": weights, "format": fmt}, where="test")


def both(fmt: str, tensors: dict, s: QuantGroup, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    f = format_named(fmt)
    on = {k: v.to(DEVICE) for k, v in tensors.items()}
    return f.decompress(on, s, dtype, kernel="triton").cpu(), f.decompress(tensors, s, dtype, kernel="torch")


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[want.element_size()]
    assert torch.equal(got.view(ints)[~nan], want.view(ints)[~nan])


def fp8_codes(rows: int, cols: int) -> torch.Tensor:
    """Every E4M3 byte, shifted per row so each byte meets every scale position."""
    b = (torch.arange(rows)[:, None] * 7 + torch.arange(cols)).remainder(256)
    return b.to(torch.uint8).view(torch.float8_e4m3fn)


def odd(shape, dtype, seed=0) -> torch.Tensor:
    s = (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 4 + 0.001).to(dtype)
    flat = s.view(-1)
    info = torch.finfo(dtype)
    for i, v in enumerate([0.0, info.tiny / 8, info.max, float("inf"), float("nan"), -0.5][: flat.numel()]):
        flat[(5 * i) % flat.numel()] = v
    return s


CASES = {"tensor": ({"strategy": "tensor"}, lambda o, i: (1,)),
         "channel": ({"strategy": "channel"}, lambda o, i: (o, 1)),
         "group": ({"strategy": "group", "group_size": 64}, lambda o, i: (o, i // 64)),
         "block": ({"strategy": "block", "block_structure": [32, 48]}, lambda o, i: (-(-o // 32), -(-i // 48))),
         "block128": ({"strategy": "block", "block_structure": [128, 128]}, lambda o, i: (-(-o // 128), -(-i // 128)))}


@pytest.mark.parametrize("sdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fp8_kernel_equals_torch(case, sdtype):
    args, shape = CASES[case]
    out, inn = (72, 320) if case != "group" else (72, 256)       # ragged against 32x48 and 128x128 blocks
    s = scheme({**FP8, **args}, "float-quantized")
    t = {"weight": fp8_codes(out, inn), "weight_scale": odd(shape(out, inn), sdtype)}
    assert_same(*both("float-quantized", t, s))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_kernel_output_dtypes_round_like_torch(out_dtype):
    s = scheme({**FP8, "strategy": "channel"}, "float-quantized")
    t = {"weight": fp8_codes(64, 256), "weight_scale": odd((64, 1), torch.bfloat16)}
    assert_same(*both("float-quantized", t, s, dtype=out_dtype))


@pytest.mark.parametrize("case", ["tensor", "block"])
def test_fp8_kernel_stacked_experts(case):
    args, shape = CASES[case]
    s = scheme({**FP8, **args}, "float-quantized")
    scale = odd((3, 1) if case == "tensor" else (3, *shape(40, 100)), torch.bfloat16, seed=1)
    t = {"weight": fp8_codes(120, 100).reshape(3, 40, 100), "weight_scale": scale}
    assert_same(*both("float-quantized", t, s))


def test_mxfp8_kernel_every_exponent():
    s = scheme({**MXFP4, "num_bits": 8}, "mxfp8-quantized")
    e = (torch.arange(256)[:, None] + torch.arange(8)).remainder(256).to(torch.uint8)
    t = {"weight": fp8_codes(256, 256), "weight_scale": e}
    assert_same(*both("mxfp8-quantized", t, s))


def fp4_bytes(rows: int) -> torch.Tensor:
    return (torch.arange(rows)[:, None] * 3 + torch.arange(256)).remainder(256).to(torch.uint8)


@pytest.mark.parametrize("g", [1.0, 31744.0, 3.0e38, 1e-30, float("inf"), float("nan"), 0.0])
def test_nvfp4_kernel_every_code_and_scale_byte(g):
    s = scheme(NVFP4, "nvfp4-pack-quantized")
    scale = (torch.arange(256)[:, None] + torch.arange(32)).remainder(256).to(torch.uint8).view(torch.float8_e4m3fn)
    t = {"weight_packed": fp4_bytes(256), "weight_scale": scale, "weight_global_scale": torch.tensor([g])}
    assert_same(*both("nvfp4-pack-quantized", t, s))


def test_nvfp4_kernel_stacked_per_expert_global_scales():
    s = scheme(NVFP4, "nvfp4-pack-quantized")
    scale = (torch.arange(3 * 16)[:, None] + torch.arange(32)).remainder(256).to(torch.uint8).view(torch.float8_e4m3fn)
    t = {"weight_packed": fp4_bytes(48).reshape(3, 16, 256), "weight_scale": scale.reshape(3, 16, 32),
         "weight_global_scale": torch.tensor([[448.0], [3.0], [1e5]])}
    assert_same(*both("nvfp4-pack-quantized", t, s))


@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.float32])
def test_mxfp4_kernel_every_code_and_exponent(out_dtype):
    s = scheme(MXFP4, "mxfp4-pack-quantized")
    e = (torch.arange(256)[:, None] + torch.arange(16)).remainder(256).to(torch.uint8)
    t = {"weight_packed": fp4_bytes(256), "weight_scale": e}
    assert_same(*both("mxfp4-pack-quantized", t, s, dtype=out_dtype))


ROOT = FORMATS
KERNEL_CKPTS = ["fp8-block", "fp8-dynamic", "fp8-static", "fp8-weight-only", "mxfp8a16", "nvfp4", "nvfp4a16",
                "mxfp4a16", "mixed-fp8-nvfp4"]


@pytest.mark.parametrize("name", KERNEL_CKPTS)
def test_kernels_on_real_checkpoints(name):
    from safetensors.torch import load_file
    qc = json.loads((ROOT / name / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.from_json(qc)
    mods: dict[str, dict] = {}
    for k, v in load_file(ROOT / name / "model.safetensors").items():
        p, _, suffix = k.rpartition(".")
        mods.setdefault(p, {})[suffix] = v
    seen = 0
    for prefix, ts in mods.items():
        last = prefix.rsplit(".", 1)[-1]
        linear = last not in EMBEDDING_NAMES and not last.endswith("norm")
        g = None if cfg.is_ignored(prefix) else cfg.group_for(prefix, linear=linear)
        fmt = None if g is None else format_named(cfg.group_format(g))
        if fmt is None or fmt.root not in ts:
            continue
        got = fmt.decompress({k: v.to(DEVICE) for k, v in ts.items()}, g, kernel="triton").cpu()
        assert_same(got, fmt.decompress(ts, g, kernel="torch"))
        seen += 1
    assert seen == 14
