"""Modules alike but for their names, judged and counted once per class (spec §4.5): the same
findings and counts as module by module, on every fixture and on a class split by one odd expert."""
from __future__ import annotations

import json
import shutil
from collections import defaultdict

import pytest

from conftest import BAD, FIXTURES, REAL_FOLDERS
from ctformat.checkpoint import open_checkpoint
from ctformat.errors import SpecError
from ctformat.summary import _layout, summarize
from ctformat.validate import _FIRST_SIBLING, _precision, _sibling_issues, _static_issues, check_module, validate
from ctformat.report import module_issue

FOLDERS = sorted({p.parent for p in FIXTURES.rglob("*.safetensors")} | set(REAL_FOLDERS))


def _open(path):
    try:
        return open_checkpoint(path, strict=False)
    except SpecError:
        return None


def _one_by_one_siblings(ckpt):
    """TEN-12 as first written: every module's siblings looked up and compared on their own."""
    mods, out = ckpt.modules(), []
    for prefix, m in mods.items():
        parent, _, leaf = prefix.rpartition(".")
        for family in _FIRST_SIBLING.get(leaf, ()):
            sibs = [x for x in map(mods.get, [f"{parent}.{name}" for name in family]) if x is not None]
            kinds = [x.scheme if x.quantized else None for x in sibs]
            if any(k is None and x.quantized for k, x in zip(kinds, sibs)):
                continue
            if any(k is not kinds[0] and k != kinds[0] for k in kinds):
                desc = ", ".join(f"{x.prefix.rpartition('.')[2]}={_precision(x)}" for x in sibs)
                out.append(module_issue("TEN-12", m, None, f"fused siblings differ ({desc}); vLLM requires one scheme"))
    return out


@pytest.mark.parametrize("path", FOLDERS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_classes_judge_and_count_as_modules_do(path):
    ckpt = _open(path)
    if ckpt is None:
        return                                # refused while opening: no modules to class
    classes, mods = ckpt.module_classes(), ckpt.modules()
    assert ckpt.module_names() == list(mods)
    assert sum(map(len, classes)) == len(mods) == len(ckpt.module_names())
    for k, c in enumerate(classes):
        for name in c.members:                # alike but for the names
            m, f = mods[name], c.first
            assert (m.group, m.format, m.ignored, m.is_linear, m.rotation, m.gptq, m.quantized) == \
                   (f.group, f.format, f.ignored, f.is_linear, f.rotation, f.gptq, f.quantized)
            assert [(s, t.dtype, t.shape) for s, t in m.tensors.items()] == \
                   [(s, t.dtype, t.shape) for s, t in f.tensors.items()]
            assert ckpt.class_indices()[ckpt.module_names().index(name)] == k
    assert [i for found in _static_issues(ckpt) for i in found] == \
           [i for m in mods.values() for i in check_module(ckpt, m)]
    assert _sibling_issues(ckpt) == _one_by_one_siblings(ckpt)
    if ckpt.quant is None or ckpt.gptq is not None or ckpt.marlin is not None:
        return                                # (their counts have more terms than _layout's)
    doc = summarize(ckpt)                     # counted per class x members = summed module by module
    by_role, by_dtype, q_params, other = defaultdict(int), defaultdict(int), 0, 0
    for m in mods.values():
        roles, dtypes, is_q, params, _, others = _layout(m)
        for role, nbytes in roles:
            by_role[role] += nbytes
        for dtype, nbytes in dtypes:
            by_dtype[dtype] += nbytes
        q_params += params if is_q else 0
        other += others
    assert doc["bytes"]["by_role"] == dict(sorted(by_role.items()))
    assert doc["bytes"]["by_dtype"] == dict(sorted(by_dtype.items()))
    assert doc["parameters"] == {"total": q_params + other, "quantized": q_params, "dense": other}
    assert doc["modules_quantized"] == sum(m.quantized for m in mods.values())


def test_one_odd_expert_gets_its_own_finding(tmp_path):
    """An expert whose scales differ in shape from its 3 siblings' is a class of its own: the
    finding names it, and only it, as judging module by module does."""
    from safetensors.torch import load_file, save_file
    src = FIXTURES / "moe" / "kimi-k2"
    out = tmp_path / "kimi-k2"
    shutil.copytree(src, out)
    tensors = load_file(out / "model.safetensors")
    odd = "model.layers.1.mlp.experts.1.gate_proj"
    tensors[f"{odd}.weight_scale"] = tensors[f"{odd}.weight_scale"][:, :1].contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    ckpt = open_checkpoint(out, strict=False)
    alike = [c for c in ckpt.module_classes() if odd in c.members]
    assert len(alike) == 1 and alike[0].members == (odd,)
    report = validate(ckpt)
    assert [i.where.rpartition(".")[0] if i.where.startswith(odd + ".") else i.where for i in report.errors] == [odd]
    assert list(report.issues) == [i for m in ckpt.modules().values() for i in check_module(ckpt, m)]
    assert json.loads(json.dumps(report.to_json()))["modules_checked"] == 12
