"""CUDA gives the same bits as the CPU path (which the other tests prove equal to
compressed-tensors). Skipped without a GPU. On a GPU machine:

    PYTHONPATH=. python -m pytest -q -m gpu tests/test_gpu.py
"""
from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES
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
                assert torch.equal(ckpt.dequantize(m, device="cuda").cpu(), ckpt.dequantize(m)), (name, m.prefix)


def test_convert_falls_back_to_cpu_when_gpu_memory_runs_out(tmp_path):
    import json

    from ctformat.checkpoint import save_checkpoint
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
        stats = convert_to_dense(src, tmp_path / "gpu", device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    convert_to_dense(src, tmp_path / "cpu", device="cpu")
    assert stats["cpu_fallbacks"] == 3
    assert (tmp_path / "gpu" / "model.safetensors").read_bytes() == (tmp_path / "cpu" / "model.safetensors").read_bytes()
