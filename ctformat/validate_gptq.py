"""The rules of a GPTQ or AWQ checkpoint's modules (spec/gptq-awq.md §7): tensor set, dtypes and
shapes from the headers (GPTQ-02..06, 10, 11; AWQ-02..05), and (deep) the values (GPTQ-07..09,
AWQ-06, DATA-01). The config rules (GPTQ-01, AWQ-01, GPTQ-11 of the block) are the reader's."""
from __future__ import annotations

from typing import Iterator

from .checkpoint import Checkpoint, Module
from .gptq_config import AWQ_METHOD, ModuleScheme, module_scheme
from .gptq_layout import awq_shapes, gptq_shapes, in_features
from .names import moe_renamed
from .report import Issue, module_issue
from .spec import AWQ_PARAMS, GPTQ_PARAMS

__all__ = ["gptq_issues", "gptq_data_issues", "source_scheme"]

_SCALE_DTYPES = ("F16", "BF16", "F32")
_EIGHTS = -0x77777778                # 0x88888888: eight zero points of 8 in one AWQ word


def gptq_issues(ckpt: Checkpoint, m: Module) -> Iterator[Issue]:
    """GPTQ-02..06, 10, 11 / AWQ-02..05 for one quantized module of a GPTQ/AWQ checkpoint."""
    awq = ckpt.gptq.method == AWQ_METHOD
    pre = "AWQ" if awq else "GPTQ"
    ms = m.gptq
    if ms is None:
        yield module_issue(f"{pre}-02", m, m.quant_tensor, "quantized tensors, but the config leaves this module "
                           "dense (" + ("modules_to_not_convert" if awq else "lm_head false or a -: dynamic rule")
                           + ")")
        return
    t = m.tensors
    allowed = set(AWQ_PARAMS if awq else GPTQ_PARAMS) | {"bias"}
    need = set(AWQ_PARAMS) | ({"g_idx"} if ms.desc_act and not awq else set())
    if need - set(t) or set(t) - allowed:
        yield module_issue(f"{pre}-02", m, None, f"has {sorted(t)}; needs {sorted(need)}, allows also bias"
                           + ("" if awq else " and g_idx"))
        return
    k = in_features(t, ms, ckpt.gptq.method)
    q, s = t["qweight"], t["scales"]
    if k is None or len(s.shape) < 2:
        yield module_issue(f"{pre}-03", m, "qweight", f"{q.dtype} {list(q.shape)} gives no in_features for "
                           f"{ms.bits}-bit weights")
        return
    n, lead = s.shape[-1], tuple(s.shape[:-2])
    if awq and (n % 8 or (ms.group_size != -1 and k % ms.group_size)):
        yield module_issue("AWQ-04", m, "scales", f"[{n}, {k}] needs out_features % 8 == 0 and in_features % "
                           f"group_size ({ms.group_size}) == 0")
        return
    want = (awq_shapes if awq else gptq_shapes)(n, k, ms, lead)
    rules = {"qweight": f"{pre}-03", "scales": f"{pre}-04", "qzeros": f"{pre}-05", "g_idx": "GPTQ-06"}
    bad = False
    for name, (code, shape) in want.items():
        got = t.get(name)
        codes = _SCALE_DTYPES if name == "scales" else (code,)
        if got is not None and (got.dtype not in codes or tuple(got.shape) != shape):
            bad = True
            yield module_issue(rules[name], m, name, f"{got.dtype} {list(got.shape)}, expected {'/'.join(codes)} "
                               f"{list(shape)} ({ms.bits}-bit, group size {ms.group_size}, K = {k}, N = {n})")
    if bad:
        return
    if not awq and s.dtype != "F16":
        yield module_issue("GPTQ-10", m, "scales", f"scales are {s.dtype}; GPTQModel and AutoGPTQ hold F16 "
                           "buffers and cast them at load")
    provenance = ckpt.gptq.provenance
    if provenance is not None:
        scheme = source_scheme(ckpt, m)
        src = None if scheme is None else module_scheme(scheme)
        if src is None or not _agrees(src, ms, awq):
            yield module_issue("GPTQ-11", m, None, f"the stored compressed-tensors config gives {src}, the "
                               f"{ckpt.gptq.method} config {ms}")


def source_scheme(ckpt: Checkpoint, m: Module):
    """The CT scheme the provenance block's source config gives a module (by its source name),
    or None when that config leaves it dense."""
    prov = ckpt.gptq.provenance
    name = moe_renamed(m.prefix, prov.names)
    group = prov.source.group_for(name, linear=True)
    return None if group is None or prov.source.is_ignored(name) else group.weights


def _agrees(src: ModuleScheme, ms: ModuleScheme, awq: bool) -> bool:
    # AWQ GEMM always says zero_point true: a symmetric source is stored with every zero 8
    return src == ms or (awq and src.sym and not ms.sym and ModuleScheme(src.bits, src.group_size, False,
                                                                           src.desc_act) == ms)


def gptq_data_issues(ckpt: Checkpoint, m: Module) -> list[Issue]:
    """GPTQ-07..09 / AWQ-06 and DATA-01 from one module's tensor values."""
    import torch
    from .awq import check_awq
    from .gptq import check_gptq
    t = {s: ckpt.load(i.name) for s, i in m.tensors.items() if s != "bias"}
    out = []
    scale = t["scales"].float()
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bad.any():
        out.append(module_issue("DATA-01", m, "scales", f"{int(bad.sum())} of {scale.numel()} scales are not finite "
                                f"and > 0 (first: {scale[bad][0].item()})"))
    if ckpt.gptq.method == AWQ_METHOD:
        found = check_awq(t, m.gptq)
        source = source_scheme(ckpt, m) if ckpt.gptq.provenance is not None else None
        if source is not None and source.symmetric and not m.gptq.sym and not bool((t["qzeros"] == _EIGHTS).all()):
            out.append(module_issue("GPTQ-11", m, "qzeros", "the stored compressed-tensors config is symmetric, "
                                    "but not every stored zero is 8"))
    else:
        found = check_gptq(t, m.gptq, v1=ckpt.gptq.v1, k=in_features(m.tensors, m.gptq, ckpt.gptq.method))
    return out + [module_issue(e.rule, m, e.where, e.message) for e in found]
