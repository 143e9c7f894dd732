"""CUDA gives the same bits as the CPU path (which the other tests prove equal to
compressed-tensors). Skipped without a GPU. On a GPU machine:

    PYTHONPATH=. python -m pytest -q -m gpu tests/test_gpu.py
"""
from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES, FORMATS
from ctformat.dequant import dequantize_module
from ctformat.checkpoint import open_checkpoint
from ctformat.pack import pack_to_int32, unpack_from_int32
from ctformat.quant import compress, decompress
from ctformat.scheme import QuantScheme

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("layout", ["dense", "padded"])
def test_pack_unpack_cuda_equals_cpu(bits, layout):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (3, 257, 1001), generator=g, dtype=torch.int8)
    for dim in (0, 1):
        cpu = pack_to_int32(q, bits, dim, layout=layout)
        gpu = pack_to_int32(q.cuda(), bits, dim, layout=layout)
        assert torch.equal(gpu.cpu(), cpu)
        assert torch.equal(unpack_from_int32(gpu, bits, q.shape, dim, layout=layout).cpu(), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", ["group", "channel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compress_decompress_cuda_equals_cpu(bits, symmetric, strategy, dtype):
    scheme = QuantScheme.from_json({"num_bits": bits, "symmetric": symmetric, "strategy": strategy,
                                    "group_size": 128 if strategy == "group" else None}, where="gpu")
    w = (torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    cpu = compress(w, scheme)
    gpu = compress(w.cuda(), scheme)
    for k in cpu:
        assert torch.equal(gpu[k].cpu(), cpu[k]), k
    assert torch.equal(decompress(gpu, scheme).cpu(), decompress(cpu, scheme))


def test_fixture_checkpoints_dequantize_identically_on_cuda():
    for name in ("tiny-mixtral", "int4-g32-asym", "int4-g32-asym-i8zp", "int4-g32-actorder", "int3-g32-padded",
                 "int3-g32-dense", "int8-g32", "int4-channel"):
        ckpt = open_checkpoint(FIXTURES / name)
        for m in ckpt.modules().values():
            if m.quantized:
                assert torch.equal(dequantize_module(ckpt, m, device="cuda").cpu(), dequantize_module(ckpt, m)), (name, m.prefix)


def test_convert_falls_back_to_cpu_when_gpu_memory_runs_out(tmp_path):
    import json

    from ctformat.writer import save_checkpoint
    from ctformat.convert import convert_to_dense
    s = QuantScheme.from_json({"num_bits": 4, "strategy": "group", "group_size": 128}, where="oom")
    tensors = {}
    for k in range(3):
        w = (torch.randn(1024, 2048, generator=torch.Generator().manual_seed(k)) * 0.02).to(torch.bfloat16)
        tensors.update({f"model.layers.{k}.mlp.down_proj.{n}": v for n, v in compress(w, s).items()})
    config = json.loads((FIXTURES / "int4-g32" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 128
    src = save_checkpoint(tmp_path / "src", tensors, config)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1e-6)      # a few kB: every module's upload fails
    try:
        stats = convert_to_dense(src, tmp_path / "gpu", device="cuda").to_json()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    convert_to_dense(src, tmp_path / "cpu", device="cpu")
    assert stats["cpu_fallbacks"] == 3
    assert (tmp_path / "gpu" / "model.safetensors").read_bytes() == (tmp_path / "cpu" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(64, 16), (8, 16384, 6144), (6144, 16384), (192, 384)])
def test_marlin_repack_kernel_on_cuda_equals_cpu_twin(bits, shape):
    from ctformat.marlin import repack, unrepack
    g = torch.Generator().manual_seed(bits)
    words = torch.randint(-2**31, 2**31, (*shape[:-1], shape[-1] * bits // 32), generator=g,
                          dtype=torch.int64).to(torch.int32)
    cpu = repack(words, bits, kernel="torch")
    gpu = repack(words.cuda(), bits)                        # auto: the Triton kernel
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(unrepack(gpu, shape[-2], bits).cpu(), words)


def test_convert_to_marlin_on_cuda_writes_the_cpu_bytes(tmp_path):
    from ctformat.convert import convert_to_ct, convert_to_marlin
    src = FIXTURES / "tiny-mixtral-g64"
    for stack in (False, True):
        convert_to_marlin(src, tmp_path / f"gpu{stack}", device="cuda", stack_experts=stack)
        convert_to_marlin(src, tmp_path / f"cpu{stack}", device="cpu", stack_experts=stack)
        assert (tmp_path / f"gpu{stack}" / "model.safetensors").read_bytes() == \
            (tmp_path / f"cpu{stack}" / "model.safetensors").read_bytes()
        convert_to_ct(tmp_path / f"gpu{stack}", tmp_path / f"back{stack}", device="cuda")
        a, b = open_checkpoint(src), open_checkpoint(tmp_path / f"back{stack}")
        assert all(torch.equal(a.load(n), b.load(n)) for n in a.tensors)


FORMAT_CKPTS = sorted(p for p in FORMATS.iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("path", FORMAT_CKPTS, ids=lambda p: p.name)
def test_every_format_dequantizes_on_cuda_as_on_the_cpu(path, monkeypatch):
    """convert --to dense's dispatch on CUDA (FP8/FP4 through formats/kernels_fp.py) gives the
    CPU's bits, which tests/test_formats_convert.py proves equal to compressed-tensors."""
    from ctformat.convert import dequantize_checkpoint
    from ctformat.formats import kernels_fp
    calls = []
    for name in ("dequantize_fp8", "dequantize_fp4"):
        real = getattr(kernels_fp, name)
        monkeypatch.setattr(kernels_fp, name, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    cpu = dequantize_checkpoint(path, device="cpu")
    gpu = dequantize_checkpoint(path, device="cuda")
    assert cpu.keys() == gpu.keys()
    for k, t in cpu.items():
        assert torch.equal(gpu[k].cpu().view(torch.int16), t.view(torch.int16)), k
    fp = any(s in path.name for s in ("fp8", "fp4", "mxfp8", "nvfp4", "mixed"))
    assert bool(calls) == fp, (path.name, len(calls))
