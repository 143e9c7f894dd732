"""The rules of a Marlin checkpoint's modules (spec §6, MRL-02..08, and DATA-01 for its scales):
tensor set, dtypes and shapes from the headers, the scheme they imply against the stored
compressed-tensors config, and (deep) the act-order permutation."""
from __future__ import annotations

from typing import Iterator

from .checkpoint import Checkpoint, Module
from .marlin_config import is_expert, legacy_unmet, marlin_dims
from .report import Issue, module_issue
from .scheme import Strategy
from .spec import MARLIN_GROUP_SIZES, MARLIN_PARAMS, MARLIN_TILE

__all__ = ["marlin_issues", "marlin_data_issues"]

_GROUPED = tuple(g for g in MARLIN_GROUP_SIZES if g > 0)      # K / G of a grouped s


def marlin_issues(ckpt: Checkpoint, m: Module) -> Iterator[Issue]:
    """MRL-02..08 for one Marlin module: tensor set, dtypes and shapes, and its scheme."""
    t = m.tensors
    for name in sorted({"B", "s"} - set(t)):
        yield module_issue("MRL-02", m, None, f"{name} is missing (a Marlin module has B and s)")
    extra = set(t) - set(MARLIN_PARAMS) - {"bias"}
    if ("g_idx" in t) != ("perm" in t):
        extra |= {"g_idx" if "g_idx" in t else "perm"}
    for name in sorted(extra):
        yield module_issue("MRL-02", m, name, "unexpected tensor (g_idx and perm come together; nothing else but bias)")
    if {"B", "s"} - set(t) or extra:
        return
    b, sc = t["B"], t["s"]
    lead = tuple(b.shape[:-2])
    k, n, bits, groups = marlin_dims(b.shape, sc.shape)
    if (b.dtype != "I32" or len(b.shape) not in (2, 3) or not n or n % MARLIN_TILE[1] or bits not in (4, 8)
            or b.shape[-1] * 2 != n * bits):
        yield module_issue("MRL-03", m, "B", f"expected I32 [K/16, N*bits/2] with bits 4 or 8 and N % 64 == 0 "
                           f"(N = {n} from s), got {b.dtype} {list(b.shape)}")
        return
    if (sc.dtype not in ("F16", "BF16") or len(sc.shape) != len(b.shape) or tuple(sc.shape[:-2]) != lead
            or not (groups == 1 or (groups and k % groups == 0 and k // groups in _GROUPED))):
        yield module_issue("MRL-04", m, "s", f"expected F16 or BF16 [G, {n}] with G = 1 or K/G in 32, 64, 128 "
                           f"(K = {k}), got {sc.dtype} {list(sc.shape)}")
        return
    if ckpt.marlin.scale_dtype not in (None, sc.dtype):
        yield module_issue("MRL-04", m, "s", f"{sc.dtype}, but quantization_config.marlin.scale_dtype says "
                           f"{ckpt.marlin.scale_dtype}")
    if ckpt.marlin.legacy:
        # bits, symmetry, group size and act-order are MRL-01's (the config); here what the files show
        unmet = legacy_unmet(num_bits=4, symmetric=True, group_size=-1, act_order=False, scale_dtype=sc.dtype,
                             n=n, k=k, expert=is_expert(m.prefix) or bool(lead))
        if unmet:
            yield module_issue("MRL-08", m, None, f"tagged for the legacy Marlin readers, which need {'; '.join(unmet)}")
    want = {"zp": (*lead, groups, n // 8), "g_idx": (*lead, k), "perm": (*lead, k)}
    for name in ("zp", "g_idx", "perm"):
        if name in t and (t[name].dtype != "I32" or tuple(t[name].shape) != want[name]):
            yield module_issue("MRL-05", m, name, f"expected I32 {list(want[name])}, got {t[name].dtype} "
                               f"{list(t[name].shape)}")
            return
    stack = _stack_issue(ckpt, m, n)
    if stack is not None:
        yield stack
        return
    yield from _scheme_issues(m, k, bits, groups)


def _stack_issue(ckpt: Checkpoint, m: Module, n: int) -> Issue | None:
    """MRL-06: a module has a leading expert dim exactly when marlin.stacked_experts lists it
    (P.experts.w13 or .w2), with that many experts and N split into parts of whole tiles."""
    found = ckpt.marlin.stack_entry(m.prefix)
    base = m.prefix.rpartition(".")[0]
    b = m.tensors["B"].shape
    if found is None:
        if len(b) == 3:
            return module_issue("MRL-06", m, "B", f"stacked B {list(b)}, but marlin.stacked_experts lists no "
                                f"{base!r} with a w13 or w2 part here")
        return None
    entry, last = found
    parts = 2 if last == "w13" else 1
    if len(b) != 3 or b[0] != entry["experts"] or n % (MARLIN_TILE[1] * parts):
        return module_issue("MRL-06", m, "B", f"marlin.stacked_experts says {entry['experts']} experts of {parts} "
                            f"part(s) of whole 64-column tiles, but B is {list(b)} with N = {n}")
    other = ckpt.modules().get(f"{base}.{'w2' if last == 'w13' else 'w13'}")
    if other is not None and {"B", "s"} <= set(other.tensors):
        k = marlin_dims(b, m.tensors["s"].shape)[0]
        k_o, n_o, _, _ = marlin_dims(other.tensors["B"].shape, other.tensors["s"].shape)
        if (last == "w13" and (n_o != k or k_o != n // 2)) or (last == "w2" and (k_o != n or n_o != 2 * k)):
            return module_issue("MRL-06", m, "B", f"w13 maps H -> 2I and w2 maps I -> H, but w13 and w2 of {base} "
                                "disagree on H or I (shapes read with the wrong header?)")
    return None


def _scheme_issues(m: Module, k: int, bits: int, groups: int) -> Iterator[Issue]:
    s = m.scheme
    if s is None or m.ignored:
        why = "is matched by ignore" if m.ignored else "is targeted by no group"
        yield module_issue("MRL-06", m, "B", f"stored in the Marlin layout, but {why} in the stored "
                           "compressed-tensors config")
        return
    source_gs = -1 if s.strategy is not Strategy.GROUP or s.group_size >= k else s.group_size
    stored = (bits, k // groups if groups > 1 else -1, "zp" not in m.tensors, "perm" in m.tensors)
    source = (s.num_bits, source_gs, s.symmetric, s.has_g_idx)
    if stored != source:
        words = "bits {}, group size {}, symmetric {}, act-order {}"
        yield module_issue("MRL-06", m, "B", f"shapes say {words.format(*stored)}; the stored config says "
                           f"{words.format(*source)}")


def marlin_data_issues(ckpt: Checkpoint, m: Module) -> list[Issue]:
    """DATA-01 for Marlin scales, MRL-07 for act-order perm and g_idx."""
    import torch
    out = []
    s = ckpt.load(m.tensors["s"].name).float()
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        out.append(module_issue("DATA-01", m, "s", "scales must be finite and > 0"))
    if "perm" in m.tensors:
        perm, g = ckpt.load(m.tensors["perm"].name).long(), ckpt.load(m.tensors["g_idx"].name).long()
        k, groups = perm.shape[-1], m.tensors["s"].shape[-2]
        if not torch.equal(perm.sort(dim=-1).values, torch.arange(k).expand_as(perm)):
            out.append(module_issue("MRL-07", m, "perm", f"not a permutation of 0..{k - 1}"))
        if bool((g[..., 1:] < g[..., :-1]).any()) or int(g.min()) < 0 or int(g.max()) >= groups:
            out.append(module_issue("MRL-07", m, "g_idx", f"not sorted within [0, {groups})"))
    return out
