"""Dequantization of the formats besides pack-quantized, side by side in one run: ctformat
(Triton kernel on CUDA through the same dispatch as convert, its torch path), compressed-tensors
0.20's own compressor, and on CUDA a plain device copy of the output (the bandwidth limit).

    python benchmarks/bench_formats.py [--device cpu|cuda] [--reps 7] [--json out.json]

Workload: one weight of [out, in] = [16384, 8192] on CUDA, [4096, 4096] on the CPU, per format:
FP8 channel, FP8 block 128x128, INT8 channel (naive family), MXFP8, NVFP4, MXFP4. Every output is
checked equal, bit for bit, to compressed-tensors' before anything is timed. Medians of `reps`
timings, implementations interleaved round by round (a shared machine drifts; ratios in one run
are what to read).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ctformat  # noqa: E402
from ctformat.scheme import QuantGroup  # noqa: E402

CASES = {
    "fp8-channel": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel"}),
    "fp8-block128": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "block",
                                         "block_structure": [128, 128]}),
    "int8-channel": ("int-quantized", {"num_bits": 8, "type": "int", "strategy": "channel"}),
    "mxfp8": ("mxfp8-quantized", {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32,
                                  "scale_dtype": "torch.uint8"}),
    "nvfp4": ("nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                                       "scale_dtype": "torch.float8_e4m3fn"}),
    "mxfp4": ("mxfp4-pack-quantized", {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32,
                                       "scale_dtype": "torch.uint8"}),
}


def timer(device: str):
    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3
    return timed


def ct_impl(fmt: str, group_json: dict):
    """compressed-tensors' compressor for the format, or None when it is not installed."""
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationScheme
    except ImportError:
        return None
    cs = QuantizationScheme.model_validate(group_json)
    comp = BaseCompressor.get_value_from_registry(fmt)
    names = comp.compression_param_names(cs)
    return lambda t: comp.decompress({k: t[k] for k in names if k in t}, cs)["weight"]


def run_case(name: str, device: str, shape: tuple[int, int], reps: int) -> dict:
    fmt, weights = CASES[name]
    obj = {"targets": ["Linear"], "weights": weights, "format": fmt}
    group = QuantGroup.from_json(name, obj, where=name)
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    t = {k: v.to(device) for k, v in ctformat.compress(w, group).items()}
    ct = ct_impl(fmt, obj)
    impls = {"ctformat": lambda: ctformat.decompress(t, group),
             "ctformat torch": lambda: ctformat.decompress(t, group, kernel="torch")}
    if ct is not None:
        impls["compressed-tensors"] = lambda: ct(t)
    want = impls["compressed-tensors" if ct is not None else "ctformat torch"]()
    for label, fn in impls.items():
        got = fn()
        assert got.dtype == want.dtype and torch.equal(got.view(torch.int16), want.view(torch.int16)), label
    if device == "cuda":
        impls["device copy of the output"] = lambda: want.clone()
    timed = timer(device)
    for fn in impls.values():
        fn()
    times = {k: [] for k in impls}
    for _ in range(reps):
        for label, fn in impls.items():
            times[label].append(timed(fn))
    ms = {k: statistics.median(v) for k, v in times.items()}
    read = sum(v.numel() * v.element_size() for v in t.values())
    moved = read + want.numel() * want.element_size()
    out = {"case": name, "format": fmt, "shape": list(shape), "bytes_moved": moved, "ms": ms,
           "GBps": {k: moved / v / 1e6 for k, v in ms.items()}}
    if ct is not None:
        out["speedup_vs_compressed_tensors"] = {k: ms["compressed-tensors"] / v for k, v in ms.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--json")
    a = ap.parse_args()
    shape = (16384, 8192) if a.device == "cuda" else (4096, 4096)
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    for name in a.cases:
        r = run_case(name, a.device, shape, a.reps)
        rows.append(r)
        ratio = r.get("speedup_vs_compressed_tensors", {})
        print(f"{name:14s} " + "  ".join(f"{k} {v:8.2f} ms" + (f" ({ratio[k]:.2f}x CT)" if k in ratio else "")
                                         for k, v in r["ms"].items()))
    if a.json:
        Path(a.json).write_text(json.dumps({"date": str(date.today()), "device": device_name,
                                            "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
