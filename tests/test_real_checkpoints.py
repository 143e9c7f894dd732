"""Checkpoints written by llm-compressor itself (fixtures/real, see its README; more from
../shared/real-checkpoints when present).

They are ground truth for what real producers write. Every folder must open and every
quantized module must dequantize; the results must equal compressed-tensors' own
arithmetic bit for bit, and round-to-nearest folders must be reproducible from the dense
model they were made from.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REAL, REAL_FOLDERS
from ctformat.dequant import dequantize_module
from ctformat.checkpoint import open_checkpoint
from ctformat.quant import compress

FOLDERS = REAL_FOLDERS                        # vendored ones always, the rest where ../shared has them
QUANTIZED = [p for p in FOLDERS if p.name != "dense"]
LLMC_014 = [p for p in QUANTIZED if p.parent.name == "llmcompressor-0.14"]
LLMC_041 = [p for p in FOLDERS if p.parent.name == "llmcompressor-0.4.1"]
DENSE = REAL / "llmcompressor-0.14" / "dense"
RTN_FOLDERS = [p for p in LLMC_014 if p.name in ("w4a16-sym-g128", "w4a16-asym-g128", "w4a16-sym-channel",
                                                 "w8a16-sym-g128")]
EXPERT_RENAME = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _id(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def _quantized(ck):
    return [m for m in ck.modules().values() if m.quantized]


def _config_groups(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]


def _assert_bit_equal(ours: torch.Tensor, theirs: torch.Tensor, where: str) -> None:
    assert ours.dtype == theirs.dtype, where
    assert ours.shape == theirs.shape, where
    assert torch.equal(ours, theirs), where


# -- every folder ------------------------------------------------------------------------

@pytest.mark.parametrize("folder", FOLDERS, ids=_id)
def test_checkpoint_opens_and_dequantizes_every_quantized_module(folder):
    ck = open_checkpoint(folder)
    assert ck.tensors
    mods = _quantized(ck)
    if folder.name == "dense":
        assert ck.quant is None and not mods
        return
    # 2 layers x (4 experts x 3 + q/k/v/o) = 32 quantized Linear modules
    assert len(mods) == 32
    for m in mods:
        shape = tuple(ck.load(f"{m.prefix}.weight_shape").tolist())
        w = dequantize_module(ck, m)
        assert w.shape == shape, m.prefix
        assert w.dtype == torch.bfloat16, m.prefix
        assert torch.isfinite(w).all(), m.prefix
        assert w.abs().amax() > 0, m.prefix


@pytest.mark.parametrize("folder", QUANTIZED, ids=_id)
def test_checkpoint_ignored_modules_stay_dense(folder):
    ck = open_checkpoint(folder)
    for name in ("lm_head", "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"):
        m = ck.modules()[name]
        assert m.ignored and not m.quantized, name


# -- llm-compressor 0.14 / compressed-tensors 0.19: CT 0.20 decompress is the oracle -----

@pytest.mark.parametrize("folder", LLMC_014, ids=_id)
def test_dequantize_matches_compressed_tensors_llmc014(folder):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    groups = _config_groups(folder)
    ck = open_checkpoint(folder)
    for m in _quantized(ck):
        ct_scheme = QuantizationScheme.model_validate(groups[m.group.name])
        theirs = compressor.decompress(ck.load_module(m), ct_scheme)["weight"]
        _assert_bit_equal(dequantize_module(ck, m), theirs, m.prefix)


# -- llm-compressor 0.4.1 / compressed-tensors 0.9.2: CT 0.20 cannot read these as-is ----

@pytest.mark.parametrize("folder", LLMC_041, ids=_id)
def test_dequantize_matches_compressed_tensors_llmc041(folder):
    """CT 0.20 rejects these configs (actorder "group") or these tensors (I8 zero points),
    so each folder is brought to a form CT 0.20 does read, using CT's own functions only:

    - symmetric, no g_idx (w4a16-gptq-g128): nothing to convert; CT decompress directly.
    - asymmetric (w4a16-asym-gptq-g128): the I8 [out, groups] zero points are repacked
      with CT's pack_to_int32(zp, 4, packed_dim=0) into the modern I32 packed form, then
      CT decompress runs on the module.
    - actorder group (w4a16-gptq-actorder-group-g128): CT's unpack_from_int32 gives the
      ints, and CT's dequantize runs with per-column scales scale[:, g_idx] under args
      strategy group, group_size 1, which is (q[:, j] - zp[:, g[j]]) * scale[:, g[j]].

    Each result must equal ctformat's Checkpoint.dequantize bit for bit.
    """
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    groups = _config_groups(folder)
    ck = open_checkpoint(folder)
    mods = _quantized(ck)
    assert mods
    for m in mods:
        tensors = ck.load_module(m)
        weights = dict(groups[m.group.name]["weights"])
        ours = dequantize_module(ck, m)
        if weights["actorder"] == "group":
            g_idx = tensors["weight_g_idx"].long()
            assert not torch.equal(g_idx, torch.arange(g_idx.numel()) // weights["group_size"]), m.prefix
            assert "weight_zero_point" not in tensors
            shape = torch.Size(tensors["weight_shape"].tolist())
            q = unpack_from_int32(tensors["weight_packed"], weights["num_bits"], shape)
            args = QuantizationArgs(num_bits=weights["num_bits"], symmetric=weights["symmetric"],
                                    strategy="group", group_size=1)
            theirs = ct_dequantize(q, tensors["weight_scale"][:, g_idx], None, args=args)
        else:
            assert weights["actorder"] is None
            if not weights["symmetric"]:
                zp = tensors["weight_zero_point"]
                assert zp.dtype == torch.int8 and zp.shape == tensors["weight_scale"].shape, m.prefix
                tensors["weight_zero_point"] = pack_to_int32(zp, weights["num_bits"], packed_dim=0)
            else:
                assert "weight_zero_point" not in tensors
            scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
            theirs = compressor.decompress(tensors, scheme)["weight"]
        _assert_bit_equal(ours, theirs, m.prefix)


# -- data-free check of quantize: the dense model the 0.14 folders came from -------------

@pytest.mark.parametrize("folder", RTN_FOLDERS, ids=_id)
def test_compress_reproduces_llmc014_round_to_nearest_checkpoint(folder):
    """QuantizationModifier (memoryless min-max observer, round to nearest) folders:
    compress(dense weight) must give the stored tensors exactly (dtype, shape, bits)."""
    dense, ck = open_checkpoint(DENSE), open_checkpoint(folder)
    mods = _quantized(ck)
    assert len(mods) == 32
    for m in mods:
        head, last = m.prefix.rsplit(".", 1)
        weight = dense.load(f"{head}.{EXPERT_RENAME.get(last, last)}.weight")
        got = compress(weight, m.scheme)
        stored = ck.load_module(m)
        assert set(got) == set(stored), m.prefix
        for key in stored:
            _assert_bit_equal(got[key], stored[key], f"{m.prefix}.{key}")


def test_compress_differs_when_checkpoint_is_gptq():
    """Guard for the test above: GPTQ changes the ints, so RTN must not reproduce them."""
    folder = REAL / "llmcompressor-0.14" / "w4a16-gptq-g128"
    dense, ck = open_checkpoint(DENSE), open_checkpoint(folder)
    m = ck.modules()["model.layers.0.self_attn.q_proj"]
    got = compress(dense.load("model.layers.0.self_attn.q_proj.weight"), m.scheme)
    assert not torch.equal(got["weight_packed"], ck.load(f"{m.prefix}.weight_packed"))
