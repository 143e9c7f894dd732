"""Large CPU tensors dequantize by blocks of rows: the same bits as compressed-tensors."""
from __future__ import annotations

import pytest
import torch

from ctformat import quant
from ctformat.quant import compress, decompress
from ctformat.scheme import QuantScheme

ct = pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("args", [{"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 128},
                                  {"num_bits": 8, "symmetric": True, "strategy": "channel"},
                                  {"num_bits": 3, "symmetric": True, "strategy": "group", "group_size": 64}])
def test_row_blocks_equal_compressed_tensors(args, monkeypatch):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    monkeypatch.setattr(quant, "_ROW_BLOCK_ELEMENTS", 5000)        # many uneven blocks
    w = (torch.randn(2, 77, 512, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    s = QuantScheme.from_json(args, where="test")
    t = compress(w, s)
    ours = decompress(t, s)
    theirs = BaseCompressor.get_value_from_registry("pack-quantized").decompress(
        t, QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args)))["weight"]
    assert ours.shape == w.shape and torch.equal(ours, theirs)
