"""Reference inference on CUDA (skipped without a GPU). On a GPU machine:
    PYTHONPATH=. python -m pytest -q tests/test_gpu_inference.py
"""
from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES, REAL
from ctformat.dequant import dequantize_module
from ctformat.checkpoint import open_checkpoint
from ctformat.inference import compare, load_model
from ctformat.linear import QuantLinear

pytestmark = pytest.mark.gpu
Q = REAL / "llmcompressor-0.14" / "w4a16-sym-g128"
IDS = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("folder", ["tiny-mixtral", "int4-g32-asym", "int4-g32-actorder", "int8-g32"])
def test_quant_linear_on_cuda_uses_the_kernel_bits(folder):
    ckpt = open_checkpoint(FIXTURES / folder)
    m = next(m for p, m in ckpt.modules().items() if m.quantized and "q_proj" in p)
    layer = QuantLinear.from_checkpoint(ckpt, m, device="cuda", dtype=torch.bfloat16)
    w = layer.dequantize()
    assert w.is_cuda and torch.equal(w.cpu(), dequantize_module(ckpt, m, dtype=torch.bfloat16))   # kernel == CPU twin
    x = torch.randn(3, 9, w.shape[1], device="cuda", dtype=torch.bfloat16)
    assert torch.equal(layer(x), x @ w.T)


def test_streamed_equals_resident_on_cuda_and_uses_less_memory():
    def peak(stream):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        logits = load_model(Q, device="cuda", dtype=torch.float32, stream=stream).logits(IDS)
        return logits, torch.cuda.max_memory_allocated() - base
    resident, p_resident = peak(False)
    streamed, p_streamed = peak(True)
    assert torch.equal(streamed, resident)
    assert p_streamed < p_resident


def test_cuda_logits_agree_with_cpu():
    gpu = load_model(Q, device="cuda", dtype=torch.float32, stream=True).logits(IDS).cpu()
    cpu = load_model(Q, device="cpu", dtype=torch.float32, stream=True).logits(IDS)
    assert torch.allclose(gpu, cpu, rtol=1e-3, atol=1e-3)
    assert (gpu.argmax(-1) == cpu.argmax(-1)).float().mean() > 0.95


def test_compare_on_cuda():
    same = compare(Q, Q, IDS, device="cuda", dtype=torch.bfloat16)
    assert same["kl_max"] == 0 and same["top1_agreement"] == 1 and same["weights"]["max"] == 0
    near = compare(Q, REAL / "llmcompressor-0.14" / "dense", IDS, device="cuda", dtype=torch.float32)
    assert 0 < near["kl_mean"] < 0.05 and 0.05 < near["weights"]["max"] < 0.2
