"""run and compare on every compressed-tensors format: the logits are transformers' forward
pass over the dense output of convert --to dense, bit for bit at float32, streamed or not
(rotations folded the same way); run says which declared quantization it does not simulate."""
from __future__ import annotations

import pytest
import torch

from conftest import FORMATS
from ctformat.convert import convert_to_dense
from ctformat.inference import compare, load_model, run

transformers = pytest.importorskip("transformers")

FOLDERS = sorted(p for p in FORMATS.iterdir() if (p / "config.json").is_file())
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("path", FOLDERS, ids=lambda p: p.name)
def test_logits_equal_transformers_on_the_dense_output(path, tmp_path):
    convert_to_dense(path, tmp_path / "d", dtype=torch.float32, device="cpu", drop_kv_cache=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(IDS, use_cache=False).logits
    for stream in (False, True):
        got = load_model(path, device="cpu", dtype=torch.float32, stream=stream).logits(IDS)
        assert torch.equal(got, want), stream


def test_run_states_what_it_does_not_simulate():
    doc = run(FORMATS / "fp8-dynamic-kv-fp8", IDS[:1], device="cpu", top_k=1)
    assert doc["weight_only"] and doc["not_simulated"] == ["input activations (float8 token dynamic)",
                                                           "kv cache (float8 tensor)"]
    assert run(FORMATS / "nvfp4a16", IDS[:1], device="cpu", top_k=1)["not_simulated"] == []


def test_compare_folds_rotations_into_the_weight_error():
    """QuIP's stored weights are rotated; folded, they are W4A16 of the base model's weights."""
    quip = compare(FORMATS / "quip-w4a16", FORMATS / "dense-base", IDS, device="cpu", dtype=torch.float32)
    plain = compare(FORMATS / "w4a16-kv-fp8", FORMATS / "dense-base", IDS, device="cpu", dtype=torch.float32)
    assert quip["weights"]["max"] < 0.2 and plain["weights"]["max"] < 0.2
    assert quip["not_simulated"] == {"a": [], "b": []}
