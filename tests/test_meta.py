"""Meta tensors (a model built without memory): decompress, unpack_from_int32 and dequantize
give meta results with the shapes and dtypes compressed-tensors 0.20 gives."""
from __future__ import annotations

import pytest
import torch

from ctformat.pack import unpack_from_int32
from ctformat.quant import compress, decompress, dequantize
from ctformat.scheme import QuantScheme, packed_width

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize  # noqa: E402

CT_PACKED = BaseCompressor.get_value_from_registry("pack-quantized")
STRATEGIES = {"group": dict(strategy="group", group_size=32), "channel": dict(strategy="channel"),
              "tensor": dict(strategy="tensor")}
# in_features 75 (channel, tensor) is not a multiple of the values per word: CT's meta shape is
# then the most values the packed width holds, not 75
SHAPES = {"group": [(6, 96), (2, 6, 64)], "channel": [(6, 75), (2, 6, 64)], "tensor": [(6, 75), (6, 64)]}
CASES = [pytest.param(b, sym, st, shape, id=f"int{b}-{'sym' if sym else 'asym'}-{st}-{'x'.join(map(str, shape))}")
         for b in range(1, 9) for sym in (True, False) for st in STRATEGIES for shape in SHAPES[st]]


def _meta(tensors):
    return {k: v.to("meta") for k, v in tensors.items()}


def _case(bits, symmetric, strategy, shape, dtype=torch.bfloat16):
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, **STRATEGIES[strategy])
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * 0.02).to(dtype)
    scheme = QuantScheme.from_json(args.model_dump(), where="test")
    return compress(w, scheme), scheme, QuantizationScheme(targets=["Linear"], weights=args)


@pytest.mark.parametrize("bits,symmetric,strategy,shape", CASES)
def test_decompress_on_meta_matches_compressed_tensors(bits, symmetric, strategy, shape):
    tensors, scheme, ct_scheme = _case(bits, symmetric, strategy, shape)
    theirs = CT_PACKED.decompress(_meta(tensors), ct_scheme)["weight"]
    ours = decompress(_meta(tensors), scheme)
    assert ours.device.type == theirs.device.type == "meta"
    assert (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype)
    assert decompress(_meta(tensors), scheme, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("kernel", ["auto", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decompress_on_meta_keeps_scale_dtype_for_every_kernel(dtype, kernel):
    tensors, scheme, ct_scheme = _case(4, False, "group", (6, 96), dtype)
    ours = decompress(_meta(tensors), scheme, kernel=kernel)
    theirs = CT_PACKED.decompress(_meta(tensors), ct_scheme)["weight"]
    assert (ours.shape, ours.dtype, ours.device.type) == (theirs.shape, theirs.dtype, "meta")
    assert (ours.shape, ours.dtype) == ((6, 96), dtype)


def test_decompress_on_meta_reads_weight_shape_when_it_has_data():
    """Only the packed tensors on meta: the stored weight_shape gives the exact in_features
    (CT 0.20 gives its upper bound 80 here, for channel and tensor alike)."""
    tensors, scheme, ct_scheme = _case(4, True, "channel", (6, 75))
    meta = {**_meta(tensors), "weight_shape": tensors["weight_shape"]}
    assert decompress(meta, scheme).shape == (6, 75)
    assert CT_PACKED.decompress(meta, ct_scheme)["weight"].shape == (6, 80)


def test_decompress_on_meta_skips_data_checks_on_g_idx():
    tensors, scheme, _ = _case(4, True, "group", (6, 96))
    meta = _meta(tensors)
    meta["weight_g_idx"] = torch.empty(96, dtype=torch.int32, device="meta")
    assert decompress(meta, scheme).shape == (6, 96)


@pytest.mark.parametrize("layout", ["dense", "padded"])
@pytest.mark.parametrize("packed_dim", [0, 1])
@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_on_meta_gives_int8_of_the_shape(bits, packed_dim, layout):
    shape = (6, 75) if packed_dim == 1 else (75, 6)
    n = shape[1] if packed_dim == 1 else shape[0]
    words = (6, packed_width(n, bits, layout)) if packed_dim == 1 else (packed_width(n, bits, layout), 6)
    out = unpack_from_int32(torch.empty(words, dtype=torch.int32, device="meta"), bits, shape, packed_dim,
                            layout=layout)
    assert (out.shape, out.dtype, out.device.type) == (shape, torch.int8, "meta")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dequantize_on_meta_matches_compressed_tensors(strategy, symmetric):
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, **STRATEGIES[strategy])
    scheme = QuantScheme.from_json(args.model_dump(), where="test")
    sshape = {"group": (6, 3), "channel": (6, 1), "tensor": (1,)}[strategy]
    q = torch.empty(6, 96, dtype=torch.int8, device="meta")
    s = torch.empty(sshape, dtype=torch.bfloat16, device="meta")
    z = None if symmetric else torch.empty(sshape, dtype=torch.int8, device="meta")
    ours, theirs = dequantize(q, s, z, scheme=scheme), ct_dequantize(q, s, z, args=args)
    assert (ours.shape, ours.dtype, ours.device.type) == (theirs.shape, theirs.dtype, "meta")
