"""GGUF output of the real llm-compressor checkpoints (shared/real-checkpoints): every repacked
tensor read back by gguf-py equals float64 s*(q-z); refusals leave nothing behind."""
from __future__ import annotations

import numpy as np
import pytest

from ctformat.checkpoint import open_checkpoint
from ctformat.errors import GGUFRefusal
from gguf_peers import ct_dirs, float64_weight, need, write_gguf

gguf = need("gguf")
REAL_DIRS = ct_dirs(real_only=True)


@pytest.mark.parametrize("folder", REAL_DIRS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_checkpoint(folder, tmp_path):
    out = tmp_path / "model.gguf"
    if "actorder-group" in folder.name:              # columns reordered: no GGUF block holds them
        with pytest.raises(GGUFRefusal, match=r"weight_g_idx puts column .*\[GCV-03\]$"):
            write_gguf(folder, out)
        assert list(tmp_path.iterdir()) == []
        if not (folder / "tokenizer.json").is_file():
            result = write_gguf(folder, out, dequantize_unmappable=True)     # exact F32 instead
            assert result.details["ggml_types"].get("Q4_0") is None and result.details["dequantized_modules"]
        return
    if (folder / "tokenizer.json").is_file():        # the 0.4.1 era ships a WordLevel tokenizer
        with pytest.raises(GGUFRefusal, match=r"^tokenizer.json: .*\[GCV-11\]$"):
            write_gguf(folder, out)
        assert list(tmp_path.iterdir()) == []
        return
    result = write_gguf(folder, out)
    r = {t.name: t for t in gguf.GGUFReader(out).tensors}
    ckpt = open_checkpoint(folder)
    mods = ckpt.modules()
    layer0 = mods["model.layers.0.self_attn.q_proj"]
    assert r["blk.0.attn_v.weight"].tensor_type.name == {(4, True): "Q4_0", (4, False): "Q5_0", (8, True): "Q8_0"}[
        (layer0.scheme.num_bits, layer0.scheme.symmetric)]
    checked = 0
    for name, t in r.items():
        if t.tensor_type.name not in ("Q4_0", "Q5_0", "Q8_0") or "exps" in name or "attn_q." in name or "attn_k." in name:
            continue
        hf = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj"}[name.split(".")[2]]
        m = mods[f"model.layers.{name.split('.')[1]}.{hf}"]
        t_ct = ckpt.load_module(m)
        want = float64_weight(t_ct, m.scheme, ckpt.word_layout(m, int(t_ct["weight_shape"][-1])))
        got = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        assert np.array_equal(got.reshape(want.shape), want.numpy()), name
        checked += 1
    assert checked == 4 and any("no tokenizer" in n for n in result.details["notes"])
