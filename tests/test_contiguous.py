"""Every public codec function returns contiguous tensors (safetensors.save_file refuses views),
for every bit width and both word layouts, from contiguous and from transposed inputs."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

from ctformat.pack import pack_to_int32, unpack_from_int32
from ctformat.quant import calculate_qparams, compress, decompress, dequantize, minmax_qparams, quantize
from ctformat.scheme import QuantScheme, Strategy

LAYOUTS = ["dense", "padded"]
# in_features 75: not a multiple of 8, 10 or 32, so every layout ends on a partial word
SCHEMES = {"group": dict(strategy=Strategy.GROUP, group_size=25), "channel": dict(strategy=Strategy.CHANNEL),
           "tensor": dict(strategy=Strategy.TENSOR)}


def _q(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, dtype=torch.int8, generator=g)


def _all_contiguous(out) -> bool:
    tensors = out.values() if isinstance(out, dict) else out if isinstance(out, tuple) else (out,)
    return all(t is None or t.is_contiguous() for t in tensors)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("packed_dim", [0, 1])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(6, 75), (2, 6, 75), (7, 1), (33, 32)], ids=str)
def test_pack_and_unpack_return_contiguous(bits, packed_dim, layout, shape):
    q = _q(shape, bits)
    words = pack_to_int32(q, bits, packed_dim, layout=layout)
    back = unpack_from_int32(words, bits, shape, packed_dim, layout=layout)
    assert words.is_contiguous() and back.is_contiguous()
    assert torch.equal(back, q)
    # the same from a transposed (non-contiguous) input
    qt = _q(shape[:-2] + shape[-2:][::-1], bits).transpose(-1, -2)
    assert pack_to_int32(qt, bits, packed_dim, layout=layout).is_contiguous()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", SCHEMES)
@pytest.mark.parametrize("bits", range(1, 9))
def test_quant_functions_return_contiguous(bits, strategy, symmetric, layout, tmp_path):
    scheme = QuantScheme(num_bits=bits, symmetric=symmetric, **SCHEMES[strategy])
    w = (torch.randn(75, 6, generator=torch.Generator().manual_seed(bits)) * 0.02).to(torch.bfloat16).T
    assert not w.is_contiguous()
    qp = calculate_qparams(w, scheme)
    assert _all_contiguous(qp)
    assert _all_contiguous(minmax_qparams(w.amin(), w.amax(), scheme))
    q, scale, zp = quantize(w, scheme)
    assert _all_contiguous((q, scale, zp))
    assert dequantize(q, scale, zp, scheme=scheme).is_contiguous()
    assert dequantize(q.T.contiguous().T, scale, zp, scheme=scheme, dtype=torch.float32).is_contiguous()
    tensors = compress(w, scheme, layout=layout)
    assert _all_contiguous(tensors)
    safetensors.torch.save_file(tensors, tmp_path / "m.safetensors")   # refuses non-contiguous tensors
    out = decompress(tensors, scheme, layout=layout)
    assert out.is_contiguous()
    assert torch.equal(out, dequantize(q, scale, zp, scheme=scheme))
