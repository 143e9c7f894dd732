"""GGUF metadata, names, shapes and types against llama.cpp's own converter (b11434, pinned),
run on ctformat's dense conversion of the same compressed-tensors model: everything equal except
the repacked weights' types, whose values (read back by gguf-py) round to llama.cpp's bf16."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctformat.convert import convert_to_dense
from gguf_models import CONFIGS, write_model
from gguf_peers import need, run_llama_cpp_convert, write_gguf

gguf = need("gguf")
need("sentencepiece")

PRE = {"llama3": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "qwen3_moe": "qwen2", "deepseek_v3": "deepseek-v3"}


def fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}, r


def bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_same_file_as_llama_cpp(arch, tmp_path):
    ct = write_model(arch, tmp_path / "ct" / arch, quantized=True)
    dense = tmp_path / "dense" / arch                 # same folder name: general.name agrees
    dense.parent.mkdir()
    convert_to_dense(ct, dense, device="cpu")
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    write_gguf(ct, ours, tokenizer_pre=None if arch != "deepseek_v3" else "deepseek-v3")
    run_llama_cpp_convert(dense, theirs, pre=PRE.get(arch))
    kv_ours, r_ours = fields(ours)
    kv_theirs, r_theirs = fields(theirs)
    assert kv_ours.pop("general.file_type") == 2 and kv_theirs.pop("general.file_type") == 32
    assert kv_ours == kv_theirs
    t_ours = {t.name: t for t in r_ours.tensors}
    t_theirs = {t.name: t for t in r_theirs.tensors}
    assert sorted(t_ours) == sorted(t_theirs)
    repacked = {n for n, t in t_ours.items() if t.tensor_type == gguf.GGMLQuantizationType.Q4_0}
    assert len(repacked) == sum(1 for n in t_ours if n.endswith(".weight") and ("attn_" in n or "ffn_" in n)
                                and not n.endswith(("norm.weight", "gate_inp.weight", "k_b.weight", "v_b.weight")))
    for name, mine in t_ours.items():
        ref = t_theirs[name]
        assert list(mine.shape) == list(ref.shape), name
        if name in repacked:
            assert ref.tensor_type == gguf.GGMLQuantizationType.BF16
            exact = gguf.quants.dequantize(mine.data, mine.tensor_type).astype(np.float64)
            assert np.array_equal(bf16(exact), ref.data.view(np.int16).reshape(exact.shape)), name
        else:
            assert mine.tensor_type == ref.tensor_type, name
            assert np.array_equal(mine.data, ref.data), name
