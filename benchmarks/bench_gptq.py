"""GPTQ/AWQ conversion throughput against a plain copy of the same bytes, side by side in one run.

    PYTHONPATH=. python benchmarks/bench_gptq.py [--out-features 4096] [--in-features 11008]
        [--modules 8] [--repeat 5] [--device cpu|cuda] [--json FILE]

Codec rows: one CT module's tensors (int4, group 128, bf16 scales) -> GPTQ v1 / v2 / AWQ tensors
and back, against torch.clone of the same input tensors (the copy). Checkpoint rows: `convert
--to gptq / --to awq` and `--to compressed-tensors` back, through the whole pipeline (read,
convert, write, publish), against shutil.copytree of the same folder; the "pipeline copy" row is
the same pipeline copying every tensor (the floor a conversion cannot go below). GB/s counts the input
bytes; the ratio is copy time / conversion time (1.0 = as fast as copying). Each timing is the
median of --repeat runs, and the copy is timed between the conversions (interleaved), so a busy
shared machine moves both alike: read the ratios, not the GB/s.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from ctformat.awq import from_awq, to_awq
from ctformat.convert import convert
from ctformat.gptq import from_gptq, to_gptq
from ctformat.gptq_config import GPTQ_V1, GPTQ_V2, module_scheme
from ctformat.pack import pack_to_int32
from ctformat.scheme import QuantScheme
from ctformat.writer import save_checkpoint


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def side_by_side(fn, copy, repeat: int, device: str = "cpu") -> tuple[float, float]:
    """(median seconds of fn, median seconds of copy), each run of fn followed by one of copy."""
    fn(), copy()
    ts, tc = [], []
    for _ in range(repeat):
        for f, out in ((fn, ts), (copy, tc)):
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(ts), statistics.median(tc)


def ct_module(n: int, k: int, sym: bool, gen: torch.Generator, device: str) -> tuple[dict, QuantScheme]:
    scheme = QuantScheme.from_json({"num_bits": 4, "symmetric": sym, "strategy": "group", "group_size": 128}, where="b")
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    t = {"weight_packed": pack_to_int32(q, 4), "weight_shape": torch.tensor([n, k]),
         "weight_scale": (torch.rand(n, k // 128, generator=gen) * 0.01 + 1e-3).to(torch.float16).to(torch.bfloat16)}
    if not sym:
        zp = torch.randint(-7, 8, (n, k // 128), generator=gen, dtype=torch.int8)
        t["weight_zero_point"] = pack_to_int32(zp, 4, packed_dim=0)
    return {a: v.to(device) if a != "weight_shape" else v for a, v in t.items()}, scheme


def nbytes(t: dict) -> int:
    return sum(v.numel() * v.element_size() for v in t.values())


def row(rows: list, name: str, size: int, seconds: float, copy: float) -> None:
    rows.append({"case": name, "gbps": size / seconds / 1e9, "copy_gbps": size / copy / 1e9, "ratio": copy / seconds})
    print(f"{name:36s} {size / seconds / 1e9:8.2f} GB/s   copy {size / copy / 1e9:8.2f} GB/s   ratio {copy / seconds:5.2f}")


def codecs(rows: list, n: int, k: int, repeat: int, device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for sym in (True, False):
        t, scheme = ct_module(n, k, sym, gen, device)
        ms, dt = module_scheme(scheme), {"weight_scale": "BF16", "weight_shape": "I64", "weight_zero_point": "I32"}
        size, label = nbytes(t), "sym" if sym else "asym"

        def copy():
            return {a: v.clone() for a, v in t.items()}
        packed = t["weight_packed"]
        row(rows, f"torch .T.contiguous() ({label})", size,
            *side_by_side(lambda: packed.T.contiguous(), copy, repeat, device))
        for fmt in (GPTQ_V1, GPTQ_V2):
            if fmt == GPTQ_V1 and not sym:
                continue
            row(rows, f"CT -> GPTQ {fmt} ({label})", size,
                *side_by_side(lambda: to_gptq(t, scheme, fmt=fmt), copy, repeat, device))
            g = to_gptq(t, scheme, fmt=fmt)
            row(rows, f"GPTQ {fmt} -> CT ({label})", size, *side_by_side(
                lambda: from_gptq(g, ms, scheme, v1=fmt == GPTQ_V1, k=k, dtypes=dt), copy, repeat, device))
        row(rows, f"CT -> AWQ ({label})", size, *side_by_side(lambda: to_awq(t, scheme), copy, repeat, device))
        a = to_awq(t, scheme)
        row(rows, f"AWQ -> CT ({label})", size,
            *side_by_side(lambda: from_awq(a, ms, scheme, dtypes=dt), copy, repeat, device))


def checkpoints(rows: list, n: int, k: int, count: int, repeat: int, device: str) -> None:
    gen = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tensors = {}
        for i in range(count):
            t, _ = ct_module(n, k, True, gen, "cpu")
            tensors.update({f"model.layers.{i}.mlp.down_proj.{a}": v for a, v in t.items()})
        qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.20.0", "ignore": [],
              "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group",
                                                                         "group_size": 128}}}}
        src = save_checkpoint(root / "ct", tensors, {"model_type": "llama", "quantization_config": qc})
        size = sum(p.stat().st_size for p in src.iterdir())

        def fresh(name: str) -> Path:
            shutil.rmtree(root / name, ignore_errors=True)
            return root / name

        def copy():
            return shutil.copytree(src, fresh("copy"))

        def pipeline_copy():             # ctformat's read -> write machinery with nothing to convert
            from ctformat.pipeline import copy_step, file_order, open_for_convert, run_conversion
            out = fresh("pcopy")
            path, dev, ckpt = open_for_convert(src, out, device)
            run_conversion(ckpt, path, out, [copy_step(ckpt, i.name) for i in file_order(ckpt)], ckpt.config,
                           target="copy", verb="copied", device=dev, params=frozenset(), max_shard_size=5 * 10**9,
                           force=False)
        row(rows, "checkpoint pipeline copy (floor)", size, *side_by_side(pipeline_copy, copy, repeat))
        for target in ("gptq", "awq"):
            row(rows, f"checkpoint CT -> {target}", size, *side_by_side(
                lambda: convert(src, fresh(target), to=target, device=device), copy, repeat))
            row(rows, f"checkpoint {target} -> CT", size, *side_by_side(
                lambda: convert(root / target, fresh(f"{target}-ct"), to="compressed-tensors", device=device),
                copy, repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-features", type=int, default=4096)
    ap.add_argument("--in-features", type=int, default=11008)
    ap.add_argument("--modules", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the rows and the machine to this file")
    a = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    head = (f"{date.today()}, commit {commit}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, device {a.device}, module [{a.out_features}, {a.in_features}] int4 "
            "g128, bf16 scales")
    print(head)
    rows: list = []
    codecs(rows, a.out_features, a.in_features, a.repeat, a.device)
    checkpoints(rows, a.out_features, a.in_features, a.modules, a.repeat, a.device)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": head, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
