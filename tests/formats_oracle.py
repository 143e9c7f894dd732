"""compressed-tensors 0.20 as the oracle of ctformat.formats: its compressors and forward
functions called on the same tensors, and bitwise comparison."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("CI"):
    import compressed_tensors  # noqa: F401  (in CI a missing peer is an error)
ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle import forward  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

from ctformat.formats import format_named  # noqa: E402
from ctformat.scheme import QuantGroup, QuantScheme  # noqa: E402

__all__ = ["bits", "same", "ct_scheme", "ct_decompress", "ct_compress", "ct_qparams", "scheme", "forward",
           "generate_gparam", "QuantizationArgs"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers (so NaN payloads, -0.0 and +0.0 compare exactly)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def scheme(weights: dict, fmt: str, inputs: dict | None = None) -> tuple[QuantGroup, QuantizationScheme]:
    """The same group as ctformat's QuantGroup and as compressed-tensors' QuantizationScheme."""
    obj = {"targets": ["Linear"], "weights": weights, "format": fmt}
    if inputs is not None:
        obj["input_activations"] = inputs
    return QuantGroup.from_json("test", obj, where="test"), QuantizationScheme.model_validate(obj)


def ct_scheme(args: QuantScheme, fmt: str) -> QuantizationScheme:
    return QuantizationScheme.model_validate({"targets": ["Linear"], "weights": args.to_json(), "format": fmt})


def ct_decompress(fmt: str, tensors: dict, cs: QuantizationScheme) -> torch.Tensor:
    """CT's own compressor, one 2-D module (stacks: expert by expert)."""
    comp = BaseCompressor.get_value_from_registry(fmt)
    root = format_named(fmt).root
    if tensors[root].ndim == 3:
        n = tensors[root].shape[0]
        return torch.stack([ct_decompress(fmt, {k: v[e] if v.ndim == 3 or tuple(v.shape) == (n, 1) else v
                                                for k, v in tensors.items()}, cs) for e in range(n)])
    names = comp.compression_param_names(cs)
    return comp.decompress({k: tensors[k] for k in names if k in tensors}, cs)["weight"]


def ct_compress(fmt: str, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                global_scale: torch.Tensor | None, cs: QuantizationScheme) -> dict:
    """CT's compressor on a module state as llm-compressor leaves it (scale in the weight dtype,
    a zero point even when symmetric)."""
    sd = {"weight": weight, "weight_scale": scale}
    if zero_point is not None:
        sd["weight_zero_point"] = zero_point
    if global_scale is not None:
        sd["weight_global_scale"] = global_scale
    return BaseCompressor.get_value_from_registry(fmt).compress(sd, cs)


def ct_qparams(x: torch.Tensor, cs: QuantizationScheme, lo: torch.Tensor, hi: torch.Tensor,
               global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """calculate_qparams on observed min/max, then held in the weight dtype as the module does."""
    scale, zp = calculate_qparams(lo, hi, cs.weights, global_scale=global_scale)
    return scale.to(x.dtype), zp
