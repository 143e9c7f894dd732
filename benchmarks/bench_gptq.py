"""GPTQ/AWQ conversion throughput against a plain copy of the same bytes, in the same run.

    PYTHONPATH=. python benchmarks/bench_gptq.py [--out-features 4096] [--in-features 11008] [--modules 8]

Codec rows: one CT module's tensors -> GPTQ v1 / v2 / AWQ tensors and back, against
torch.clone of the same input tensors. Checkpoint rows: convert_to_gptq / convert_from_gptq
of a synthetic checkpoint folder, against shutil.copytree of the same folder. GB/s counts the
input bytes; the ratio is copy time / conversion time (1.0 = as fast as copying). Timings are
the median of --repeat runs; on a shared machine only the ratios mean anything.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ctformat.awq import from_awq, to_awq
from ctformat.checkpoint import save_checkpoint
from ctformat.gptq import from_gptq, to_gptq
from ctformat.gptq_config import GPTQ_V1, GPTQ_V2, module_scheme
from ctformat.gptq_convert import convert_from_gptq, convert_to_gptq
from ctformat.pack import pack_to_int32
from ctformat.scheme import QuantScheme


def median_time(fn, repeat: int) -> float:
    fn()                                             # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ct_module(n: int, k: int, sym: bool, gen: torch.Generator) -> tuple[dict, QuantScheme]:
    scheme = QuantScheme.from_json({"num_bits": 4, "symmetric": sym, "strategy": "group", "group_size": 128}, where="b")
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    t = {"weight_packed": pack_to_int32(q, 4), "weight_shape": torch.tensor([n, k]),
         "weight_scale": (torch.rand(n, k // 128, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)}
    if not sym:
        zp = torch.randint(-7, 8, (n, k // 128), generator=gen, dtype=torch.int8)
        t["weight_zero_point"] = pack_to_int32(zp, 4, packed_dim=0)
    return t, scheme


def nbytes(t: dict) -> int:
    return sum(v.numel() * v.element_size() for v in t.values())


def row(name: str, size: int, seconds: float, copy: float) -> None:
    print(f"{name:34s} {size / seconds / 1e9:8.2f} GB/s   copy {size / copy / 1e9:8.2f} GB/s   "
          f"ratio {copy / seconds:5.2f}")


def codecs(n: int, k: int, repeat: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for sym in (True, False):
        t, scheme = ct_module(n, k, sym, gen)
        ms, dt = module_scheme(scheme), {"weight_scale": "BF16", "weight_shape": "I64", "weight_zero_point": "I32"}
        size = nbytes(t)
        copy = median_time(lambda: {a: v.clone() for a, v in t.items()}, repeat)
        label = "sym" if sym else "asym"
        for fmt in (GPTQ_V1, GPTQ_V2):
            if fmt == GPTQ_V1 and not sym:
                continue
            row(f"CT -> GPTQ {fmt} ({label})", size, median_time(lambda: to_gptq(t, scheme, fmt=fmt), repeat), copy)
            g = to_gptq(t, scheme, fmt=fmt)
            row(f"GPTQ {fmt} -> CT ({label})", size,
                median_time(lambda: from_gptq(g, ms, scheme, v1=fmt == GPTQ_V1, k=k, dtypes=dt), repeat), copy)
        row(f"CT -> AWQ ({label})", size, median_time(lambda: to_awq(t, scheme), repeat), copy)
        a = to_awq(t, scheme)
        row(f"AWQ -> CT ({label})", size, median_time(lambda: from_awq(a, ms, scheme, dtypes=dt), repeat), copy)


def checkpoints(n: int, k: int, count: int, repeat: int) -> None:
    gen = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tensors = {}
        for i in range(count):
            t, _ = ct_module(n, k, True, gen)
            tensors.update({f"model.layers.{i}.mlp.down_proj.{a}": v for a, v in t.items()})
        qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.20.0", "ignore": [],
              "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group",
                                                                         "group_size": 128}}}}
        src = save_checkpoint(root / "ct", tensors, {"model_type": "llama", "quantization_config": qc})
        size = sum(p.stat().st_size for p in src.iterdir())

        def fresh(name: str) -> Path:
            shutil.rmtree(root / name, ignore_errors=True)
            return root / name
        copy = median_time(lambda: shutil.copytree(src, fresh("copy")), repeat)
        for target, fmt in (("gptq", GPTQ_V1), ("awq", None)):
            row(f"checkpoint CT -> {target}", size,
                median_time(lambda: convert_to_gptq(src, fresh(target), target, fmt=fmt), repeat), copy)
            row(f"checkpoint {target} -> CT", size,
                median_time(lambda: convert_from_gptq(root / target, fresh(f"{target}-ct")), repeat), copy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-features", type=int, default=4096)
    ap.add_argument("--in-features", type=int, default=11008)
    ap.add_argument("--modules", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, module [{a.out_features}, "
          f"{a.in_features}] int4 g128, bf16 scales")
    codecs(a.out_features, a.in_features, a.repeat)
    checkpoints(a.out_features, a.in_features, a.modules, a.repeat)


if __name__ == "__main__":
    main()
