"""No quantized module ever leaves ctformat with part of its tensor set missing (spec §2.2):
a module that carries any tensor of a quantization tensor set but not all of them is an
error in validate and a refusal in every convert, never a dense copy of the stray tensors."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from conftest import FIXTURES, tree_snapshot
from ctformat.checkpoint import open_checkpoint
from ctformat.writer import save_checkpoint
from ctformat.convert import convert_to_ct, convert_to_dense, convert_to_marlin
from ctformat.errors import CtFormatError
from ctformat.summary import summarize
from ctformat.validate import validate_checkpoint

CT_SETS = [("int4-g32", "model.layers.0.self_attn.q_proj"),
           ("int4-g32-asym", "model.layers.0.self_attn.q_proj"),
           ("int4-g32-actorder", "model.layers.0.self_attn.o_proj"),
           ("tiny-mixtral", "model.layers.1.block_sparse_moe.experts.2.w3"),
           ("tiny-mixtral", "model.layers.0.block_sparse_moe.experts.0.w1")]


def _without(tmp_path, src, names) -> Path:
    """A copy of checkpoint `src` whose tensors `names` are gone (index and headers agree)."""
    ckpt = open_checkpoint(src)
    tensors = {n: ckpt.load(n) for n in ckpt.tensors if n not in names}
    out = tmp_path / "partial"
    save_checkpoint(out, tensors, json.loads((src / "config.json").read_text()), source=src)
    return out


def _proper_subsets(suffixes):
    """Every way to lose tensors of a set without losing all of them."""
    s = sorted(suffixes)
    return [c for k in range(1, len(s)) for c in itertools.combinations(s, k)]


@pytest.mark.parametrize("fixture,module", CT_SETS)
def test_every_partial_ct_tensor_set_is_an_error_and_refused(tmp_path, fixture, module):
    src = FIXTURES / fixture
    m = open_checkpoint(src).modules()[module]
    for lost in _proper_subsets(m.tensors):
        case = tmp_path / "-".join(lost)
        case.mkdir()
        partial = _without(case, src, {f"{module}.{s}" for s in lost})
        report = validate_checkpoint(partial)
        assert not report.ok, f"validate passes {fixture} without {lost}"
        for target in ("vllm", "transformers"):     # the profiles and inspect read it without a crash
            assert not validate_checkpoint(partial, target=target, deep=True).ok
        summarize(open_checkpoint(partial))
        assert any(i.where and i.where.startswith(module) and i.severity == "error" for i in report.issues), lost
        before = tree_snapshot(partial)
        with pytest.raises(CtFormatError):
            convert_to_dense(partial, case / "out", device="cpu")
        assert not (case / "out").exists() and tree_snapshot(partial) == before


def test_scale_and_shape_without_weight_packed_names_the_missing_tensor(tmp_path):
    """The case found in outside testing: validate said OK with a TEN-12 warning and convert
    exited 0 writing q_proj.weight_scale/weight_shape and no q_proj.weight."""
    partial = _without(tmp_path, FIXTURES / "int4-g32", {"model.layers.0.self_attn.q_proj.weight_packed"})
    report = validate_checkpoint(partial)
    tens01 = [i for i in report.errors if i.rule == "TEN-01"]
    assert tens01 and tens01[0].where == "model.layers.0.self_attn.q_proj" and "weight_packed" in tens01[0].message
    with pytest.raises(CtFormatError, match=r"weight_packed is missing.*\[TEN-01\]"):
        convert_to_dense(partial, tmp_path / "out", device="cpu")
    with pytest.raises(CtFormatError, match=r"\[TEN-01\]"):
        convert_to_marlin(partial, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lost", [("B",), ("s",), ("B", "zp"), ("s", "zp")])
def test_partial_marlin_tensor_set_is_refused(tmp_path, lost):
    src = tmp_path / "marlin"
    convert_to_marlin(FIXTURES / "tiny-mixtral-g64", src, device="cpu")
    module = "model.layers.0.self_attn.q_proj"
    m = open_checkpoint(src).modules()[module]
    lost = [s for s in lost if s in m.tensors]
    partial = _without(tmp_path, src, {f"{module}.{s}" for s in lost})
    assert not validate_checkpoint(partial).ok
    for convert in (convert_to_dense, convert_to_ct):
        with pytest.raises(CtFormatError, match=r"\[MRL-02\]"):
            convert(partial, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_dense_output_holds_a_weight_for_every_quantized_module(tmp_path):
    """The positive side: every module with a quantization tensor set comes out as M.weight,
    and every other tensor comes out once, under its (renamed) name."""
    for fixture in ("tiny-mixtral", "int4-g32-asym", "int4-g32-actorder", "mixed-groups"):
        src = FIXTURES / fixture
        ckpt = open_checkpoint(src)
        out = tmp_path / fixture
        convert_to_dense(src, out, device="cpu", keep_names=True)
        dense = open_checkpoint(out)
        quantized = {p for p, m in ckpt.modules().items() if m.quantized}
        assert {f"{p}.weight" for p in quantized} <= set(dense.tensors)
        others = {n for n in ckpt.tensors if n.rpartition(".")[0] not in quantized}
        assert others <= set(dense.tensors)
        assert len(dense.tensors) == len(quantized) + len(others)
