"""The GGUF files run in llama.cpp itself (b11739, CPU): per-position logits equal a float64
reference computed from the compressed-tensors checkpoint (Hugging Face row order and RoPE) with
llama.cpp's input rounding (Q8_0 activations against repacked weights, bf16 against BF16 ones)."""
from __future__ import annotations

import numpy as np
import pytest

from gguf_models import write_model
from gguf_peers import need, write_gguf
from llama_cpp import llama_cpp_logits, reference_logits

need("gguf")
need("sentencepiece")
need("cffi")

IDS = [1, 17, 42, 5, 63, 8, 23, 31, 50, 12, 3, 44]
TOL = 1e-5      # absolute, logits ~1.3: measured 5e-8..9e-8; without the Q8_0 emulation 5e-3..7e-3


@pytest.mark.slow
@pytest.mark.parametrize("arch,scheme", [
    ("llama", None), ("mixtral", None), ("mixtral_ct019", None),
    ("llama", {"num_bits": 8, "symmetric": True, "strategy": "group", "group_size": 64}),
    ("llama", {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32}),
    ("mistral", {"num_bits": 3, "symmetric": True, "strategy": "channel", "group_size": -1}),
])
def test_logits_match_llama_cpp(arch, scheme, tmp_path):
    ct = write_model(arch, tmp_path / arch, quantized=True, scheme_json=scheme)
    out = tmp_path / "model.gguf"
    write_gguf(ct, out)
    got = llama_cpp_logits(out, IDS, tmp_path)
    want = reference_logits(ct, IDS)
    assert got.shape == want.shape == (len(IDS), 64)
    err = np.abs(got - want).max()
    assert err < TOL, f"max |llama.cpp - reference| = {err:.3g}"
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.slow
def test_split_files_load_in_llama_cpp(tmp_path):
    """--split-max-size output: llama.cpp loads the set from its first shard, same logits."""
    ct = write_model("mixtral", tmp_path / "mixtral", quantized=True)
    write_gguf(ct, tmp_path / "one.gguf")
    write_gguf(ct, tmp_path / "split.gguf", split_max_size=20_000)
    first = sorted(tmp_path.glob("split-*.gguf"))[0]
    assert np.array_equal(llama_cpp_logits(first, IDS, tmp_path), llama_cpp_logits(tmp_path / "one.gguf", IDS, tmp_path))
