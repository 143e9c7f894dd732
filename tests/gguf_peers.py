"""Test helpers for GGUF output: the real peers (gguf-py, llama.cpp's converter, a llama.cpp
library), a reference forward pass that rounds activations as llama.cpp's CPU backend does,
and tiny models of each architecture. Nothing here is library code."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
# shared/ lies beside the checkout (CI) or beside the worktree folder
REAL = next((p for p in (ROOT.parent / "shared" / "real-checkpoints", ROOT.parents[1] / "shared" / "real-checkpoints")
             if p.is_dir()), ROOT.parent / "shared" / "real-checkpoints")
CACHE = Path(os.environ.get("CTFORMAT_TEST_CACHE", Path.home() / ".cache" / "ctformat-tests"))


def need(module: str):
    """Import a peer; in CI (CI set) a missing peer is an error, elsewhere a skip."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def ct_dirs() -> list[Path]:
    """Every pack-quantized fixture and real checkpoint folder (those with a quantization_config)."""
    import json
    found = []
    for cfg in sorted([*FIXTURES.glob("*/config.json"), *REAL.glob("*/*/config.json")]):
        qc = json.loads(cfg.read_text()).get("quantization_config")
        if qc and qc.get("quant_method") == "compressed-tensors":
            found.append(cfg.parent)
    return found


def float64_weight(tensors: dict[str, torch.Tensor], scheme, layout: str) -> torch.Tensor:
    """s * (q - z) in float64 (exact) from a module's CT tensors, through ctformat's reading of
    the CT layout (itself checked against compressed-tensors in test_pack/test_quant)."""
    from ctformat.pack import unpack_from_int32
    from ctformat.quant import dequantize
    shape = tuple(int(v) for v in tensors["weight_shape"].tolist())
    q = unpack_from_int32(tensors["weight_packed"], scheme.num_bits, shape, layout=layout)
    zp = tensors.get("weight_zero_point")
    if zp is not None and zp.dtype == torch.int32:
        zp = unpack_from_int32(zp, scheme.num_bits, (*shape[:-1], tensors["weight_scale"].shape[-1]), packed_dim=0,
                               layout=layout)
    return dequantize(q, tensors["weight_scale"].double(), zp, tensors.get("weight_g_idx"), scheme=scheme)
